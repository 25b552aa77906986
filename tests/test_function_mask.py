"""FunctionMask (FlexAttention's mask_mod): the same rule as the built-in masks gives the same
dense mask, the same block metadata and bit-identical attention in every backend (gradients
included); it composes, works under jit, and bad functions get clear errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxattn
from jaxattn import masks as M
from jaxattn.ops.registry import Implementation

DOC_IDS = np.array([[0] * 9 + [1] * 14 + [2] * 10, [0] * 20 + [1] * 13])  # [B=2, 33]


def _causal(b, h, q, k):
    return k <= q


def _window_sinks(b, h, q, k):
    return (k <= q) & ((q - k <= 5) | (k < 3))


def _per_head_window(b, h, q, k):  # head 0: causal, head 1: 3 keys of history
    return (k <= q) & ((h == 0) | (q - k <= 3))


def _documents(b, h, q, k):  # closes over a concrete NumPy array (static structure)
    ids = jnp.asarray(DOC_IDS) if isinstance(q, jax.Array) else DOC_IDS
    last = DOC_IDS.shape[1] - 1  # tiles past the end evaluate padded positions
    return ids[b, q.clip(0, last)] == ids[b, k.clip(0, last)]


PAIRS = {  # FunctionMask -> the built-in mask with the same rule
    "causal": (M.FunctionMask(_causal), M.CausalMask()),
    "window_sinks": (M.FunctionMask(_window_sinks),
                     (M.LocalMask((5, 0)) | M.SinkMask(3)) & M.CausalMask()),
    "per_head": (M.FunctionMask(_per_head_window, heads=2),
                 M.MultiHeadMask((M.CausalMask(), M.LocalMask((3, 0)) & M.CausalMask()))),
    "documents": (M.FunctionMask(_documents, batch=2), M.SegmentMask(DOC_IDS)),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_same_dense_mask_and_block_metadata_as_the_builtin(name):
    fmask, builtin = PAIRS[name]
    t = s = DOC_IDS.shape[1]  # 33: unaligned with every tile size below
    np.testing.assert_array_equal(
        np.broadcast_to(fmask.to_array(t, s), (2, 2, t, s)),
        np.broadcast_to(builtin.to_array(t, s), (2, 2, t, s)))
    for bq, bk in ((8, 8), (16, 4)):
        got, want = fmask.block_info(t, s, bq, bk), builtin.block_info(t, s, bq, bk)
        kind_shape = np.broadcast_shapes(got.kind.shape, want.kind.shape)
        np.testing.assert_array_equal(np.broadcast_to(got.kind, kind_shape),
                                      np.broadcast_to(want.kind, kind_shape))
        assert got.num_empty > 0  # the structure is seen: tiles are skipped


def _qkv(t=33, n=2, seed=0):
    r = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(x, (2, t, n, 16)) for x in r)


@pytest.mark.parametrize("impl", ["reference", "xla_chunked", "pallas"])
@pytest.mark.parametrize("name", ["window_sinks", "per_head", "documents"])
def test_every_backend_matches_the_builtin_mask_exactly(impl, name):
    fmask, builtin = PAIRS[name]
    q, k, v = _qkv()
    tiles = {"reference": impl, "xla_chunked": Implementation(impl, 16, 16),
             "pallas": Implementation(impl, 16, 16)}
    kw = dict(implementation=tiles[impl])
    got = jaxattn.dot_product_attention(q, k, v, mask=fmask, **kw)
    want = jaxattn.dot_product_attention(q, k, v, mask=builtin, **kw)
    np.testing.assert_array_equal(got, want)
    ref = jaxattn.dot_product_attention(q, k, v, mask=builtin, implementation="reference")
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0)


def test_gradients_and_jit_match_the_builtin():
    fmask, builtin = PAIRS["window_sinks"]
    q, k, v = _qkv()

    def loss(mask, q, k, v):
        out = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation="xla_chunked")
        return jnp.sum(jnp.sin(out))

    g_f = jax.jit(jax.grad(functools.partial(loss, fmask), argnums=(0, 1, 2)))(q, k, v)
    g_b = jax.grad(functools.partial(loss, builtin), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_f, g_b, strict=True):
        np.testing.assert_array_equal(a, b)

    @jax.jit
    def built_inside(q, k, v):  # a FunctionMask made under jit (its fn is static)
        return jaxattn.dot_product_attention(q, k, v, mask=M.FunctionMask(_window_sinks))

    np.testing.assert_array_equal(
        built_inside(q, k, v), jaxattn.dot_product_attention(q, k, v, mask=builtin))


def test_composes_with_builtin_masks_and_is_a_pytree():
    causal = M.FunctionMask(_causal)
    t = 12
    got = (causal & M.LocalMask((2, 0))) | M.SinkMask(2)
    want = (M.CausalMask() & M.LocalMask((2, 0))) | M.SinkMask(2)
    np.testing.assert_array_equal(got.to_array(t, t), want.to_array(t, t))
    np.testing.assert_array_equal((~causal).to_array(t, t), ~M.CausalMask().to_array(t, t))
    assert causal == M.FunctionMask(_causal) and hash(causal) == hash(M.FunctionMask(_causal))
    assert causal != M.FunctionMask(_window_sinks)
    assert jax.tree_util.tree_leaves(causal) == []  # the function is static, no leaves


def test_bad_functions_get_clear_errors():
    with pytest.raises(TypeError, match="callable"):
        M.FunctionMask(3)
    with pytest.raises(ValueError, match="heads must be a positive int"):
        M.FunctionMask(_causal, heads=0)
    with pytest.raises(TypeError, match="must return booleans, got dtype int"):
        M.FunctionMask(lambda b, h, q, k: q - k).to_array(4, 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        M.FunctionMask(lambda b, h, q, k: np.ones((3, 3), bool)).to_array(4, 4)

    @jax.jit
    def closes_over_a_tracer(x):
        mask = M.FunctionMask(lambda b, h, q, k: k <= q + x)
        return jaxattn.dot_product_attention(*_qkv(t=8), mask=mask)

    with pytest.raises(ValueError, match="traced"):
        closes_over_a_tracer(jnp.int32(0))
