"""Tiled neighborhood attention in pure JAX: query tiles against a fixed key halo.

The math behind ``neighborhood_attention(..., implementation="xla")``. Tokens are regrouped per
dilation group and per query tile with one static gather (:func:`tile_tables`, NumPy, cached per
shape), so cost and memory grow with ``L * halo``, never ``L * L``; above ~256 MiB of logits the
tiles run in sequential, rematerialised chunks. Differentiable by autodiff. The window rules are
NATTEN's (:mod:`jaxattn.core.neighborhood`); the per-axis geometry comes from
:func:`jaxattn.ops.neighborhood_planner.plan_axis`.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.core import dense
from jaxattn.core import neighborhood as na_ref
from jaxattn.core import softmax as sm
from jaxattn.ops import neighborhood_planner as planner

__all__ = ["default_q_tile", "tile_tables", "outer_broadcast", "outer_shape",
           "neighborhood_attention_xla", "merge_additional_kv"]


def default_q_tile(spatial, params: na_ref.NeighborhoodParams) -> tuple[int, ...]:
    """Query tile per dimension for the XLA path, minimising a simple cost model.

    Cost ~ (tiles) * (logits per tile + a per-row overhead): small tiles waste the halo less, large
    tiles amortise gathers and launch overhead. Measured on CPU (benchmarks/neighborhood.py).
    """
    ndim = len(spatial)
    cands = (16, 32, 64, 128, 256) if ndim == 1 else (1, 2, 4, 8, 16)
    per_dim = [{t: planner.plan_axis(spatial[i], params.kernel_size[i], params.dilation[i],
                                     params.stride[i], params.is_causal[i], t) for t in cands}
               for i in range(ndim)]
    best, best_cost = None, math.inf
    for combo in itertools.product(cands, repeat=ndim):
        axes = [per_dim[i][t] for i, t in enumerate(combo)]
        tiles = math.prod(a.num_tiles * a.dilation for a in axes)
        tq = math.prod(a.q_tile for a in axes)
        hl = math.prod(a.halo for a in axes)
        cost = tiles * (tq * hl + 16 * (tq + hl) + 2048)
        if cost < best_cost:
            best, best_cost = tuple(a.q_tile for a in axes), cost
    return best


def outer_broadcast(parts, ndim):
    """Broadcast per-dimension arrays ``[d_i, nt_i, x_i, ...]`` into one N-D layout.

    ``parts[i]`` has shape ``[d_i, nt_i, *rest_i]`` where every ``rest_i`` has the same number of
    axes ``r``; the result axes are ``[d_1..d_n, nt_1..nt_n, rest_1[0]..rest_n[0], ...]`` so that a
    row-major reshape flattens each kind of axis in dimension order.
    """
    r = parts[0].ndim - 2
    out = []
    for i, p in enumerate(parts):
        shape = [1] * ((2 + r) * ndim)
        for a in range(2 + r):
            shape[a * ndim + i] = p.shape[a]
        out.append(p.reshape(shape))
    return out


@functools.lru_cache(maxsize=64)
def tile_tables(spatial, params, q_tile):
    """Static NumPy tables of the tiled layout for ``spatial`` (tuple), ``params`` and ``q_tile``
    (one int per dimension); cached, and shared with the Pallas adapter.

    Keys: ``axes`` (per-axis :class:`~jaxattn.ops.neighborhood_planner.AxisPlan`), ``q_index``
    ``[D, NT, TQ]`` / ``k_index`` ``[D, NT, HL]`` (flat token gathered at each tiled slot),
    ``out_index`` ``[L]`` (slot of each real token), per-dimension within-group ``q_coord`` /
    ``k_coord`` and window bounds ``q_start`` / ``q_end``, and ``dims = (D, NT, TQ, HL)``: dilation
    groups, tiles per group, queries per tile and halo keys per tile (products over dimensions).
    """
    ndim = len(spatial)
    axes = [planner.plan_axis(spatial[i], params.kernel_size[i], params.dilation[i],
                              params.stride[i], params.is_causal[i], q_tile[i])
            for i in range(ndim)]
    q_coord, k_coord, q_glob, k_glob, q_start, q_end = [], [], [], [], [], []
    for a in axes:
        d, nt, t, hl = a.dilation, a.num_tiles, a.q_tile, a.halo
        grp = np.arange(d)[:, None, None]
        qc = (np.arange(nt)[:, None] * t + np.arange(t)[None, :])[None]  # [1, nt, t]
        kc = a.offsets[:, :, None] + np.arange(hl)[None, None, :]  # [d, nt, hl]
        q_coord.append(np.broadcast_to(qc, (d, nt, t)))
        k_coord.append(kc)
        # global coordinate, clamped into the axis for padding entries (they are masked anyway)
        q_glob.append(np.minimum(qc * d + grp, a.length - 1))
        k_glob.append(np.minimum(kc * d + grp, a.length - 1))
        q_start.append(a.q_start.reshape(d, nt, t))
        q_end.append(a.q_end.reshape(d, nt, t))
    strides = [math.prod(spatial[i + 1:]) for i in range(ndim)]
    q_index = sum(g * st for g, st in zip(outer_broadcast(q_glob, ndim), strides, strict=True))
    k_index = sum(g * st for g, st in zip(outer_broadcast(k_glob, ndim), strides, strict=True))
    shape_d = math.prod(a.dilation for a in axes)
    shape_nt = math.prod(a.num_tiles for a in axes)
    tq = math.prod(a.q_tile for a in axes)
    hl = math.prod(a.halo for a in axes)
    q_index = np.broadcast_to(q_index, q_index.shape).reshape(shape_d, shape_nt, tq)
    k_index = np.broadcast_to(k_index, k_index.shape).reshape(shape_d, shape_nt, hl)
    # inverse of q_index for real tokens: where each token's output sits in the tiled layout
    flat_pos = np.full(math.prod(spatial), -1, np.int64)
    valid = functools.reduce(np.logical_and, outer_broadcast(
        [a.q_valid.reshape(a.dilation, a.num_tiles, a.q_tile) for a in axes], ndim))
    valid = np.broadcast_to(valid, (shape_d, shape_nt, tq) if ndim == 1 else valid.shape)
    valid = valid.reshape(-1)
    flat_pos[q_index.reshape(-1)[valid]] = np.nonzero(valid)[0]
    assert (flat_pos >= 0).all()
    return dict(axes=axes, q_index=q_index, k_index=k_index, out_index=flat_pos,
                q_coord=q_coord, k_coord=k_coord, q_start=q_start, q_end=q_end,
                dims=(shape_d, shape_nt, tq, hl))


def neighborhood_attention_xla(query, key, value, params: na_ref.NeighborhoodParams, *,
                               scale, bias=None, q_tile=None):
    """Tiled NA without additional KV: ``(out [B, *spatial, N, Hv], lse [B, *spatial, N])``.

    Each tile of ``prod(q_tile)`` queries (within one dilation group) attends to a fixed halo of
    ``prod(halo)`` keys with the exact per-query window mask; work is ``O(L * prod(halo))``.
    """
    b, *spatial, n, h = query.shape
    spatial = tuple(spatial)
    ndim = len(spatial)
    kh, hv = key.shape[-2], value.shape[-1]
    if q_tile is None:
        q_tile = default_q_tile(spatial, params)
    elif isinstance(q_tile, int):
        q_tile = (q_tile,) * ndim
    tab = tile_tables(spatial, params, tuple(int(t) for t in q_tile))
    nd, nt, tq, hl = tab["dims"]
    nb, g = nd * nt, n // kh  # tiles (all dilation groups), query heads per kv head
    total = math.prod(spatial)
    # Heads-major layout so every contraction below is a plain batched matmul over (B, K, tile).
    qf = query.reshape(b, total, n, h).transpose(0, 2, 1, 3)  # [B, N, L, H]
    kf = key.reshape(b, total, kh, h).transpose(0, 2, 1, 3)  # [B, K, L, H]
    vf = value.reshape(b, total, kh, hv).transpose(0, 2, 1, 3)
    k_idx = jnp.asarray(tab["k_index"].reshape(-1), jnp.int32)
    q_t = jnp.take(qf, jnp.asarray(tab["q_index"].reshape(-1), jnp.int32), axis=2)
    q_t = q_t.reshape(b, kh, g, nb, tq, h).transpose(0, 1, 3, 2, 4, 5)  # [B, K, NB, G, TQ, H]
    q_t = q_t.reshape(b, kh, nb, g * tq, h)
    k_t = jnp.take(kf, k_idx, axis=2).reshape(b, kh, nb, hl, h)  # [B, K, NB, HL, H]
    v_t = jnp.take(vf, k_idx, axis=2).reshape(b, kh, nb, hl, hv)
    # The exact per-query window mask [NB, 1, TQ, HL]: O(L * halo) static bools (the AND of
    # per-dimension masks). A constant measured 2-3x faster on CPU than computing it in-graph.
    mask = jnp.asarray(_tile_mask(tab, ndim).reshape(nb, 1, tq, hl))
    rpb = None
    if bias is not None:
        idx = []
        for i in range(ndim):
            k_i = params.kernel_size[i]
            rel = tab["k_coord"][i][:, :, None, :] - tab["q_coord"][i][..., None] + k_i - 1
            idx.append(np.clip(rel, 0, 2 * k_i - 2))
        grids = [jnp.asarray(x, jnp.int32) for x in outer_broadcast(idx, ndim)]
        rpb = bias.astype(jnp.float32)[(slice(None), *grids)]  # [N, d.., nt.., t.., hl..]
        rpb = rpb.reshape(kh, g, nb, tq, hl).transpose(0, 2, 1, 3, 4)  # [K, NB, G, TQ, HL]
    core = functools.partial(_tile_attention, scale=scale, groups=g)
    chunks = _num_chunks(nb, 4 * b * n * nb * tq * hl)
    if chunks == 1:
        out, lse = core(q_t, k_t, v_t, mask, rpb)
    else:
        # Bound memory: tiles in `chunks` sequential groups, each rematerialised in the backward.
        split = lambda x, axis: jnp.moveaxis(
            x.reshape(x.shape[:axis] + (chunks, nb // chunks) + x.shape[axis + 1:]), axis, 0)
        xs = (split(q_t, 2), split(k_t, 2), split(v_t, 2), split(mask, 0),
              None if rpb is None else split(rpb, 1))
        out, lse = jax.lax.map(lambda a: jax.checkpoint(core)(*a), xs)
        out = jnp.moveaxis(out, 0, 2).reshape(b, kh, nb, g * tq, hv)
        lse = jnp.moveaxis(lse, 0, 2).reshape(b, kh, nb, g, tq)
    out = out.reshape(b, kh, nb, g, tq, hv).transpose(0, 2, 4, 1, 3, 5)  # [B, NB, TQ, K, G, Hv]
    out = out.reshape(b, nb * tq, n, hv)
    lse = lse.transpose(0, 2, 4, 1, 3).reshape(b, nb * tq, n)
    back = jnp.asarray(tab["out_index"], jnp.int32)
    out = jnp.take(out, back, axis=1).reshape(b, *spatial, n, hv)
    lse = jnp.take(lse, back, axis=1).reshape(b, *spatial, n)
    return out, lse


_CHUNK_BYTES = 1 << 28  # above ~256 MiB of f32 logits, process tiles in sequential chunks


def _num_chunks(num_tiles: int, logits_bytes: int) -> int:
    """Smallest divisor of ``num_tiles`` that brings each chunk's logits under the budget."""
    for c in range(1, num_tiles + 1):
        if num_tiles % c == 0 and logits_bytes // c <= _CHUNK_BYTES:
            return c
    return num_tiles


def _tile_attention(q_t, k_t, v_t, mask, rpb, *, scale, groups):
    """Dense attention inside each tile.

    ``q_t [B, K, NB, G*TQ, H]``, ``k_t/v_t [B, K, NB, HL, H|Hv]``, ``mask [NB, 1, TQ, HL]``,
    ``rpb [K, NB, G, TQ, HL] | None`` -> ``(out [B, K, NB, G*TQ, Hv], lse [B, K, NB, G, TQ])``.
    """
    b, kh, nb, gtq, _ = q_t.shape
    hl = k_t.shape[3]
    logits = jnp.einsum("bktqh,bktsh->bktqs", q_t.astype(jnp.float32),
                        k_t.astype(jnp.float32)) * scale  # [B, K, NB, G*TQ, HL]
    logits = logits.reshape(b, kh, nb, groups, gtq // groups, hl)
    if rpb is not None:
        logits = logits + rpb
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jax.lax.stop_gradient(sm.safe_max(logits, axis=-1, keepdims=True))
    e = jnp.exp(logits - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    probs = (e / jnp.where(denom > 0, denom, 1.0)).reshape(b, kh, nb, gtq, hl)
    lse = (m + sm.safe_log(denom))[..., 0]  # [B, K, NB, G, TQ]
    out = jnp.einsum("bktqs,bktsh->bktqh", probs, v_t.astype(jnp.float32))
    return out, lse


def _tile_mask(tab, ndim):
    """Boolean ``[D, NT, TQ, HL]`` mask of the tiled layout (NumPy, cached with the tables)."""
    if "mask" in tab:
        return tab["mask"]
    per_dim = [(kc[:, :, None, :] >= st[..., None]) & (kc[:, :, None, :] < en[..., None])
               for kc, st, en in zip(tab["k_coord"], tab["q_start"], tab["q_end"], strict=True)]
    mask = functools.reduce(np.logical_and, outer_broadcast(per_dim, ndim))
    tab["mask"] = np.broadcast_to(mask, outer_shape(tab["axes"]) + tuple(
        a.halo for a in tab["axes"])).reshape(tab["dims"])
    return tab["mask"]


def outer_shape(axes) -> tuple[int, ...]:
    """``(d_1..d_n, nt_1..nt_n, t_1..t_n)`` of per-axis plans: the tiled layout's axes."""
    return tuple([a.dilation for a in axes] + [a.num_tiles for a in axes]
                 + [a.q_tile for a in axes])


def merge_additional_kv(query, additional_keys, additional_values, out, lse, *, scale):
    """Merge a neighborhood result with unmasked attention onto the additional keys (by LSE).

    ``query [B, *spatial, N, H]``, ``additional_keys [B, S_extra, K, H]``, ``additional_values
    [B, S_extra, K, Hv]``, ``out [B, *spatial, N, Hv]``, ``lse [B, *spatial, N]`` -> the merged
    ``(out, lse)`` in f32 with the same shapes; ``(out, lse)`` unchanged without additional keys.
    """
    if additional_keys is None:
        return out, lse
    b, *spatial, n, h = query.shape
    total = math.prod(spatial)
    extra_out, extra_lse = dense.attention_reference(
        query.reshape(b, total, n, h), additional_keys, additional_values, scale=scale,
        return_lse=True)
    hv = out.shape[-1]
    merged, merged_lse = sm.merge_partials(
        [out.reshape(b, total, n, hv).astype(jnp.float32), extra_out.astype(jnp.float32)],
        [lse.reshape(b, total, n), extra_lse])
    return merged.reshape(out.shape), merged_lse.reshape(lse.shape)
