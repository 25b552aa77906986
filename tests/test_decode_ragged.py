"""Decoding with ragged batches: per-sequence cache indices, padded prefill, token masks, and
``jaxattn.decode_attention``'s tile loop bounded by the live cache length (issue 13, item 3)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, bf16_budget, jit_for_tests, max_err, rand_inputs
from flax import nnx

import jaxattn
from jaxattn import masks as M
from jaxattn.core.chunked import plan_tiles
from jaxattn.nn import MultiHeadAttention
from jaxattn.ops.decode import decode_attention_with_stats

# ---- the op: jaxattn.decode_attention against the reference -----------------------------------

B, T, N, K, H, S = 3, 2, 4, 2, 8, 37  # S not a multiple of the tile: the last tile is shifted
OFFSETS = np.array([3, 20, 35], np.int32)  # each sequence at its own cache index; 35 + 2 = S


@functools.partial(jit_for_tests, static_argnames=("block_kv",))
def _decode_op(q, k, v, offsets, kv_lengths, sinks, *, block_kv):
    return decode_attention_with_stats(q, k, v, mask=M.CausalMask(offset=offsets), sinks=sinks,
                                       logits_soft_cap=5.0, key_value_seq_lengths=kv_lengths,
                                       block_kv=block_kv)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_equals_the_reference(dtype):
    """Per-sequence causal offsets, GQA, sinks, soft-cap, a partial last tile; three tile sizes
    (tiles straddling the live bound and the shifted last tile included)."""
    q, k, v = rand_inputs(seed=1, b=B, t=T, s=S, n=N, k=K, h=H, dtype=dtype)
    sinks = jnp.linspace(-1.0, 1.0, N)
    mask = M.CausalMask(offset=OFFSETS)
    kw = dict(mask=mask, sinks=sinks, logits_soft_cap=5.0)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    truth = jaxattn.dot_product_attention(*f32, implementation="reference", **kw)
    budget = F32_ATOL if dtype == jnp.float32 else bf16_budget(q, k, v, **kw)
    for block in (4, 16, 64):
        res = _decode_op(q, k, v, jnp.asarray(OFFSETS), jnp.asarray(OFFSETS + T), sinks,
                         block_kv=block)
        assert res.out.dtype == dtype
        assert max_err(res.out, truth) < budget, block
        assert int(res.tiles_visited) == -(-(int(OFFSETS.max()) + T) // min(block, S))


def test_decode_attention_fully_masked_rows_are_zero_and_checks_arguments():
    q, k, v = rand_inputs(seed=2, b=2, t=1, s=12, n=2, k=1, h=4)
    lengths = jnp.array([0, 5], jnp.int32)  # sequence 0 has no live key
    out, lse = jaxattn.decode_attention(q, k, v, key_value_seq_lengths=lengths, return_lse=True,
                                        block_kv=4)
    ref = jaxattn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                        implementation="reference")
    assert float(jnp.max(jnp.abs(out[0]))) == 0.0 and bool(jnp.all(lse[0] == -jnp.inf))
    assert not bool(jnp.any(jnp.isnan(out))) and max_err(out, ref) < F32_ATOL
    with pytest.raises(ValueError, match=r"key_value_seq_lengths must be an int array of shape"):
        jaxattn.decode_attention(q, k, v, key_value_seq_lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="block_kv must be a positive int"):
        jaxattn.decode_attention(q, k, v, block_kv=0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        jaxattn.decode_attention(q[:1], k, v)


# ---- the tile bound -----------------------------------------------------------------------------

S_LONG, TILE = 4096, 256


@jit_for_tests
def _tiles_at(q, k, v, index):
    """One decode step at a traced cache ``index [B]`` of a 4096-long cache."""
    res = decode_attention_with_stats(q, k, v, mask=M.CausalMask(offset=index),
                                      key_value_seq_lengths=index + 1, block_kv=TILE)
    return res.tiles_visited


def test_tiles_visited_are_bounded_by_the_largest_live_index():
    """Under jit, a step at cache index 256 of S = 4096 reads ceil(257 / 256) = 2 tiles, not
    S / tile = 16 (what the full-cache xla_chunked call plans); the largest index of the batch
    sets the bound."""
    q, k, v = rand_inputs(seed=3, b=2, t=1, s=S_LONG, n=1, k=1, h=8)
    for index in ([256, 3], [3, 256], [0, 0], [4095, 10], [511, 512]):
        want = -(-(max(index) + 1) // TILE)
        assert int(_tiles_at(q, k, v, jnp.array(index, jnp.int32))) == want, index
    planned = []

    def full_cache_plan(index):  # what dot_product_attention's xla_chunked plans for the step
        planned.append(plan_tiles(M.CausalMask(offset=index), 1, S_LONG, 1, TILE).num_visited)
        return index

    jax.eval_shape(full_cache_plan, jnp.array([256, 3], jnp.int32))
    assert planned == [S_LONG // TILE]


# ---- the layer: ragged prefill and decode equal each sequence alone -----------------------------

LENGTHS = np.array([5, 2, 7], np.int32)  # prompt lengths of the three sequences
BLOCK, STEPS, CACHE = 7, 3, 16


def _layer(dtype, **kw):
    m = MultiHeadAttention(4, 16, num_kv_heads=2, rope_theta=10_000.0, is_causal=True,
                           use_sinks=True, logits_soft_cap=20.0, dtype=dtype, rngs=nnx.Rngs(0),
                           **kw)
    m.sinks[...] = jnp.linspace(-1.0, 1.0, 4)
    return m


@nnx.jit
def _step(m, x, lengths, token_mask):
    return m(x, decode=True, lengths=lengths, token_mask=token_mask)


def _tokens(dtype):
    """Each sequence's own tokens ``[B, max_len + STEPS, 16]`` (rows past its length unused)."""
    return jax.random.normal(jax.random.key(7), (3, BLOCK + STEPS, 16)).astype(dtype)


def _alone(m, x, b, length):
    """The full causal forward of sequence ``b``'s first ``length`` tokens, alone."""
    return m(x[b:b + 1, :length])[0]


def _errors_against_alone(m, outs_per_seq, x, dtype):
    """Max error of each sequence's decoded outputs against its own full forward (in
    ``dtype``) and the bf16 budget (twice the bf16 full forward's error against f32)."""
    errs, budgets = [], []
    for b, outs in enumerate(outs_per_seq):
        got = jnp.concatenate(outs, axis=0)
        errs.append(max_err(got, _alone(m, x, b, got.shape[0])))
        if dtype == jnp.bfloat16:
            m32 = nnx.clone(m)
            m32.dtype = jnp.float32
            f32_alone = _alone(m32, x.astype(jnp.float32), b, got.shape[0])
            budgets.append(2 * max_err(_alone(m, x, b, got.shape[0]), f32_alone) + 2.0**-8)
        else:
            budgets.append(F32_ATOL)
    return errs, budgets


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ragged_prefill_and_decode_equal_each_sequence_alone(dtype):
    """Right-padded prompts of lengths 5, 2, 7 in one [3, 7] block (padding random), then three
    one-token steps: each sequence sits at its own cache index, its RoPE positions are its own,
    and its outputs equal the causal forward of that sequence alone (GQA, sinks, soft-cap)."""
    m = _layer(dtype)
    x = _tokens(dtype)
    m.init_cache(3, CACHE)
    noise = jax.random.normal(jax.random.key(8), (3, BLOCK, 16)).astype(dtype)
    pad = np.arange(BLOCK)[None, :, None] >= LENGTHS[:, None, None]
    prompt = jnp.where(pad, noise, x[:, :BLOCK])  # padding is junk: it must not matter
    y = _step(m, prompt, jnp.asarray(LENGTHS), None)
    assert m.cache_index[...].tolist() == LENGTHS.tolist()
    outs = [[y[b, :LENGTHS[b]]] for b in range(3)]
    for s in range(STEPS):
        xt = jnp.stack([x[b, LENGTHS[b] + s] for b in range(3)])[:, None]
        yt = _step(m, xt, None, None)
        for b in range(3):
            outs[b].append(yt[b])
    assert m.cache_index[...].tolist() == (LENGTHS + STEPS).tolist()
    errs, budgets = _errors_against_alone(m, outs, x, dtype)
    assert all(e < bud for e, bud in zip(errs, budgets, strict=True)), (errs, budgets)


def test_left_padded_prompts_with_a_token_mask_stay_invisible():
    """A scalar (shared) cache index with left-padded prompts: padding tokens (token_mask False)
    take cache slots but no later query sees them, so each sequence equals itself alone (RoPE
    positions are shifted by the padding; attention depends only on position differences)."""
    m = _layer(jnp.float32)
    x = _tokens(jnp.float32)
    m.init_cache(3, CACHE)
    noise = jax.random.normal(jax.random.key(9), (3, BLOCK, 16))
    token_mask = np.arange(BLOCK)[None, :] >= (BLOCK - LENGTHS)[:, None]
    prompt = jnp.stack([jnp.concatenate([noise[b, :BLOCK - LENGTHS[b]], x[b, :LENGTHS[b]]])
                        for b in range(3)])
    y = _step(m, prompt, None, jnp.asarray(token_mask))
    assert m.cache_index[...].ndim == 0 and int(m.cache_index[...]) == BLOCK
    assert m.cached_key_mask[...][:, :BLOCK].tolist() == token_mask.tolist()
    outs = [[y[b, BLOCK - LENGTHS[b]:]] for b in range(3)]
    for s in range(STEPS):
        xt = jnp.stack([x[b, LENGTHS[b] + s] for b in range(3)])[:, None]
        yt = _step(m, xt, None, None)
        for b in range(3):
            outs[b].append(yt[b])
    errs, budgets = _errors_against_alone(m, outs, x, jnp.float32)
    assert all(e < bud for e, bud in zip(errs, budgets, strict=True)), (errs, budgets)


def test_layer_decodes_with_decode_attention_and_reads_only_live_tiles():
    """The default decode function is jaxattn.decode_attention; the layer hands it the live
    lengths, so a 3-token prefill of a 1024 cache reads 1 tile of 256, then 2 at index 256."""
    assert MultiHeadAttention(2, 8, rngs=nnx.Rngs(0)).decode_attention_fn is \
        jaxattn.decode_attention
    seen = []

    def spy(q, k, v, bias=None, **kw):
        res = decode_attention_with_stats(q, k, v, bias, **kw)
        seen.append((int(res.tiles_visited), kw["key_value_seq_lengths"].tolist()))
        return res.out

    m = MultiHeadAttention(2, 8, is_causal=True, decode_attention_fn=spy, rngs=nnx.Rngs(0))
    m.init_cache(2, 1024)
    x = jax.random.normal(jax.random.key(10), (2, 3, 8))
    m(x, decode=True, lengths=jnp.array([3, 1], jnp.int32))
    m.cache_index[...] = jnp.array([100, 256], jnp.int32)  # jump ahead (contents irrelevant)
    m(x[:, :1], decode=True)
    assert seen == [(1, [3, 1]), (2, [101, 257])]


# ---- past the cache end, bad input -------------------------------------------------------------

def test_past_the_cache_end_raises_eagerly_and_poisons_only_that_sequence_under_jit():
    m = _layer(jnp.float32)
    x = _tokens(jnp.float32)
    m.init_cache(2, 6)
    m(x[:2, :5], decode=True, lengths=jnp.array([5, 2], jnp.int32))
    with pytest.raises(ValueError, match=r"sequence\(s\) \[0\] at cache positions \[5\] would "
                                         r"end at \[7\], past the KV cache length 6"):
        m(x[:2, :2], decode=True)
    m.init_cache(2, 6)
    _step(m, x[:2, :5], jnp.array([5, 2], jnp.int32), None)
    fits = _step(m, x[:2, 5:6], None, None)  # sequence 0 fills the cache exactly
    past = _step(m, x[:2, 6:7], None, None)  # sequence 0 runs past: NaN; sequence 1 is fine
    assert bool(jnp.all(jnp.isfinite(fits)))
    assert bool(jnp.all(jnp.isnan(past[0]))) and bool(jnp.all(jnp.isfinite(past[1])))
    ref = _alone(m, jnp.concatenate([x[1:2, :2], x[1:2, 5:7]], axis=1), 0, 4)[-1]
    assert max_err(past[1, 0], ref) < F32_ATOL


def test_bad_ragged_arguments_raise_clear_errors():
    m = MultiHeadAttention(2, 8, is_causal=True, rngs=nnx.Rngs(0))
    m.init_cache(2, 8)
    x = jnp.ones((2, 3, 8))
    with pytest.raises(ValueError, match=r"lengths must be an int array of shape \[B\] = \(2,\)"):
        m(x, decode=True, lengths=jnp.array([1, 2, 3], jnp.int32))
    with pytest.raises(ValueError, match=r"lengths must be an int array"):
        m(x, decode=True, lengths=jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"lengths must be in \[0, T=3\], got \[1, 4\]"):
        m(x, decode=True, lengths=jnp.array([1, 4], jnp.int32))
    with pytest.raises(ValueError, match=r"token_mask must be a bool array of shape \[B, T\] = "
                                         r"\(2, 3\)"):
        m(x, decode=True, token_mask=jnp.ones((2, 2), bool))
    with pytest.raises(ValueError, match="describe a decode step"):
        m(x, lengths=jnp.array([1, 2], jnp.int32))


def test_decode_attention_on_an_explicit_mesh_keeps_the_query_sharding():
    """Inputs sharded over an Explicit mesh axis (jax.make_mesh's default): the loop runs on
    Auto axes, the result equals the unsharded reference and stays batch-sharded."""
    explicit = jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((2,), ("data",), axis_types=(explicit,))
    q, k, v = rand_inputs(seed=4, b=2, t=1, s=24, n=2, k=1, h=4)
    index = jnp.array([5, 20], jnp.int32)
    ref = jaxattn.dot_product_attention(q, k, v, mask=M.CausalMask(offset=index),
                                        implementation="reference")
    spec = jax.sharding.PartitionSpec("data")
    with jax.set_mesh(mesh):
        qs, ks, vs = (jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in (q, k, v))
        out = jax.jit(lambda q, k, v, i: jaxattn.decode_attention(
            q, k, v, mask=M.CausalMask(offset=i), key_value_seq_lengths=i + 1, block_kv=8))(
                qs, ks, vs, index)
        assert tuple(jax.typeof(out).sharding.spec)[:1] == ("data",)
    assert max_err(out, ref) < F32_ATOL


def test_layer_decodes_batch_sharded_steps_on_an_explicit_mesh():
    """A decode step whose inputs are batch-sharded over an Explicit axis: the (unsharded)
    cache follows the step's batch sharding, shared-index and ragged steps both equal the full
    causal forward, and the output keeps the batch sharding."""
    explicit = jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((2,), ("data",), axis_types=(explicit,))
    layer = MultiHeadAttention(4, 16, is_causal=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 6, 16))
    full = layer(x)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
        layer.init_cache(2, 8)
        steps = [layer(xs[:, :3], decode=True), layer(xs[:, 3:4], decode=True)]
        assert tuple(jax.typeof(steps[-1]).sharding.spec)[:1] == ("data",)
        assert max_err(jnp.concatenate(steps, axis=1), full[:, :4]) < F32_ATOL
        layer.init_cache(2, 8)  # ragged: sequence 1 has a 2-token prompt
        first = np.asarray(layer(xs[:, :3], decode=True, lengths=jnp.array([3, 2], jnp.int32)))
    assert max_err(first[0], full[0, :3]) < F32_ATOL
    assert max_err(first[1, :2], full[1, :2]) < F32_ATOL
