"""Structured attention masks.

A mask is *data*, not a dense array: it knows the rule that decides whether query position
``q`` may attend to key position ``k``, so it can

* materialise itself for references and tests (:meth:`Mask.to_array`),
* evaluate itself on a single tile of indices inside a kernel (:meth:`Mask.evaluate`),
* summarise a block grid for kernels (:meth:`Mask.block_info`): which ``(q_block, kv_block)``
  tiles are empty (skipped), full (run without evaluating the mask) or partial (element mask).

Masks are shape-agnostic where their rule allows it (``CausalMask()`` works for any ``T, S``),
compose with ``&``, ``|`` and ``~``, and are pytrees: fields holding arrays (segment ids,
explicit boolean arrays, per-example lengths) are leaves and may be traced; everything else is
static metadata.

Canonical shape. :meth:`Mask.evaluate` always returns a 4-D boolean array
``[b, n, tq, tk]`` with ``b`` in ``{1, B}`` and ``n`` in ``{1, N}``: a mask that does not depend
on the batch or the head has a leading ``1``. That is the form ``[B, N, T, S]`` broadcasts from.

Boolean convention: ``True`` means *may attend* (as in ``jax.nn.dot_product_attention``).

Layout: :mod:`~jaxattn.masks.base` (the :class:`Mask` base class, :func:`register_mask`, array
helpers), :mod:`~jaxattn.masks.composite` (:class:`CompositeMask` and ``&``/``|``/``~``),
:mod:`~jaxattn.masks.library` (the concrete masks, :func:`as_mask`),
:mod:`~jaxattn.masks.function` (:class:`FunctionMask`, a rule given as a Python function) and
:mod:`~jaxattn.masks.blocks` (:class:`BlockInfo`, ``EMPTY``/``PARTIAL``/``FULL``). This package
only re-exports.
"""

from jaxattn.masks.base import Mask, is_array, is_tracer, register_mask
from jaxattn.masks.blocks import EMPTY, FULL, PARTIAL, BlockInfo
from jaxattn.masks.composite import AndMask, CompositeMask, NotMask, OrMask
from jaxattn.masks.function import FunctionMask
from jaxattn.masks.library import (
    ArrayMask,
    CausalMask,
    ChunkedCausalMask,
    FullMask,
    LengthMask,
    LocalMask,
    ModalityMutualMask,
    MultiHeadMask,
    PrefixLMMask,
    SegmentMask,
    SinkMask,
    as_mask,
    segment_ids_from_cu_seqlens,
    segment_ids_from_lengths,
)

__all__ = [
    "Mask",
    "FullMask",
    "CausalMask",
    "LocalMask",
    "ChunkedCausalMask",
    "PrefixLMMask",
    "SegmentMask",
    "LengthMask",
    "SinkMask",
    "ModalityMutualMask",
    "MultiHeadMask",
    "ArrayMask",
    "FunctionMask",
    "AndMask",
    "OrMask",
    "NotMask",
    "BlockInfo",
    "as_mask",
    "segment_ids_from_cu_seqlens",
    "segment_ids_from_lengths",
    "EMPTY",
    "PARTIAL",
    "FULL",
    # for masks defined outside this package (e.g. jaxattn.parallel.layout.AtPositions)
    "CompositeMask",
    "register_mask",
    "is_array",
    "is_tracer",
]
