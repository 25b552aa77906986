"""A mask given by a Python function of the indices (FlexAttention's ``mask_mod``).

``FunctionMask(fn)`` with ``fn(b, h, q_idx, kv_idx) -> bool`` over broadcasting integer index
arrays, as PyTorch's FlexAttention defines a ``mask_mod`` (Dong et al., "Flex Attention: A
Programming Model for Generating Optimized Attention Kernels", 2024). Its block metadata is
computed like ``create_block_mask``: by evaluating ``fn`` on each tile's index grid on the host
(NumPy), so every backend skips the tiles it rules out; kernels evaluate it again per partial
tile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxattn.masks.base import Mask, register_mask

__all__ = ["FunctionMask"]


@register_mask
class FunctionMask(Mask):
    """Key ``kv_idx`` is visible to query ``q_idx`` of batch row ``b`` and head ``h`` iff
    ``fn(b, h, q_idx, kv_idx)`` is True.

    ``fn`` receives int32 arrays shaped ``[B|1, 1, 1, 1]``, ``[1, N|1, 1, 1]``, ``[1, 1, tq, 1]``
    and ``[1, 1, 1, tk]`` and must return booleans broadcastable to ``[B|1, N|1, tq, tk]``. Write
    it with operators and ``jnp`` / NumPy functions that work on both (it runs on NumPy arrays
    for block metadata and on ``jax.numpy`` arrays inside kernels); data it reads (document
    ids, per-head windows) must be concrete arrays it closes over, or the block structure could
    not be known at trace time: for traced data use :class:`SegmentMask`, :class:`LengthMask`
    or :class:`ArrayMask`, whose arrays are pytree leaves.

    Args:
      fn: the rule, ``fn(b, h, q_idx, kv_idx) -> bool``.
      batch: the batch size the rule depends on (``b`` runs over ``range(batch)``), or ``None``
        when it does not (``b`` is then ``[0]``, and ``fn`` must not depend on it).
      heads: the same for heads (``h``).

    Example: causal sliding window of 128 keys plus 4 sinks,
    ``FunctionMask(lambda b, h, q, k: (k <= q) & ((q - k < 128) | (k < 4)))``.
    Two masks are equal when they hold the same function object (so cache and compile keys are
    shared by reusing one ``fn``).
    """

    fn: Callable[..., Any] | None = None
    batch: int | None = None
    heads: int | None = None

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"FunctionMask fn must be callable, got {type(self.fn).__name__}")
        for name in ("batch", "heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"FunctionMask {name} must be a positive int or None, "
                                 f"got {value!r}")

    @property
    def batch_size(self) -> int | None:
        return self.batch

    @property
    def num_heads(self) -> int | None:
        return self.heads

    def _evaluate(self, q, k, xp):
        b = xp.arange(self.batch or 1, dtype=np.int32).reshape(-1, 1, 1, 1)
        h = xp.arange(self.heads or 1, dtype=np.int32).reshape(1, -1, 1, 1)
        qq, kk = q[None, None], k[None, None]  # [1, 1, tq, 1], [1, 1, 1, tk]
        try:
            out = self.fn(b, h, qq, kk)
        except jax.errors.TracerArrayConversionError as err:
            raise ValueError(
                "FunctionMask fn reads a traced array, so its block structure is not known at "
                "trace time; close over concrete arrays, or use SegmentMask / LengthMask / "
                "ArrayMask for traced data"
            ) from err
        if xp is np:
            try:
                out = np.asarray(out)
            except jax.errors.TracerArrayConversionError as err:
                raise ValueError(
                    "FunctionMask fn returned a traced value while its block metadata was being "
                    "computed on the host; close over concrete arrays only"
                ) from err
        dtype = getattr(out, "dtype", None)
        if dtype is None or dtype != np.bool_:
            raise TypeError(f"FunctionMask fn must return booleans, got dtype {dtype} "
                            f"(shape {getattr(out, 'shape', None)})")
        want = (b.shape[0], h.shape[1], q.shape[0], k.shape[1])
        try:
            return xp.broadcast_to(out, want)
        except ValueError as err:
            raise ValueError(f"FunctionMask fn returned shape {tuple(out.shape)}, which does not "
                             f"broadcast to [b, h, q, k] = {want}") from err
