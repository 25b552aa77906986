"""Attention-dropout keep mask as a hash of global ``(batch, head, query, key)`` indices.

The same function as ``jaxattn.core.dropout.keep_mask`` (kept here because kernels never import
jaxattn; a test checks the two agree bit for bit): MurmurHash3's 32-bit finaliser over the
indices and two seed words, so a kernel regenerates any tile's mask from its indices, in the
forward and in both backward kernels, and drops exactly what the reference drops.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["keep_mask"]

_GOLDEN = 0x9E3779B9
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35


def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * jnp.uint32(_C1)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(_C2)
    return h ^ (h >> 16)


def keep_mask(seed0, seed1, batch_idx, head_idx, q_idx, kv_idx, rate: float, num_heads: int):
    """Boolean keep mask (``True`` with probability ``1 - rate``) broadcast over the indices.

    ``seed0``, ``seed1``: uint32 scalars; the indices: integer arrays or scalars (global
    positions); ``num_heads``: the number of query heads ``N``.
    """
    u32 = lambda x: jnp.asarray(x).astype(jnp.uint32)
    row = u32(batch_idx) * jnp.uint32(num_heads) + u32(head_idx)
    h = _fmix32(u32(seed0) ^ _fmix32(row * jnp.uint32(_GOLDEN) + u32(seed1)))
    h = _fmix32(h ^ (u32(q_idx) * jnp.uint32(_C2)))
    h = _fmix32(h + u32(kv_idx) * jnp.uint32(_GOLDEN))
    threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
    return h >= jnp.uint32(threshold)
