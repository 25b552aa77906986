"""Shared helpers for attention tests: random inputs and per-dtype tolerances (written once)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import masks
from jaxattn.core import dense

# Absolute tolerances for comparing an implementation with the f32 reference on O(1) inputs.
# f32: tiling reorders sums; errors observed are ~1e-6, 2e-5 leaves headroom for other CPUs.
F32_ATOL = 2e-5
F32_GRAD_ATOL = 1e-4


# On CPU the attention tests' cost is XLA compile time (one program per mask rule and shape), so
# test programs are compiled with LLVM's backend optimisations off and XLA's older elemental
# fusion emitters: measured 0.8 s -> 0.2 s per xla_chunked forward+backward. The HLO (what the
# library builds, after XLA's fusion and simplification passes) is the same; XLA CPU does no
# fast-math reassociation under either setting, so results agree to rounding (the tolerances).
CPU_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0,
                       "xla_llvm_disable_expensive_passes": True,
                       "xla_cpu_use_fusion_emitters": False}


@functools.cache
def _cpu_options_accepted() -> bool:
    """Whether this jaxlib knows every option of :data:`CPU_COMPILE_OPTIONS` (XLA renames or
    drops debug options between releases; an unknown one fails the compile)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILE_OPTIONS)(jnp.zeros(()))
    except Exception:  # noqa: BLE001 - any rejection means: compile with the defaults
        return False
    return True


def jit_for_tests(fun=None, **kw):
    """``jax.jit`` with :data:`CPU_COMPILE_OPTIONS` when running on CPU (and accepted there)."""
    if fun is None:
        return functools.partial(jit_for_tests, **kw)
    if jax.default_backend() == "cpu" and _cpu_options_accepted():
        kw["compiler_options"] = CPU_COMPILE_OPTIONS
    return jax.jit(fun, **kw)


def rand_inputs(seed=0, b=2, t=37, s=53, n=4, k=2, h=16, hv=None, dtype=jnp.float32):
    """Random ``q [b, t, n, h]``, ``k [b, s, k, h]``, ``v [b, s, k, hv]``."""
    r = np.random.default_rng(seed)
    hv = h if hv is None else hv
    q = jnp.asarray(r.normal(size=(b, t, n, h)), dtype)
    key = jnp.asarray(r.normal(size=(b, s, k, h)), dtype)
    v = jnp.asarray(r.normal(size=(b, s, k, hv)), dtype)
    return q, key, v


def max_err(a, b) -> float:
    """Max absolute difference, computed in NumPy (no per-shape XLA compilation per call)."""
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@jit_for_tests(static_argnames=("scale", "logits_soft_cap"))
def _bf16_reference_pair(q, k, v, bias, allowed, sinks, *, scale, logits_soft_cap):
    """(f32 reference, bf16 computation of the reference) for :func:`bf16_budget`; jitted so
    that a budget costs one compilation per shape instead of one per eager op."""
    kw = dict(scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    truth = dense.attention_reference(*f32, bias, allowed, **kw)
    probs, _ = dense.attention_probabilities(q, k, bias, allowed, **kw)
    b, t, n, _ = q.shape
    kh = k.shape[2]
    pg = probs.astype(jnp.bfloat16).reshape(b, kh, n // kh, t, -1)
    low = jnp.einsum("bkgts,bskh->btkgh", pg, v, preferred_element_type=jnp.float32)
    return truth, low.reshape(b, t, n, -1).astype(jnp.bfloat16)


def bf16_budget(q, k, v, **kw) -> float:
    """Error budget for a bf16 implementation (docs/architecture.md, principle 6): twice the
    error that a bf16 computation of the reference (inputs, logits and probabilities rounded to
    bf16) makes against the f32 reference, plus a floor of one bf16 ulp at 1.0.

    ``kw``: ``mask`` (a Mask or boolean array), ``bias``, ``scale``, ``logits_soft_cap``,
    ``sinks`` as for the reference."""
    unknown = set(kw) - {"mask", "bias", "scale", "logits_soft_cap", "sinks"}
    if unknown:
        raise TypeError(f"bf16_budget got unexpected keyword arguments {sorted(unknown)}")
    mask = masks.as_mask(kw.get("mask"))
    allowed = None if mask is None else np.asarray(mask.to_array(q.shape[1], k.shape[1]))
    truth, low = _bf16_reference_pair(
        q, k, v, kw.get("bias"), allowed, kw.get("sinks"), scale=kw.get("scale"),
        logits_soft_cap=kw.get("logits_soft_cap"))
    return 2.0 * max_err(low, truth) + 2.0**-8


def grads(fn, args, argnums):
    """Gradients of a fixed random projection of ``fn(*args)`` (tests every output entry), as
    one jitted program (``fn`` is traced, never run op by op)."""
    out = jax.eval_shape(fn, *args)
    w = np.random.default_rng(42).standard_normal(out.shape).astype(np.float32)

    def loss(*a):
        return jnp.sum(fn(*a).astype(jnp.float32) * w)

    return jit_for_tests(jax.grad(loss, argnums=argnums))(*args)
