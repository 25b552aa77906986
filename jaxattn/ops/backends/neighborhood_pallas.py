"""``implementation="pallas"`` for ``neighborhood_attention``: the fused block-sparse kernel.

Refuses, with the reason in ``explain_neighborhood()``:

* a relative-position ``bias`` (the kernel has no bias input; use ``"xla"`` or ``"reference"``);
* a traced ``scale`` (a static kernel parameter);
* on GPU, tiles whose token count is not a multiple of 16 (Triton's block shapes);
* a missing ``pallas_kernels.neighborhood`` package.

Automatic selection prefers it only on GPU / TPU; elsewhere the kernel runs in (slow) interpret
mode. Forward and backward are the kernel's ``custom_vjp``
(:func:`pallas_kernels.neighborhood.box_attention`); additional keys/values are merged by LSE.
Queries and keys are permuted into the tiled layout of :mod:`jaxattn.core.neighborhood_xla`
(:func:`pallas_tables`), and ``pallas_kernels.neighborhood`` is imported on first use.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.core import neighborhood as na_ref
from jaxattn.core import neighborhood_xla as na_xla
from jaxattn.ops import registry
from jaxattn.ops.call import NeighborhoodCall

__all__ = ["supports", "prefer", "run", "pallas_tables", "default_pallas_tile", "BACKEND"]


@functools.cache
def box_kernels():
    """The ``pallas_kernels.neighborhood`` module, imported on the first call (ImportError if the
    optional kernel package is missing)."""
    import pallas_kernels.neighborhood

    return pallas_kernels.neighborhood


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
    tab = na_xla.tile_tables(spatial, params, tile)
    axes, (nd, nt, tq, _) = tab["axes"], tab["dims"]
    full = (nd, nt, tq)

    def stack(per_dim):
        return np.stack([np.broadcast_to(x, na_xla.outer_shape(axes)).reshape(full).reshape(-1)
                         for x in na_xla.outer_broadcast(per_dim, ndim)], axis=-1)

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


def supports(c: NeighborhoodCall) -> str | None:
    """``None`` if the kernel can run ``c`` here, else the first refusal of the module docstring."""
    try:
        box_kernels()
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


def prefer(c: NeighborhoodCall) -> str | None:
    """Automatic selection only on GPU / TPU (interpret mode elsewhere)."""
    if c.platform not in ("gpu", "tpu"):
        return f"on {c.platform!r} the Pallas kernel runs in (slow) interpret mode"
    return None


def run(c: NeighborhoodCall):
    """``(out [B, *spatial, N, Hv]`` in the query dtype, ``lse [B, *spatial, N])``."""
    kernels = box_kernels()
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
    cfg = kernels.BoxConfig(block=t["block"], scale=c.scale,
                            interpret=c.platform not in ("gpu", "tpu"))
    out, lse = kernels.box_attention(q, k, v, t["q_start"], t["q_end"], t["k_coord"], t["table"],
                                     t["table_t"], cfg)  # [B, N, Lp, Hv], [B, N, Lp]
    back = jnp.asarray(t["out_index"], jnp.int32)
    out = jnp.take(out, back, axis=2).transpose(0, 2, 1, 3).reshape(b, *spatial, n, hv)
    lse = jnp.take(lse, back, axis=2).transpose(0, 2, 1).reshape(b, *spatial, n)
    out, lse = na_xla.merge_additional_kv(c.query, c.additional_keys, c.additional_values,
                                          out.astype(jnp.float32), lse, scale=c.scale)
    return out.astype(c.dtype), lse


BACKEND = registry.Backend("pallas", run, supports=supports, prefer=prefer, priority=20)
