"""Block-sparse flash attention: padding, ``pallas_call`` wiring and ``jax.custom_vjp``.

FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", 2023) driven by Splash-style block metadata (empty tiles skipped, full tiles
unmasked, partial tiles masked elementwise). The public layout is ``[batch, seq, heads,
head_dim]``; the kernels see ``[batch, heads, seq, head_dim]`` (transposed and padded here, so a
tile is the two minor dimensions on every lowering). GQA reads kv head ``n // (N // K)``
directly (K/V are never repeated). An additive bias keeps its ``[B|1, N|1, T|1, S|1]`` shape
(broadcast dims map to block 0); its gradient comes from a fourth kernel (``_dbias``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import kernels, lowering, mosaic_gpu
from pallas_kernels.flash.config import FlashConfig
from pallas_kernels.flash.metadata import BlockSparseMeta

__all__ = ["flash_attention", "mosaic_gpu_refusal"]

SQ = pl.squeezed


@dataclasses.dataclass(frozen=True)
class _Static:
    cfg: FlashConfig
    q_len: int
    kv_len: int
    meta_batch: int  # 1 or B
    meta_heads: int  # 1 or N
    has_seg: bool
    has_sink: bool
    bias_full: tuple[bool, bool, bool, bool] | None = None  # bias dims not broadcast (B, N, T, S)
    score_mod: Any = None  # fn(score, b, h, q_idx, kv_idx, *args), applied per tile

    @property
    def tpu(self) -> bool:
        return self.cfg.backend in ("mosaic_tpu", "tpu_interpret")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_axis(x, axis: int, size: int, mode: str = "constant"):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def _whole(st: _Static, x):
    """Spec for an array every program reads whole (metadata, sinks): SMEM on TPU."""
    if st.tpu:
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _meta_layout(st: _Static, meta, rows: int):
    return (st.meta_batch > 1, st.meta_heads, rows, meta.shape[-1])


def _seg_skip(st: _Static) -> bool:
    # The run-time "disjoint segment ranges" tile skip (a vector -> scalar reduction feeding
    # lax.cond) lowers for Triton and Mosaic TPU (checked from CPU) and runs in both interpreters.
    del st
    return True


# Internal layout is [batch, heads, seq, head_dim] (q: [B, N, Tp, H], k/v: [B, K, Sp, H]):
# tiles are then the two minor dimensions, which every lowering accepts (Mosaic TPU requires
# it). Segment ids are [B, Tp, 1] (query) and [B, 1, Sp] (key); lse/delta are [B, N, Tp, 1].


def _seed_input(st: _Static, seed, names, in_specs, args):
    """Append the dropout seed (uint32 [2], whole; SMEM on TPU) when the config drops."""
    if st.cfg.dropout_rate:
        names.append("seed")
        in_specs.append(_whole(st, seed))
        args.append(seed)


def _extra_inputs(st: _Static, bias, bias_spec, mod_args, names, in_specs, args):
    """Append the bias (block ``bias_spec``) and the score function's arguments (whole
    blocks; in VMEM on TPU, since a score function reads them as arrays)."""
    del st
    if bias is not None:
        names.append("bias")
        in_specs.append(bias_spec)
        args.append(bias)
    for i, a in enumerate(mod_args):
        names.append(f"mod{i}")
        in_specs.append(pl.BlockSpec(a.shape, lambda *_, nd=a.ndim: (0,) * nd))
        args.append(a)


def _bias_row_spec(st: _Static, bias, bq: int):
    """Bias block of a (batch, head, query tile) program: ``[bq|1, Sp|1]``, broadcast dims
    mapped to block 0 (never materialised)."""
    if bias is None:
        return None
    bf, nf, tf, _ = st.bias_full
    return pl.BlockSpec((SQ, SQ, bq if tf else 1, bias.shape[3]),
                        lambda ib, ih, i: (ib if bf else 0, ih if nf else 0, i if tf else 0, 0))


def _forward(st: _Static, q, k, v, sinks, seg_q, seg_kv, meta_fwd, blocks, seed=None,
             bias=None, mod_args=()):
    """Padded BNTH inputs -> out [B, N, Tp, Hv], lse [B, N, Tp, 1] f32, visits or None."""
    cfg = st.cfg
    b, n, tp, h = q.shape
    _, kh, sp, hv = v.shape
    g = n // kh
    bq = cfg.block_q
    nq = tp // bq
    flat = meta_fwd.reshape(-1)
    names = ["meta", "q", "k", "v"]
    in_specs = [
        _whole(st, flat),
        pl.BlockSpec((SQ, SQ, bq, h), lambda ib, ih, i: (ib, ih, i, 0)),
        pl.BlockSpec((SQ, SQ, sp, h), lambda ib, ih, i: (ib, lax.div(ih, g), 0, 0)),
        pl.BlockSpec((SQ, SQ, sp, hv), lambda ib, ih, i: (ib, lax.div(ih, g), 0, 0)),
    ]
    args = [flat, q, k, v]
    if st.has_seg:
        names += ["seg_q", "seg_kv"]
        in_specs += [pl.BlockSpec((SQ, bq, 1), lambda ib, ih, i: (ib, i, 0)),
                     pl.BlockSpec((SQ, 1, sp), lambda ib, ih, i: (ib, 0, 0))]
        args += [seg_q, seg_kv]
    if st.has_sink:
        names.append("sinks")
        in_specs.append(_whole(st, sinks))
        args.append(sinks.astype(jnp.float32))
    _seed_input(st, seed, names, in_specs, args)
    _extra_inputs(st, bias, _bias_row_spec(st, bias, bq), mod_args, names, in_specs, args)
    names += ["blocks", "out", "lse"]
    in_specs.append(pl.BlockSpec(blocks.shape, lambda ib, ih, i: (0, 0, 0)))
    args.append(blocks)
    out_specs = [pl.BlockSpec((SQ, SQ, bq, hv), lambda ib, ih, i: (ib, ih, i, 0)),
                 pl.BlockSpec((SQ, SQ, bq, 1), lambda ib, ih, i: (ib, ih, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, n, tp, hv), q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp, 1), jnp.float32)]
    if cfg.count_visits:
        names.append("visits")
        out_specs.append(pl.BlockSpec((SQ, SQ, SQ, 1, 1), lambda ib, ih, i: (ib, ih, i, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, n, nq, 1, 1), jnp.int32))
    kernel = functools.partial(
        kernels.fwd_kernel, cfg=cfg, names=tuple(names),
        meta_layout=_meta_layout(st, meta_fwd, nq), kv_slots=(meta_fwd.shape[-1] - 2) // 3,
        seg_skip=_seg_skip(st), num_heads=n, score_mod=st.score_mod)
    outs = lowering.call(kernel, cfg=cfg, grid=(b, n, nq), in_specs=in_specs,
                         out_specs=out_specs, out_shape=out_shape, name="flash_fwd")(*args)
    visits = outs[2][..., 0, 0] if cfg.count_visits else None
    return outs[0], outs[1], visits


def _dq(st: _Static, q, k, v, do, lse, delta, seg_q, seg_kv, meta_fwd, blocks, seed=None,
        bias=None, mod_args=()):
    """dq [B, N, Tp, H] f32 and, per floating score-function argument, its gradient (the
    kernel's per-(batch, head, query tile) partial sums, reduced here; None for the others)."""
    cfg = st.cfg
    b, n, tp, h = q.shape
    _, kh, sp, hv = v.shape
    g = n // kh
    bq = cfg.block_q
    flat = meta_fwd.reshape(-1)
    names = ["meta", "q", "k", "v", "do", "lse", "delta"]
    row = pl.BlockSpec((SQ, SQ, bq, 1), lambda ib, ih, i: (ib, ih, i, 0))
    in_specs = [
        _whole(st, flat),
        pl.BlockSpec((SQ, SQ, bq, h), lambda ib, ih, i: (ib, ih, i, 0)),
        pl.BlockSpec((SQ, SQ, sp, h), lambda ib, ih, i: (ib, lax.div(ih, g), 0, 0)),
        pl.BlockSpec((SQ, SQ, sp, hv), lambda ib, ih, i: (ib, lax.div(ih, g), 0, 0)),
        pl.BlockSpec((SQ, SQ, bq, hv), lambda ib, ih, i: (ib, ih, i, 0)),
        row,
        row,
    ]
    args = [flat, q, k, v, do, lse, delta]
    if st.has_seg:
        names += ["seg_q", "seg_kv"]
        in_specs += [pl.BlockSpec((SQ, bq, 1), lambda ib, ih, i: (ib, i, 0)),
                     pl.BlockSpec((SQ, 1, sp), lambda ib, ih, i: (ib, 0, 0))]
        args += [seg_q, seg_kv]
    _seed_input(st, seed, names, in_specs, args)
    _extra_inputs(st, bias, _bias_row_spec(st, bias, bq), mod_args, names, in_specs, args)
    names += ["blocks", "dq"]
    in_specs.append(pl.BlockSpec(blocks.shape, lambda ib, ih, i: (0, 0, 0)))
    args.append(blocks)
    nq = tp // bq
    out_specs = [pl.BlockSpec((SQ, SQ, bq, h), lambda ib, ih, i: (ib, ih, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, n, tp, h), jnp.float32)]
    float_at = [i for i, a in enumerate(mod_args) if jnp.issubdtype(a.dtype, jnp.floating)]
    if st.score_mod is None:
        float_at = []
    for i in float_at:  # per-program partial gradients of the score function's arguments
        a = mod_args[i]
        names.append(f"dmod{i}")
        out_specs.append(pl.BlockSpec((SQ, SQ, SQ, *a.shape),
                                      lambda ib, ih, iq, nd=a.ndim: (ib, ih, iq) + (0,) * nd))
        out_shape.append(jax.ShapeDtypeStruct((b, n, nq, *a.shape), jnp.float32))
    kernel = functools.partial(
        kernels.dq_kernel, cfg=cfg, names=tuple(names),
        meta_layout=_meta_layout(st, meta_fwd, nq), kv_slots=(meta_fwd.shape[-1] - 2) // 3,
        seg_skip=_seg_skip(st), num_heads=n, score_mod=st.score_mod)
    outs = lowering.call(kernel, cfg=cfg, grid=(b, n, nq), in_specs=in_specs,
                         out_specs=out_specs, out_shape=out_shape, name="flash_dq")(*args)
    dmod = [None] * len(mod_args)
    for i, g in zip(float_at, outs[1:], strict=True):
        dmod[i] = jnp.sum(g, axis=(0, 1, 2)).astype(mod_args[i].dtype)
    return outs[0], tuple(dmod)


def _dkv(st: _Static, q, k, v, do, lse, delta, seg_q, seg_kv, meta_bwd, blocks, seed=None,
         bias=None, mod_args=()):
    cfg = st.cfg
    b, n, tp, h = q.shape
    _, kh, sp, hv = v.shape
    g = n // kh
    bk = cfg.block_kv
    nk = sp // bk
    flat = meta_bwd.reshape(-1)
    names = ["meta", "q", "k", "v", "do", "lse", "delta"]
    group = lambda ib, ih, j: (ib, ih, 0, 0)  # noqa: E731  (the G query heads of kv head ih)
    in_specs = [
        _whole(st, flat),
        pl.BlockSpec((SQ, g, tp, h), group),
        pl.BlockSpec((SQ, SQ, bk, h), lambda ib, ih, j: (ib, ih, j, 0)),
        pl.BlockSpec((SQ, SQ, bk, hv), lambda ib, ih, j: (ib, ih, j, 0)),
        pl.BlockSpec((SQ, g, tp, hv), group),
        pl.BlockSpec((SQ, g, tp, 1), group),
        pl.BlockSpec((SQ, g, tp, 1), group),
    ]
    args = [flat, q, k, v, do, lse, delta]
    if st.has_seg:
        names += ["seg_q", "seg_kv"]
        in_specs += [pl.BlockSpec((SQ, tp, 1), lambda ib, ih, j: (ib, 0, 0)),
                     pl.BlockSpec((SQ, 1, bk), lambda ib, ih, j: (ib, 0, j))]
        args += [seg_q, seg_kv]
    _seed_input(st, seed, names, in_specs, args)
    bias_spec = None
    if bias is not None:  # [G|1, Tp|1, bk|1] of the kv head's query heads
        bf, nf, tf, sf = st.bias_full
        bias_spec = pl.BlockSpec(
            (SQ, g if nf else 1, tp if tf else 1, bk if sf else 1),
            lambda ib, ih, j: (ib if bf else 0, ih if nf else 0, 0, j if sf else 0))
    _extra_inputs(st, bias, bias_spec, mod_args, names, in_specs, args)
    names += ["blocks", "dk", "dv"]
    in_specs.append(pl.BlockSpec(blocks.shape, lambda ib, ih, j: (0, 0, 0)))
    args.append(blocks)
    kernel = functools.partial(
        kernels.dkv_kernel, cfg=cfg, names=tuple(names),
        meta_layout=_meta_layout(st, meta_bwd, nk), q_slots=(meta_bwd.shape[-1] - 2) // 3,
        groups=g, seg_skip=_seg_skip(st), num_heads=n, score_mod=st.score_mod)
    return lowering.call(
        kernel, cfg=cfg, grid=(b, kh, nk), in_specs=in_specs,
        out_specs=[pl.BlockSpec((SQ, SQ, bk, h), lambda ib, ih, j: (ib, ih, j, 0)),
                   pl.BlockSpec((SQ, SQ, bk, hv), lambda ib, ih, j: (ib, ih, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, kh, sp, h), jnp.float32),
                   jax.ShapeDtypeStruct((b, kh, sp, hv), jnp.float32)],
        name="flash_dkv",
    )(*args)


def _dbias(st: _Static, q, k, v, do, lse, delta, seg_q, seg_kv, meta_fwd, blocks, seed, bias,
           mod_args):
    """dbias in the padded bias's shape ``[B|1, N|1, Tp|1, Sp|1]`` (f32), never materialising
    a broadcast: a program per dbias tile, with the broadcast batches / heads reduced over the
    two innermost grid axes, sequential and accumulated in the output block (interpreters,
    Mosaic TPU), or, on Triton (no sequential axes), as per-(batch, head) partial tiles summed
    here (then ``B*N/(Bb*Nb)`` times the bias's size is written)."""
    cfg = st.cfg
    b, n, tp, h = q.shape
    _, kh, sp, hv = v.shape
    g = n // kh
    bq, bk = cfg.block_q, cfg.block_kv
    nq, nk = tp // bq, sp // bk
    bf, nf, tf, sf = st.bias_full
    grid = (b if bf else 1, n if nf else 1, nq if tf else 1, nk if sf else 1,
            1 if bf else b, 1 if nf else n)
    rows = bq if tf else tp
    bi = lambda ob, rb: ob if bf else rb  # noqa: E731  (the batch / head a program reads)
    ni = lambda on, rn: on if nf else rn  # noqa: E731
    row_spec = lambda d: pl.BlockSpec(  # noqa: E731
        (SQ, SQ, rows, d), lambda ob, on, io, jo, rb, rn: (bi(ob, rb), ni(on, rn),
                                                            io if tf else 0, 0))
    kv_spec = lambda d: pl.BlockSpec(  # noqa: E731
        (SQ, SQ, sp, d), lambda ob, on, io, jo, rb, rn: (bi(ob, rb), lax.div(ni(on, rn), g),
                                                          0, 0))
    flat = meta_fwd.reshape(-1)
    names = ["meta", "q", "k", "v", "do", "lse", "delta"]
    in_specs = [_whole(st, flat), row_spec(h), kv_spec(h), kv_spec(hv), row_spec(hv),
                row_spec(1), row_spec(1)]
    args = [flat, q, k, v, do, lse, delta]
    if st.has_seg:
        names += ["seg_q", "seg_kv"]
        in_specs += [
            pl.BlockSpec((SQ, rows, 1), lambda ob, on, io, jo, rb, rn: (bi(ob, rb),
                                                                         io if tf else 0, 0)),
            pl.BlockSpec((SQ, 1, sp), lambda ob, on, io, jo, rb, rn: (bi(ob, rb), 0, 0))]
        args += [seg_q, seg_kv]
    _seed_input(st, seed, names, in_specs, args)
    bias_spec = pl.BlockSpec((SQ, SQ, bq if tf else 1, bias.shape[3]),
                             lambda ob, on, io, jo, rb, rn: (ob, on, io, 0))
    _extra_inputs(st, bias, bias_spec, mod_args, names, in_specs, args)
    names += ["blocks", "dbias"]
    in_specs.append(pl.BlockSpec(blocks.shape, lambda *_: (0, 0, 0)))
    args.append(blocks)
    tile = (bq if tf else 1, bk if sf else 1)
    padded = (grid[0], grid[1], tp if tf else 1, sp if sf else 1)
    accumulate = cfg.backend != "triton"
    if accumulate:
        out_spec = pl.BlockSpec((SQ, SQ, *tile), lambda ob, on, io, jo, rb, rn: (ob, on, io, jo))
        out_shape = jax.ShapeDtypeStruct(padded, jnp.float32)
    else:
        out_spec = pl.BlockSpec((SQ, SQ, SQ, SQ, *tile),
                                lambda ob, on, io, jo, rb, rn: (rb, rn, ob, on, io, jo))
        out_shape = jax.ShapeDtypeStruct(grid[4:] + padded, jnp.float32)
    kernel = functools.partial(
        kernels.dbias_kernel, cfg=cfg, names=tuple(names),
        meta_layout=_meta_layout(st, meta_fwd, nq), kv_slots=(meta_fwd.shape[-1] - 2) // 3,
        num_heads=n, full=st.bias_full, accumulate=accumulate, score_mod=st.score_mod)
    out = lowering.call(kernel, cfg=cfg, grid=grid, in_specs=in_specs, out_specs=out_spec,
                        out_shape=out_shape, name="flash_dbias",
                        sequential_minor=2 if accumulate else 0)(*args)
    return out if accumulate else jnp.sum(out, axis=(0, 1))


def _pad_bias(st: _Static, bias):
    """Pad the bias's non-broadcast T / S dims to the tile grid (broadcast dims stay 1)."""
    if bias is None:
        return None
    _, _, tf, sf = st.bias_full
    if tf:
        bias = _pad_axis(bias, 2, _round_up(st.q_len, st.cfg.block_q))
    if sf:
        bias = _pad_axis(bias, 3, _round_up(st.kv_len, st.cfg.block_kv))
    return bias


def _bnth(x, length: int):
    """[B, L, heads, D] -> padded [B, heads, length, D]."""
    return _pad_axis(jnp.transpose(x, (0, 2, 1, 3)), 2, length)


def _from_bnth(x, length: int):
    """[B, heads, Lp, D] -> [B, length, heads, D]."""
    return jnp.transpose(x[:, :, :length], (0, 2, 1, 3))


def _pad_inputs(st: _Static, q, k, v, seg_q, seg_kv):
    cfg = st.cfg
    tp, sp = _round_up(st.q_len, cfg.block_q), _round_up(st.kv_len, cfg.block_kv)
    q, k, v = _bnth(q, tp), _bnth(k, sp), _bnth(v, sp)
    if st.has_seg:
        # Edge padding keeps each tile's id range tight (the run-time skip test stays sharp);
        # padded keys are masked by the partial-tile masks, padded query rows are discarded.
        seg_q = _pad_axis(seg_q.astype(jnp.int32), 1, tp, "edge")[:, :, None]  # [B, Tp, 1]
        seg_kv = _pad_axis(seg_kv.astype(jnp.int32), 1, sp, "edge")[:, None, :]  # [B, 1, Sp]
    return q, k, v, seg_q, seg_kv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st, q, k, v, sinks, seg_q, seg_kv, meta_fwd, meta_bwd, blocks, seed, bias, mod_args):
    out, lse, visits, _ = _flash_fwd_impl(st, q, k, v, sinks, seg_q, seg_kv, meta_fwd, blocks,
                                          seed, bias, mod_args)
    return out, lse, visits


def _flash_fwd_impl(st, q, k, v, sinks, seg_q, seg_kv, meta_fwd, blocks, seed, bias, mod_args):
    qp, kp, vp, sqp, skp = _pad_inputs(st, q, k, v, seg_q, seg_kv)
    bp = _pad_bias(st, bias)
    if st.cfg.backend == "mosaic_gpu":  # Hopper forward on the [B, T, N, H] inputs as given
        out, lse = mosaic_gpu.flash_forward_mosaic_gpu_arrays(
            q, k, v, meta_fwd, blocks, config=_mosaic_config(st.cfg))
        return out, lse, None, (qp, kp, vp, sqp, skp, bp)
    out, lse, visits = _forward(st, qp, kp, vp, sinks, sqp, skp, meta_fwd, blocks, seed, bp,
                                mod_args)
    out = _from_bnth(out, st.q_len)
    lse = jnp.transpose(lse[:, :, : st.q_len, 0], (0, 2, 1))  # [B, T, N]
    return out, lse, visits, (qp, kp, vp, sqp, skp, bp)


def _flash_fwd(st, q, k, v, sinks, seg_q, seg_kv, meta_fwd, meta_bwd, blocks, seed, bias,
               mod_args):
    out, lse, visits, padded = _flash_fwd_impl(st, q, k, v, sinks, seg_q, seg_kv, meta_fwd,
                                               blocks, seed, bias, mod_args)
    res = (padded, sinks, meta_fwd, meta_bwd, blocks, seed, out, lse, bias, mod_args)
    return (out, lse, visits), res


def _flash_bwd(st, res, cts):
    (qp, kp, vp, sqp, skp, bp), sinks, meta_fwd, meta_bwd, blocks, seed, out, lse, bias, \
        mod_args = res
    d_out, d_lse = cts[0], cts[1]
    tp = qp.shape[2]
    # delta_t = sum_j p_tj dp_tj = dO_t . O_t; a cotangent on the LSE adds p * d_lse to dlogits,
    # which is the same as subtracting it from delta (d lse / d logit_j = p_j).
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, N]
    delta = delta - d_lse.astype(jnp.float32)
    # Rows with no visible key have lse = -inf; +inf makes their recomputed p exactly 0.
    lse_safe = jnp.where(jnp.isfinite(lse), lse, jnp.inf)
    lse_p = _pad_axis(jnp.transpose(lse_safe, (0, 2, 1)), 2, tp)[..., None]  # [B, N, Tp, 1]
    delta_p = _pad_axis(jnp.transpose(delta, (0, 2, 1)), 2, tp)[..., None]
    dop = _bnth(d_out.astype(qp.dtype), tp)
    if st.cfg.backend == "mosaic_gpu":  # no Mosaic-GPU backward yet: Triton-lowered dq / dkv
        st = dataclasses.replace(st, cfg=dataclasses.replace(st.cfg, backend="triton"))
    dq, dmod = _dq(st, qp, kp, vp, dop, lse_p, delta_p, sqp, skp, meta_fwd, blocks, seed, bp,
                   mod_args)
    dk, dv = _dkv(st, qp, kp, vp, dop, lse_p, delta_p, sqp, skp, meta_bwd, blocks, seed, bp,
                  mod_args)
    dbias = None
    if bias is not None:
        dbias = _dbias(st, qp, kp, vp, dop, lse_p, delta_p, sqp, skp, meta_fwd, blocks, seed,
                       bp, mod_args)
        dbias = dbias[:, :, : bias.shape[2], : bias.shape[3]].astype(bias.dtype)
    dq = _from_bnth(dq, st.q_len).astype(qp.dtype)
    dk = _from_bnth(dk, st.kv_len).astype(kp.dtype)
    dv = _from_bnth(dv, st.kv_len).astype(vp.dtype)
    d_sinks = None
    if sinks is not None:
        # d sink = -p_sink * delta (the sink's logit has no value vector, so dp_sink = 0).
        p_sink = jnp.exp(sinks.astype(jnp.float32)[None, None, :] - lse)  # [B, T, N]
        d_sinks = (-jnp.sum(p_sink * delta, axis=(0, 1))).astype(sinks.dtype)
    return dq, dk, dv, d_sinks, None, None, None, None, None, None, dbias, dmod


_flash.defvjp(_flash_fwd, _flash_bwd)


def mosaic_gpu_refusal(q, v, *, has_segments: bool, has_sinks: bool,
                       config: FlashConfig) -> str | None:
    """Why the Mosaic-GPU forward cannot run a call (None if it can); callers then use
    ``backend="triton"``. ``q [B, T, N, H]``, ``v [B, S, K, Hv]`` (arrays or shape structs)."""
    if q.dtype not in mosaic_gpu.SUPPORTED_DTYPES:
        return f"it takes bf16/f16 inputs, got {q.dtype}"
    if q.shape[-1] not in mosaic_gpu.HEAD_DIMS or v.shape[-1] not in mosaic_gpu.HEAD_DIMS:
        return f"head dims must be in {mosaic_gpu.HEAD_DIMS}, got H={q.shape[-1]}, " \
               f"Hv={v.shape[-1]}"
    if has_segments or has_sinks:
        return "it has no segment ids or sinks yet"
    if config.dropout_rate:
        return "it has no dropout yet"
    if config.count_visits:
        return "it does not count visits"
    try:  # the tile rules live in MosaicGPUConfig
        _mosaic_config(config)
    except ValueError as e:
        return str(e)
    return None


def _mosaic_config(cfg: FlashConfig) -> mosaic_gpu.MosaicGPUConfig:
    """The Mosaic-GPU kernel's config for ``cfg`` (ValueError if its tiles do not fit it)."""
    return mosaic_gpu.MosaicGPUConfig(block_q=cfg.block_q, block_kv=cfg.block_kv,
                                      scale=cfg.scale, logits_soft_cap=cfg.logits_soft_cap,
                                      num_stages=cfg.num_stages)


def flash_attention(q, k, v, meta: BlockSparseMeta, *, config: FlashConfig,
                    q_segment_ids=None, kv_segment_ids=None, sinks=None, dropout_seed=None,
                    bias=None, score_mod=None, score_mod_args=()):
    """Block-sparse flash attention (FlashAttention-2, Dao 2023): Pallas forward kernel and
    Pallas dq / dk-dv backward kernels tied by ``jax.custom_vjp``.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]`` with ``N % K == 0`` (GQA:
        head ``n`` reads kv head ``n // (N // K)``). One floating dtype for all three.
      meta: :class:`BlockSparseMeta` on the ``(config.block_q, config.block_kv)`` grid of the
        unpadded ``[T, S]`` problem; its batch/head dims are 1 or ``B`` / ``N``.
      config: static :class:`FlashConfig` (tiles, scale, soft-cap, lowering).
      q_segment_ids, kv_segment_ids: optional int ``[B, T]`` / ``[B, S]`` document ids (may be
        traced); a query sees only keys with an equal id.
      sinks: optional ``[N]`` attention-sink logits (one extra logit per head with no value).
      dropout_seed: uint32 ``[2]`` (e.g. ``jax.random.bits(key, (2,), jnp.uint32)``), required
        when ``config.dropout_rate > 0``: entry ``(b, n, i, j)`` is dropped by a hash of these
        indices and the seed (:mod:`pallas_kernels.flash.dropout`).
      bias: optional floating ``[B|1, N|1, T|1, S|1]`` additive bias, added to the scaled logits
        before the score function, the soft-cap and the mask. Broadcast (size-1) dims are never
        materialised (the BlockSpecs map them to block 0), nor in ``dbias`` (see ``_dbias``).
      score_mod: optional ``fn(score, b, h, q_idx, kv_idx, *score_mod_args) -> score`` applied
        per tile to ``scale * q k^T + bias`` (before the soft-cap and the mask): ``score`` f32
        ``[block_q, block_kv]``, ``b``, ``h`` int32 scalars (``h`` the query head), ``q_idx``
        int32 ``[block_q, 1]``, ``kv_idx`` ``[1, block_kv]`` (global positions). On GPU / TPU
        it must use operations the lowering supports (a gather from a table may not lower).
      score_mod_args: arrays passed whole to every program; floating ones get gradients, from
        per-(batch, head, query tile) partial sums the dq kernel writes
        (``B * N * num_q_blocks`` copies of each argument's shape, summed in XLA).

    Returns:
      ``(out [B, T, N, Hv] in q.dtype, lse [B, T, N] f32, visits)``; ``visits`` is int32
      ``[B, N, num_q_blocks]`` (kv tiles each query tile computed) when
      ``config.count_visits``, else ``None``. Rows with no visible key give 0 and ``lse=-inf``.
      Differentiable in q, k, v, sinks, bias, the floating ``score_mod_args`` (and through
      ``lse``).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be rank 4, got {q.shape}, {k.shape}, {v.shape}")
    b, t, n, h = q.shape
    _, s, kh, _ = k.shape
    if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != h or n % kh:
        raise ValueError(f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    nq, nk = -(-t // config.block_q), -(-s // config.block_kv)
    if (meta.block_q, meta.block_kv) != (config.block_q, config.block_kv) or meta.grid != (nq, nk):
        raise ValueError(
            f"metadata is for tiles {(meta.block_q, meta.block_kv)} on grid {meta.grid}, but "
            f"config has tiles {(config.block_q, config.block_kv)} and T={t}, S={s} need grid "
            f"{(nq, nk)}")
    mb, mn = meta.kind.shape[:2]
    if mb not in (1, b) or mn not in (1, n):
        raise ValueError(f"metadata batch/head dims {(mb, mn)} must be 1 or {(b, n)}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and (q_segment_ids.shape != (b, t)
                                      or kv_segment_ids.shape != (b, s)):
        raise ValueError(f"segment ids must be [B, T]={b, t} and [B, S]={b, s}, got "
                         f"{q_segment_ids.shape}, {kv_segment_ids.shape}")
    if sinks is not None and sinks.shape != (n,):
        raise ValueError(f"sinks must have shape [N]=({n},), got {sinks.shape}")
    if config.backend == "mosaic_gpu":
        why = mosaic_gpu_refusal(q, v, has_segments=q_segment_ids is not None,
                                 has_sinks=sinks is not None, config=config)
        if why is not None:
            raise ValueError(f"backend='mosaic_gpu' cannot run this call: {why}")
    if config.dropout_rate:
        if dropout_seed is None or dropout_seed.shape != (2,):
            raise ValueError("config.dropout_rate > 0 needs dropout_seed, a uint32 [2] array")
        dropout_seed = dropout_seed.astype(jnp.uint32)
    else:
        dropout_seed = None
    bias_full = None if bias is None else _check_bias(bias, (b, n, t, s))
    score_mod_args = _check_score_mod(score_mod, tuple(score_mod_args), config)
    if config.backend == "mosaic_gpu" and (bias is not None or score_mod is not None):
        raise ValueError("backend='mosaic_gpu' has no bias or score_mod; use backend='triton'")
    st = _Static(config, t, s, mb, mn, q_segment_ids is not None, sinks is not None, bias_full,
                 score_mod)
    return _flash(st, q, k, v, sinks, q_segment_ids, kv_segment_ids,
                  jnp.asarray(meta.fwd), jnp.asarray(meta.bwd), jnp.asarray(meta.blocks),
                  dropout_seed, bias, score_mod_args)


def _check_bias(bias, bnts) -> tuple[bool, bool, bool, bool]:
    """Which dims of a ``[B|1, N|1, T|1, S|1]`` bias are not broadcast (ValueError otherwise)."""
    shape = tuple(getattr(bias, "shape", ()))
    if len(shape) != 4 or any(d not in (1, full) for d, full in zip(shape, bnts, strict=True)):
        raise ValueError(f"bias must be [B|1, N|1, T|1, S|1] with [B, N, T, S]={list(bnts)}, "
                         f"got shape {shape}")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"bias must be floating, got {bias.dtype}")
    return tuple(d > 1 for d in shape)


def _check_score_mod(score_mod, args: tuple, config: FlashConfig) -> tuple:
    """``args`` as arrays, after checking ``score_mod`` keeps a tile's shape (abstractly)."""
    if score_mod is None:
        if args:
            raise ValueError("score_mod_args were given without a score_mod")
        return ()
    if not callable(score_mod):
        raise TypeError(f"score_mod must be callable, got {type(score_mod).__name__}")
    args = tuple(jnp.asarray(a) for a in args)
    bq, bk = config.block_q, config.block_kv
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    score = jax.ShapeDtypeStruct((bq, bk), jnp.float32)
    out = jax.eval_shape(lambda x, b, h, qi, kj, *a: score_mod(x, b, h, qi, kj, *a), score,
                         i32(), i32(), i32(bq, 1), i32(1, bk), *args)
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"score_mod must return floating scores, got dtype {dtype}")
    try:
        ok = jnp.broadcast_shapes(tuple(shape), (bq, bk)) == (bq, bk)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"score_mod returned shape {tuple(shape)} for a [block_q, block_kv] = "
                         f"{[bq, bk]} tile of scores; it must keep the scores' shape")
    return args


