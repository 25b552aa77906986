"""Shared helpers for attention tests: random inputs and per-dtype tolerances (written once)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.core import dense

# Absolute tolerances for comparing an implementation with the f32 reference on O(1) inputs.
# f32: tiling reorders sums; errors observed are ~1e-6, 2e-5 leaves headroom for other CPUs.
F32_ATOL = 2e-5
F32_GRAD_ATOL = 1e-4


def rand_inputs(seed=0, b=2, t=37, s=53, n=4, k=2, h=16, hv=None, dtype=jnp.float32):
    """Random ``q [b, t, n, h]``, ``k [b, s, k, h]``, ``v [b, s, k, hv]``."""
    r = np.random.default_rng(seed)
    hv = h if hv is None else hv
    q = jnp.asarray(r.normal(size=(b, t, n, h)), dtype)
    key = jnp.asarray(r.normal(size=(b, s, k, h)), dtype)
    v = jnp.asarray(r.normal(size=(b, s, k, hv)), dtype)
    return q, key, v


def max_err(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def bf16_budget(q, k, v, **kw) -> float:
    """Error budget for a bf16 implementation (ARCHITECTURE principle 7): twice the error that a
    bf16 computation of the reference (inputs, logits and probabilities rounded to bf16) makes
    against the f32 reference, plus a floor of one bf16 ulp at 1.0."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    truth = dense.attention_reference(*f32, **kw)
    probs, _ = dense.attention_probabilities(
        q, k, kw.get("bias"), kw.get("mask"), scale=kw.get("scale"),
        logits_soft_cap=kw.get("logits_soft_cap"), sinks=kw.get("sinks"),
    )
    b, t, n, _ = q.shape
    kh = k.shape[2]
    pg = probs.astype(jnp.bfloat16).reshape(b, kh, n // kh, t, -1)
    low = jnp.einsum("bkgts,bskh->btkgh", pg, v, preferred_element_type=jnp.float32)
    low = low.reshape(b, t, n, -1).astype(jnp.bfloat16)
    return 2.0 * max_err(low, truth) + 2.0**-8


def grads(fn, args, argnums):
    """Gradients of a fixed random projection of ``fn(*args)`` (tests every output entry)."""
    out = fn(*args)
    w = jax.random.normal(jax.random.key(42), out.shape, jnp.float32)

    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32) * w)

    return jax.grad(loss, argnums=argnums)(*args)
