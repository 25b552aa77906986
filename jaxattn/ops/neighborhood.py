"""``jaxattn.neighborhood_attention``: validated, dispatched 1-D/2-D/3-D neighborhood attention.

Semantics are NATTEN's exactly (see :mod:`jaxattn.core.neighborhood`). Implementations:

* ``"reference"``: dense ``[L, L]`` mask from the window formulas (the specification).
* ``"xla"``: tiles of queries against their key halo. Tokens are regrouped per dilation group and
  per query tile with one static gather, so cost and memory grow with ``L * halo``, never
  ``L * L`` (above ~256 MiB of logits the tiles run in sequential, rematerialised chunks).
  Differentiable by autodiff.
* ``"pallas"``: the fused block-sparse kernel of ``pallas_kernels.neighborhood`` (forward and
  backward with ``custom_vjp``; interpret mode off-GPU/TPU).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxattn.core import dense
from jaxattn.core import neighborhood as na_ref
from jaxattn.core import softmax as sm
from jaxattn.ops import neighborhood_planner as planner
from jaxattn.ops import registry
from jaxattn.ops.attention import _fmt, _platform_of  # shared argument helpers

__all__ = ["neighborhood_attention", "explain_neighborhood", "NeighborhoodCall",
           "make_neighborhood_call", "neighborhood_attention_xla", "default_q_tile",
           "pallas_tables"]

PRIMITIVE = "neighborhood"


@dataclasses.dataclass(frozen=True)
class NeighborhoodCall:
    """A validated neighborhood-attention call, as backends see it."""

    query: Any  # [B, *spatial, N, H]
    key: Any  # [B, *spatial, K, H]
    value: Any  # [B, *spatial, K, Hv]
    params: na_ref.NeighborhoodParams
    scale: Any
    additional_keys: Any  # [B, S_extra, K, H] or None
    additional_values: Any  # [B, S_extra, K, Hv] or None
    bias: Any  # [N, 2k_1-1, ...] or None
    return_lse: bool
    platform: str

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.query.shape[1:-2])

    @property
    def dtype(self):
        return self.query.dtype


def make_neighborhood_call(query, key, value, kernel_size, *, dilation=1, stride=1,
                           is_causal=False, scale=None, additional_keys=None,
                           additional_values=None, bias=None,
                           return_lse=False) -> NeighborhoodCall:
    """Validate the arguments of :func:`neighborhood_attention` (raises ValueError/TypeError)."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, "
                        f"{key.dtype}, {value.dtype}; cast explicitly")
    if not (query.ndim == key.ndim == value.ndim) or query.ndim not in (4, 5, 6):
        raise ValueError(
            "query, key and value must all be [B, *spatial, heads, head_dim] with 1, 2 or 3 "
            f"spatial dims (rank 4, 5 or 6), got query {_fmt(query)}, key {_fmt(key)}, "
            f"value {_fmt(value)}")
    b, *spatial, n, h = query.shape
    if tuple(key.shape[:-2]) != (b, *spatial) or tuple(value.shape[:-2]) != (b, *spatial):
        raise ValueError(f"key and value must have the query's [B, *spatial] = {(b, *spatial)}; "
                         f"got query {_fmt(query)}, key {_fmt(key)}, value {_fmt(value)}")
    kh, hk = key.shape[-2:]
    if value.shape[-2] != kh:
        raise ValueError(f"key {_fmt(key)} and value {_fmt(value)} must have the same heads")
    if hk != h:
        raise ValueError(f"query head_dim {h} != key head_dim {hk}")
    if kh == 0 or n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of key/value heads K={kh}")
    params = na_ref.normalize_params(spatial, kernel_size, dilation, stride, is_causal)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is not None:
        ak, av = additional_keys, additional_values
        if ak.ndim != 4 or av.ndim != 4:
            raise ValueError(f"additional keys/values must be [B, S_extra, K, H], got "
                             f"{_fmt(ak)} and {_fmt(av)}")
        if ak.dtype != query.dtype or av.dtype != query.dtype:
            raise TypeError(f"additional keys/values must have the query's dtype {query.dtype}, "
                            f"got {ak.dtype} and {av.dtype}")
        if (ak.shape[0], ak.shape[2], ak.shape[3]) != (b, kh, h) or \
                tuple(av.shape) != (*ak.shape[:3], value.shape[-1]):
            raise ValueError(
                f"additional keys/values must be [B, S_extra, K, H] = [{b}, S, {kh}, {h}] and "
                f"[B, S_extra, K, Hv] with Hv={value.shape[-1]}; got {_fmt(ak)}, {_fmt(av)}")
    if bias is not None:
        if not hasattr(bias, "dtype") or not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be a floating array, got {getattr(bias, 'dtype', bias)}")
        want = (n, *(2 * k - 1 for k in params.kernel_size))
        if tuple(bias.shape) != want:
            raise ValueError(f"bias must be a relative-position table [N, 2k_1-1, ...] = {want}, "
                             f"got {_fmt(bias)}")
    if scale is None:
        scale = h**-0.5
    elif not isinstance(scale, jax.core.Tracer):
        scale = float(scale)
    return NeighborhoodCall(query, key, value, params, scale, additional_keys, additional_values,
                            bias, bool(return_lse), _platform_of(query))


# ---- the tiled XLA path ----------------------------------------------------------------------


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


def _outer(parts, ndim):
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
def _tile_tables(spatial, params, q_tile):
    """Static tables for the tiled path: gather indices, masks inputs and bias indices."""
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
    q_index = sum(g * st for g, st in zip(_outer(q_glob, ndim), strides, strict=True))
    k_index = sum(g * st for g, st in zip(_outer(k_glob, ndim), strides, strict=True))
    shape_d = math.prod(a.dilation for a in axes)
    shape_nt = math.prod(a.num_tiles for a in axes)
    tq = math.prod(a.q_tile for a in axes)
    hl = math.prod(a.halo for a in axes)
    q_index = np.broadcast_to(q_index, q_index.shape).reshape(shape_d, shape_nt, tq)
    k_index = np.broadcast_to(k_index, k_index.shape).reshape(shape_d, shape_nt, hl)
    # inverse of q_index for real tokens: where each token's output sits in the tiled layout
    flat_pos = np.full(math.prod(spatial), -1, np.int64)
    valid = functools.reduce(np.logical_and, _outer(
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
    tab = _tile_tables(spatial, params, tuple(int(t) for t in q_tile))
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
        grids = [jnp.asarray(x, jnp.int32) for x in _outer(idx, ndim)]
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
    mask = functools.reduce(np.logical_and, _outer(per_dim, ndim))
    tab["mask"] = np.broadcast_to(mask, _outer_shape(tab["axes"], ndim) + tuple(
        a.halo for a in tab["axes"])).reshape(tab["dims"])
    return tab["mask"]


def _with_additional_kv(c: NeighborhoodCall, out, lse):
    """Merge the neighborhood result with unmasked attention onto the additional keys (by LSE)."""
    if c.additional_keys is None:
        return out, lse
    b, *spatial, n, _ = c.query.shape
    total = math.prod(spatial)
    q = c.query.reshape(b, total, n, c.query.shape[-1])
    extra_out, extra_lse = dense.attention_reference(
        q, c.additional_keys, c.additional_values, scale=c.scale, return_lse=True)
    hv = c.value.shape[-1]
    merged, merged_lse = sm.merge_partials(
        [out.reshape(b, total, n, hv).astype(jnp.float32), extra_out.astype(jnp.float32)],
        [lse.reshape(b, total, n), extra_lse])
    return merged.reshape(out.shape), merged_lse.reshape(lse.shape)


# ---- backends --------------------------------------------------------------------------------


def _run_reference(c: NeighborhoodCall):
    p = c.params
    return na_ref.neighborhood_attention_reference(
        c.query, c.key, c.value, p.kernel_size, dilation=p.dilation, stride=p.stride,
        is_causal=p.is_causal, scale=c.scale, additional_keys=c.additional_keys,
        additional_values=c.additional_values, bias=c.bias, return_lse=True)


def _run_xla(c: NeighborhoodCall):
    out, lse = neighborhood_attention_xla(c.query, c.key, c.value, c.params, scale=c.scale,
                                          bias=c.bias)
    out, lse = _with_additional_kv(c, out, lse)
    return out.astype(c.dtype), lse


def default_pallas_tile(spatial) -> tuple[int, ...]:
    """Tokens per tile edge for the Pallas kernel: 64 (1-D), 8x8 (2-D), 4x4x4 (3-D)."""
    return {1: (64,), 2: (8, 8), 3: (4, 4, 4)}[len(spatial)]


def pallas_tables(spatial, params: na_ref.NeighborhoodParams, tile):
    """Token permutation and block-sparse tables for ``pallas_kernels.neighborhood``.

    Queries and keys share one permutation (dilation group, tile, position in tile; the same
    layout as the XLA path), so query tile ``i`` and key tile ``u`` are both hyper-rectangles of
    ``prod(tile)`` tokens. Returns a dict with ``perm`` (gather index), ``out_index`` (its inverse
    on real tokens), ``q_start``/``q_end``/``k_coord`` ``[Lp, ndim]``, ``table``/``table_t``.
    """
    ndim = len(spatial)
    tab = _tile_tables(spatial, params, tile)
    axes, (nd, nt, tq, _) = tab["axes"], tab["dims"]
    full = (nd, nt, tq)

    def stack(per_dim):
        return np.stack([np.broadcast_to(x, _outer_shape(axes, ndim)).reshape(full).reshape(-1)
                         for x in _outer(per_dim, ndim)], axis=-1)

    valid = [a.q_valid.reshape(a.dilation, a.num_tiles, a.q_tile) for a in axes]
    k_coord = [np.where(v, c, -1) for v, c in zip(valid, tab["q_coord"], strict=True)]
    # per dimension: the key tiles each (group, query tile) visits (windows are monotone)
    visits = []
    for i, a in enumerate(axes):
        st, en = tab["q_start"][i], tab["q_end"][i]
        big = np.iinfo(np.int64).max
        lo = np.where(valid[i], st, big).min(-1)
        hi = np.where(valid[i], en, 0).max(-1)
        visits.append([[list(range(lo[g, t] // a.q_tile, -(-hi[g, t] // a.q_tile)))
                        if valid[i][g, t].any() else [] for t in range(a.num_tiles)]
                       for g in range(a.dilation)])
    nts = [a.num_tiles for a in axes]
    rows = []
    for gs in itertools.product(*(range(a.dilation) for a in axes)):
        g_flat = int(np.ravel_multi_index(gs, [a.dilation for a in axes]))
        for ts in itertools.product(*(range(n) for n in nts)):
            lists = [visits[i][gs[i]][ts[i]] for i in range(ndim)]
            rows.append([g_flat * nt + int(np.ravel_multi_index(us, nts))
                         for us in itertools.product(*lists)])
    cols = [[] for _ in rows]
    for i, r in enumerate(rows):
        for u in r:
            cols[u].append(i)

    def pack(lists):
        # widths are powers of two: Triton block shapes must be
        width = _pow2(1 + max(len(x) for x in lists))
        out = np.zeros((len(lists), width), np.int32)
        for i, x in enumerate(lists):
            out[i, 0] = len(x)
            out[i, 1:1 + len(x)] = x
        return out

    # pad the coordinate columns to a power of two with an always-true dimension (start 0, end 1,
    # key 0), again for Triton's power-of-two block shapes
    q_start, q_end, kc = stack(tab["q_start"]), stack(tab["q_end"]), stack(k_coord)
    extra = _pow2(ndim) - ndim
    if extra:
        pad = lambda x, val: np.concatenate([x, np.full((x.shape[0], extra), val, x.dtype)], 1)
        q_start, q_end, kc = pad(q_start, 0), pad(q_end, 1), pad(kc, 0)
    return dict(perm=tab["q_index"].reshape(-1), out_index=tab["out_index"], q_start=q_start,
                q_end=q_end, k_coord=kc, table=pack(rows), table_t=pack(cols), block=tq)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _outer_shape(axes, ndim):
    return tuple([a.dilation for a in axes] + [a.num_tiles for a in axes]
                 + [a.q_tile for a in axes])


def _pallas_supports(c: NeighborhoodCall):
    try:
        import pallas_kernels.neighborhood  # noqa: F401
    except ImportError as e:  # pragma: no cover - the kernel package is optional
        return f"pallas_kernels.neighborhood is unavailable: {e}"
    if c.bias is not None:
        return "the Pallas kernel has no relative-position bias (use 'xla' or 'reference')"
    if isinstance(c.scale, jax.core.Tracer):
        return "the Pallas kernel needs a Python-number scale"
    if c.platform == "gpu":
        block = math.prod(default_pallas_tile(c.spatial))
        if block % 16:
            return f"GPU tiles need a multiple of 16 tokens, got {block}"
    return None


def _pallas_prefer(c: NeighborhoodCall):
    if c.platform not in ("gpu", "tpu"):
        return f"on {c.platform!r} the Pallas kernel runs in (slow) interpret mode"
    return None


def _run_pallas(c: NeighborhoodCall):
    from pallas_kernels.neighborhood import BoxConfig, box_attention

    b, *spatial, n, h = c.query.shape
    spatial = tuple(spatial)
    kh, hv = c.key.shape[-2], c.value.shape[-1]
    total = math.prod(spatial)
    t = pallas_tables(spatial, c.params, default_pallas_tile(spatial))
    perm = jnp.asarray(t["perm"], jnp.int32)
    heads_major = lambda x, heads, dim: jnp.take(
        x.reshape(b, total, heads, dim), perm, axis=1).transpose(0, 2, 1, 3)
    q = heads_major(c.query, n, h)
    k = heads_major(c.key, kh, h)
    v = heads_major(c.value, kh, hv)
    cfg = BoxConfig(block=t["block"], scale=c.scale,
                    interpret=c.platform not in ("gpu", "tpu"))
    out, lse = box_attention(q, k, v, t["q_start"], t["q_end"], t["k_coord"], t["table"],
                             t["table_t"], cfg)  # [B, N, Lp, Hv], [B, N, Lp]
    back = jnp.asarray(t["out_index"], jnp.int32)
    out = jnp.take(out, back, axis=2).transpose(0, 2, 1, 3).reshape(b, *spatial, n, hv)
    lse = jnp.take(lse, back, axis=2).transpose(0, 2, 1).reshape(b, *spatial, n)
    out, lse = _with_additional_kv(c, out.astype(jnp.float32), lse)
    return out.astype(c.dtype), lse


registry.register(PRIMITIVE, registry.Backend(
    "reference", _run_reference, supports=lambda c: None, priority=0))
registry.register(PRIMITIVE, registry.Backend(
    "xla", _run_xla, supports=lambda c: None, priority=10))
registry.register(PRIMITIVE, registry.Backend(
    "pallas", _run_pallas, supports=_pallas_supports, prefer=_pallas_prefer, priority=20))


# ---- public API ------------------------------------------------------------------------------


def neighborhood_attention(
    query: Float[Array, "B *spatial N H"],
    key: Float[Array, "B *spatial K H"],
    value: Float[Array, "B *spatial K Hv"],
    kernel_size: int | tuple[int, ...],
    *,
    dilation: int | tuple[int, ...] = 1,
    stride: int | tuple[int, ...] = 1,
    is_causal: bool | tuple[bool, ...] = False,
    scale: float | None = None,
    additional_keys: Float[Array, "B S K H"] | None = None,
    additional_values: Float[Array, "B S K Hv"] | None = None,
    bias: Float[Array, "N ..."] | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
):
    """1-D / 2-D / 3-D neighborhood attention with NATTEN's exact semantics.

    Neighborhood attention (Hassani et al., CVPR 2023), dilated NA (DiNAT, 2022) and strided /
    generalized NA (GNA, Hassani et al., 2025). Each query attends to a ``kernel_size`` window per
    spatial dimension that shifts (never shrinks) at borders; see :mod:`jaxattn.core.neighborhood`
    for the exact window rules.

    Args:
      query: ``[B, *spatial, N, H]`` with 1, 2 or 3 spatial dimensions.
      key: ``[B, *spatial, K, H]``; value: ``[B, *spatial, K, Hv]``; ``N % K == 0`` (GQA/MQA).
      kernel_size: int >= 2 or one per dimension, with ``kernel_size * dilation <= length``.
      dilation: int >= 1 or one per dimension.
      stride: ``1 <= stride <= kernel_size`` per dimension (stride groups share one window).
      is_causal: bool or one per dimension (e.g. ``(True, False, False)`` for video).
      scale: logit scale, default ``H ** -0.5``.
      additional_keys, additional_values: ``[B, S_extra, K, H]`` / ``[B, S_extra, K, Hv]``: extra
        context every query attends to without a mask (merged by LSE, as NATTEN).
      bias: relative-position bias table ``[N, 2k_1-1, ..., 2k_d-1]`` (NATTEN < 0.20 RPB): query
        ``q`` and key ``j`` get ``bias[n, c_j - c_q + k_1 - 1, ...]`` (within-group coordinates).
        It does not apply to the additional keys.
      return_lse: also return the f32 natural-log sum-exp ``[B, *spatial, N]``.
      implementation: ``"reference"``, ``"xla"``, ``"pallas"`` or ``None`` (best that can run
        here; :func:`explain_neighborhood` says which and why).

    Returns:
      ``[B, *spatial, N, Hv]`` in the query dtype (and the LSE with ``return_lse``).

    Raises:
      ValueError / TypeError on bad shapes, dtypes or window arguments.
    """
    call = make_neighborhood_call(
        query, key, value, kernel_size, dilation=dilation, stride=stride, is_causal=is_causal,
        scale=scale, additional_keys=additional_keys, additional_values=additional_values,
        bias=bias, return_lse=return_lse)
    backend = registry.choose(PRIMITIVE, call, implementation)
    out, lse = backend.run(call)
    return (out, lse) if return_lse else out


def explain_neighborhood(*args, **kwargs) -> registry.Explanation:
    """Same arguments as :func:`neighborhood_attention`: which implementation ``None`` picks."""
    kwargs.pop("implementation", None)
    return registry.explain(PRIMITIVE, make_neighborhood_call(*args, **kwargs))
