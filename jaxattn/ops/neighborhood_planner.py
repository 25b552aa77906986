"""Tile geometry of neighborhood attention, and a GNA-style analytical speed-up planner.

Generalized Neighborhood Attention (Hassani et al., 2025) models the cost of a tiled NA kernel by
counting, for every query tile, the key tiles it must visit: window starts and ends are monotone in
the query coordinate, so a (hyper-rectangular) query tile visits a hyper-rectangle of key tiles,
``[floor(start(first q) / T_kv), ceil(end(last q) / T_kv))`` per dimension. Everything here is
static NumPy on shapes; nothing touches arrays.

* :func:`plan_axis` gives the per-axis geometry the XLA path uses: dilation groups, query tiles, a
  fixed key *halo* per tile, and each query's window bounds.
* :func:`plan_speedup` gives the visited-tile fraction vs dense attention, the ideal (tile-level)
  speed-up, the FLOP bound, and whether the configuration is perfectly block-sparse (every visited
  tile fully unmasked), so users can pick strides and tiles. Dilation is modelled as NATTEN's
  token permutation: each dilation group is tiled separately.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxattn.core import neighborhood as na_ref

__all__ = ["AxisPlan", "plan_axis", "SpeedupPlan", "plan_speedup"]


@dataclasses.dataclass(frozen=True, eq=False)
class AxisPlan:
    """Geometry of one spatial axis for the tiled XLA path.

    Attributes:
      length, dilation: the axis length ``L`` and dilation ``d``.
      group_len: ``G = ceil(L / d)``, the longest dilation group.
      q_tile: queries per tile (within a group); ``num_tiles = ceil(G / q_tile)``.
      halo: keys per tile (within a group), the same for every tile.
      offsets: ``[d, num_tiles]`` first key (within-group coordinate) of each tile's halo.
      q_start, q_end: ``[d, num_tiles * q_tile]`` window of each (possibly padding) query; padding
        queries have ``start == end == 0`` (they see nothing).
      q_valid: ``[d, num_tiles * q_tile]`` whether the query exists (``c < L_g``).
    """

    length: int
    dilation: int
    kernel_size: int
    group_len: int
    q_tile: int
    num_tiles: int
    halo: int
    offsets: np.ndarray
    q_start: np.ndarray
    q_end: np.ndarray
    q_valid: np.ndarray


def plan_axis(length: int, kernel_size: int, dilation: int, stride: int, is_causal: bool,
              q_tile: int) -> AxisPlan:
    """Tile one axis: query tiles of ``q_tile`` within each dilation group and their key halo."""
    d = dilation
    g_len = -(-length // d)
    q_tile = max(1, min(q_tile, g_len))
    nt = -(-g_len // q_tile)
    padded = nt * q_tile
    g, c, start, end = na_ref.window_bounds_1d(length, kernel_size, d, stride, is_causal)
    q_start = np.zeros((d, padded), np.int64)
    q_end = np.zeros((d, padded), np.int64)
    q_valid = np.zeros((d, padded), bool)
    q_start[g, c], q_end[g, c], q_valid[g, c] = start, end, True
    # Monotone windows: a tile's keys span [start of its first query, end of its last query).
    lo = np.where(q_valid, q_start, np.iinfo(np.int64).max).reshape(d, nt, q_tile).min(-1)
    hi = np.where(q_valid, q_end, 0).reshape(d, nt, q_tile).max(-1)
    has_q = q_valid.reshape(d, nt, q_tile).any(-1)
    lo = np.where(has_q, lo, 0)
    halo = int(min(max(int((hi - lo).max()), 1), g_len))
    offsets = np.minimum(lo, g_len - halo)
    return AxisPlan(length, d, kernel_size, g_len, q_tile, nt, halo, offsets, q_start, q_end,
                    q_valid)


@dataclasses.dataclass(frozen=True)
class SpeedupPlan:
    """GNA-style analytical model of one NA configuration (see :func:`plan_speedup`)."""

    visited_tiles: int  # (query tile, key tile) pairs a tiled kernel must compute
    full_tiles: int  # of which fully unmasked (no masking work)
    dense_tiles: int  # pairs dense attention computes with the same tile shapes
    attended_fraction: float  # fraction of the dense [L, L] mask that is True
    visited_fraction: float  # visited_tiles / dense_tiles
    ideal_speedup: float  # dense_tiles / visited_tiles: best a tiled kernel can do
    flop_bound_speedup: float  # 1 / attended_fraction: no wasted work at all
    perfectly_block_sparse: bool  # every visited tile is full

    def __str__(self) -> str:
        return (f"visited {self.visited_tiles}/{self.dense_tiles} tiles "
                f"({100 * self.visited_fraction:.1f}%), {self.full_tiles} full; ideal speed-up "
                f"{self.ideal_speedup:.2f}x, FLOP bound {self.flop_bound_speedup:.2f}x, "
                f"perfectly block-sparse: {self.perfectly_block_sparse}")


def _axis_tiles(length, k, d, s, causal, tq, tkv):
    """Per axis: (visited pairs, full pairs, dense pairs, attended pairs)."""
    g, c, start, end = na_ref.window_bounds_1d(length, k, d, s, causal)
    visited = full = 0
    for grp in range(d):
        st, en = start[g == grp], end[g == grp]  # ordered by within-group coordinate
        lg = st.shape[0]
        for q0 in range(0, lg, tq):
            q1 = min(q0 + tq, lg)
            first_kv = st[q0] // tkv
            last_kv = -(-en[q1 - 1] // tkv)
            visited += last_kv - first_kv
            for u in range(first_kv, last_kv):
                a, b = u * tkv, min((u + 1) * tkv, lg)
                # monotone windows: the tile is full iff the last query starts by a and the
                # first query ends at or after b (padding keys beyond L_g are not counted)
                if st[q1 - 1] <= a and en[q0] >= b:
                    full += 1
    dense = math.ceil(length / tq) * math.ceil(length / tkv)
    attended = int((end - start).sum())
    return visited, full, dense, attended


def plan_speedup(spatial_shape, kernel_size, *, stride=1, dilation=1, is_causal=False,
                 q_tile=64, kv_tile=64) -> SpeedupPlan:
    """Fraction of key tiles a tiled NA kernel visits, and its ideal speed-up over dense attention.

    The N-D mask is a Kronecker product of 1-D masks and a multi-dimensional tile is a product of
    1-D tiles, so tile counts multiply across dimensions. ``q_tile``/``kv_tile`` are per-dimension
    tile shapes (an int is broadcast), e.g. ``(16, 8)`` for Hopper-style 2-D tiles.

    Returns a :class:`SpeedupPlan`. ``ideal_speedup`` is the GNA "speed of light" of a kernel that
    pays for every visited tile in full; ``flop_bound_speedup`` is the sparsity bound; they agree
    (up to partial tiles at the borders) when the configuration is perfectly block-sparse.
    """
    spatial_shape = tuple(int(x) for x in spatial_shape)
    p = na_ref.normalize_params(spatial_shape, kernel_size, dilation, stride, is_causal)
    ndim = p.ndim
    tq = q_tile if isinstance(q_tile, (tuple, list)) else (q_tile,) * ndim
    tkv = kv_tile if isinstance(kv_tile, (tuple, list)) else (kv_tile,) * ndim
    visited = full = dense = attended = 1
    for i in range(ndim):
        v, f, dn, at = _axis_tiles(spatial_shape[i], p.kernel_size[i], p.dilation[i],
                                   p.stride[i], p.is_causal[i], int(tq[i]), int(tkv[i]))
        visited, full, dense, attended = visited * v, full * f, dense * dn, attended * at
    total = math.prod(spatial_shape)
    frac = attended / total**2
    return SpeedupPlan(
        visited_tiles=visited, full_tiles=full, dense_tiles=dense, attended_fraction=frac,
        visited_fraction=visited / dense, ideal_speedup=dense / visited,
        flop_bound_speedup=1.0 / frac, perfectly_block_sparse=full == visited,
    )
