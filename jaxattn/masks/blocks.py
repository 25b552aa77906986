"""Block metadata: the ``EMPTY``/``PARTIAL``/``FULL`` tile codes, :class:`BlockInfo`, and the
host-side (NumPy) computation that classifies a mask's ``(q_block, kv_block)`` tiles.

Kernels skip empty tiles, run full tiles without evaluating the mask, and apply an element
mask to partial tiles; the distinct partial-tile masks are deduplicated (as Splash does).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from jaxattn.masks.base import Mask

__all__ = ["EMPTY", "PARTIAL", "FULL", "BlockInfo", "cached_block_info"]

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True, eq=False)
class BlockInfo:
    """Block-sparse summary of a mask on a ``[num_q_blocks, num_kv_blocks]`` grid.

    Attributes:
      q_len, kv_len: the unpadded lengths T and S.
      block_q, block_kv: tile sizes.
      kind: int8 ``[b, n, num_q_blocks, num_kv_blocks]`` with values ``EMPTY`` (0, skip),
        ``PARTIAL`` (1, apply the element mask) and ``FULL`` (2, no mask needed); ``b`` in
        ``{1, B}``, ``n`` in ``{1, N}``.
      partial_index: int32, same shape as ``kind``: index into ``partial_blocks`` for partial
        tiles, ``-1`` elsewhere.
      partial_blocks: bool ``[P, block_q, block_kv]``: the distinct element masks of the partial
        tiles (deduplicated, as Splash does). Padded key columns are ``False``.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    kind: np.ndarray
    partial_index: np.ndarray
    partial_blocks: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return self.kind.shape[-2], self.kind.shape[-1]

    @property
    def num_empty(self) -> int:
        return int((self.kind == EMPTY).sum())

    @property
    def num_partial(self) -> int:
        return int((self.kind == PARTIAL).sum())

    @property
    def num_full(self) -> int:
        return int((self.kind == FULL).sum())

    @property
    def num_visited(self) -> int:
        """Tiles a block-sparse kernel must compute (partial + full), over all ``b, n``."""
        return int((self.kind != EMPTY).sum())

    def union_kind(self) -> np.ndarray:
        """``[num_q_blocks, num_kv_blocks]`` kind valid for every batch row and head: EMPTY only
        if empty everywhere, FULL only if full everywhere, PARTIAL otherwise."""
        k = self.kind.reshape(-1, *self.grid)
        empty = (k == EMPTY).all(0)
        full = (k == FULL).all(0)
        return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


def _row_tiles(mask: Mask, i: int, bq: int, nk: int, bk: int, kv_valid: np.ndarray):
    """Query block ``i`` of ``mask`` cut into tiles: bool ``[b, n, nk, bq, bk]``, padded keys
    (``kv_valid [nk * bk]`` false) masked."""
    q_idx = np.arange(i * bq, (i + 1) * bq)
    row = np.asarray(mask.evaluate(q_idx, np.arange(nk * bk)))  # [b, n, bq, nk*bk]
    row = row & kv_valid
    return row.reshape(row.shape[:2] + (bq, nk, bk)).transpose(0, 1, 3, 2, 4)


def _tile_kinds(tiles: np.ndarray, q_valid: np.ndarray, kv_tile_valid: np.ndarray):
    """``tiles [b, n, nk, bq, bk]`` -> kinds ``[b, n, nk]``; rows with ``q_valid [bq]`` false are
    ignored, and a tile holding padded keys (``kv_tile_valid [nk, bk]``) is never FULL."""
    valid_tiles = tiles[:, :, :, q_valid, :]
    anyv = valid_tiles.any(axis=(-1, -2))
    allv = (valid_tiles | ~kv_tile_valid[None, None, :, None, :]).all(axis=(-1, -2))
    allv &= kv_tile_valid.all(-1)
    return np.where(anyv, np.where(allv, FULL, PARTIAL), EMPTY)


def _intern(tile: np.ndarray, seen: dict[bytes, int], blocks: list[np.ndarray]) -> int:
    """Index of ``tile`` in ``blocks``, appending it the first time its contents appear."""
    key = tile.tobytes()
    if key not in seen:
        seen[key] = len(blocks)
        blocks.append(tile)
    return seen[key]


@functools.lru_cache(maxsize=256)
def cached_block_info(mask: Mask, q_len: int, kv_len: int, bq: int, bk: int) -> BlockInfo:
    """:class:`BlockInfo` of a static ``mask`` for a ``[q_len, kv_len]`` problem on
    ``bq x bk`` tiles (cached on the mask's value; use :meth:`Mask.block_info`, which checks
    the mask first)."""
    if bq < 1 or bk < 1:
        raise ValueError(f"block sizes must be positive, got block_q={bq}, block_kv={bk}")
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    kinds = p_index = None
    blocks: list[np.ndarray] = []
    seen: dict[bytes, int] = {}
    kv_valid = np.arange(nk * bk) < kv_len
    for i in range(nq):
        q_valid = np.arange(i * bq, (i + 1) * bq) < q_len
        tiles = _row_tiles(mask, i, bq, nk, bk, kv_valid)
        if kinds is None:
            kinds = np.zeros(tiles.shape[:2] + (nq, nk), np.int8)
            p_index = np.full(tiles.shape[:2] + (nq, nk), -1, np.int32)
        kinds[:, :, i] = _tile_kinds(tiles, q_valid, kv_valid.reshape(nk, bk))
        for b, n, j in zip(*np.nonzero(kinds[:, :, i] == PARTIAL), strict=True):
            p_index[b, n, i, j] = _intern(tiles[b, n, j] & q_valid[:, None], seen, blocks)
    pb = np.stack(blocks) if blocks else np.zeros((0, bq, bk), bool)
    return BlockInfo(q_len, kv_len, bq, bk, kinds, p_index, pb)
