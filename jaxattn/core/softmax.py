"""Numerically safe softmax pieces shared by every attention path.

Conventions: logits are f32; a masked logit is ``-inf``; a row with no visible key has
``lse = -inf``, probabilities 0 and output 0, and every gradient through it is finite.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["soft_cap", "soft_cap_grad", "safe_max", "safe_log", "merge_partials",
           "online_softmax_step"]


def soft_cap(logits, cap: float | None):
    """``cap * tanh(logits / cap)`` (Gemma 2 logit soft-capping); identity when ``cap`` is None."""
    if cap is None:
        return logits
    return cap * jnp.tanh(logits / cap)


def soft_cap_grad(logits, cap: float | None):
    """d soft_cap / d logits, elementwise (1 when ``cap`` is None)."""
    if cap is None:
        return jnp.ones_like(logits)
    t = jnp.tanh(logits / cap)
    return 1.0 - t * t


def safe_max(x, axis, keepdims=False):
    """Max that returns 0 (not -inf) for an all ``-inf`` slice, so ``x - max`` never NaNs."""
    m = jnp.max(x, axis=axis, keepdims=keepdims)
    return jnp.where(jnp.isfinite(m), m, 0.0)


def safe_log(x):
    """``log(x)`` with ``-inf`` at ``x == 0`` and a zero (not NaN/inf) gradient there."""
    pos = x > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, x, 1.0)), -jnp.inf)


def online_softmax_step(m, logits):
    """One tile of the online softmax (FlashAttention): the running max ``m [...]`` and a tile's
    ``logits [..., bk]`` -> ``(m_new, alpha, p)``: the new running max, the factor ``exp(m -
    m_new)`` that rescales the carried sum and accumulator, and the tile's unnormalised
    probabilities ``exp(logits - m_new)``. Rows masked so far (``m_new = -inf``) give
    ``alpha = p = 0``, never NaN."""
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    return m_new, jnp.exp(m - m_safe), jnp.exp(logits - m_safe[..., None])


def merge_partials(outs, lses):
    """Merge attention results computed over disjoint key sets (ring attention, split-K).

    Args:
      outs: sequence of ``[B, T, N, Hv]`` outputs, each normalised over its own keys.
      lses: sequence of ``[B, T, N]`` natural-log sum-exp of the logits over those keys
        (``-inf`` where a part saw no key).

    Returns:
      ``(out [B, T, N, Hv], lse [B, T, N])`` equal to attention over the union of the key sets.
    """
    lse_stack = jnp.stack([l.astype(jnp.float32) for l in lses])  # [P, B, T, N]
    m = safe_max(lse_stack, axis=0)
    w = jnp.exp(lse_stack - m)  # [P, B, T, N]; 0 for empty parts
    total = jnp.sum(w, axis=0)
    lse = m + safe_log(total)
    denom = jnp.where(total > 0, total, 1.0)
    out = sum(
        o.astype(jnp.float32) * (wi / denom)[..., None] for o, wi in zip(outs, w, strict=True)
    )
    return out.astype(outs[0].dtype), lse
