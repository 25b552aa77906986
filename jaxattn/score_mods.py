"""Ready-made score functions for ``jaxattn.dot_product_attention(score_mod=...)``.

Each is a function ``fn(score, b, h, q_idx, kv_idx, *args) -> score`` (FlexAttention's
``score_mod``) or a factory returning one; pass its arrays as ``score_mod_args`` so they get
gradients. Factories cache what they return, so the same settings give the same function
object (one compiled program, shared block-metadata caches).

* :func:`alibi` with :func:`alibi_slopes` (Press et al., "Train Short, Test Long", ICLR 2022).
* :func:`t5_relative_bias` (Raffel et al., "Exploring the Limits of Transfer Learning", JMLR
  2020, Section 2.1: bucketed relative positions, one learned scalar per bucket and head).
* :func:`relative_2d` (a learned per-head table over 2-D offsets, as Swin / NAT relative
  position biases on an image grid of width ``W``).
* :func:`soft_cap` (Gemma 2's ``c * tanh(score / c)``) and :func:`temperature` (per-head
  ``score / t_h``).
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

__all__ = ["alibi", "alibi_slopes", "relative_2d", "soft_cap", "t5_relative_bias",
           "t5_bucket", "temperature"]


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's head slopes ``m_h = 2^(-8 (h + 1) / n)`` for the nearest power of two ``n``, with
    the paper's interleaving for other head counts; float32 ``[num_heads]``."""
    def powers(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads}")
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(n)
    if n < num_heads:
        slopes += powers(2 * n)[0::2][: num_heads - n]
    return np.asarray(slopes, np.float32)


def alibi(score, b, h, q_idx, kv_idx, slopes):
    """ALiBi: ``score - slopes[h] * |q - kv|`` (for causal attention, ``k <= q``, this is the
    paper's ``m_h (k - q)``). ``slopes [N]`` (e.g. :func:`alibi_slopes`)."""
    del b
    return score - slopes[h].astype(score.dtype) * jnp.abs(q_idx - kv_idx).astype(score.dtype)


def t5_bucket(relative, *, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucket of ``relative = kv - q``: exact buckets for small distances, log-spaced up to
    ``max_distance`` (half the buckets per direction when ``bidirectional``)."""
    relative = jnp.asarray(relative)
    bucket = jnp.zeros_like(relative)
    n = num_buckets
    if bidirectional:
        n //= 2
        bucket = bucket + (relative > 0).astype(relative.dtype) * n
        distance = jnp.abs(relative)
    else:
        distance = jnp.maximum(-relative, 0)
    exact = n // 2
    is_small = distance < exact
    safe = jnp.maximum(distance, 1).astype(jnp.float32)
    large = exact + (jnp.log(safe / exact) / math.log(max_distance / exact)
                     * (n - exact)).astype(relative.dtype)
    large = jnp.minimum(large, n - 1)
    return bucket + jnp.where(is_small, distance, large)


@functools.cache
def t5_relative_bias(num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True):
    """``fn(score, b, h, q, kv, table)`` adding ``table[bucket(kv - q), h]`` with ``table
    [num_buckets, N]`` learned (T5's relative attention bias)."""
    if num_buckets < 2 or max_distance < 2:
        raise ValueError("num_buckets and max_distance must be >= 2")

    def fn(score, b, h, q_idx, kv_idx, table):
        del b
        bucket = t5_bucket(kv_idx - q_idx, bidirectional=bidirectional,
                           num_buckets=num_buckets, max_distance=max_distance)
        return score + table[bucket, h].astype(score.dtype)

    return fn


@functools.cache
def relative_2d(width: int):
    """``fn(score, b, h, q, kv, table)`` for tokens on a row-major grid of width ``width``:
    adds ``table[dy + Hg - 1, dx + width - 1, h]`` with ``(dy, dx)`` the key's offset from the
    query and ``table [2 Hg - 1, 2 width - 1, N]`` (``Hg`` the grid height, read from the
    table)."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")

    def fn(score, b, h, q_idx, kv_idx, table):
        del b
        rows = (table.shape[0] + 1) // 2
        dy = kv_idx // width - q_idx // width + rows - 1
        dx = kv_idx % width - q_idx % width + width - 1
        return score + table[dy, dx, h].astype(score.dtype)

    return fn


@functools.cache
def soft_cap(cap: float):
    """``fn(score, ...) = cap * tanh(score / cap)`` (as ``logits_soft_cap=cap``)."""
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")

    def fn(score, b, h, q_idx, kv_idx):
        del b, h, q_idx, kv_idx
        return cap * jnp.tanh(score / cap)

    return fn


def temperature(score, b, h, q_idx, kv_idx, temperatures):
    """Per-head temperature: ``score / temperatures[h]`` (``temperatures [N]``, learnable)."""
    del b, q_idx, kv_idx
    return score / temperatures[h].astype(score.dtype)
