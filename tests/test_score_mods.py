"""score_mod (FlexAttention's score function) in dot_product_attention: the tiled path equals the
reference in forward and gradients (score_mod_args included) for every ready-made function in
jaxattn.score_mods, each function equals the explicit bias it stands for, and bad score
functions get clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, F32_GRAD_ATOL

import jaxattn
from jaxattn import masks as M
from jaxattn import score_mods as S
from jaxattn.ops.registry import Implementation

B, T, N, K, H = 2, 36, 4, 2, 16  # T unaligned with the 16 x 16 tiles, GQA 4:2
GRID_W = 6  # relative_2d: the 36 tokens as a 6 x 6 grid
CHUNKED = Implementation("xla_chunked", 16, 16)


def _qkv(dtype=jnp.float32, seed=0):
    r = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(r[0], (B, T, N, H))
    k, v = (jax.random.normal(x, (B, T, K, H)) for x in r[1:])
    return tuple(x.astype(dtype) for x in (q, k, v))


def _t5_bucket_loop(rel, bidirectional, num_buckets, max_distance):
    """T5's relative_position_bucket (Raffel et al. 2020), one integer at a time."""
    n, ret = num_buckets, 0
    if bidirectional:
        n //= 2
        ret += n if rel > 0 else 0
        dist = abs(rel)
    else:
        dist = max(-rel, 0)
    exact = n // 2
    if dist < exact:
        return ret + dist
    val = exact + int(np.log(dist / exact) / np.log(max_distance / exact) * (n - exact))
    return ret + min(val, n - 1)


def _explicit_bias(name, args):
    """The ``[1, N, T, T]`` bias each score function stands for, built with NumPy loops."""
    i, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    if name == "alibi":
        (slopes,) = args
        return -np.asarray(slopes)[:, None, None] * np.abs(i - j)[None]
    if name == "t5":
        (table,) = args
        buckets = np.vectorize(lambda r: _t5_bucket_loop(r, True, 8, 20))(j - i)
        return np.transpose(np.asarray(table)[buckets], (2, 0, 1))
    if name == "relative_2d":
        (table,) = args
        dy = j // GRID_W - i // GRID_W + (T // GRID_W) - 1
        dx = j % GRID_W - i % GRID_W + GRID_W - 1
        return np.transpose(np.asarray(table)[dy, dx], (2, 0, 1))
    raise ValueError(name)


def _mods():
    r = np.random.default_rng(0)
    f32 = lambda *shape: jnp.asarray(r.normal(size=shape), jnp.float32)
    return {
        "alibi": (S.alibi, (jnp.asarray(S.alibi_slopes(N)),)),
        "t5": (S.t5_relative_bias(num_buckets=8, max_distance=20), (f32(8, N),)),
        "relative_2d": (S.relative_2d(GRID_W), (f32(2 * (T // GRID_W) - 1, 2 * GRID_W - 1, N),)),
        "temperature": (S.temperature, (jnp.asarray([0.5, 1.0, 2.0, 4.0], jnp.float32),)),
        "soft_cap": (S.soft_cap(2.0), ()),
    }


MODS = _mods()


@pytest.mark.parametrize("name", ["alibi", "t5", "relative_2d"])
def test_score_functions_equal_their_explicit_bias(name):
    fn, args = MODS[name]
    q, k, v = _qkv()
    bias = jnp.asarray(_explicit_bias(name, args)[None], jnp.float32)
    want = jaxattn.dot_product_attention(q, k, v, bias, is_causal=True, implementation="reference")
    got = jaxattn.dot_product_attention(q, k, v, is_causal=True, score_mod=fn,
                                        score_mod_args=args, implementation="reference")
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_soft_cap_score_function_is_the_soft_cap_argument():
    q, k, v = _qkv()
    want = jaxattn.dot_product_attention(q, k, v, logits_soft_cap=2.0, implementation="reference")
    got = jaxattn.dot_product_attention(q, k, v, score_mod=S.soft_cap(2.0),
                                        implementation="reference")
    np.testing.assert_array_equal(got, want)
    assert S.soft_cap(2.0) is S.soft_cap(2.0)  # factories return one function per setting


@pytest.mark.parametrize("name", list(MODS))
def test_tiled_path_matches_reference_with_gradients(name):
    """xla_chunked applies score_mod per tile in its forward and custom backward; the arguments
    (slopes, tables, temperatures) get the reference's gradients."""
    fn, args = MODS[name]
    q, k, v = _qkv()
    mask = M.LocalMask((20, 0)) & M.CausalMask()
    w = jax.random.normal(jax.random.key(4), q.shape)

    def value_and_grads(impl):
        def loss(q, k, v, args):
            out = jaxattn.dot_product_attention(q, k, v, mask=mask, score_mod=fn,
                                                score_mod_args=args, implementation=impl)
            return jnp.sum(out * w), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
            q, k, v, args)

    (_, out), g = value_and_grads(CHUNKED)
    (_, out_r), g_r = value_and_grads("reference")
    np.testing.assert_allclose(out, out_r, atol=F32_ATOL, rtol=0)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r), strict=True):
        scale = max(1.0, float(jnp.abs(b).max()))  # table / slope grads sum over T*S entries
        np.testing.assert_allclose(a, b, atol=F32_GRAD_ATOL * scale, rtol=0)


def test_bf16_and_cross_attention_lengths():
    fn, args = MODS["alibi"]
    q, k, v = _qkv(jnp.bfloat16)
    k, v = k[:, :20], v[:, :20]  # T = 36 queries, S = 20 keys
    call = functools.partial(jaxattn.dot_product_attention, q, k, v, score_mod=fn,
                             score_mod_args=args)
    got, ref = call(implementation=CHUNKED), call(implementation="reference")
    assert got.dtype == jnp.bfloat16 and got.shape == (B, T, N, H)
    np.testing.assert_allclose(got.astype(jnp.float32), ref.astype(jnp.float32), atol=2e-2)


def test_bad_score_functions_get_clear_errors():
    q, k, v = _qkv()
    call = functools.partial(jaxattn.dot_product_attention, q, k, v, implementation="reference")
    with pytest.raises(TypeError, match="score_mod must be callable"):
        call(score_mod=3)
    with pytest.raises(TypeError, match=r"score_mod_args\[0\] must be an array"):
        call(score_mod=S.alibi, score_mod_args=("slopes",))
    with pytest.raises(ValueError, match="without a score_mod"):
        call(score_mod_args=(jnp.ones(4),))
    with pytest.raises(TypeError, match="floating scores"):
        call(score_mod=lambda s, b, h, q, k: q > k)
    with pytest.raises(ValueError, match="keep the scores' shape"):
        call(score_mod=lambda s, b, h, q, k: jnp.zeros((3, 3)))
    # every CPU backend runs a score_mod now (pallas in the interpreter): explain() says so
    reasons = jaxattn.explain(q, k, v, score_mod=S.alibi,
                              score_mod_args=(jnp.ones(N),))
    assert "usable" in reasons.verdicts["pallas"] or "interpreter" in reasons.verdicts["pallas"]
