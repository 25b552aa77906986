"""Rotary position embedding (Su et al., "RoFormer: Enhanced Transformer with Rotary Position
Embedding", 2021), in the rotate-half layout used by GPT-NeoX / Llama."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

__all__ = ["apply_rope"]


def apply_rope(
    x: Float[Array, "B L N H"], positions: Int[Array, "B L"], theta: float = 10_000.0
) -> Float[Array, "B L N H"]:
    """Rotate pairs ``(x[..., i], x[..., i + H/2])`` by ``positions * theta^(-2i/H)``.

    ``H`` must be even. Computed in f32 and returned in ``x.dtype``.
    """
    h = x.shape[-1]
    if h % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {h}")
    inv_freq = theta ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)  # [H/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, H/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
