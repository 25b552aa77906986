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

import jax
import jax.numpy as jnp

__all__ = ["dropout_seed", "keep_mask"]

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
