"""Block-sparse flash-attention forward for Hopper (sm90) written against Mosaic GPU (``plgpu``).

FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", 2023) forward on the TMA + ``wgmma`` + warp-specialisation data path of
FlashAttention-3 (Shah et al., "FlashAttention-3: Fast and Accurate Attention with Asynchrony
and Low-precision", 2024), driven by the block metadata of the portable kernels
(:mod:`pallas_kernels.flash.metadata`).

What it does
------------
One program (CUDA block) per ``(query tile, query head, batch)``; it has ``block_q / 64``
consumer warpgroups (64 query rows each) and one producer warpgroup:

1. The visit-list row ``[n_partial, n_full, partial kv tiles, their mask ids, full kv tiles]``
   (scalar loads from GMEM) is flattened to ``n_partial + n_full`` steps, partial tiles first.
   EMPTY tiles are not in the list: they are never loaded nor computed.
2. The producer fills a ``num_stages``-deep SMEM ring with TMA copies: per step the K^T and V
   tiles and, for partial steps only, the tile's additive mask. Before reusing a slot it waits
   until every consumer has released it (an mbarrier with one arrival per consumer).
3. Each consumer TMA-loads its Q rows once, then per step: ``S = Q K^T`` (``wgmma``, f32),
   scale or soft-cap, add its 64 rows of the mask tile on partial steps only (FULL tiles run
   unmasked), online softmax in f32 with ``exp2``, ``O += P V`` (``wgmma``; ``P`` from registers,
   or from SMEM with ``p_via_smem``), release the slot.
4. ``O / l`` (q dtype) and ``lse`` (f32) go out through SMEM with TMA stores. Rows that see no
   key give 0 and ``lse = -inf``.

Layouts (every ``wgmma`` operand is a plain, non-transposed SMEM tile, which is also the only form
the Mosaic-GPU interpreter of JAX 0.10 executes): q / out ``[B, T, N, H]`` as given (strided TMA
tiles), v ``[B, S, K, Hv]`` as given, K transposed once by XLA to ``[B, K, H, S]`` (one extra pass
over K, against the ``T / block_q`` passes the kernel makes), lse ``[B, N, T]`` f32, partial-tile
masks as an additive bias ``[P, block_q, block_kv]`` in the input dtype (0 / -inf are exact),
one per *distinct* partial tile. GQA reads kv head ``n // (N // K)``; K/V are never repeated.
Unaligned lengths are padded (padded keys are masked by the metadata's partial tiles).

What it does not do
-------------------
No backward (dq, dk, dv), no segment ids, no attention sinks, no f32 inputs, no head dims other
than 64 / 128 / 256. Compared with FlashAttention-3 it lacks the ping-pong scheduling of the two
consumer warpgroups, the early release of K before ``P V``, and intra-warpgroup overlap of the
softmax with the next ``Q K^T``.

Status: it LOWERS for ``cuda`` from a CPU-only machine (JAX 0.10.2; the Pallas -> Mosaic-GPU
lowering rules and Mosaic's SMEM accounting run, ptxas does not) and its numerics are checked on
CPU with the private Mosaic-GPU interpreter (TMA, barriers between the warpgroups and ``wgmma``
are simulated; the register-``P`` variant and ``layout_cast`` are not, see
``tests/test_pallas_flash_mosaic_gpu.py``). It has NEVER RUN ON A GPU: register pressure, TMA /
barrier timing on a real H100 and the speed are unverified.

Routing the GPU forward through it (for the lead; not done here)
-----------------------------------------------------------------
* ``config.py``: add ``"mosaic_gpu"`` to ``BACKENDS``.
* ``lowering.py``: ``default_backend`` maps ``"gpu"`` / ``"cuda"`` to ``"mosaic_gpu"``.
* ``attention.py``, ``_flash_fwd_impl``: if ``st.cfg.backend == "mosaic_gpu"``, compute
  ``out, lse = mosaic_gpu.flash_forward_mosaic_gpu_arrays(q, k, v, meta_fwd, blocks,
  config=mosaic_gpu.MosaicGPUConfig(block_q=cfg.block_q, block_kv=cfg.block_kv,
  scale=cfg.scale, logits_soft_cap=cfg.logits_soft_cap))`` on the unpadded ``[B, T, N, H]``
  inputs (``visits = None``) and still return ``_pad_inputs(...)`` as the residuals. In
  ``_flash_bwd`` run ``_dq`` / ``_dkv`` with ``dataclasses.replace(st, cfg=dataclasses.replace(
  st.cfg, backend="triton"))``: with no compiler params a GPU ``pallas_call`` would go to the
  Mosaic-GPU lowering, which cannot lower those Triton-style kernels.
* ``jaxattn/ops/backends/pallas.py``: for ``platform == "gpu"`` use ``block_q = 128`` (two consumer
  warpgroups) and ``block_kv = 64``; in ``supports()`` send calls with segment ids, sinks or f32
  inputs to the Triton backend (``backend="triton"``) instead of refusing them, and keep
  ``HARDWARE_VALIDATED`` False until ``tests/test_pallas_flash_mosaic_gpu.py``-style checks pass
  on an H100 without the interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash.metadata import BlockSparseMeta

__all__ = ["MosaicGPUConfig", "flash_forward_mosaic_gpu", "flash_forward_mosaic_gpu_arrays",
           "interpret_params", "smem_bytes", "HEAD_DIMS", "SUPPORTED_DTYPES"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# Running-max start: finite so that exp2(m_old - m_new) is never exp2(-inf + inf) = NaN on rows
# whose first tiles are fully masked; far below any real logit so masked logits still give 0.
_NEG_INIT = -1e30
# Hopper SMEM per block (227 KiB usable with the opt-in carve-out); Mosaic GPU aligns each
# scratch buffer to 1 KiB and reserves 2 KiB for cross-warp reductions (CompilerParams default).
_SMEM_LIMIT = 227 * 1024
_SMEM_ALIGN = 1024
_REDUCTION_SCRATCH = 2048
_HEAD_DIMS = (64, 128, 256)
_WG_ROWS = 64  # query rows per consumer warpgroup (the M of one wgmma)
_DTYPES = (jnp.bfloat16, jnp.float16)
HEAD_DIMS, SUPPORTED_DTYPES = _HEAD_DIMS, _DTYPES  # what the wrapper routes here


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig:
    """Static configuration of the Mosaic-GPU forward kernel.

    Attributes:
      block_q: query rows per program: 64 (one consumer warpgroup) or 128 (two consumer
        warpgroups of 64 rows sharing every K/V tile).
      block_kv: keys per pipeline step (multiple of 64).
      scale: logit scale (multiplies ``Q K^T``).
      logits_soft_cap: ``c`` for ``c * tanh(logits / c)``, or ``None``.
      num_stages: depth of the K^T / V / mask TMA ring (>= 1; 2-3 overlap loads with compute).
      p_via_smem: stage the probabilities ``P`` in SMEM before ``P V`` (else ``wgmma`` reads them
        from registers, as FlashAttention-3 does). The Mosaic-GPU interpreter of JAX 0.10 only
        executes the SMEM form, so the CPU numerics tests use ``True``.
      approx_math: let Mosaic use approximate ``exp2``/``tanh`` (faster, slightly less exact).
    """

    block_q: int = 64
    block_kv: int = 64
    scale: float = 1.0
    logits_soft_cap: float | None = None
    num_stages: int = 2
    p_via_smem: bool = False
    approx_math: bool = False

    def __post_init__(self):
        if self.block_q not in (64, 128):
            raise ValueError(f"block_q must be 64 or 128 (64 rows per consumer warpgroup), got "
                             f"{self.block_q}")
        if not isinstance(self.block_kv, int) or self.block_kv < 64 or self.block_kv % 64:
            raise ValueError(f"block_kv must be a positive multiple of 64, got {self.block_kv}")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be a positive int, got {self.num_stages}")
        if not isinstance(self.scale, int | float):
            raise TypeError(f"scale must be a Python number, got {type(self.scale)}")
        if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be positive, got {self.logits_soft_cap}")


def interpret_params():
    """``InterpretGPUParams()`` of the private Mosaic-GPU interpreter (CPU), for tests."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def smem_bytes(cfg: MosaicGPUConfig, head_dim: int, value_dim: int, itemsize: int = 2) -> int:
    """SMEM the kernel asks for (bytes), as Mosaic GPU counts it: every scratch buffer rounded up
    to 1 KiB, plus its 2 KiB of reduction scratch and the barriers. Buffers: the Q tile (reused
    for O when ``H == Hv``), the K^T / V / mask ring (masks as 16-bit additive biases), P, lse."""
    bq, bk, st = cfg.block_q, cfg.block_kv, cfg.num_stages
    buffers = [bq * head_dim * itemsize, st * bk * head_dim * itemsize,
               st * bk * value_dim * itemsize, st * bq * bk * itemsize, bq * 4]
    if value_dim != head_dim:
        buffers.append(bq * value_dim * itemsize)
    if cfg.p_via_smem:
        buffers.append(bq * bk * itemsize)
    aligned = sum(-(-x // _SMEM_ALIGN) * _SMEM_ALIGN for x in buffers)
    return aligned + _REDUCTION_SCRATCH + 8 * (bq // _WG_ROWS + 4 * st)


def _swizzled(shape, dtype):
    """SMEM tile with a 128-byte swizzle: the form wgmma operands need, and the one from which
    registers in the wgmma layout load without bank conflicts (also for the mask tiles)."""
    swizzle = 128
    return plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
        plgpu.SwizzleTransform(swizzle)))


def _wgmma_row_layout():
    """Layout of a per-row vector of a wgmma tile (``Layout.WGMMA.reduce(1)`` since JAX 0.10;
    older releases spelled it ``Layout.WGMMA_ROW``)."""
    wgmma = plgpu.Layout.WGMMA
    return wgmma.reduce(1) if hasattr(wgmma, "reduce") else plgpu.Layout.WGMMA_ROW


def _matmul(a_smem_or_regs, b_smem, shape):
    """``a @ b`` with one wgmma into a fresh f32 accumulator; returns the f32 registers
    (reading the accumulator waits for the wgmma to finish)."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_smem_or_regs, b_smem)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _kernel(meta_ref, q_ref, kt_ref, v_ref, bias_ref, out_ref, lse_ref,
            q_smem, kt_smem, v_smem, bias_smem, p_smem, o_smem, lse_smem,
            q_bar, k_bar, v_bar, m_bar, free_bar, *, cfg: MosaicGPUConfig, groups: int,
            meta_batch: bool, meta_heads: bool, kv_slots: int, interpreting: bool):
    """One program: warpgroups ``0 .. C-1`` compute 64 query rows each (``C = block_q / 64``),
    warpgroup ``C`` only issues the K^T / V / mask TMA copies (warp specialisation)."""
    bk, stages = cfg.block_kv, cfg.num_stages
    consumers = cfg.block_q // _WG_ROWS
    dtype = q_ref.dtype
    hv = v_ref.shape[-1]

    def layout(x, new_layout):
        # Register layouts only matter to the GPU lowering; the JAX 0.10 interpreter has no rule
        # for layout_cast, and the cast is the identity on values.
        return x if interpreting else plgpu.layout_cast(x, new_layout)

    wg = lax.axis_index("wg")
    i = lax.axis_index("q")
    n = lax.axis_index("heads")
    b = lax.axis_index("batch")
    kh = lax.div(n, jnp.int32(groups))
    row = meta_ref.at[b if meta_batch else 0, n if meta_heads else 0, i]  # [2 + 3 * nk]
    n_part = row[0]
    total = n_part + row[1]

    # With three warpgroups (384 threads, ~168 registers each) move registers from the producer
    # to the consumers, as FlashAttention-3 does: (40 + 2 * 232) * 128 <= 65536 per block. With
    # two, every thread can already hold 255 registers, so nothing is rebalanced.
    rebalance = consumers == 2

    @pl.when(wg == consumers)
    def _producer():
        if rebalance:
            plgpu.set_max_registers(40, action="decrease")

        def load_step(t, _):
            """Wait until every consumer released ring slot t % stages, then fill it with the
            kv tile of step t (partial tiles first, then full tiles) and, for a partial tile,
            its additive mask."""
            slot = lax.rem(t, jnp.int32(stages))
            pl.when(t >= stages)(lambda: plgpu.barrier_wait(free_bar.at[slot]))
            part = row[2 + jnp.minimum(t, kv_slots - 1)]
            full = row[2 + 2 * kv_slots + jnp.clip(t - n_part, 0, kv_slots - 1)]
            start = jnp.where(t < n_part, part, full) * bk
            plgpu.copy_gmem_to_smem(kt_ref.at[b, kh, :, pl.ds(start, bk)], kt_smem.at[slot],
                                    k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(start, bk), kh], v_smem.at[slot],
                                    v_bar.at[slot])

            @pl.when(t < n_part)
            def _():
                mask_id = row[2 + kv_slots + jnp.minimum(t, kv_slots - 1)]
                plgpu.copy_gmem_to_smem(bias_ref.at[mask_id], bias_smem.at[slot],
                                        m_bar.at[slot])

        lax.fori_loop(0, total, load_step, None)

    # log2(e) folded into the logit scale: softmax runs in base 2 (exp2 is the native op).
    if cfg.logits_soft_cap is None:
        def logits(s):
            return s * (cfg.scale * _LOG2E)
    else:
        cap = cfg.logits_soft_cap

        def logits(s):
            return jnp.tanh(s * (cfg.scale / cap)) * (cap * _LOG2E)

    @pl.when(wg < consumers)
    def _consumer():
        if rebalance:
            plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(i * cfg.block_q + wg * _WG_ROWS, _WG_ROWS)  # this warpgroup's query rows
        q_tile = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, n], q_tile, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])

        def step(t, carry, *, masked: bool):
            acc, m, l = carry
            slot = lax.rem(t, jnp.int32(stages))
            plgpu.barrier_wait(k_bar.at[slot])
            s = logits(_matmul(q_tile, kt_smem.at[slot], (_WG_ROWS, bk)))  # f32, base 2
            if masked:
                plgpu.barrier_wait(m_bar.at[slot])
                bias = bias_smem.at[slot, wg][...]  # this warpgroup's rows of the mask tile
                s = s + layout(bias, plgpu.Layout.WGMMA).astype(jnp.float32)
            m_new = jnp.maximum(m, s.max(axis=1))  # [64]
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            alpha = jnp.exp2(m - m_new)
            l = l * alpha + p.sum(axis=1)
            plgpu.barrier_wait(v_bar.at[slot])
            if cfg.p_via_smem:
                p_tile = p_smem.at[wg]
                p_tile[...] = p.astype(dtype)
                plgpu.commit_smem()  # make the register -> SMEM stores visible to wgmma
                pv = _matmul(p_tile, v_smem.at[slot], (_WG_ROWS, hv))
            else:
                pv = _matmul(p.astype(dtype), v_smem.at[slot], (_WG_ROWS, hv))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
            # Both wgmma of this step have completed (their accumulators were read): release the
            # slot to the producer, which refills it with step t + stages if there is one (every
            # release is then awaited, as the interpreter checks).
            pl.when(t + stages < total)(lambda: plgpu.barrier_arrive(free_bar.at[slot]))
            return acc, m_new, l

        row_layout = _wgmma_row_layout()
        carry = (layout(jnp.zeros((_WG_ROWS, hv), jnp.float32), plgpu.Layout.WGMMA),
                 layout(jnp.full((_WG_ROWS,), _NEG_INIT, jnp.float32), row_layout),
                 layout(jnp.zeros((_WG_ROWS,), jnp.float32), row_layout))
        carry = lax.fori_loop(0, n_part, functools.partial(step, masked=True), carry)
        acc, m, l = lax.fori_loop(n_part, total, functools.partial(step, masked=False), carry)

        # Rows that saw no key (l == 0) give output 0 and lse -inf.
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        # With H == Hv the output reuses this warpgroup's Q tile (its last reader has finished).
        o_tile = q_tile if o_smem is None else o_smem.at[wg]
        o_tile[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(dtype)
        lse_tile = lse_smem.at[wg]
        lse_tile[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * _LN2, -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_tile, out_ref.at[b, rows, n])
        plgpu.copy_smem_to_gmem(lse_tile, lse_ref.at[b, n, rows])
        plgpu.wait_smem_to_gmem(0)


def _pad_axis(x, axis: int, size: int):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def flash_forward_mosaic_gpu(q, k, v, meta: BlockSparseMeta, *, config: MosaicGPUConfig,
                             interpret=None):
    """Block-sparse flash-attention forward on Hopper via Mosaic GPU (FlashAttention-2/3).

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]``; bf16 or f16, one dtype;
        ``N % K == 0`` (GQA: head ``n`` reads kv head ``n // (N // K)``); ``H, Hv`` in
        64 / 128 / 256.
      meta: :class:`~pallas_kernels.flash.metadata.BlockSparseMeta` built on the
        ``(config.block_q, config.block_kv)`` grid of the unpadded ``[T, S]`` problem (batch/head
        dims 1 or ``B`` / ``N``). Only ``meta.fwd`` and ``meta.blocks`` are used. Keys past ``S``
        must be masked by the partial tiles (``block_sparse_meta`` / ``dense_meta`` do this).
      config: static :class:`MosaicGPUConfig`.
      interpret: ``None`` to compile for the GPU, or ``interpret_params()`` to run the
        Mosaic-GPU interpreter on CPU (tests; slow).

    Returns:
      ``(out [B, T, N, Hv] in q.dtype, lse [B, T, N] f32)``. Rows with no visible key give 0 and
      ``lse = -inf``, as the portable kernels and the reference do.

    Not supported here (raise, or use the portable kernels): gradients (no backward kernel; do
    not differentiate through it), segment ids, attention sinks, f32 inputs, head dims other
    than 64/128/256. Lengths that are not multiples of the tiles are padded (padded keys are
    masked through the metadata, padded query rows are dropped).
    """
    if (meta.block_q, meta.block_kv) != (config.block_q, config.block_kv):
        raise ValueError(f"metadata is for tiles {(meta.block_q, meta.block_kv)}, the config has "
                         f"{(config.block_q, config.block_kv)}")
    return flash_forward_mosaic_gpu_arrays(q, k, v, jnp.asarray(meta.fwd),
                                           jnp.asarray(meta.blocks), config=config,
                                           interpret=interpret)


def flash_forward_mosaic_gpu_arrays(q, k, v, meta_fwd, blocks, *, config: MosaicGPUConfig,
                                    interpret=None):
    """:func:`flash_forward_mosaic_gpu` on the metadata arrays (they may be traced, e.g. inside
    a ``custom_vjp`` as in ``pallas_kernels.flash.attention``).

    Args:
      q, k, v: as in :func:`flash_forward_mosaic_gpu`.
      meta_fwd: int32 ``[b, n, nq, 2 + 3 * nk]`` visit lists (``BlockSparseMeta.fwd``).
      blocks: int8/bool ``[P, block_q, block_kv]`` partial-tile element masks (1 = attend).
      config, interpret: as in :func:`flash_forward_mosaic_gpu`.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4, got {q.shape}, {k.shape}, {v.shape}")
    b, t, n, h = q.shape
    _, s, kh, hv = v.shape
    if k.shape != (b, s, kh, h) or v.shape[:3] != (b, s, kh) or n % kh:
        raise ValueError(f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES:
        raise TypeError(f"q, k, v must share a dtype in (bfloat16, float16), got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if h not in _HEAD_DIMS or hv not in _HEAD_DIMS:
        raise ValueError(f"head dims must be in {_HEAD_DIMS}, got H={h}, Hv={hv}")
    cfg = config
    bq, bk = cfg.block_q, cfg.block_kv
    nq, nk = -(-t // bq), -(-s // bk)
    if meta_fwd.ndim != 4 or meta_fwd.shape[2:] != (nq, 2 + 3 * nk):
        raise ValueError(f"meta_fwd {meta_fwd.shape} is not on the grid {(nq, nk)} that tiles "
                         f"{(bq, bk)} give for T={t}, S={s}")
    if blocks.ndim != 3 or blocks.shape[1:] != (bq, bk):
        raise ValueError(f"blocks must be [P, {bq}, {bk}], got {blocks.shape}")
    mb, mn = meta_fwd.shape[:2]
    if mb not in (1, b) or mn not in (1, n):
        raise ValueError(f"metadata batch/head dims {(mb, mn)} must be 1 or {(b, n)}")
    need = smem_bytes(cfg, h, hv, q.dtype.itemsize)
    if need > _SMEM_LIMIT:
        raise ValueError(f"tiles {(bq, bk)} x {cfg.num_stages} stages with H={h}, Hv={hv} need "
                         f"{need >> 10} KiB of SMEM (> {_SMEM_LIMIT >> 10} KiB); use smaller "
                         "tiles or fewer stages")
    tp, sp = nq * bq, nk * bk
    qp = _pad_axis(q, 1, tp)
    ktp = jnp.transpose(_pad_axis(k, 1, sp), (0, 2, 3, 1))  # [B, K, H, Sp]
    vp = _pad_axis(v, 1, sp)
    # Additive masks in the input dtype (0 or -inf are exact in bf16/f16): half the SMEM of f32.
    # Split by the rows each consumer warpgroup owns: [P, bq // 64, 64, bk].
    bias = jnp.where(blocks != 0, jnp.zeros((), q.dtype), jnp.full((), -jnp.inf, q.dtype))
    bias = bias.reshape(blocks.shape[0], bq // _WG_ROWS, _WG_ROWS, bk)

    kernel = functools.partial(_kernel, cfg=cfg, groups=n // kh, meta_batch=mb > 1,
                               meta_heads=mn > 1, kv_slots=nk,
                               interpreting=interpret is not None)
    st, wgs, rows = cfg.num_stages, bq // _WG_ROWS, _WG_ROWS
    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((b, tp, n, hv), q.dtype),
                  jax.ShapeDtypeStruct((b, n, tp), jnp.float32)),
        scratch_types=(
            _swizzled((wgs, rows, h), q.dtype),  # q, one tile per consumer warpgroup
            _swizzled((st, h, bk), q.dtype),  # K^T ring
            _swizzled((st, bk, hv), q.dtype),  # V ring
            _swizzled((st, wgs, rows, bk), q.dtype),  # mask ring, split by warpgroup rows
            _swizzled((wgs, rows, bk), q.dtype) if cfg.p_via_smem else None,  # P
            _swizzled((wgs, rows, hv), q.dtype) if hv != h else None,  # out (else reuses q)
            plgpu.SMEM((wgs, rows), jnp.float32),  # lse
            plgpu.Barrier(num_barriers=wgs),  # q loaded
            plgpu.Barrier(num_barriers=st),  # K^T slot filled
            plgpu.Barrier(num_barriers=st),  # V slot filled
            plgpu.Barrier(num_barriers=st),  # mask slot filled
            plgpu.Barrier(num_arrivals=wgs, num_barriers=st),  # slot released by all consumers
        ),
        grid=(nq, n, b),
        grid_names=("q", "heads", "batch"),
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=cfg.approx_math,
            lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret,
        kernel_name="flash_fwd_mosaic_gpu",
    )
    out, lse = call(meta_fwd.astype(jnp.int32), qp, ktp, vp, bias)
    return out[:, :t], jnp.transpose(lse[:, :, :t], (0, 2, 1))
