"""Kernel bodies of block-sparse flash attention (forward, dq, dk/dv).

FlashAttention-2 (Dao, 2023) recurrences with Splash/FlexAttention-style block sparsity: each
program owns one query tile (forward, dq) or one kv tile (dk/dv) and loops over the visit lists
of :mod:`pallas_kernels.flash.metadata` -- first the partial tiles, which apply their element mask,
then the full tiles, which apply none. Online softmax statistics are f32. Segment ids (packed
documents) are compared per tile from the id arrays; a tile whose query and key id ranges are
disjoint is skipped at run time without loading K/V.

An additive bias tile and a score function (FlexAttention's ``score_mod``, evaluated on the
tile's global index grids) enter each tile's logits in the reference's order,
``soft_cap(score_mod(scale * q k^T + bias))`` then the mask; the backward goes through the
score function with ``jax.vjp`` per tile. ``dbias_kernel`` reduces ``ds`` to a broadcast bias.

Ref shapes below are per program (squeezed batch/head dimensions removed). Per-row statistics
are kept as ``[bq, 1]`` columns and key segment ids as ``[1, bk]`` rows (2-D values lower on every
backend, including Mosaic TPU). The metadata and sinks refs hold whole arrays (SMEM on TPU) and
are indexed with the program ids.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash import dropout

__all__ = ["fwd_kernel", "dq_kernel", "dkv_kernel", "dbias_kernel", "NEG_INIT", "TileExtras",
           "call_score_mod"]

# Start of the running max: finite, so that exp(m_old - m_new) is never exp(-inf + inf) = NaN,
# and far below any real logit, so masked logits (-inf) still get probability exactly 0.
NEG_INIT = -1e30


def _dot_nt(a, b):
    """a [m, d], b [n, d] -> f32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    """a [m, k], b [k, n] -> f32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a [k, m], b [k, n] -> f32 [m, n]."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


@dataclasses.dataclass(frozen=True)
class TileExtras:
    """What one tile adds to ``scale * q k^T`` before the soft-cap: an additive ``bias`` tile
    (``[bq|1, bk|1]``, or None) and ``mod(x, args) -> score`` (the score function evaluated at the
    tile's indices, or None) with its argument values ``args``."""

    bias: Any = None
    mod: Callable | None = None
    args: tuple = ()


NO_EXTRAS = TileExtras()


def _index_grid(q_start, k_start, bq, bk):
    """Global query ``[bq, 1]`` and key ``[1, bk]`` int32 positions of a tile."""
    qi = q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    kj = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return qi, kj


def call_score_mod(score_mod, x, b, h, q_idx, kv_idx, args):
    """``score_mod(x, b, h, q_idx, kv_idx, *args)`` broadcast to ``x.shape``, as f32."""
    i32 = lambda a: jnp.asarray(a, jnp.int32)  # noqa: E731
    y = score_mod(x, i32(b), i32(h), i32(q_idx), i32(kv_idx), *args)
    return jnp.broadcast_to(y, x.shape).astype(jnp.float32)


def tile_extras(r, score_mod, b, h, q_start, k_start, bq, bk, bias=None):
    """The :class:`TileExtras` of the tile at global ``(q_start, k_start)`` of batch ``b`` and
    query head ``h``; the score function's arguments are the refs ``mod0, mod1, ...``."""
    if score_mod is None:
        return TileExtras(bias)
    qi, kj = _index_grid(q_start, k_start, bq, bk)
    args = tuple(r[f"mod{i}"][...] for i in range(sum(n.startswith("mod") for n in r)))
    return TileExtras(bias, lambda x, a: call_score_mod(score_mod, x, b, h, qi, kj, a), args)


def bias_cols(bias, start, bk):
    """Columns ``[start, start + bk)`` of a bias block ``[rows, Sp]`` (``[rows, 1]``: as is)."""
    if bias is None:
        return None
    return bias[...] if bias.shape[-1] == 1 else bias[:, pl.ds(start, bk)]


def _pre_cap(q, k, cfg, ex: TileExtras):
    """``scale * q k^T + bias`` of a tile, f32 [bq, bk] (the score function's input)."""
    x = _dot_nt(q, k) * cfg.scale
    if ex.bias is not None:
        x = x + ex.bias.astype(jnp.float32)
    return x


def _soft_cap(y, cfg):
    """Soft-capped logits and ``tanh(y / cap)`` (None without a cap)."""
    if cfg.logits_soft_cap is None:
        return y, None
    t = jnp.tanh(y / cfg.logits_soft_cap)
    return cfg.logits_soft_cap * t, t


def _logits(q, k, cfg, ex: TileExtras = NO_EXTRAS):
    """Logits f32 [bq, bk]: ``soft_cap(score_mod(scale * q k^T + bias))`` (the reference's
    order), and tanh(y / cap) (None without a cap)."""
    x = _pre_cap(q, k, cfg, ex)
    return _soft_cap(x if ex.mod is None else ex.mod(x, ex.args), cfg)


def _floating(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating)


def _keep(r, cfg, b, n, q_start, k_start, bq, bk, num_heads):
    """Dropout keep mask ``[bq, bk]`` of the tile at global ``(q_start, k_start)``, or None."""
    if not cfg.dropout_rate:
        return None
    qi = q_start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    kj = k_start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    return dropout.keep_mask(r["seed"][0], r["seed"][1], b, n, qi, kj, cfg.dropout_rate,
                             num_heads)


def _allowed(elem, seg_q, seg_kv):
    """Combine an element mask (int8 tile or None) with segment ids ([bq, 1], [1, bk] or None)."""
    allowed = None if elem is None else elem != 0
    if seg_q is not None:
        same = seg_q == seg_kv
        allowed = same if allowed is None else allowed & same
    return allowed


def _ranges_overlap(a, b):
    """Whether two id vectors can share a value (conservative: compares [min, max] ranges)."""
    return (jnp.min(a) <= jnp.max(b)) & (jnp.min(b) <= jnp.max(a))


def _meta_reader(meta_ref, ml, b, n, row):
    """``slot -> int`` reader of visit-list row ``row`` for batch ``b`` and query head ``n``.

    ``meta_ref`` is the whole flattened ``[mb * mn * rows * width]`` list array; ``ml`` is
    ``(batch_dependent, num_heads_or_1, rows, width)``.
    """
    batch_dep, mn, rows, width = ml
    mb_i = b if batch_dep else 0
    mn_i = n if mn > 1 else 0
    base = ((mb_i * mn + mn_i) * rows + row) * width
    return lambda slot: meta_ref[base + slot]


def _visit(meta, slots, tile_fn, carry, *, skip_fn=None):
    """Run ``tile_fn(block, elem_mask_index_or_None, carry)`` over a visit-list row.

    ``meta(i)`` reads slot ``i`` of the row ``[n_partial, n_full, partial (slots), mask index
    (slots), full (slots)]``. ``skip_fn(block)`` (optional) is a traced bool: skip the tile.
    """

    def run(block, pidx, c):
        if skip_fn is None:
            return tile_fn(block, pidx, c)
        return lax.cond(skip_fn(block), lambda c: c, lambda c: tile_fn(block, pidx, c), c)

    def partial_body(t, c):
        return run(meta(2 + t), meta(2 + slots + t), c)

    def full_body(t, c):
        return run(meta(2 + 2 * slots + t), None, c)

    carry = lax.fori_loop(0, meta(0), partial_body, carry)
    return lax.fori_loop(0, meta(1), full_body, carry)


def _unpack(refs, names):
    """Split ``refs`` by the static list ``names`` (absent optional inputs are not in it)."""
    return dict(zip(names, refs, strict=True))


def fwd_kernel(*refs, cfg, names, meta_layout, kv_slots, seg_skip, num_heads, score_mod=None):
    """Forward program for one (batch, head, query tile); grid ``(B, N, nq)``.

    Refs (by name): meta (whole), q [bq, H], k [Sp, H], v [Sp, Hv], optional seg_q [bq, 1],
    seg_kv [1, Sp], sinks (whole [N]), bias [bq|1, Sp|1], mod0.. (the score function's
    arguments, whole); blocks [P, bq, bk] -> out [bq, Hv], lse [bq, 1], optional visits [1, 1].
    """
    r = _unpack(refs, names)
    b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_kv
    has_seg = "seg_q" in r
    q = r["q"][...]
    seg_q = r["seg_q"][...] if has_seg else None
    if "sinks" in r:
        sink = r["sinks"][n].astype(jnp.float32)
        m0 = jnp.full((bq, 1), sink, jnp.float32)  # the sink is one extra logit with no value
        den0 = jnp.ones((bq, 1), jnp.float32)
    else:
        m0 = jnp.full((bq, 1), NEG_INIT, jnp.float32)
        den0 = jnp.zeros((bq, 1), jnp.float32)
    acc0 = jnp.zeros((bq, r["v"].shape[-1]), jnp.float32)

    def seg_kv_at(start):
        return r["seg_kv"][:, pl.ds(start, bk)]

    def tile(j, pidx, carry):
        m, den, acc, visits = carry
        start = pl.multiple_of(j * bk, bk)
        k = r["k"][pl.ds(start, bk), :]
        v = r["v"][pl.ds(start, bk), :]
        ex = tile_extras(r, score_mod, b, n, i * bq, start, bq, bk,
                         bias_cols(r.get("bias"), start, bk))
        s, _ = _logits(q, k, cfg, ex)  # [bq, bk]
        elem = None if pidx is None else r["blocks"][pidx]
        allowed = _allowed(elem, seg_q, seg_kv_at(start) if has_seg else None)
        if allowed is not None:
            s = jnp.where(allowed, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        den = alpha * den + jnp.sum(p, axis=-1, keepdims=True)  # dropout never touches den
        keep = _keep(r, cfg, b, n, i * bq, start, bq, bk, num_heads)
        if keep is not None:
            p = jnp.where(keep, p * (1.0 / (1.0 - cfg.dropout_rate)), 0.0)
        acc = alpha * acc + _dot_nn(p.astype(v.dtype), v)
        return m_new, den, acc, visits + 1

    skip = None
    if has_seg and seg_skip:
        def skip(j):
            return ~_ranges_overlap(seg_q, seg_kv_at(pl.multiple_of(j * bk, bk)))

    meta = _meta_reader(r["meta"], meta_layout, b, n, i)
    m, den, acc, visits = _visit(meta, kv_slots, tile, (m0, den0, acc0, jnp.int32(0)),
                                 skip_fn=skip)
    ok = den > 0
    den_safe = jnp.where(ok, den, 1.0)
    r["out"][...] = (acc / den_safe).astype(r["out"].dtype)
    r["lse"][...] = jnp.where(ok, m + jnp.log(den_safe), -jnp.inf)
    if "visits" in r:
        r["visits"][...] = jnp.full((1, 1), visits, jnp.int32)


def _grad_tile(q, k, v, do, lse, delta, allowed, cfg, keep=None, ex: TileExtras = NO_EXTRAS,
               arg_grads: bool = False):
    """Recompute probabilities of one tile: ``(p_v [bq, bk], ds [bq, bk], dargs)`` in f32.

    ``p_v`` multiplies V in the forward (``p``, or ``keep * p / (1 - rate)`` with dropout) and
    gives dV. ``ds = dL/dx`` for ``x = scale * q k^T + bias`` (so it is also dL/dbias):
    ``p * (dp - delta)`` times the soft-cap derivative and back through the score function,
    with ``dp`` masked and rescaled like ``p_v``. ``dargs``: with ``arg_grads``, this tile's
    gradients of the score function's floating arguments (None for the others), else None.
    ``lse``, ``delta`` are ``[bq, 1]``; ``lse`` is +inf on rows with no visible key, which makes
    their ``p`` exactly 0.
    """
    x = _pre_cap(q, k, cfg, ex)
    mod_vjp, float_at = None, ()
    if ex.mod is None:
        y = x
    elif arg_grads:
        float_at = tuple(i for i, a in enumerate(ex.args) if _floating(a))

        def with_args(x, fargs):
            args = list(ex.args)
            for i, a in zip(float_at, fargs, strict=True):
                args[i] = a
            return ex.mod(x, tuple(args))

        y, mod_vjp = jax.vjp(with_args, x, tuple(ex.args[i] for i in float_at))
    else:
        y, mod_vjp = jax.vjp(lambda x: ex.mod(x, ex.args), x)
    s, t = _soft_cap(y, cfg)
    p = jnp.exp(s - lse)
    if allowed is not None:
        p = jnp.where(allowed, p, 0.0)
    dp = _dot_nt(do, v)
    p_v = p
    if keep is not None:
        inv = 1.0 / (1.0 - cfg.dropout_rate)
        p_v = jnp.where(keep, p * inv, 0.0)
        dp = jnp.where(keep, dp * inv, 0.0)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)
    if mod_vjp is None:
        return p_v, ds, None
    if not arg_grads:
        return p_v, mod_vjp(ds)[0], None
    ds, fgrads = mod_vjp(ds)
    dargs = [None] * len(ex.args)
    for i, g in zip(float_at, fgrads, strict=True):
        dargs[i] = g.astype(jnp.float32)
    return p_v, ds, tuple(dargs)


def dq_kernel(*refs, cfg, names, meta_layout, kv_slots, seg_skip, num_heads, score_mod=None):
    """dq program for one (batch, head, query tile); grid ``(B, N, nq)``.

    Refs: meta (whole), q [bq, H], k [Sp, H], v [Sp, Hv], do [bq, Hv], lse [bq, 1],
    delta [bq, 1], optional seg_q [bq, 1], seg_kv [1, Sp], bias [bq|1, Sp|1], mod0..;
    blocks [P, bq, bk] -> dq [bq, H] f32 and, with a score function, dmod<i> (this program's
    partial gradient of each floating argument ``i``, f32, the argument's shape).
    """
    r = _unpack(refs, names)
    b, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bk = cfg.block_kv
    has_seg = "seg_q" in r
    q, do, lse, delta = r["q"][...], r["do"][...], r["lse"][...], r["delta"][...]
    seg_q = r["seg_q"][...] if has_seg else None

    bq = q.shape[0]
    dmod_names = tuple(nm for nm in names if nm.startswith("dmod"))

    def tile(j, pidx, carry):
        dq, dmod = carry
        start = pl.multiple_of(j * bk, bk)
        k = r["k"][pl.ds(start, bk), :]
        v = r["v"][pl.ds(start, bk), :]
        elem = None if pidx is None else r["blocks"][pidx]
        seg_kv = r["seg_kv"][:, pl.ds(start, bk)] if has_seg else None
        keep = _keep(r, cfg, b, n, i * bq, start, bq, bk, num_heads)
        ex = tile_extras(r, score_mod, b, n, i * bq, start, bq, bk,
                         bias_cols(r.get("bias"), start, bk))
        _, ds, dargs = _grad_tile(q, k, v, do, lse, delta, _allowed(elem, seg_q, seg_kv), cfg,
                                  keep, ex, arg_grads=bool(dmod_names))
        if dmod_names:
            dmod = tuple(acc + g for acc, g in zip(dmod, (g for g in dargs if g is not None),
                                                     strict=True))
        return dq + _dot_nn(ds.astype(k.dtype), k), dmod

    skip = None
    if has_seg and seg_skip:
        def skip(j):
            start = pl.multiple_of(j * bk, bk)
            return ~_ranges_overlap(seg_q, r["seg_kv"][:, pl.ds(start, bk)])

    meta = _meta_reader(r["meta"], meta_layout, b, n, i)
    dmod0 = tuple(jnp.zeros(r[nm].shape, jnp.float32) for nm in dmod_names)
    dq, dmod = _visit(meta, kv_slots, tile, (jnp.zeros(q.shape, jnp.float32), dmod0),
                      skip_fn=skip)
    r["dq"][...] = (dq * cfg.scale).astype(r["dq"].dtype)
    for nm, g in zip(dmod_names, dmod, strict=True):
        r[nm][...] = g


def dkv_kernel(*refs, cfg, names, meta_layout, q_slots, groups, seg_skip, num_heads,
               score_mod=None):
    """dk/dv program for one (batch, kv head, kv tile); grid ``(B, K, nk)``. Loops over the
    ``groups`` query heads sharing this kv head (GQA), each with its own visit list when the
    mask is per head.

    Refs: meta (whole), q [G, Tp, H], k [bk, H], v [bk, Hv], do [G, Tp, Hv], lse [G, Tp, 1],
    delta [G, Tp, 1], optional seg_q [Tp, 1], seg_kv [1, bk], bias [G|1, Tp|1, bk|1],
    mod0..; blocks [P, bq, bk] -> dk [bk, H], dv [bk, Hv] (f32).
    """
    r = _unpack(refs, names)
    b, kh, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq = cfg.block_q
    has_seg = "seg_q" in r
    k, v = r["k"][...], r["v"][...]
    seg_kv = r["seg_kv"][...] if has_seg else None
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)

    for g in range(groups):  # static: G is small

        def tile(i, pidx, carry, g=g):
            dk, dv = carry
            start = pl.multiple_of(i * bq, bq)
            q = r["q"][g, pl.ds(start, bq), :]
            do = r["do"][g, pl.ds(start, bq), :]
            lse = r["lse"][g, pl.ds(start, bq), :]
            delta = r["delta"][g, pl.ds(start, bq), :]
            elem = None if pidx is None else r["blocks"][pidx]
            seg_q = r["seg_q"][pl.ds(start, bq), :] if has_seg else None
            bk = k.shape[0]
            keep = _keep(r, cfg, b, kh * groups + g, start, j * bk, bq, bk, num_heads)
            bias = None
            if "bias" in r:
                rows = pl.ds(start, bq) if r["bias"].shape[1] > 1 else pl.ds(0, 1)
                bias = r["bias"][g if r["bias"].shape[0] > 1 else 0, rows, :]
            ex = tile_extras(r, score_mod, b, kh * groups + g, start, j * bk, bq, bk, bias)
            p, ds, _ = _grad_tile(q, k, v, do, lse, delta, _allowed(elem, seg_q, seg_kv), cfg,
                                  keep, ex)
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        skip = None
        if has_seg and seg_skip:
            def skip(i):
                start = pl.multiple_of(i * bq, bq)
                return ~_ranges_overlap(r["seg_q"][pl.ds(start, bq), :], seg_kv)

        meta = _meta_reader(r["meta"], meta_layout, b, kh * groups + g, j)
        dk, dv = _visit(meta, q_slots, tile, (dk, dv), skip_fn=skip)
    r["dk"][...] = (dk * cfg.scale).astype(r["dk"].dtype)
    r["dv"][...] = dv.astype(r["dv"].dtype)


def dbias_kernel(*refs, cfg, names, meta_layout, kv_slots, num_heads, full, accumulate,
                 score_mod=None):
    """dbias program for one output tile of a bias ``[B|1, N|1, T|1, S|1]``; grid ``(Bb, Nb,
    nq|1, nk|1, rB, rN)`` (the last two run over the batches / heads the bias is broadcast over).

    ``full = (batch, heads, rows, cols)``: which bias dimensions are not broadcast. A program
    owns the dbias block ``[bq|1, bk|1]`` and sums ``ds`` over what the bias is broadcast over
    without materialising it: broadcast rows / columns inside the program (it loops over every
    query tile when the rows are broadcast, and over the visit list's kv tiles, keeping only its
    own kv tile when the columns are not broadcast), broadcast batches / heads over the two
    innermost grid axes: with ``accumulate`` (sequential axes) into the resident output block,
    otherwise (Triton: no sequential grid axes) into per-``(rb, rn)`` partial blocks that the
    caller sums.

    Refs: meta (whole), q [bq|Tp, H], k [Sp, H], v [Sp, Hv], do [bq|Tp, Hv], lse, delta
    [bq|Tp, 1], optional seg_q [bq|Tp, 1], seg_kv [1, Sp], bias [bq|1, Sp|1], mod0..;
    blocks [P, bq, bk] -> dbias [bq|1, bk|1] f32.
    """
    r = _unpack(refs, names)
    ob, on, io, jo, rb, rn = (pl.program_id(a) for a in range(6))
    b_full, n_full, t_full, s_full = full
    b, n = (ob if b_full else rb), (on if n_full else rn)
    bq, bk = cfg.block_q, cfg.block_kv
    has_seg = "seg_q" in r

    def q_tile(il, acc):
        i = io if t_full else il  # global query tile
        qs = pl.multiple_of(il * bq, bq)  # its rows in this program's blocks
        q, do = r["q"][pl.ds(qs, bq), :], r["do"][pl.ds(qs, bq), :]
        lse, delta = r["lse"][pl.ds(qs, bq), :], r["delta"][pl.ds(qs, bq), :]
        seg_q = r["seg_q"][pl.ds(qs, bq), :] if has_seg else None

        def tile(j, pidx, acc):
            def add(acc):
                start = pl.multiple_of(j * bk, bk)
                k, v = r["k"][pl.ds(start, bk), :], r["v"][pl.ds(start, bk), :]
                elem = None if pidx is None else r["blocks"][pidx]
                seg_kv = r["seg_kv"][:, pl.ds(start, bk)] if has_seg else None
                keep = _keep(r, cfg, b, n, i * bq, start, bq, bk, num_heads)
                ex = tile_extras(r, score_mod, b, n, i * bq, start, bq, bk,
                                 bias_cols(r["bias"], start, bk))
                _, ds, _ = _grad_tile(q, k, v, do, lse, delta, _allowed(elem, seg_q, seg_kv),
                                      cfg, keep, ex)
                if not t_full:
                    ds = jnp.sum(ds, axis=0, keepdims=True)
                if not s_full:
                    ds = jnp.sum(ds, axis=1, keepdims=True)
                return acc + ds

            if s_full:  # only this program's kv tile
                return lax.cond(j == jo, add, lambda a: a, acc)
            return add(acc)

        return _visit(_meta_reader(r["meta"], meta_layout, b, n, i), kv_slots, tile, acc)

    acc0 = jnp.zeros(r["dbias"].shape, jnp.float32)
    acc = lax.fori_loop(0, r["q"].shape[0] // bq, q_tile, acc0)
    if accumulate:
        first = (rb == 0) & (rn == 0)
        acc = acc + jnp.where(first, 0.0, r["dbias"][...])
    r["dbias"][...] = acc
