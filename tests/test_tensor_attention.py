"""Tensor (trilinear) attention: every implementation against the pair-enumerating reference,
the plain-attention limit, the polynomial method's error and refusals, and bad input."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
import jaxattn.nn
from jaxattn.core import tensor as tensor_lib
from jaxattn.core.tensor_chunked import tensor_attention_chunked
from tests.attention_testing import F32_ATOL, F32_GRAD_ATOL, jit_for_tests, max_err


def inputs(seed=0, b=2, t=11, s=None, n=4, k=2, h=8, hv=6, amp=1.0, dtype=jnp.float32):
    """``q [b, t, n, h]``, ``k1, k2 [b, s, k, h]``, ``v1, v2 [b, s, k, hv]``."""
    r = np.random.default_rng(seed)
    s = t if s is None else s
    shapes = [(b, t, n, h), (b, s, k, h), (b, s, k, h), (b, s, k, hv), (b, s, k, hv)]
    return tuple(jnp.asarray(amp * r.normal(size=sh), dtype) for sh in shapes)


def literal(q, k1, k2, v1, v2, *, causal, scale=None):
    """The paper's sum written as loops over pairs, in float64 NumPy (heads without GQA)."""
    q, k1, k2, v1, v2 = (np.asarray(x, np.float64) for x in (q, k1, k2, v1, v2))
    b, t, n, h = q.shape
    s, kh = k1.shape[1], k1.shape[2]
    scale = 1.0 / h if scale is None else scale
    out = np.zeros((b, t, n, v1.shape[-1]))
    for bi, i, ni in itertools.product(range(b), range(t), range(n)):
        kv = ni // (n // kh)
        pairs = [(a, c) for a in range(s) for c in range(s)
                 if not causal or (a <= i and c <= i)]
        logits = np.array([scale * np.sum(q[bi, i, ni] * k1[bi, a, kv] * k2[bi, c, kv])
                           for a, c in pairs])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out[bi, i, ni] = sum(wi * v1[bi, a, kv] * v2[bi, c, kv]
                             for wi, (a, c) in zip(w, pairs, strict=True))
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_reference_is_the_papers_sum(causal):
    args = inputs(b=1, t=5, n=2, k=1, h=3, hv=2)
    want = literal(*args, causal=causal)
    got = tensor_lib.tensor_attention_reference(*args, is_causal=causal)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# One jitted program per (implementation, causal, tiles); shapes fixed per family.
@jit_for_tests(static_argnames=("impl", "causal", "return_lse"))
def _run(q, k1, k2, v1, v2, *, impl, causal, return_lse=False):
    return jaxattn.tensor_attention(q, k1, k2, v1, v2, is_causal=causal, implementation=impl,
                                    return_lse=return_lse)


def _grads(impl, causal, args):
    out_shape = args[0].shape[:3] + args[3].shape[-1:]
    w = np.random.default_rng(1).standard_normal(out_shape).astype(np.float32)

    def loss(*a):
        o, lse = jaxattn.tensor_attention(*a, is_causal=causal, implementation=impl,
                                          return_lse=True)
        # the LSE output is differentiable too: include it with a small weight
        return jnp.sum(o.astype(jnp.float32) * w) + 0.1 * jnp.sum(lse)

    return jit_for_tests(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(*args)


EXACT = [jaxattn.Implementation("xla_chunked", 4, 3), "xla_chunked"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("impl", EXACT, ids=["chunked_4x3", "chunked_default"])
def test_exact_paths_equal_the_reference_with_gradients(impl, causal):
    """Odd T (11: tiles do not divide it), GQA (4 query heads on 2 kv heads), Hv != H."""
    args = inputs(t=11)
    ref, ref_lse = _run(*args, impl="reference", causal=causal, return_lse=True)
    got, lse = _run(*args, impl=impl, causal=causal, return_lse=True)
    assert got.shape == (2, 11, 4, 6) and got.dtype == jnp.float32
    assert max_err(got, ref) < F32_ATOL and max_err(lse, ref_lse) < F32_ATOL
    for g_ref, g in zip(_grads("reference", causal, args), _grads(impl, causal, args),
                        strict=True):
        assert max_err(g, g_ref) < F32_GRAD_ATOL


def test_chunked_cross_attention_other_key_length_and_bf16():
    args = inputs(t=7, s=10)
    ref_fn = jit_for_tests(tensor_lib.tensor_attention_reference)
    chunked = jit_for_tests(lambda *a: tensor_attention_chunked(*a, block_q=4, block_kv=4))
    ref = ref_fn(*args)
    assert max_err(chunked(*args), ref) < F32_ATOL
    low = tuple(x.astype(jnp.bfloat16) for x in args)
    got16 = chunked(*low)
    ref16 = ref_fn(*low)  # f32 math on the same bf16 inputs
    assert got16.dtype == jnp.bfloat16
    # both round one f32 result to bf16: at most one ulp of the output's magnitude apart
    ulp = 2.0**-7 * float(np.abs(np.asarray(ref16, np.float32)).max())
    assert max_err(got16, ref16) <= ulp


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_constant_second_key_and_value_is_plain_attention(causal):
    """``k2 = 1``, ``v2 = 1``: the logits no longer depend on ``j2``, so the softmax over pairs
    is the softmax over ``j1`` and tensor attention is ``dot_product_attention(q, k1, v1)``."""
    q, k1, _, v1, _ = inputs(t=9)
    ones_k, ones_v = jnp.ones_like(k1), jnp.ones_like(v1)
    plain = jaxattn.dot_product_attention(q, k1, v1, scale=1 / 8, is_causal=causal,
                                          implementation="reference")
    for impl in ("reference", "xla_chunked"):  # the default scale 1 / H = 1 / 8
        got = _run(q, k1, ones_k, v1, ones_v, impl=impl, causal=causal)
        assert max_err(got, plain) < F32_ATOL


def test_causal_output_ignores_the_future():
    q, k1, k2, v1, v2 = inputs(t=9)
    base = jaxattn.tensor_attention(q, k1, k2, v1, v2, is_causal=True)
    later = [x.at[:, 6:].set(5.0) for x in (k1, k2, v1, v2)]
    moved = jaxattn.tensor_attention(q.at[:, 6:].set(5.0), *later, is_causal=True)
    assert max_err(moved[:, :6], base[:, :6]) == 0.0
    assert max_err(moved[:, 6:], base[:, 6:]) > 1e-3


def test_chunked_memory_is_linear_in_length():
    """At T = S = 256 the reference's pair logits alone are 256^3 f32 = 64 MiB per head; the
    chunked program's temporaries stay within a few tiles."""
    args = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs(b=1, t=256, n=1, k=1))
    compiled = jax.jit(lambda *a: tensor_attention_chunked(*a, block_q=16, block_kv=32)).lower(
        *args).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    assert stats.temp_size_in_bytes < 4 * 2**20, stats.temp_size_in_bytes


# ---- the polynomial method -----------------------------------------------------------------


def test_monomials_and_taylor_coefficients_reproduce_the_polynomial():
    index, alpha = tensor_lib.monomial_exponents(3, 4)
    assert len(index) == tensor_lib.polynomial_rank(3, 4) == 35
    assert (alpha.sum(1) <= 4).all() and len({tuple(a) for a in alpha}) == 35
    r = np.random.default_rng(0)
    q, k1, k2 = (r.normal(size=3) * 0.7 for _ in range(3))
    scale = 0.4
    coef = tensor_lib._taylor_coefficients(3, 4, scale)
    approx = float(jnp.sum(tensor_lib.monomial_features(jnp.asarray(q, jnp.float32), 4, coef)
                           * tensor_lib.monomial_features(jnp.asarray(k1, jnp.float32), 4)
                           * tensor_lib.monomial_features(jnp.asarray(k2, jnp.float32), 4)))
    x = scale * float(np.sum(q * k1 * k2))
    taylor = sum(x**j / np.prod(np.arange(1, j + 1)) for j in range(5))
    assert abs(approx - taylor) < 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_polynomial_error_shrinks_with_the_degree(causal):
    args = inputs(t=13, h=4, hv=4, amp=0.8)
    exact = tensor_lib.tensor_attention_reference(*args, is_causal=causal)
    poly = jit_for_tests(tensor_lib.tensor_attention_polynomial,
                         static_argnames=("degree", "is_causal"))
    errors = [max_err(poly(*args, degree=g, is_causal=causal), exact) for g in (1, 2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 1e-3 < errors[0], errors


def test_polynomial_dispatch_checks_its_error_bound():
    small = inputs(t=9, h=4, hv=4, amp=0.25)
    exact = jaxattn.tensor_attention(*small)
    bound = float(max(np.abs(np.asarray(x)).max() for x in small[:3]))
    g = tensor_lib.min_polynomial_degree(bound, 4)
    got = jaxattn.tensor_attention(*small, polynomial_degree=g, implementation="polynomial")
    eps = tensor_lib.polynomial_error_bound(bound, 4, g)
    assert eps < 1.0
    # the guarantee: every weight within relative eps, so the output within ~2 eps max|v1 v2|
    vmax = float(np.abs(np.asarray(small[3])).max() * np.abs(np.asarray(small[4])).max())
    assert max_err(got, exact) <= 2 * eps / (1 - eps) * vmax
    with pytest.raises(ValueError, match=r"error bound .* >= 1 .* degree >= \d+ would hold"):
        jaxattn.tensor_attention(*small, polynomial_degree=g - 1, implementation="polynomial")
    big = tuple(4 * x for x in small)
    with pytest.raises(ValueError, match="no degree <= 64 would hold"):
        jaxattn.tensor_attention(*big, polynomial_degree=8, implementation="polynomial")
    with pytest.raises(ValueError, match="needs polynomial_degree"):
        jaxattn.tensor_attention(*small, implementation="polynomial")
    with pytest.raises(ValueError, match="apply only to implementation='polynomial'"):
        jaxattn.tensor_attention(*small, polynomial_degree=3)
    assert "approximate" in str(jaxattn.explain_tensor_attention(*small, polynomial_degree=g))


def test_polynomial_under_jit_needs_and_enforces_a_declared_bound():
    small = inputs(t=9, h=4, hv=4, amp=0.25)
    with pytest.raises(ValueError, match="pass entry_bound"):
        jax.jit(lambda *a: jaxattn.tensor_attention(*a, polynomial_degree=6,
                                                    implementation="polynomial"))(*small)
    run = jax.jit(lambda *a: jaxattn.tensor_attention(
        *a, polynomial_degree=6, entry_bound=1.0, implementation="polynomial"))
    eager = jaxattn.tensor_attention(*small, polynomial_degree=6, implementation="polynomial")
    assert max_err(run(*small), eager) < 1e-6
    broken = (small[0] * 8,) + small[1:]
    assert np.isnan(np.asarray(run(*broken))).all()  # a broken promise is loud, not wrong
    with pytest.raises(ValueError, match="exceed entry_bound"):
        jaxattn.tensor_attention(*broken, polynomial_degree=6, entry_bound=1.0,
                                 implementation="polynomial")


# ---- bad input ----------------------------------------------------------------------------


def test_bad_input_names_the_argument_and_shapes():
    q, k1, k2, v1, v2 = inputs(t=6)
    with pytest.raises(ValueError, match=r"key1 and key2 must have one shape .*\(2, 5, 2, 8\)"):
        jaxattn.tensor_attention(q, k1, k2[:, :5], v1, v2)
    with pytest.raises(ValueError, match="value1 and value2 must have one shape"):
        jaxattn.tensor_attention(q, k1, k2, v1, v2[..., :3])
    with pytest.raises(ValueError, match="query head_dim 8 != key head_dim 4"):
        jaxattn.tensor_attention(q, k1[..., :4], k2[..., :4], v1, v2)
    with pytest.raises(ValueError, match="multiple of key/value heads K=3"):
        jaxattn.tensor_attention(q, *(jnp.concatenate([x, x[:, :, :1]], 2)
                                      for x in (k1, k2, v1, v2)))
    with pytest.raises(ValueError, match="is_causal=True needs as many queries as keys"):
        jaxattn.tensor_attention(q[:, :4], k1, k2, v1, v2, is_causal=True)
    with pytest.raises(TypeError, match="must share a dtype"):
        jaxattn.tensor_attention(q.astype(jnp.bfloat16), k1, k2, v1, v2)
    with pytest.raises(ValueError, match="rank 4"):
        jaxattn.tensor_attention(q[0], k1, k2, v1, v2)
    with pytest.raises(ValueError, match="polynomial_degree must be an int"):
        jaxattn.tensor_attention(q, k1, k2, v1, v2, polynomial_degree=2.5,
                                 implementation="polynomial")
    with pytest.raises(ValueError, match="unknown implementation 'pallas'"):
        jaxattn.tensor_attention(q, k1, k2, v1, v2, implementation="pallas")


def test_mixer_projects_five_ways_and_calls_the_primitive():
    from flax import nnx

    layer = jaxattn.nn.make_mixer("tensor_attention", features=12, num_heads=3, causal=True,
                                  implementation="reference", rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 12)), jnp.float32)
    q = layer.project("query", x)
    k1, k2, v1, v2 = (layer.project(n, x) for n in ("key1", "key2", "value1", "value2"))
    heads = tensor_lib.tensor_attention_reference(q, k1, k2, v1, v2, is_causal=True)
    want = jnp.einsum("blnh,nhd->bld", heads, layer.out_kernel[...])
    assert max_err(layer(x), want) < F32_ATOL
    assert q.shape == (2, 7, 3, 4)
