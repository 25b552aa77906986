"""Score functions (FlexAttention's ``score_mod``): a Python function applied to every scaled
logit with its indices, ``score' = fn(score, b, h, q_idx, kv_idx, *args)``, before the soft-cap
and the mask (Dong et al., "Flex Attention: A Programming Model for Generating Optimized
Attention Kernels", 2024). ``args`` are arrays (ALiBi slopes, a relative-position table) that
receive gradients. Every path evaluates the function on index grids of the block it holds, so
no ``[T, S]`` bias is ever materialised by the tiled paths.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["apply_score_mod"]


def apply_score_mod(score_mod, score, b_idx, h_idx, q_idx, kv_idx, args):
    """``score_mod(score, b, h, q, kv, *args)`` checked to return ``score``'s shape, as f32.

    Index arrays are int32 and broadcast against ``score`` (e.g. ``[B, 1, 1, 1]``,
    ``[1, N, 1, 1]``, ``[1, 1, T, 1]``, ``[1, 1, 1, S]``).
    """
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    out = score_mod(score, i32(b_idx), i32(h_idx), i32(q_idx), i32(kv_idx), *args)
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"score_mod must return floating scores, got dtype {dtype}")
    if tuple(shape) != tuple(score.shape):
        out = jnp.broadcast_to(out, score.shape) if _broadcasts(shape, score.shape) else None
        if out is None:
            raise ValueError(f"score_mod returned shape {tuple(shape)}; it must keep the "
                             f"scores' shape {tuple(score.shape)}")
    return out.astype(jnp.float32)


def _broadcasts(shape, target) -> bool:
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(shape[::-1], target[::-1], strict=False))
