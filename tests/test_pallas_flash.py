"""Pallas block-sparse flash attention, in interpret mode on CPU: what is kernel-specific.

The cases every backend must pass (masks, soft-cap, sinks, segments, fully masked rows, bf16,
dropout, head dims, random mask compositions) run for Pallas from
``tests/test_backend_pallas.py`` (the conformance suite). Here: block skipping, hand-made
metadata, dispatch and refusals, the kernel's copy of the dropout hash, the TPU variant and the
device lowerings.

Shapes are deliberately small and odd (T=37, S=45 with 16x16 tiles: padding in both directions,
several partial and full tiles) so that the whole file stays fast in the interpreter.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, F32_GRAD_ATOL, jit_for_tests, max_err, rand_inputs

import jaxattn
from jaxattn import masks as M
from jaxattn.core import dense
from jaxattn.ops.attention import make_call
from jaxattn.ops.backends import pallas as pallas_backend
from pallas_kernels import flash

B, T, S, N, K, H = 2, 37, 45, 4, 2, 16
BLOCK = 16


def _seg_ids(length, bounds, b=B):
    """int32 [b, length]: document ids that change at ``bounds`` (shifted per batch row)."""
    rows = [np.searchsorted(np.asarray(bounds) + i, np.arange(length), side="right")
            for i in range(b)]
    return jnp.asarray(np.stack(rows), jnp.int32)


def reference(q, k, v, mask=None, **kw):
    call, _ = make_call(q, k, v, None, mask, return_lse=True, **kw)
    return dense.attention_reference(
        q, k, v, None, call.full_mask, scale=call.scale, logits_soft_cap=call.logits_soft_cap,
        sinks=call.sinks, return_lse=True)


def _loss_grads(fn, args, argnums):
    """Gradients of a random projection of out plus one of the (finite part of the) LSE."""
    out, lse = jax.eval_shape(fn, *args)
    w_o = jax.random.normal(jax.random.key(1), out.shape, jnp.float32)
    w_l = jax.random.normal(jax.random.key(2), lse.shape, jnp.float32)

    def loss(*a):
        o, lse = fn(*a)
        return jnp.sum(o.astype(jnp.float32) * w_o) + jnp.sum(
            jnp.where(jnp.isfinite(lse), lse, 0.0) * w_l)

    # jit: one compilation of the whole backward instead of one per eager kernel call.
    return jit_for_tests(jax.grad(loss, argnums=argnums))(*args)


# Masks with empty tiles on the 16 x 16 grid of T=37, S=45 (the block-skipping tests).
SKIP_MASKS = {
    "causal_bottom_right": M.CausalMask(offset=S - T),
    "local": M.LocalMask((9, 3), offset=S - T),
    "multi_head": M.MultiHeadMask([M.CausalMask(), M.LocalMask((4, 0)), M.FullMask(),
                                   M.ChunkedCausalMask(7)]),
    "prefix_lm": M.PrefixLMMask(np.array([5, 20])),
}


# ---- block skipping is real -----------------------------------------------------------------


def _visits(q, k, v, mask, **seg):
    cfg = flash.FlashConfig(BLOCK, BLOCK, scale=H**-0.5, count_visits=True)
    meta = pallas_backend.meta_for(mask, q.shape[1], k.shape[1], BLOCK, BLOCK)
    out, _, visits = flash.flash_attention(q, k, v, meta, config=cfg, **seg)
    return out, np.asarray(visits), meta


@pytest.mark.parametrize("case", list(SKIP_MASKS))
def test_visited_blocks_equal_block_info(case):
    mask = SKIP_MASKS[case]
    q, k, v = rand_inputs(8, b=B, t=T, s=S, n=N, k=K, h=H)
    out, visits, _ = _visits(q, k, v, mask)
    info = mask.block_info(T, S, BLOCK, BLOCK)
    nonempty = np.broadcast_to(info.kind != M.EMPTY, (B, N) + info.grid)
    assert visits.shape == (B, N, info.grid[0])
    # Per query tile, the kernel computed exactly the non-empty kv tiles, no more.
    np.testing.assert_array_equal(visits, nonempty.sum(-1))
    # BlockInfo counts over its own (b in {1, B}, n in {1, N}) entries; broadcast to (B, N).
    repeat = (B // info.kind.shape[0]) * (N // info.kind.shape[1])
    assert visits.sum() == info.num_visited * repeat
    assert info.num_empty > 0  # the mask has empty tiles, so the count shows real skipping
    ref = dense.attention_reference(q, k, v, mask=mask)
    assert max_err(out, ref) < F32_ATOL


def test_segment_tiles_with_disjoint_ids_are_skipped():
    q, k, v = rand_inputs(9, b=B, t=S, s=S, n=N, k=K, h=H)
    ids = _seg_ids(S, [16, 32])  # row 0: documents on tile boundaries; row 1 shifted by one
    mask = M.CausalMask()
    out, visits, meta = _visits(q, k, v, mask, q_segment_ids=ids, kv_segment_ids=ids)
    ids_np = np.asarray(ids)
    nq = nk = -(-S // BLOCK)
    pad = np.pad(ids_np, ((0, 0), (0, nq * BLOCK - S)), mode="edge").reshape(B, nq, BLOCK)
    lo, hi = pad.min(-1), pad.max(-1)  # [B, nq]
    overlap = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])
    expect = (overlap & (meta.kind[0, 0] != flash.EMPTY)[None]).sum(-1)  # [B, nq]
    np.testing.assert_array_equal(visits, np.broadcast_to(expect[:, None], (B, N, nq)))
    assert visits.sum() < (meta.kind != flash.EMPTY).sum() * B * N  # skipping happened
    full = mask & M.SegmentMask(ids, ids)
    assert max_err(out, dense.attention_reference(q, k, v, mask=full)) < F32_ATOL
    assert nk == meta.grid[1]


def test_tiles_follow_the_metadata_not_the_mask_rule():
    """FULL tiles are computed unmasked and PARTIAL tiles use exactly their listed element block:
    hand-made metadata (no Mask involved) against the reference with the equivalent array."""
    t = s = 2 * BLOCK
    q, k, v = rand_inputs(16, b=1, t=t, s=s, n=2, k=1, h=H)
    kind = np.array([[flash.FULL, flash.PARTIAL], [flash.EMPTY, flash.PARTIAL]], np.int8)
    pidx = np.array([[-1, 1], [-1, 0]], np.int32)
    checker = (np.add.outer(np.arange(BLOCK), np.arange(BLOCK)) % 2 == 0)
    stripes = np.zeros((BLOCK, BLOCK), bool)
    stripes[:, ::3] = True
    meta = flash.block_sparse_meta(kind[None, None], pidx[None, None],
                                   np.stack([checker, stripes]))
    dense_mask = np.zeros((t, s), bool)
    dense_mask[:BLOCK, :BLOCK] = True
    dense_mask[:BLOCK, BLOCK:] = stripes
    dense_mask[BLOCK:, BLOCK:] = checker
    cfg = flash.FlashConfig(BLOCK, BLOCK, scale=H**-0.5, count_visits=True)
    out, lse, visits = flash.flash_attention(q, k, v, meta, config=cfg)
    r_out, r_lse = dense.attention_reference(q, k, v, mask=M.ArrayMask(dense_mask),
                                             return_lse=True)
    assert max_err(out, r_out) < F32_ATOL and max_err(lse, r_lse) < F32_ATOL
    np.testing.assert_array_equal(np.asarray(visits), [[[2, 1], [2, 1]]])


# ---- dispatch --------------------------------------------------------------------------------


def test_dispatch_tile_sizes_reach_the_kernel():
    q, k, v = rand_inputs(14, b=1, t=T, s=S, n=N, k=K, h=H)
    impl = jaxattn.Implementation("pallas", block_q=16, block_kv=32)
    out = jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    assert max_err(out, reference(q, k, v, is_causal=True)[0]) < F32_ATOL
    call, _ = make_call(q, k, v, is_causal=True)
    cfg = pallas_backend.flash_config_for(dataclasses.replace(call, block_q=16, block_kv=32))
    assert (cfg.block_q, cfg.block_kv) == (16, 32)
    assert pallas_backend.flash_config_for(call).block_q != 16  # the default differs


def test_kernel_dropout_hash_equals_jaxattn():
    """pallas_kernels keeps its own copy of the hash (no jaxattn imports): bit-equal."""
    from jaxattn.core import dropout as ref_dropout
    from pallas_kernels.flash import dropout as kernel_dropout

    seed = ref_dropout.dropout_seed(jax.random.key(5))
    idx = (jnp.arange(3)[:, None, None, None], jnp.arange(4)[None, :, None, None],
           jnp.arange(0, 4000, 37)[None, None, :, None], jnp.arange(0, 9000, 91)[None, None, None])
    a = ref_dropout.keep_mask(seed, *idx, 0.3, 4)
    b = kernel_dropout.keep_mask(seed[0], seed[1], *idx, 0.3, 4)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dispatch_refusals_and_cpu_never_auto():
    q, k, v = rand_inputs(12, b=1, t=8, s=8, n=2, k=2, h=H)
    ex = jaxattn.ops.attention.explain(q, k, v, is_causal=True)
    assert ex.chosen != "pallas" and "interpreter" in ex.verdicts["pallas"]
    bias = jnp.zeros((1, 1, 8, 8), jnp.float32)
    # a bias is no longer refused: on CPU the verdict is the interpreter's, as without one
    assert "interpreter" in jaxattn.ops.attention.explain(q, k, v, bias).verdicts["pallas"]

    @jax.jit
    def traced_offset(q, k, v, off):
        return jaxattn.dot_product_attention(q, k, v, mask=M.CausalMask(offset=off),
                                             implementation="pallas")

    with pytest.raises(ValueError, match="traced"):
        traced_offset(q, k, v, jnp.int32(0))


def test_supports_and_prefer_on_other_platforms():
    """Verdicts for GPU/TPU calls (platform simulated: only the decision logic runs)."""
    q = jnp.zeros((1, 4096, 2, 128), jnp.bfloat16)
    call, _ = make_call(q, q, q, is_causal=True)
    gpu = dataclasses.replace(call, platform="gpu")
    assert pallas_backend.supports(gpu) is None
    assert "validated" in pallas_backend.prefer(gpu)  # never auto-picked until run on a device
    assert pallas_backend.supports(dataclasses.replace(call, platform="tpu")) is None
    # GPU routing: the Mosaic-GPU forward when it applies, else the Triton lowering.
    assert pallas_backend.flash_config_for(gpu).backend == "mosaic_gpu"
    assert (pallas_backend.flash_config_for(gpu).block_q,
            pallas_backend.flash_config_for(gpu).block_kv) == (128, 64)
    seg = jnp.zeros((1, 4096), jnp.int32)
    seg_call, _ = make_call(q, q, q, is_causal=True, query_segment_ids=seg)
    assert pallas_backend.flash_config_for(
        dataclasses.replace(seg_call, platform="gpu")).backend == "triton"
    f32_call, _ = make_call(*(jnp.zeros((1, 256, 2, 128), jnp.float32),) * 3)
    assert pallas_backend.flash_config_for(
        dataclasses.replace(f32_call, platform="gpu")).backend == "triton"
    odd = dataclasses.replace(call, query=q[..., :48], key=q[..., :48], platform="gpu")
    assert "head dims" in pallas_backend.supports(odd)
    long_q = jnp.zeros((1, 65536, 2, 128), jnp.bfloat16)
    long_call, _ = make_call(long_q, long_q, long_q, is_causal=True)
    assert "SMEM" in pallas_backend.supports(dataclasses.replace(long_call, platform="tpu"))


def test_kernel_argument_validation():
    q, k, v = rand_inputs(13, b=1, t=T, s=S, n=2, k=2, h=H)
    cfg = flash.FlashConfig(BLOCK, BLOCK)
    with pytest.raises(ValueError, match="grid"):
        flash.flash_attention(q, k, v, flash.dense_meta(T, S + 40, BLOCK, BLOCK), config=cfg)
    with pytest.raises(ValueError, match="backend"):
        flash.FlashConfig(backend="cuda")
    with pytest.raises(ValueError, match="block_q"):
        flash.FlashConfig(block_q=0)
    with pytest.raises(ValueError, match="kind"):
        flash.block_sparse_meta(np.full((1, 1, 2, 2), 7), np.zeros((1, 1, 2, 2)),
                                np.zeros((0, 4, 4), bool))


def test_visit_lists_match_kind():
    r = np.random.default_rng(0)
    kind = r.integers(0, 3, size=(2, 3, 4, 5)).astype(np.int8)
    pidx = np.where(kind == flash.PARTIAL, r.integers(0, 6, size=kind.shape), -1)
    meta = flash.block_sparse_meta(kind, pidx, np.zeros((6, 8, 8), bool))
    nk = kind.shape[-1]
    for ib, ih, i in np.ndindex(2, 3, 4):
        row = meta.fwd[ib, ih, i]
        part = np.nonzero(kind[ib, ih, i] == flash.PARTIAL)[0]
        full = np.nonzero(kind[ib, ih, i] == flash.FULL)[0]
        assert row[0] == len(part) and row[1] == len(full)
        np.testing.assert_array_equal(row[2:2 + len(part)], part)
        np.testing.assert_array_equal(row[2 + nk:2 + nk + len(part)], pidx[ib, ih, i, part])
        np.testing.assert_array_equal(row[2 + 2 * nk:2 + 2 * nk + len(full)], full)
    # The transposed lists count the same tiles.
    assert meta.bwd[..., 0].sum() + meta.bwd[..., 1].sum() == meta.num_visited


# ---- TPU variant and device lowerings (no device here) ---------------------------------------


def _tpu_case():
    """A case on 128-tiles (TPU block constraints) with GQA, per-head mask, sinks, soft-cap and
    segment ids; T, S not multiples of 128."""
    t, s = 150, 200
    q, k, v = rand_inputs(14, b=1, t=t, s=s, n=4, k=2, h=16)
    mask = M.MultiHeadMask([M.CausalMask(offset=s - t), M.LocalMask((40, 0), offset=s - t),
                            M.FullMask(), M.ChunkedCausalMask(64)])
    info = mask.block_info(t, s, 128, 128)
    meta = flash.block_sparse_meta(info.kind, info.partial_index, info.partial_blocks)
    seg = dict(q_segment_ids=_seg_ids(t, [60], b=1), kv_segment_ids=_seg_ids(s, [110], b=1))
    sinks = jnp.asarray([0.3, -0.5, 1.0, 0.0], jnp.float32)
    full = mask & M.SegmentMask(seg["q_segment_ids"], seg["kv_segment_ids"])
    return q, k, v, meta, seg, sinks, full


def test_tpu_interpret_variant_matches_reference():
    """The Mosaic-TPU variant (SMEM metadata) run by the TPU interpreter on CPU."""
    q, k, v, meta, seg, sinks, full = _tpu_case()
    cfg = flash.FlashConfig(128, 128, scale=0.25, logits_soft_cap=6.0, backend="tpu_interpret")

    def ours(q, k, v, sinks):
        return flash.flash_attention(q, k, v, meta, config=cfg, sinks=sinks, **seg)[:2]

    def ref(q, k, v, sinks):
        return dense.attention_reference(q, k, v, None, full, scale=0.25, logits_soft_cap=6.0,
                                         sinks=sinks, return_lse=True)

    args = (q, k, v, sinks)
    out, lse = jit_for_tests(ours)(*args)
    r_out, r_lse = jit_for_tests(ref)(*args)
    assert max_err(out, r_out) < F32_ATOL and max_err(lse, r_lse) < F32_ATOL
    for g, r in zip(_loss_grads(ours, args, (0, 1, 2, 3)), _loss_grads(ref, args, (0, 1, 2, 3)),
                    strict=True):
        assert max_err(g, r) < F32_GRAD_ATOL
    # Dropout with the seed in SMEM: the same entries as the reference drops for that seed.
    key = jax.random.key(2)
    drop = dataclasses.replace(cfg, dropout_rate=0.2)
    out_d = jit_for_tests(lambda *a: flash.flash_attention(
        *a, meta, config=drop, sinks=sinks, dropout_seed=jax.random.bits(key, (2,), jnp.uint32),
        **seg)[0])(q, k, v)
    ref_d = jit_for_tests(lambda *a: dense.attention_reference(
        *a, None, full, scale=0.25, logits_soft_cap=6.0, sinks=sinks, dropout_rate=0.2,
        dropout_rng=key))(q, k, v)
    assert max_err(out_d, ref_d) < F32_ATOL and max_err(out_d, out) > 1e-2


@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic_tpu", "tpu")])
def test_device_lowerings_lower_from_cpu(backend, platform):
    """Forward + backward lower for the GPU (Triton) and TPU (Mosaic) backends. This checks the
    lowering rules only: nothing is compiled for or run on a device here."""
    q, k, v, meta, seg, sinks, _ = _tpu_case()
    q, k, v = (jnp.zeros(x.shape[:3] + (128,), jnp.bfloat16) for x in (q, k, v))
    cfg = flash.FlashConfig(128, 128, scale=0.1, logits_soft_cap=6.0, backend=backend,
                            dropout_rate=0.1)  # the dropout hash (uint32 ops) must lower too
    seed = jnp.array([3, 4], jnp.uint32)

    def loss(q, k, v, sinks):
        out = flash.flash_attention(q, k, v, meta, config=cfg, sinks=sinks, dropout_seed=seed,
                                    **seg)[0]
        return jnp.sum(out.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, v, sinks).lower(
        lowering_platforms=(platform,))
    text = lowered.as_text()
    for name in ("flash_fwd", "flash_dq", "flash_dkv"):
        assert name in text


def test_mosaic_gpu_backend_lowers_forward_and_triton_backward():
    """backend="mosaic_gpu": the Hopper forward kernel plus the Triton dq / dkv kernels lower for
    cuda from CPU through flash_attention's custom_vjp (nothing runs on a device here)."""
    t = s = 200  # unaligned: padded and masked
    q = jnp.zeros((1, t, 4, 128), jnp.bfloat16)
    k = v = jnp.zeros((1, s, 2, 128), jnp.bfloat16)
    meta = pallas_backend.meta_for(M.CausalMask(), t, s, 128, 64)
    cfg = flash.FlashConfig(128, 64, scale=0.1, backend="mosaic_gpu")

    def loss(q, k, v):
        return jnp.sum(flash.flash_attention(q, k, v, meta, config=cfg)[0].astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "flash_fwd_mosaic_gpu" in text and "flash_dq" in text and "flash_dkv" in text
    assert not re.search(r"flash_fwd(?!_mosaic_gpu)", text)  # not the portable forward
    seg = jnp.zeros((1, t), jnp.int32)
    with pytest.raises(ValueError, match="no segment ids or sinks"):
        flash.flash_attention(q, k, v, meta, config=cfg, q_segment_ids=seg, kv_segment_ids=seg)


def test_bench_small_runs(capsys):
    """The benchmark driver runs end to end at --small size (no timing is asserted)."""
    from pallas_kernels import bench

    bench.main(["--small", "--workloads", "packed_12docs", "--iters", "1"])
    text = capsys.readouterr().out
    assert "packed_12docs: visited" in text and "pallas:" in text and "xla_chunked:" in text
