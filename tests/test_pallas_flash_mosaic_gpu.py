"""The Mosaic-GPU (Hopper) flash-attention forward, checked without a GPU.

Two kinds of checks, both on CPU:

* lowering: ``jit(...).trace(...).lower(lowering_platforms=("cuda",))`` runs the Pallas ->
  Mosaic-GPU lowering rules (layouts, wgmma operand forms, TMA transforms, Mosaic's SMEM
  accounting) and produces the ``mosaic_gpu`` custom call. It does not run ptxas or the kernel:
  registers, barrier/TMA timing on hardware and speed are untested here.
* numerics: the private Mosaic-GPU interpreter of JAX (``InterpretGPUParams``) runs the kernel
  on CPU -- producer and consumer warpgroups as concurrent threads, TMA copies, barriers and
  wgmma included -- against the dense reference. It executes ``wgmma`` only from SMEM operands,
  so these runs use ``p_via_smem=True`` (the register-P variant, the GPU default, is only
  lowered), and it has no rule for ``layout_cast``, which the kernel skips when interpreted.
* ``test_runs_on_hopper`` runs the compiled kernel on an sm90 GPU; it skips without one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import bf16_budget, max_err, rand_inputs

from jaxattn import masks as M
from jaxattn.core import dense
from pallas_kernels import flash
from pallas_kernels.flash import mosaic_gpu as mg

# lse is computed from exact products of 16-bit inputs accumulated in f32 (wgmma) and base-2
# exp/log in f32; observed errors are ~5e-7. 2e-4 leaves room for the summation order.
LSE_ATOL = 2e-4


@pytest.fixture(autouse=True)
def _fresh_interpreter():
    """The GPU interpreter keeps global state; an earlier failure must not leak into a test."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:  # private module; the interpret tests then skip in _interpret
        yield
        return
    gpu_callbacks.reset_gpu_interpret_mode_state()
    yield


def _meta(mask, t, s, bq, bk):
    if mask is None:
        return flash.dense_meta(t, s, bq, bk)
    info = mask.block_info(t, s, bq, bk)
    return flash.block_sparse_meta(info.kind, info.partial_index, info.partial_blocks)


def _interpreter(meta, cfg, *, traced_meta=False):
    """The kernel under the GPU interpreter as one jitted ``fn(q, k, v) -> (out, lse)``: build it
    once and call it for every input of the same shapes (one trace and compilation)."""
    try:
        params = mg.interpret_params()
    except ImportError as e:
        pytest.skip(f"this jax has no Mosaic-GPU interpreter (private module moved?): {e}")
    if traced_meta:  # metadata as jit arguments, as inside jaxattn's custom_vjp
        fn = jax.jit(lambda q, k, v, fwd, blocks: mg.flash_forward_mosaic_gpu_arrays(
            q, k, v, fwd, blocks, config=cfg, interpret=params))
        run = lambda q, k, v: fn(q, k, v, jnp.asarray(meta.fwd), jnp.asarray(meta.blocks))
    else:
        run = jax.jit(lambda q, k, v: mg.flash_forward_mosaic_gpu(
            q, k, v, meta, config=cfg, interpret=params))

    def on_cpu(q, k, v):
        # The interpreter runs on the default backend: pin CPU (matters when a GPU is visible).
        with jax.default_device(jax.devices("cpu")[0]):
            return run(q, k, v)

    return on_cpu


def _interpret(q, k, v, meta, cfg, *, traced_meta=False):
    return _interpreter(meta, cfg, traced_meta=traced_meta)(q, k, v)


def _reference(q, k, v, **kw):
    """f32 reference ``(out, lse)`` as one jitted program (op by op it compiles every op)."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    return jax.jit(lambda q, k, v: dense.attention_reference(q, k, v, return_lse=True, **kw))(
        *f32)


def _check(q, k, v, mask, cfg, *, soft_cap=None, traced_meta=False):
    """Interpreted kernel against the f32 reference: out within the bf16/f16 budget, lse tight,
    fully masked rows (lse -inf) in the same places."""
    meta = _meta(mask, q.shape[1], k.shape[1], cfg.block_q, cfg.block_kv)
    out, lse = _interpret(q, k, v, meta, cfg, traced_meta=traced_meta)
    assert out.shape == q.shape[:3] + v.shape[3:] and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
    kw = dict(mask=mask, scale=cfg.scale, logits_soft_cap=soft_cap)
    r_out, r_lse = _reference(q, k, v, **kw)
    assert max_err(out, r_out) <= bf16_budget(q, k, v, **kw)
    finite = jnp.isfinite(r_lse)
    assert bool(jnp.all(finite == jnp.isfinite(lse)))
    assert max_err(jnp.where(finite, lse, 0.0), jnp.where(finite, r_lse, 0.0)) < LSE_ATOL
    return meta, out, lse


# ---- numerics in the Mosaic-GPU interpreter ------------------------------------------------


def test_causal_gqa_empty_full_partial_tiles():
    """T = S = 2 tiles, causal: per query tile one FULL, one PARTIAL and one EMPTY kv tile.
    The metadata arrays are traced jit arguments here (the array entry point)."""
    q, k, v = rand_inputs(0, b=1, t=128, s=128, n=2, k=1, h=64, dtype=jnp.bfloat16)
    cfg = mg.MosaicGPUConfig(64, 64, scale=64**-0.5, p_via_smem=True)
    meta, _, _ = _check(q, k, v, M.CausalMask(), cfg, traced_meta=True)
    np.testing.assert_array_equal(meta.kind[0, 0], [[flash.PARTIAL, flash.EMPTY],
                                                    [flash.FULL, flash.PARTIAL]])


def test_unaligned_lengths_per_head_mask_soft_cap_f16():
    """T, S not tile multiples (padding both ways), a different mask per head (per-head visit
    lists), soft-capping, f16, MQA (one kv head), 128-row query tiles (two consumer warpgroups
    splitting each mask tile by rows), more pipeline steps than ring slots."""
    t, s = 180, 230
    q, k, v = rand_inputs(1, b=1, t=t, s=s, n=2, k=1, h=64, dtype=jnp.float16)
    q = q * 3.0  # large logits so that the soft-cap matters
    mask = M.MultiHeadMask([M.CausalMask(offset=s - t), M.LocalMask((40, 0), offset=s - t)])
    cfg = mg.MosaicGPUConfig(128, 64, scale=0.125, logits_soft_cap=5.0, p_via_smem=True)
    meta, _, _ = _check(q, k, v, mask, cfg, soft_cap=5.0)
    assert meta.kind.shape[:2] == (1, 2) and (meta.kind == flash.EMPTY).any()
    assert (meta.kind[0, 0, 0] == flash.PARTIAL).sum() > cfg.num_stages  # the ring wraps


def test_batch_dependent_mask_and_fully_masked_rows():
    """A random per-batch mask (per-batch visit lists) with query rows that see no key."""
    t = s = 128
    q, k, v = rand_inputs(2, b=2, t=t, s=s, n=2, k=2, h=64, dtype=jnp.bfloat16)
    allowed = np.random.default_rng(0).random((2, 1, t, s)) > 0.5
    allowed[:, :, 5] = False
    allowed[1, :, 64:] = False  # the second query tile of batch 1 is all EMPTY tiles
    mask = M.ArrayMask(allowed)
    cfg = mg.MosaicGPUConfig(64, 64, scale=0.125, p_via_smem=True)
    meta, out, lse = _check(q, k, v, mask, cfg)
    assert meta.kind.shape[0] == 2
    assert bool(jnp.all(out[:, 5] == 0)) and bool(jnp.all(lse[:, 5] == -jnp.inf))
    assert bool(jnp.all(out[1, 64:] == 0)) and bool(jnp.all(lse[1, 64:] == -jnp.inf))


def test_head_dim_128_value_dim_64_three_stages_unmasked():
    """Unmasked (dense metadata: the last kv tile is PARTIAL for the padded keys), 128-row query
    tile, H = 128 with Hv = 64 (own output buffer), a 3-deep ring cycled over 5 kv tiles."""
    q, k, v = rand_inputs(3, b=1, t=128, s=300, n=1, k=1, h=128, hv=64, dtype=jnp.bfloat16)
    cfg = mg.MosaicGPUConfig(128, 64, scale=128**-0.5, num_stages=3, p_via_smem=True)
    _check(q, k, v, None, cfg)


def test_empty_tiles_are_never_read_and_full_tiles_are_unmasked():
    """Hand-made metadata: K/V of the EMPTY tile are NaN (touching them would poison the row),
    and a FULL tile is computed without any mask while PARTIAL tiles use exactly their listed
    element block; compared with the reference on the equivalent dense mask."""
    bq = bk = 64
    t, s = 2 * bq, 3 * bk
    q, k, v = rand_inputs(4, b=1, t=t, s=s, n=1, k=1, h=64, dtype=jnp.bfloat16)
    kind = np.array([[flash.FULL, flash.PARTIAL, flash.EMPTY],
                     [flash.EMPTY, flash.PARTIAL, flash.FULL]], np.int8)
    pidx = np.array([[-1, 1, -1], [-1, 0, -1]], np.int32)
    checker = np.add.outer(np.arange(bq), np.arange(bk)) % 2 == 0
    stripes = np.zeros((bq, bk), bool)
    stripes[:, ::3] = True
    meta = flash.block_sparse_meta(kind[None, None], pidx[None, None],
                                   np.stack([checker, stripes]))
    dense_mask = np.zeros((t, s), bool)
    dense_mask[:bq, :bk] = True
    dense_mask[:bq, bk:2 * bk] = stripes
    dense_mask[bq:, bk:2 * bk] = checker
    dense_mask[bq:, 2 * bk:] = True
    # kv tile 2 is EMPTY for query tile 0 (FULL for tile 1) and kv tile 0 the reverse: NaN in
    # one of them must leave exactly the query tile that skips it untouched.
    cfg = mg.MosaicGPUConfig(bq, bk, scale=0.125, p_via_smem=True)
    r_out, r_lse = _reference(q, k, v, mask=M.ArrayMask(dense_mask), scale=0.125)
    budget = bf16_budget(q, k, v, mask=M.ArrayMask(dense_mask), scale=0.125)
    kernel = _interpreter(meta, cfg)  # one program for the clean and the two NaN runs
    out, lse = kernel(q, k, v)
    assert max_err(out, r_out) <= budget and max_err(lse, r_lse) < LSE_ATOL
    for rows, cols in ((slice(0, bq), slice(2 * bk, s)), (slice(bq, t), slice(0, bk))):
        k_bad = k.at[:, cols].set(jnp.nan)
        v_bad = v.at[:, cols].set(jnp.nan)
        out_bad, lse_bad = kernel(q, k_bad, v_bad)
        assert bool(jnp.all(jnp.isfinite(out_bad[:, rows].astype(jnp.float32))))
        assert max_err(out_bad[:, rows], r_out[:, rows]) <= budget
        assert max_err(lse_bad[:, rows], r_lse[:, rows]) < LSE_ATOL


# ---- lowering for the GPU (no GPU needed, nothing runs) --------------------------------------


def _lower(q, k, v, meta, cfg):
    fn = jax.jit(lambda q, k, v: mg.flash_forward_mosaic_gpu(q, k, v, meta, config=cfg))
    return fn.trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("h,hv,bq,bk,stages,p_via_smem,soft_cap,approx", [
    (64, 64, 64, 64, 2, False, None, False),
    (128, 128, 64, 64, 3, False, 30.0, True),
    (128, 128, 128, 64, 2, True, None, False),
    (128, 64, 128, 64, 2, False, None, True),
    (128, 128, 64, 128, 2, True, None, False),
    (256, 256, 64, 64, 1, False, None, False),
])
def test_lowers_for_cuda(h, hv, bq, bk, stages, p_via_smem, soft_cap, approx):
    """GQA (4 query heads on 2 kv heads), a different mask per head, padding both ways."""
    t, s = 200, 333
    q = jnp.zeros((2, t, 4, h), jnp.bfloat16)
    k = jnp.zeros((2, s, 2, h), jnp.bfloat16)
    v = jnp.zeros((2, s, 2, hv), jnp.bfloat16)
    mask = M.MultiHeadMask([M.CausalMask(offset=s - t), M.LocalMask((64, 0), offset=s - t),
                            M.FullMask(), M.ChunkedCausalMask(96)])
    cfg = mg.MosaicGPUConfig(bq, bk, scale=h**-0.5, logits_soft_cap=soft_cap, num_stages=stages,
                             p_via_smem=p_via_smem, approx_math=approx)
    text = _lower(q, k, v, _meta(mask, t, s, bq, bk), cfg)
    assert "mosaic_gpu" in text  # the kernel became a Mosaic-GPU custom call


def test_argument_validation():
    q, k, v = rand_inputs(5, b=1, t=64, s=64, n=2, k=1, h=64, dtype=jnp.bfloat16)
    cfg = mg.MosaicGPUConfig()
    meta = flash.dense_meta(64, 64, 64, 64)
    with pytest.raises(TypeError, match="dtype"):
        mg.flash_forward_mosaic_gpu(q.astype(jnp.float32), k.astype(jnp.float32),
                                    v.astype(jnp.float32), meta, config=cfg)
    q48, k48, v48 = rand_inputs(5, b=1, t=64, s=64, n=2, k=1, h=48, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="head dims"):
        mg.flash_forward_mosaic_gpu(q48, k48, v48, meta, config=cfg)
    with pytest.raises(ValueError, match="grid"):
        mg.flash_forward_mosaic_gpu(q, k, v, flash.dense_meta(64, 200, 64, 64), config=cfg)
    with pytest.raises(ValueError, match="incompatible"):
        mg.flash_forward_mosaic_gpu(q, k[:, :, :, :32], v, meta, config=cfg)
    # The borderline case: 128 x 128 tiles, H = 128, 2 stages. Lowered without this check, JAX
    # 0.10.2's Mosaic GPU refuses it itself (232528 B > 232448 B, the count smem_bytes gives);
    # the wrapper refuses it first, with the remedy in the message.
    q128, k128, v128 = rand_inputs(5, b=1, t=128, s=128, n=1, k=1, h=128, dtype=jnp.bfloat16)
    big = mg.MosaicGPUConfig(128, 128, num_stages=2)
    with pytest.raises(ValueError, match="SMEM"):
        mg.flash_forward_mosaic_gpu(q128, k128, v128, flash.dense_meta(128, 128, 128, 128),
                                    config=big)
    with pytest.raises(ValueError, match="block_q"):
        mg.MosaicGPUConfig(block_q=32)
    with pytest.raises(ValueError, match="block_kv"):
        mg.MosaicGPUConfig(block_kv=96)
    with pytest.raises(ValueError, match="num_stages"):
        mg.MosaicGPUConfig(num_stages=0)


# ---- on a Hopper GPU (skipped here: none is available) ---------------------------------------


def _hopper():
    try:
        gpus = jax.devices("cuda")
    except RuntimeError:
        return None
    cc = getattr(gpus[0], "compute_capability", "")
    return gpus[0] if str(cc).startswith("9") else None


@pytest.mark.parametrize("p_via_smem", [False, True])
def test_runs_on_hopper(p_via_smem):
    """The compiled kernel on an sm90 GPU against the reference. Needs a visible Hopper GPU:
    ``JAX_PLATFORMS=cuda,cpu pytest tests/test_pallas_flash_mosaic_gpu.py`` (conftest pins CPU
    otherwise). Never run yet: no GPU was available when it was written."""
    gpu = _hopper()
    if gpu is None:
        pytest.skip("no Hopper (sm90) CUDA device visible; this test needs real hardware")
    t, s = 1000, 1100
    q, k, v = rand_inputs(6, b=2, t=t, s=s, n=4, k=2, h=128, dtype=jnp.bfloat16)
    mask = M.MultiHeadMask([M.CausalMask(offset=s - t), M.LocalMask((200, 0), offset=s - t),
                            M.FullMask(), M.ChunkedCausalMask(256)])
    cfg = mg.MosaicGPUConfig(128, 64, scale=128**-0.5, num_stages=2, p_via_smem=p_via_smem)
    meta = _meta(mask, t, s, cfg.block_q, cfg.block_kv)
    q, k, v = jax.device_put((q, k, v), gpu)
    out, lse = jax.jit(lambda q, k, v: mg.flash_forward_mosaic_gpu(q, k, v, meta, config=cfg))(
        q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    r_out, r_lse = dense.attention_reference(*f32, mask=mask, scale=cfg.scale, return_lse=True)
    assert max_err(out, r_out) <= bf16_budget(q, k, v, mask=mask, scale=cfg.scale)
    assert max_err(lse, r_lse) < LSE_ATOL
