"""Block-sparse metadata for the flash kernels: which kv tiles each query tile visits.

The input is a block classification on a ``[num_q_blocks, num_kv_blocks]`` grid (the same
encoding as ``jaxattn.masks.BlockInfo``: 0 = EMPTY, 1 = PARTIAL, 2 = FULL), built on the host. It
is turned into *visit lists* (the FlexAttention ``kv_indices`` / Splash ``data_next`` idea):
per query tile, the partial kv tiles (with the index of their element mask) and the full kv tiles.
Kernels loop over exactly these lists, so empty tiles are never loaded or computed, and full
tiles are run without evaluating any mask. The transposed lists (per kv tile, the query tiles
that see it) drive the dk/dv kernel.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["EMPTY", "PARTIAL", "FULL", "BlockSparseMeta", "block_sparse_meta", "dense_meta"]

EMPTY, PARTIAL, FULL = 0, 1, 2


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparseMeta:
    """Visit lists for the forward/dq kernels (``fwd``) and the dk/dv kernel (``bwd``).

    Attributes:
      fwd: int32 ``[b, n, nq, 2 + 3 * nk]``; row ``[num_partial, num_full, partial kv blocks
        (nk slots), their element-mask indices (nk slots), full kv blocks (nk slots)]``.
      bwd: int32 ``[b, n, nk, 2 + 3 * nq]``; the same per kv block, listing query blocks.
      blocks: int8 ``[P, block_q, block_kv]`` element masks of partial tiles (1 = attend);
        ``P >= 1`` (a dummy all-zero block when there is no partial tile).
      kind: int8 ``[b, n, nq, nk]``, the classification it was built from.
      ``b`` is 1 or the batch size, ``n`` is 1 or the number of query heads.
    """

    fwd: np.ndarray
    bwd: np.ndarray
    blocks: np.ndarray
    kind: np.ndarray

    @property
    def block_q(self) -> int:
        return int(self.blocks.shape[1])

    @property
    def block_kv(self) -> int:
        return int(self.blocks.shape[2])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.kind.shape[2]), int(self.kind.shape[3])

    @property
    def num_visited(self) -> int:
        """Non-empty tiles over all ``(b, n)`` entries of the metadata."""
        return int((self.kind != EMPTY).sum())


def _lists(kind: np.ndarray, pidx: np.ndarray) -> np.ndarray:
    """kind/pidx ``[b, n, r, c]`` -> int32 ``[b, n, r, 2 + 3 c]`` visit lists along ``c``."""
    b, n, r, c = kind.shape
    out = np.zeros((b, n, r, 2 + 3 * c), np.int32)
    for ib in range(b):
        for ih in range(n):
            for i in range(r):
                part = np.nonzero(kind[ib, ih, i] == PARTIAL)[0]
                full = np.nonzero(kind[ib, ih, i] == FULL)[0]
                row = out[ib, ih, i]
                row[0], row[1] = len(part), len(full)
                row[2:2 + len(part)] = part
                row[2 + c:2 + c + len(part)] = pidx[ib, ih, i, part]
                row[2 + 2 * c:2 + 2 * c + len(full)] = full
    return out


def block_sparse_meta(kind, partial_index, partial_blocks) -> BlockSparseMeta:
    """Build visit lists from a block classification.

    Args:
      kind: int ``[b, n, nq, nk]`` with values EMPTY / PARTIAL / FULL.
      partial_index: int ``[b, n, nq, nk]``: for PARTIAL tiles, the index of their element mask
        in ``partial_blocks`` (anything elsewhere).
      partial_blocks: bool ``[P, block_q, block_kv]`` element masks (True = attend). Key columns
        past the sequence end must be False in them, and a tile that contains such columns must
        not be FULL: the kernels only mask padding through these blocks.

    Returns:
      :class:`BlockSparseMeta`.
    """
    kind = np.asarray(kind).astype(np.int8)
    pidx = np.asarray(partial_index).astype(np.int32)
    blocks = np.asarray(partial_blocks)
    if kind.ndim != 4 or pidx.shape != kind.shape:
        raise ValueError(f"kind and partial_index must be [b, n, nq, nk], got {kind.shape}, "
                         f"{pidx.shape}")
    if blocks.ndim != 3:
        raise ValueError(f"partial_blocks must be [P, block_q, block_kv], got {blocks.shape}")
    if not np.isin(kind, (EMPTY, PARTIAL, FULL)).all():
        raise ValueError("kind holds values other than EMPTY=0, PARTIAL=1, FULL=2")
    part = kind == PARTIAL
    if part.any() and (pidx[part].min() < 0 or pidx[part].max() >= blocks.shape[0]):
        raise ValueError("partial_index of a PARTIAL tile is out of range of partial_blocks")
    if blocks.shape[0] == 0:
        blocks = np.zeros((1,) + blocks.shape[1:], bool)
    fwd = _lists(kind, pidx)
    bwd = _lists(kind.transpose(0, 1, 3, 2), pidx.transpose(0, 1, 3, 2))
    return BlockSparseMeta(fwd, bwd, blocks.astype(np.int8), kind)


def dense_meta(q_len: int, kv_len: int, block_q: int, block_kv: int) -> BlockSparseMeta:
    """Metadata for an unmasked problem: every tile FULL except the last kv tile when ``kv_len``
    is not a multiple of ``block_kv`` (its padded key columns are masked)."""
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    kind = np.full((1, 1, nq, nk), FULL, np.int8)
    pidx = np.full(kind.shape, -1, np.int32)
    blocks = np.zeros((0, block_q, block_kv), bool)
    if kv_len % block_kv:
        kind[..., -1] = PARTIAL
        pidx[..., -1] = 0
        tail = np.zeros((1, block_q, block_kv), bool)
        tail[0, :, : kv_len % block_kv] = True
        blocks = tail
    return block_sparse_meta(kind, pidx, blocks)
