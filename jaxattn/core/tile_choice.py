"""Tile sizes of the chunked path chosen from the mask's own block structure.

A block-sparse mask costs its density only when the tiles line up with its blocks: 256 x 256
blocks cut by the default 256 x 512 tiles turn every visited block into a half-empty partial
tile. When the caller does not fix the tile sizes, :func:`choose_tiles` classifies the mask once
on a fine ``128 x 128`` grid (host-side NumPy, :meth:`jaxattn.masks.Mask.block_info`), derives
every candidate tiling's visited tiles from it, and picks the cheapest under a two-term cost
model: the area of the visited tiles plus a fixed per-tile overhead (loop step, slicing,
carry update).

The overhead constant was measured on a 2-core x86 CPU (benchmarks/attention_cpu.py, the
``tiles`` section): at B * N = 8 heads of head_dim 64 a tile costs about 0.27 ms plus 2.2 ns per
(query, key, head) entry, i.e. the overhead of one tile is worth ~125k head-entries. Tiles never
exceed the tuned dense defaults (``256 x 512``): larger ones were not faster on CPU, so a mask
without structure (no mask, causal) keeps the defaults.
"""

from __future__ import annotations

import numpy as np

from jaxattn import masks as masks_lib

__all__ = ["choose_tiles", "tiling_cost", "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_KV"]

# Tuned on CPU at L=4096 (benchmarks/attention_cpu.py): 256 x 512 tiles beat 512 x 512 and larger.
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_KV = 512
FINE = 128  # the grid every candidate tiling is derived from
CANDIDATES_Q = (128, 256)
CANDIDATES_KV = (128, 256, 512)
TILE_OVERHEAD_ENTRIES = 125_000  # one tile's fixed cost in (query, key, head) entries, measured


def _coarse_kind(fine: np.ndarray, fq: int, fk: int, kv_len: int, block_kv: int) -> np.ndarray:
    """Kinds ``[nq, nk]`` of ``fq x fk`` groups of fine tiles: EMPTY if all are empty, FULL if
    all are full (and the coarse tile has no padded keys), PARTIAL otherwise."""
    nqf, nkf = fine.shape
    nq, nk = -(-nqf // fq), -(-nkf // fk)
    padded = np.full((nq * fq, nk * fk), -1, np.int8)  # -1: beyond the end (neutral)
    padded[:nqf, :nkf] = fine
    groups = padded.reshape(nq, fq, nk, fk).transpose(0, 2, 1, 3).reshape(nq, nk, fq * fk)
    empty = np.all((groups == masks_lib.EMPTY) | (groups == -1), axis=-1)
    full = np.all((groups == masks_lib.FULL) | (groups == -1), axis=-1)
    kind = np.where(empty, masks_lib.EMPTY, np.where(full, masks_lib.FULL, masks_lib.PARTIAL))
    if kv_len % block_kv:
        kind[:, -1] = np.where(kind[:, -1] == masks_lib.EMPTY, masks_lib.EMPTY,
                               masks_lib.PARTIAL)  # padded keys need the element mask
    return kind.astype(np.int8)


def tiling_cost(num_visited: int, block_q: int, block_kv: int, entries_per_tile_cell: float
                ) -> float:
    """Model cost of a tiling, in (query, key, head) entries: every visited tile costs its area
    times ``entries_per_tile_cell`` (batch x heads x (H + Hv) / 128) plus the fixed overhead."""
    return num_visited * (block_q * block_kv * entries_per_tile_cell + TILE_OVERHEAD_ENTRIES)


def choose_tiles(mask, q_len: int, kv_len: int, *, block_q: int | None = None,
                 block_kv: int | None = None, batch: int = 1, num_heads: int = 1,
                 head_dim: int = 64, value_dim: int | None = None) -> tuple[int, int]:
    """``(block_q, block_kv)`` for a ``[q_len, kv_len]`` problem under ``mask``.

    Sizes the caller fixed are kept. With no mask, a mask known only at run time (traced
    arrays) or lengths under two fine tiles, the dense defaults are used. Otherwise the
    candidate with the lowest :func:`tiling_cost` wins (ties go to the larger tiles).

    Args:
      mask: a :class:`jaxattn.masks.Mask` or None.
      q_len, kv_len: T and S.
      block_q, block_kv: sizes fixed by the caller (None: choose).
      batch, num_heads, head_dim, value_dim: the problem's B, N, H and Hv (scale the work per
        tile entry against the fixed per-tile overhead).
    """
    if block_q is not None and block_kv is not None:
        return block_q, block_kv
    default = (block_q or DEFAULT_BLOCK_Q, block_kv or DEFAULT_BLOCK_KV)
    mask = masks_lib.as_mask(mask)
    if mask is None or not mask.is_static or min(q_len, kv_len) < 2 * FINE:
        return default
    fine = mask.block_info(q_len, kv_len, FINE, FINE).union_kind()
    per_cell = batch * num_heads * (head_dim + (value_dim or head_dim)) / 128
    best, best_cost = default, None
    qs = (block_q,) if block_q is not None else CANDIDATES_Q
    ks = (block_kv,) if block_kv is not None else CANDIDATES_KV
    for bq in sorted(qs, reverse=True):
        for bk in sorted(ks, reverse=True):
            if bq % FINE or bk % FINE:  # a caller's size off the fine grid: no estimate
                return default
            kind = _coarse_kind(fine, bq // FINE, bk // FINE, kv_len, bk)
            cost = tiling_cost(int((kind != masks_lib.EMPTY).sum()), bq, bk, per_cell)
            if best_cost is None or cost < best_cost * (1 - 1e-9):
                best, best_cost = (bq, bk), cost
    return best
