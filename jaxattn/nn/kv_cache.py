"""The KV cache's bookkeeping for :class:`jaxattn.nn.MultiHeadAttention` decode steps: ragged
step padding (``lengths`` / ``token_mask``), the step's attention mask, and cache writes that
keep working when the step carries Explicit mesh axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxattn import masks as masks_lib
from jaxattn.ops.call import describe
from jaxattn.ops.explicit_axes import explicit_mesh_of, explicit_spec, in_auto_axes

__all__ = ["check_step_padding", "real_tokens", "decode_mask", "scatter_rows", "sharded_like"]


def check_step_padding(batch: int, t: int, lengths, token_mask):
    """A decode step's ``lengths`` (int ``[B]`` in ``[0, T]``, as int32) and ``token_mask``
    (bool ``[B, T]``), checked; either may be None."""
    if lengths is not None:
        lengths = lengths if hasattr(lengths, "dtype") else np.asarray(lengths)
        if tuple(lengths.shape) != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be an int array of shape [B] = ({batch},) (each "
                             f"sequence's new tokens), got {describe(lengths)}")
        if not isinstance(lengths, jax.core.Tracer) and (
                np.any(np.asarray(lengths) < 0) or np.any(np.asarray(lengths) > t)):
            raise ValueError(f"lengths must be in [0, T={t}], got {np.asarray(lengths).tolist()}")
        lengths = jnp.asarray(lengths, jnp.int32)
    if token_mask is not None:
        token_mask = token_mask if hasattr(token_mask, "dtype") else np.asarray(token_mask)
        if tuple(token_mask.shape) != (batch, t) or token_mask.dtype != jnp.bool_:
            raise ValueError(f"token_mask must be a bool array of shape [B, T] = ({batch}, {t}) "
                             f"(True = a real token), got {describe(token_mask)}")
        token_mask = jnp.asarray(token_mask)
    return lengths, token_mask


def real_tokens(t: int, lengths, token_mask):
    """bool ``[B, T]``: the step's real tokens (``t < lengths[b]`` and ``token_mask``), or None
    when every token is real."""
    real = None if lengths is None else jnp.arange(t) < lengths[:, None]
    if token_mask is not None:
        real = token_mask if real is None else real & token_mask
    return real


def decode_mask(offset, key_mask, real):
    """The mask of a decode step: query ``i`` of sequence ``b`` sits at cache position
    ``offset[b] + i`` and sees the cached keys ``j <= offset[b] + i`` that are real tokens
    (``key_mask [B, S_max]``); padded query rows (``real [B, T]`` False) see nothing."""
    mask = masks_lib.CausalMask(offset=offset) & masks_lib.ArrayMask(key_mask[:, None, None, :])
    if real is not None:
        mask = mask & masks_lib.ArrayMask(real[:, None, :, None])
    return mask


def scatter_rows(caches, updates, slots, *, like):
    """``caches[b][slots[b, t]] = updates[b][t]`` for every batch row ``b`` (slots past the end
    are dropped). On Explicit mesh axes (``like``'s type) the scatter runs on Auto axes (its
    index arrays carry no sharding) and the result keeps the caches' batch sharding."""

    def scatter(caches, updates, slots):
        rows = jnp.arange(slots.shape[0])[:, None]
        return [c.at[rows, slots].set(u, mode="drop")
                for c, u in zip(caches, updates, strict=True)]

    mesh = explicit_mesh_of(like)
    if mesh is None:
        return scatter(caches, updates, slots)
    out = [_batch_spec(like, c.ndim) for c in caches]
    return in_auto_axes(scatter, mesh, out, caches, updates, slots)


def sharded_like(step, arrays):
    """``arrays`` (batch-leading: the caches ``[B, S_max, ...]`` and the step's updates) resharded
    like the decode step ``step [B, T, ...]`` over its batch axis when ``step`` carries Explicit
    mesh axes (``init_cache`` allocates the caches unsharded; a write needs equal sharding
    types). Unchanged otherwise."""
    mesh = explicit_mesh_of(step)
    if mesh is None:
        return arrays
    return [jax.sharding.reshard(c, jax.sharding.NamedSharding(mesh, _batch_spec(step, c.ndim)))
            for c in arrays]


def _batch_spec(like, ndim: int) -> PartitionSpec:
    """A rank-``ndim`` spec sharded like ``like``'s (Explicit) batch axis, replicated elsewhere."""
    return PartitionSpec(explicit_spec(like)[0], *(None,) * (ndim - 1))
