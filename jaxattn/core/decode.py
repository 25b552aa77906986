"""Decoding attention: a few query tokens against a long KV cache, reading only the live tiles.

Flash-decoding's recurrence (Dao, Haziza, Massa & Sizov, "Flash-Decoding for long-context
inference", 2023): the cache ``[B, S_max, K, H]`` is cut into key tiles of ``block_kv``
positions and an online softmax (running max ``m``, denominator ``l`` and unnormalised output
``acc``, as FlashAttention) is carried across them. The tiles run in a ``lax.while_loop`` whose
trip count is *traced*: ``ceil(num_live / block_kv)`` where ``num_live`` is the largest number of
live cache entries in the batch. Under ``jax.jit`` a step at cache index 256 of a 4096-long cache
therefore reads one 256-key tile, not sixteen; the cache length only fixes the array shapes.

Keys at or beyond ``num_live`` are never read (and are masked if a tile straddles the bound).
The last tile is shifted left to end at ``S_max`` when ``S_max`` is not a multiple of
``block_kv`` (no padded copy of the cache); keys it shares with the previous tile are masked.

Forward only: ``lax.while_loop`` has no reverse-mode derivative (train with
:func:`jaxattn.dot_product_attention`; decoding needs no gradients).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxattn.core import softmax as sm
from jaxattn.core.chunked import slice_axis

__all__ = ["DEFAULT_DECODE_BLOCK_KV", "DecodeResult", "decode_attention_tiles",
           "live_tile_count"]

# Tiles of 256 keys: at S_max = 4096 on CPU a step at index 256 costs about as much as a 512 tile
# (benchmarks/decode.py); smaller tiles make more loop iterations, larger ones read dead keys.
DEFAULT_DECODE_BLOCK_KV = 256


class DecodeResult(NamedTuple):
    """What :func:`decode_attention_tiles` returns.

    ``out [B, T, N, Hv]`` (the query's dtype), ``lse [B, T, N]`` (f32, ``-inf`` for a row that
    sees no key), ``tiles_visited`` (int32 scalar: loop iterations run, counted in the loop).
    """

    out: jax.Array
    lse: jax.Array
    tiles_visited: jax.Array


def live_tile_count(num_live, kv_len: int, block_kv: int):
    """Tiles holding a live key: ``ceil(min(max(num_live), kv_len) / block)`` as int32, with
    ``block = min(block_kv, kv_len)``; ``num_live`` is an int scalar or ``[B]``."""
    block = min(block_kv, kv_len)
    live = jnp.clip(jnp.max(jnp.asarray(num_live, jnp.int32)), 0, kv_len)
    return (live + block - 1) // block


def _per_head_tile(x, kv_heads: int, groups: int):
    """A ``[b, N|1, T|1, bk|1]`` tile (mask, bias) -> ``[b, K|1, G|1, T|1, bk|1]``."""
    b, n, t, s = x.shape
    if n == 1:
        return x.reshape(b, 1, 1, t, s)
    return x.reshape(b, kv_heads, groups, t, s)


def decode_attention_tiles(query, key, value, *, num_live=None, bias=None, mask=None,
                           scale: float | None = None, logits_soft_cap: float | None = None,
                           sinks=None, block_kv: int = DEFAULT_DECODE_BLOCK_KV) -> DecodeResult:
    """Attention of a few queries over the live prefix of a KV cache (arguments unvalidated:
    :func:`jaxattn.decode_attention` checks them).

    Args:
      query: ``[B, T, N, H]`` (``T`` small: the step's new tokens).
      key: ``[B, S, K, H]``, the whole cache (``N % K == 0``).
      value: ``[B, S, K, Hv]``.
      num_live: int scalar or ``[B]``: keys at positions ``>= max(num_live)`` are never read
        (and count as masked). ``None``: every key is live (every tile is visited).
      bias: f32-castable, rank 4, broadcastable to ``[B, N, T, S]``.
      mask: a :class:`jaxattn.masks.Mask` (evaluated tile by tile on query positions
        ``0 .. T-1`` and cache positions), or None.
      scale: logit scale, default ``H ** -0.5``.
      logits_soft_cap: ``c * tanh(logits / c)`` after scale and bias.
      sinks: ``[N]``: one extra logit per head in every denominator.
      block_kv: keys per tile (clipped to ``S``).

    Returns:
      :class:`DecodeResult` ``(out [B, T, N, Hv], lse [B, T, N], tiles_visited)``. A row with no
      visible key (and no sink) is zero.
    """
    b, t, n, h = query.shape
    s, kv_heads, hv = key.shape[1], key.shape[2], value.shape[-1]
    groups = n // kv_heads
    block = min(block_kv, s)
    scale = h**-0.5 if scale is None else scale
    live = s if num_live is None else jnp.clip(jnp.max(jnp.asarray(num_live, jnp.int32)), 0, s)
    n_tiles = live_tile_count(live, s, block)
    # f32 operands, as the reference: exact products of bf16 inputs, f32 sums (and on CPU much
    # faster than bf16 dots; measured in benchmarks/decode.py)
    q = query.reshape(b, t, kv_heads, groups, h).astype(jnp.float32)
    q_idx = jnp.arange(t, dtype=jnp.int32)

    def tile_logits(nominal_start, start):
        """f32 logits ``[B, K, G, T, block]`` of the keys ``start ..``, masked to -inf."""
        k_tile = jax.lax.dynamic_slice_in_dim(key, start, block, axis=1).astype(jnp.float32)
        logits = jnp.einsum("btkgh,bskh->bkgts", q, k_tile) * scale
        if bias is not None:
            bias_tile = slice_axis(bias, 3, start, block).astype(jnp.float32)  # [b, n, t, bk|1]
            logits = logits + _per_head_tile(bias_tile, kv_heads, groups)
        logits = sm.soft_cap(logits, logits_soft_cap)
        kv_idx = start + jnp.arange(block, dtype=jnp.int32)
        visible = (kv_idx >= nominal_start) & (kv_idx < live)  # [block]: new and live keys
        if mask is not None:
            visible = visible & _per_head_tile(mask.evaluate(q_idx, kv_idx), kv_heads, groups)
        return jnp.where(visible, logits, -jnp.inf)

    def body(i, carry):
        m, l, acc, visited = carry
        nominal_start = i * block
        start = jnp.minimum(nominal_start, s - block)  # the last tile ends at S (no padding)
        logits = tile_logits(nominal_start, start)
        m_new, alpha, p = sm.online_softmax_step(m, logits)
        v_tile = jax.lax.dynamic_slice_in_dim(value, start, block, axis=1)
        pv = jnp.einsum("bkgts,bskh->bkgth", p, v_tile.astype(jnp.float32))
        l = alpha * l + jnp.sum(p, axis=-1)
        acc = alpha[..., None] * acc + pv
        return m_new, l, acc, visited + 1

    stats_shape = (b, kv_heads, groups, t)
    init = (jnp.full(stats_shape, -jnp.inf, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
            jnp.zeros((*stats_shape, hv), jnp.float32), jnp.zeros((), jnp.int32))
    m, l, acc, visited = jax.lax.fori_loop(0, n_tiles, body, init)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, kv_heads, groups, 1)
        m_all = jnp.maximum(m, sink)
        rescale = jnp.exp(m - m_all)
        l = l * rescale + jnp.exp(sink - m_all)
        acc = acc * rescale[..., None]
        m = m_all
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    lse = jnp.where(jnp.isfinite(m), m, 0.0) + sm.safe_log(l)
    out = jnp.moveaxis(out, 3, 1).reshape(b, t, n, hv).astype(query.dtype)  # [B, T, N, Hv]
    lse = jnp.moveaxis(lse, 3, 1).reshape(b, t, n)
    return DecodeResult(out, lse, visited)
