"""Conformance suite for token mixers: runs for every entry of ``jaxattn.nn.MIXERS``.

A mixer gets these checks by registering (``jaxattn.nn.register_mixer``), built with only the
required arguments ``make_mixer(name, features=, num_heads=, causal=, rngs=)``:

* output shape and dtype (f32 and bf16), finite values;
* ``jit`` equals eager; ``deterministic=True`` gives the same output twice;
* finite, non-zero gradients for the input and every parameter (random-projection cotangent),
  and ``jax.test_util.check_grads`` on the input;
* a causal mixer never sees the future: perturbing positions ``> t`` leaves outputs ``<= t``
  unchanged (and does change later outputs, so the check can fail);
* batch independence: changing one batch row leaves the others unchanged;
* cross patterns accept a context with ``S != L`` and depend on it;
* aux losses: in training mode exactly the class's ``aux_loss_names`` are sown, as finite f32
  scalars (collected with ``capture_aux_losses``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.test_util import check_grads

from jaxattn.nn import MIXERS, capture_aux_losses, make_mixer

B, L, D, HEADS = 2, 64, 16, 2  # L = 8 x 8: a 2-D mixer reads it as a square grid
S = 24  # context length for cross patterns (S != L)


def cases() -> list[tuple[str, bool]]:
    """``(name, causal)`` for every registered mixer and self pattern it supports."""
    out = []
    for name, spec in sorted(MIXERS.items()):
        for causal, pattern in ((False, "self"), (True, "causal_self")):
            if pattern in spec.patterns:
                out.append((name, causal))
    return out


def cross_cases() -> list[tuple[str, bool]]:
    return [(name, causal) for name, spec in sorted(MIXERS.items())
            for causal, pattern in ((False, "cross"), (True, "causal_cross"))
            if pattern in spec.patterns]


def case_id(case) -> str:
    name, causal = case
    return f"{name}-{'causal' if causal else 'bidir'}"


@functools.cache
def build(name: str, causal: bool, cross: bool = False) -> nnx.Module:
    """One mixer per case, shared by the checks (they never mutate it)."""
    return make_mixer(name, features=D, num_heads=HEADS, causal=causal, cross=cross,
                      rngs=nnx.Rngs(0))


def inputs(seed: int = 0, length: int = L, dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (B, length, D), jnp.float32).astype(dtype)


def run(mixer, x, *, deterministic=True, context=None):
    """The mixer's output (aux losses, if any, captured and dropped)."""
    kw = {} if context is None else {"context": context}
    fwd = lambda m, x: m(x, deterministic=deterministic, rngs=nnx.Rngs(dropout=0), **kw)
    return capture_aux_losses(fwd, mixer, x)[0]


def _close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)


class MixerConformance:
    """Checks for one ``(name, causal)`` case; subclasses are parametrized over :func:`cases`."""

    def test_shape_dtype_and_finite(self, case):
        mixer = build(*case)
        for dtype in (jnp.float32, jnp.bfloat16):
            y = run(mixer, inputs(dtype=dtype))
            assert y.shape == (B, L, D) and y.dtype == dtype, (y.shape, y.dtype)
            assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))

    def test_jit_equals_eager_and_deterministic(self, case):
        mixer, x = build(*case), inputs(1)
        eager = run(mixer, x)
        np.testing.assert_array_equal(np.asarray(eager), np.asarray(run(mixer, x)))
        jitted = nnx.jit(lambda m, x: run(m, x))(mixer, x)
        _close(jitted, eager)

    def test_gradients_finite_and_nonzero(self, case):
        mixer, x = build(*case), inputs(2)
        w = jax.random.normal(jax.random.key(42), (B, L, D))

        def loss(m, x):
            return jnp.sum(run(m, x, deterministic=False) * w)

        g_params, g_x = nnx.grad(loss, argnums=(0, 1))(mixer, x)
        assert bool(jnp.all(jnp.isfinite(g_x))) and float(jnp.max(jnp.abs(g_x))) > 0
        for path, g in nnx.to_flat_state(nnx.state(g_params, nnx.Param)):
            v = g.get_value() if hasattr(g, "get_value") else g.value
            assert bool(jnp.all(jnp.isfinite(v))), path
        leaves = jax.tree.leaves(nnx.state(g_params, nnx.Param))
        assert any(float(jnp.max(jnp.abs(v))) > 0 for v in leaves)

    def test_check_grads_on_input(self, case):
        mixer = build(*case)
        x = inputs(3)
        # f32 central differences with eps 1e-2 on O(1) inputs: truncation and rounding errors
        # are ~1e-3 relative, so 5e-2 still fails a wrong VJP (which is off by O(1)).
        graphdef, state = nnx.split(mixer)  # a fresh module per trace (jax.vjp inside)
        check_grads(lambda x: run(nnx.merge(graphdef, state), x, deterministic=False), (x,),
                    order=1, modes=("rev",), eps=1e-2, atol=5e-2, rtol=5e-2)

    def test_causal_never_sees_the_future(self, case):
        name, causal = case
        if not causal:
            return
        mixer, x, t = build(*case), inputs(4), L // 2
        x2 = x.at[:, t + 1:].set(inputs(5)[:, t + 1:])
        for det in (True, False):
            y, y2 = run(mixer, x, deterministic=det), run(mixer, x2, deterministic=det)
            _close(y[:, : t + 1], y2[:, : t + 1])
            assert not np.allclose(y[:, t + 1:], y2[:, t + 1:]), "the check would not fail"

    def test_batch_rows_are_independent(self, case):
        mixer, x = build(*case), inputs(6)
        x2 = x.at[1].set(inputs(7)[1])
        for det in (True, False):
            _close(run(mixer, x, deterministic=det)[0], run(mixer, x2, deterministic=det)[0])

    def test_aux_losses_are_collected(self, case):
        mixer = build(*case)
        expected = getattr(type(mixer), "aux_loss_names", frozenset())
        call = lambda det: (lambda m, x: m(x, deterministic=det, rngs=nnx.Rngs(dropout=0)))
        _, train = capture_aux_losses(call(False), mixer, inputs(8))
        assert {k.split("/")[-1] for k in train} == set(expected)
        for value in train.values():
            assert value.shape == () and value.dtype == jnp.float32
            assert bool(jnp.isfinite(value))
        _, evaluation = capture_aux_losses(call(True), mixer, inputs(8))
        assert {k.split("/")[-1] for k in evaluation} <= set(expected)


class CrossMixerConformance:
    """Cross patterns: ``context [B, S, D]`` with ``S != L``."""

    def test_context_with_other_length(self, case):
        name, causal = case
        mixer = build(name, causal, cross=True)
        x, c = inputs(9), inputs(10, length=S)
        y = run(mixer, x, context=c)
        assert y.shape == (B, L, D) and bool(jnp.all(jnp.isfinite(y)))
        y2 = run(mixer, x, context=c.at[:, :4].set(0.0))
        assert not np.allclose(y, y2), "output does not depend on the context"
