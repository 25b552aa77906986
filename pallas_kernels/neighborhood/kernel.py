"""Fused neighborhood attention as block-sparse flash attention with per-query box windows.

Fused Neighborhood Attention (Hassani et al., "Faster Neighborhood Attention", NeurIPS 2024) and
GNA (2025): after token permutation, every query tile is a hyper-rectangle of one dilation group
and visits a hyper-rectangle of key tiles. The caller supplies, in permuted token order:

* ``q_start, q_end [L, ndim]``: each query's window ``[start, end)`` per dimension (within-group
  coordinates; padding queries have ``start == end``, so they see nothing);
* ``k_coord [L, ndim]``: each key's within-group coordinate (padding keys: a value outside every
  window);
* ``table [num_q_tiles, 1 + max_visits]``: row ``i`` = ``[count, kv tile ids...]`` (forward, dq);
* ``table_t [num_kv_tiles, 1 + max_visitors]``: the transpose (dk/dv).

A key is attended iff its coordinate lies in the query's box in every dimension. Only visited
tiles are loaded; the mask inside a tile is recomputed from the coordinates (O(L) metadata, no
dense mask). Forward and backward (dq; dk/dv) are separate kernels under one ``custom_vjp``.

Layout: ``q [B, N, L, H]``, ``k [B, K, L, H]``, ``v [B, K, L, Hv]`` (heads-major; GQA query head
``n`` uses kv head ``n // (N // K)``). This module imports only jax and numpy.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

__all__ = ["BoxConfig", "box_attention"]


@dataclasses.dataclass(frozen=True)
class BoxConfig:
    """Static configuration: tokens per tile (queries and keys) and how to lower."""

    block: int
    scale: float
    interpret: bool = True


def _box_mask(qs, qe, kc, ndim):
    """``[bq, bk]`` bool: key coordinates inside each query's box in every dimension."""
    ok = None
    for i in range(ndim):
        c = kc[:, i][None, :]
        m = (c >= qs[:, i][:, None]) & (c < qe[:, i][:, None])
        ok = m if ok is None else ok & m
    return ok


def _dot(a, b):  # a @ b.T in f32
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _safe(x):
    return jnp.where(jnp.isfinite(x), x, 0.0)


# ---- forward -----------------------------------------------------------------------------------


def _fwd_kernel(tab_ref, q_ref, k_ref, v_ref, qs_ref, qe_ref, kc_ref, o_ref, lse_ref, *,
                cfg: BoxConfig, ndim: int):
    bk = cfg.block
    q = q_ref[...].astype(jnp.float32)  # [bq, H]
    qs, qe = qs_ref[...], qe_ref[...]  # [bq, ndim]
    bq, hv = q.shape[0], o_ref.shape[-1]

    def body(j, carry):
        acc, m, l = carry
        sl = pl.ds(tab_ref[1 + j] * bk, bk)
        k = k_ref[sl, :].astype(jnp.float32)
        v = v_ref[sl, :].astype(jnp.float32)
        s = _dot(q, k) * cfg.scale  # [bq, bk]
        s = jnp.where(_box_mask(qs, qe, kc_ref[sl, :], ndim), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        shift = _safe(m_new)
        alpha = jnp.exp(m - shift)
        p = jnp.exp(s - shift[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p, v, preferred_element_type=jnp.float32)
        return acc, m_new, l

    init = (jnp.zeros((bq, hv), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, tab_ref[0], body, init)
    seen = l > 0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _forward(q, k, v, qs, qe, kc, table, cfg: BoxConfig):
    b, n, length, h = q.shape
    kh, hv = k.shape[1], v.shape[-1]
    g, bq = n // kh, cfg.block
    nq = length // bq
    ndim = qs.shape[1]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, ndim=ndim)
    return pl.pallas_call(
        kernel,
        grid=(b, n, nq),
        in_specs=[
            pl.BlockSpec((None, table.shape[1]), lambda bi, ni, i: (i, 0)),
            pl.BlockSpec((None, None, bq, h), lambda bi, ni, i: (bi, ni, i, 0)),
            pl.BlockSpec((None, None, length, h), lambda bi, ni, i: (bi, ni // g, 0, 0)),
            pl.BlockSpec((None, None, length, hv), lambda bi, ni, i: (bi, ni // g, 0, 0)),
            pl.BlockSpec((bq, ndim), lambda bi, ni, i: (i, 0)),
            pl.BlockSpec((bq, ndim), lambda bi, ni, i: (i, 0)),
            pl.BlockSpec((length, ndim), lambda bi, ni, i: (0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, hv), lambda bi, ni, i: (bi, ni, i, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, ni, i: (bi, ni, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, n, length, hv), q.dtype),
                   jax.ShapeDtypeStruct((b, n, length), jnp.float32)],
        interpret=cfg.interpret,
        name="neighborhood_box_fwd",
    )(table, q, k, v, qs, qe, kc)


# ---- backward ----------------------------------------------------------------------------------


def _dq_kernel(tab_ref, q_ref, k_ref, v_ref, qs_ref, qe_ref, kc_ref, do_ref, lse_ref, dl_ref,
               dq_ref, *, cfg: BoxConfig, ndim: int):
    bk = cfg.block
    q = q_ref[...].astype(jnp.float32)
    do = do_ref[...].astype(jnp.float32)
    lse = _safe(lse_ref[...])
    delta = dl_ref[...]  # sum(dO * O) - dLSE
    qs, qe = qs_ref[...], qe_ref[...]

    def body(j, dq):
        sl = pl.ds(tab_ref[1 + j] * bk, bk)
        k = k_ref[sl, :].astype(jnp.float32)
        v = v_ref[sl, :].astype(jnp.float32)
        s = _dot(q, k) * cfg.scale
        p = jnp.where(_box_mask(qs, qe, kc_ref[sl, :], ndim), jnp.exp(s - lse[:, None]), 0.0)
        ds = p * (_dot(do, v) - delta[:, None])
        return dq + jnp.dot(ds, k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, tab_ref[0], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(tab_ref, q_ref, k_ref, v_ref, qs_ref, qe_ref, kc_ref, do_ref, lse_ref, dl_ref,
                dk_ref, dv_ref, *, cfg: BoxConfig, ndim: int, groups: int):
    bq = cfg.block
    k = k_ref[...].astype(jnp.float32)  # [bk, H]
    v = v_ref[...].astype(jnp.float32)
    kc = kc_ref[...]
    count = tab_ref[0]

    def per_head(gi, carry):
        def body(j, carry):
            dk, dv = carry
            sl = pl.ds(tab_ref[1 + j] * bq, bq)
            q = q_ref[gi, sl, :].astype(jnp.float32)
            do = do_ref[gi, sl, :].astype(jnp.float32)
            lse = _safe(lse_ref[gi, sl])
            delta = dl_ref[gi, sl]
            s = _dot(q, k) * cfg.scale
            mask = _box_mask(qs_ref[sl, :], qe_ref[sl, :], kc, ndim)
            p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bk]
            dv = dv + jax.lax.dot_general(p, do, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            ds = p * (_dot(do, v) - delta[:, None])
            dk = dk + jax.lax.dot_general(ds, q, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            return dk, dv

        return jax.lax.fori_loop(0, count, body, carry)

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = jax.lax.fori_loop(0, groups, per_head, init)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, qs, qe, kc, table, table_t, o, lse, do, dlse, cfg: BoxConfig):
    b, n, length, h = q.shape
    kh, hv = k.shape[1], v.shape[-1]
    g, blk = n // kh, cfg.block
    nt = length // blk
    ndim = qs.shape[1]
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1) - dlse
    full = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, ndim=ndim),
        grid=(b, n, nt),
        in_specs=[
            pl.BlockSpec((None, table.shape[1]), lambda bi, ni, i: (i, 0)),
            pl.BlockSpec((None, None, blk, h), lambda bi, ni, i: (bi, ni, i, 0)),
            pl.BlockSpec((None, None, length, h), lambda bi, ni, i: (bi, ni // g, 0, 0)),
            pl.BlockSpec((None, None, length, hv), lambda bi, ni, i: (bi, ni // g, 0, 0)),
            pl.BlockSpec((blk, ndim), lambda bi, ni, i: (i, 0)),
            pl.BlockSpec((blk, ndim), lambda bi, ni, i: (i, 0)),
            full((length, ndim)),
            pl.BlockSpec((None, None, blk, hv), lambda bi, ni, i: (bi, ni, i, 0)),
            pl.BlockSpec((None, None, blk), lambda bi, ni, i: (bi, ni, i)),
            pl.BlockSpec((None, None, blk), lambda bi, ni, i: (bi, ni, i)),
        ],
        out_specs=pl.BlockSpec((None, None, blk, h), lambda bi, ni, i: (bi, ni, i, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg.interpret,
        name="neighborhood_box_dq",
    )(table, q, k, v, qs, qe, kc, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, ndim=ndim, groups=g),
        grid=(b, kh, nt),
        in_specs=[
            pl.BlockSpec((None, table_t.shape[1]), lambda bi, ki, u: (u, 0)),
            pl.BlockSpec((None, g, length, h), lambda bi, ki, u: (bi, ki, 0, 0)),
            pl.BlockSpec((None, None, blk, h), lambda bi, ki, u: (bi, ki, u, 0)),
            pl.BlockSpec((None, None, blk, hv), lambda bi, ki, u: (bi, ki, u, 0)),
            full((length, ndim)),
            full((length, ndim)),
            pl.BlockSpec((blk, ndim), lambda bi, ki, u: (u, 0)),
            pl.BlockSpec((None, g, length, hv), lambda bi, ki, u: (bi, ki, 0, 0)),
            pl.BlockSpec((None, g, length), lambda bi, ki, u: (bi, ki, 0)),
            pl.BlockSpec((None, g, length), lambda bi, ki, u: (bi, ki, 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, blk, h), lambda bi, ki, u: (bi, ki, u, 0)),
                   pl.BlockSpec((None, None, blk, hv), lambda bi, ki, u: (bi, ki, u, 0))],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=cfg.interpret,
        name="neighborhood_box_dkv",
    )(table_t, q, k, v, qs, qe, kc, do, lse, delta)
    return dq, dk, dv


# ---- public entry ------------------------------------------------------------------------------


def box_attention(q, k, v, q_start, q_end, k_coord, table, table_t, cfg: BoxConfig):
    """Block-sparse attention where query ``i`` sees key ``j`` iff ``k_coord[j]`` lies in
    ``[q_start[i], q_end[i])`` in every dimension; only the tiles listed in ``table`` are visited.

    Args:
      q: ``[B, N, L, H]``; k: ``[B, K, L, H]``; v: ``[B, K, L, Hv]``; ``L % cfg.block == 0``.
      q_start, q_end, k_coord: int32 ``[L, ndim]`` (see the module docstring).
      table: int32 ``[L / block, 1 + max_visits]``; table_t: int32 ``[L / block, 1 + max_q]``
        (NumPy arrays: they are static metadata).
      cfg: :class:`BoxConfig`.

    Returns:
      ``(out [B, N, L, Hv], lse [B, N, L] f32)``; differentiable in ``q, k, v`` (and through
      ``lse``). Rows that see no key give 0 and ``lse = -inf``.
    """
    if q.shape[2] % cfg.block:
        raise ValueError(f"length {q.shape[2]} is not a multiple of block {cfg.block}")
    consts = tuple(jnp.asarray(np.asarray(x), jnp.int32)
                   for x in (q_start, q_end, k_coord, table, table_t))

    @jax.custom_vjp
    def attend(q, k, v):
        qs, qe, kc, tab, _ = consts
        return _forward(q, k, v, qs, qe, kc, tab, cfg)

    def fwd(q, k, v):
        o, lse = attend(q, k, v)
        return (o, lse), (q, k, v, o, lse)

    def bwd(res, cots):
        q, k, v, o, lse = res
        do, dlse = cots
        qs, qe, kc, tab, tab_t = consts
        return _backward(q, k, v, qs, qe, kc, tab, tab_t, o, lse, do,
                         dlse.astype(jnp.float32), cfg)

    attend.defvjp(fwd, bwd)
    return attend(q, k, v)
