"""Attention dropout whose mask is a pure function of ``(rng, batch, head, query, key)``.

Dropout on attention probabilities (Srivastava et al., 2014; as in "Attention Is All You
Need") keeps entry ``(b, n, i, j)`` with probability ``1 - rate`` and rescales kept entries by
``1 / (1 - rate)``. Here the keep decision is a counter-based hash of the entry's global indices
and two 32-bit words drawn from ``dropout_rng`` (the FlashAttention approach of indexing a
counter-based generator by position), so every implementation — the dense reference, the
chunked path with any tile size, a sharded run — drops exactly the same entries for the same
rng, and the backward pass regenerates the mask tile by tile instead of storing it.

The hash is MurmurHash3's 32-bit finaliser applied over the indices (a well-mixed bijection of
``uint32``); it is a dropout mask, not cryptography.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["DropoutIndex", "dropout_seed", "keep_mask", "keep_mask_of"]

_GOLDEN = 0x9E3779B9  # odd constants: multiplication by them is a bijection on uint32
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35


def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_C1)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(_C2)
    return h ^ (h >> 16)


def dropout_seed(rng) -> jax.Array:
    """Two ``uint32`` words from a PRNG key (typed ``jax.random.key`` or raw ``PRNGKey``)."""
    if rng is None:
        raise ValueError("dropout_rate > 0 needs a dropout_rng (a jax.random.key)")
    return jax.random.bits(rng, (2,), jnp.uint32)


def keep_mask(seed, batch_idx, head_idx, q_idx, kv_idx, rate: float, num_heads: int):
    """Boolean keep mask, ``True`` with probability ``1 - rate``, broadcast over the indices.

    Args:
      seed: ``uint32 [2]`` from :func:`dropout_seed`.
      batch_idx, head_idx, q_idx, kv_idx: integer arrays (global indices) that broadcast
        together, e.g. ``[B, 1, 1, 1]``, ``[1, N, 1, 1]``, ``[1, 1, T, 1]``, ``[1, 1, 1, S]``.
      rate: the dropout rate in ``[0, 1)``.
      num_heads: ``N`` (the row index of a ``(batch, head)`` pair is ``batch * N + head``).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)
    row = u32(batch_idx) * jnp.uint32(num_heads) + u32(head_idx)
    h = _fmix32(seed[0] ^ _fmix32(row * jnp.uint32(_GOLDEN) + seed[1]))
    h = _fmix32(h ^ (u32(q_idx) * jnp.uint32(_C2)))
    h = _fmix32(h + u32(kv_idx) * jnp.uint32(_GOLDEN))
    threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
    return h >= jnp.uint32(threshold)


@dataclasses.dataclass(frozen=True)
class DropoutIndex:
    """Where one attention call's entries sit inside a larger call that it is a shard of, so it
    drops exactly the entries the whole call drops (context / head parallelism).

    Local entry ``(b, n, i, j)`` is hashed as global ``(batch_start + b, head_start + n,
    q_positions[i], kv_positions[j])`` of a call with ``num_heads`` query heads. Positions
    default to the local indices (``None``).

    Attributes:
      seed: ``uint32 [2]`` from :func:`dropout_seed` of the whole call's ``dropout_rng``.
      num_heads: ``N`` of the whole call (static).
      batch_start, head_start: int scalars (may be traced, e.g. from ``lax.axis_index``).
      q_positions: int ``[T]`` global query positions of the local rows, or None.
      kv_positions: int ``[S]`` global key positions of the local columns, or None.
    """

    seed: Any
    num_heads: int
    batch_start: Any = 0
    head_start: Any = 0
    q_positions: Any = None
    kv_positions: Any = None

    def globalize(self, batch_idx, head_idx, q_idx, kv_idx):
        """Local index arrays -> the global ones :func:`keep_mask` hashes (out-of-range local
        indices, e.g. a padded tile's, are clipped: their entries are discarded anyway)."""
        take = lambda table, idx: idx if table is None else jnp.take(
            jnp.asarray(table), jnp.asarray(idx), mode="clip")
        return (jnp.asarray(batch_idx) + self.batch_start, jnp.asarray(head_idx) + self.head_start,
                take(self.q_positions, q_idx), take(self.kv_positions, kv_idx))


jax.tree_util.register_dataclass(
    DropoutIndex, data_fields=["seed", "batch_start", "head_start", "q_positions",
                               "kv_positions"], meta_fields=["num_heads"])


def keep_mask_of(seed_or_index, batch_idx, head_idx, q_idx, kv_idx, rate: float,
                 num_heads: int):
    """:func:`keep_mask` for local indices: with a :class:`DropoutIndex` they are first mapped
    to the whole call's indices (its seed and head count), with a plain seed used as they are."""
    if isinstance(seed_or_index, DropoutIndex):
        ix = seed_or_index
        return keep_mask(ix.seed, *ix.globalize(batch_idx, head_idx, q_idx, kv_idx), rate,
                         ix.num_heads)
    return keep_mask(seed_or_index, batch_idx, head_idx, q_idx, kv_idx, rate, num_heads)
