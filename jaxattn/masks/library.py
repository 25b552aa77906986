"""The mask library: the concrete structured masks and :func:`as_mask`.

Position rules (:class:`FullMask`, :class:`CausalMask`, :class:`LocalMask`,
:class:`ChunkedCausalMask`, :class:`PrefixLMMask`), data-dependent rules whose arrays are pytree
leaves (:class:`SegmentMask`, :class:`LengthMask`, :class:`ModalityMutualMask`,
:class:`ArrayMask`) and the per-head :class:`MultiHeadMask` (a composite of head-independent
masks).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from jaxattn.masks.base import Mask, is_array, is_tracer, register_mask
from jaxattn.masks.composite import CompositeMask

__all__ = [
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
    "as_mask",
    "segment_ids_from_cu_seqlens",
    "segment_ids_from_lengths",
]


def _ones(q, k, xp):
    """All-true ``[1, 1, tq, tk]`` for ``q [tq, 1]``, ``k [1, tk]``."""
    return xp.ones((1, 1, q.shape[0], k.shape[1]), dtype=bool)


def _bcast4(x, xp):
    """[tq, tk] -> [1, 1, tq, tk]."""
    return x[None, None]


@register_mask
class FullMask(Mask):
    """Every query sees every key."""

    def _evaluate(self, q, k, xp):
        return _ones(q, k, xp)


@register_mask
class CausalMask(Mask):
    """``k <= q + offset``.

    ``offset=0`` is the top-left aligned causal mask of ``jax.nn.dot_product_attention``
    (``is_causal=True``). For decoding T new queries against S cached keys use
    ``offset = S - T`` (bottom-right alignment). ``offset`` may be a traced scalar, or an int
    ``[B]`` array: one offset per batch row (a ragged decoding batch, each sequence at its own
    cache index).
    """

    offset: Any = 0
    _array_fields: ClassVar = ("offset",)

    @property
    def batch_size(self):
        o = self.offset
        return int(o.shape[0]) if is_array(o) and o.ndim == 1 else None

    def _evaluate(self, q, k, xp):
        o = self.offset
        if is_array(o) and o.ndim == 1:  # per batch row: [B, 1, tq, tk]
            return (k <= q + o[:, None, None])[:, None]
        return _bcast4(k <= q + o, xp)


@register_mask
class LocalMask(Mask):
    """Sliding window: ``q + offset - left <= k <= q + offset + right``.

    ``window=(left, right)``; ``None`` on a side means unbounded; an int ``w`` means ``(w, w)``.
    ``LocalMask((w, 0))`` is the causal sliding window of Mistral/Gemma with ``w`` keys of
    history plus the diagonal. Same semantics as ``local_window_size`` of
    ``jax.nn.dot_product_attention``.
    """

    window: tuple[int | None, int | None] = (None, None)
    offset: int = 0

    def __post_init__(self):
        if isinstance(self.window, int | np.integer) and not isinstance(self.window, bool):
            object.__setattr__(self, "window", (int(self.window), int(self.window)))
        if not isinstance(self.window, tuple) or len(self.window) != 2:
            raise ValueError(f"LocalMask window must be a (left, right) tuple, got {self.window!r}")
        for side, w in zip(("left", "right"), self.window, strict=True):
            if w is not None and (not isinstance(w, int | np.integer) or w < 0):
                raise ValueError(
                    f"LocalMask window {side} must be a non-negative int or None, got {w!r}"
                )

    def _evaluate(self, q, k, xp):
        left, right = self.window
        ok = xp.ones((q.shape[0], k.shape[1]), dtype=bool)
        if left is not None:
            ok = ok & (k >= q + self.offset - left)
        if right is not None:
            ok = ok & (k <= q + self.offset + right)
        return _bcast4(ok, xp)


@register_mask
class ChunkedCausalMask(Mask):
    """Causal attention inside fixed chunks: ``k <= q`` and ``k // c == q // c`` (Llama 4)."""

    chunk_size: int = 1

    def __post_init__(self):
        if not isinstance(self.chunk_size, int | np.integer) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")

    def _evaluate(self, q, k, xp):
        c = self.chunk_size
        return _bcast4((k <= q) & (k // c == q // c), xp)


@register_mask
class PrefixLMMask(Mask):
    """Prefix-LM: bidirectional over the first ``prefix_len`` keys, causal after.

    ``k <= q or k < prefix_len``. ``prefix_len`` is an int or an int array ``[B]``.
    """

    prefix_len: Any = 0
    _array_fields: ClassVar = ("prefix_len",)

    @property
    def batch_size(self):
        p = self.prefix_len
        return int(p.shape[0]) if is_array(p) and p.ndim == 1 else None

    def _evaluate(self, q, k, xp):
        p = self.prefix_len
        if is_array(p) and p.ndim == 1:
            return ((k <= q) | (k < p[:, None, None]))[:, None]  # [B, 1, tq, tk]
        return _bcast4((k <= q) | (k < p), xp)


def _gather_ids(ids, idx, xp):
    """ids [B, L], idx [..] -> ids[:, clip(idx)] (positions past the end read the last id)."""
    n = ids.shape[1]
    return xp.take(ids, xp.clip(idx, 0, n - 1), axis=1)


@register_mask
class SegmentMask(Mask):
    """Document masking for packed sequences: ``q_segment_ids[b, q] == kv_segment_ids[b, k]``.

    ``q_segment_ids``: int ``[B, T]``; ``kv_segment_ids``: int ``[B, S]`` (defaults to the
    query ids for self-attention). Combine with ``CausalMask()`` for packed causal LM training.
    """

    q_segment_ids: Any = None
    kv_segment_ids: Any = None
    _array_fields: ClassVar = ("q_segment_ids", "kv_segment_ids")

    def __post_init__(self):
        if self.q_segment_ids is None:
            raise ValueError("SegmentMask needs q_segment_ids [B, T]")
        if self.kv_segment_ids is None:
            object.__setattr__(self, "kv_segment_ids", self.q_segment_ids)
        for name in ("q_segment_ids", "kv_segment_ids"):
            a = getattr(self, name)
            if not is_array(a) or a.ndim != 2:
                raise ValueError(f"SegmentMask.{name} must be an int array [B, L], got {a!r}")
        if self.q_segment_ids.shape[0] != self.kv_segment_ids.shape[0]:
            raise ValueError(
                "SegmentMask: batch sizes differ, q_segment_ids "
                f"{self.q_segment_ids.shape} vs kv_segment_ids {self.kv_segment_ids.shape}"
            )

    @property
    def batch_size(self):
        return int(self.q_segment_ids.shape[0])

    def _check_lengths(self, q_len, kv_len):
        if self.q_segment_ids.shape[1] != q_len or self.kv_segment_ids.shape[1] != kv_len:
            raise ValueError(
                f"SegmentMask ids have shapes q {self.q_segment_ids.shape}, kv "
                f"{self.kv_segment_ids.shape}, which do not match T={q_len}, S={kv_len}"
            )

    def _evaluate(self, q, k, xp):
        qs = _gather_ids(self.q_segment_ids, q[:, 0], xp)  # [B, tq]
        ks = _gather_ids(self.kv_segment_ids, k[0], xp)  # [B, tk]
        return (qs[:, :, None] == ks[:, None, :])[:, None]


@register_mask
class LengthMask(Mask):
    """Padding mask: key ``k`` is visible iff ``k < kv_lengths[b]``; optionally query rows
    ``q >= q_lengths[b]`` see nothing (their outputs are zero). Lengths are ``[B]`` arrays or
    scalars (the same length for every batch row)."""

    kv_lengths: Any = None
    q_lengths: Any = None
    _array_fields: ClassVar = ("kv_lengths", "q_lengths")

    @property
    def batch_size(self):
        for a in (self.kv_lengths, self.q_lengths):
            if a is not None and np.ndim(a) > 0:
                return int(np.shape(a)[0])
        return None

    def _evaluate(self, q, k, xp):
        per_row = lambda a: xp.reshape(xp.asarray(a), (-1, 1, 1, 1))  # [B or 1, 1, 1, 1]
        out = xp.ones((1, 1, q.shape[0], k.shape[1]), dtype=bool)
        if self.kv_lengths is not None:
            out = out & (k[None, None] < per_row(self.kv_lengths))
        if self.q_lengths is not None:
            out = out & (q[None, None] < per_row(self.q_lengths))
        return out


@register_mask
class SinkMask(Mask):
    """Attention sinks (StreamingLLM, Xiao et al., 2024): the first ``num_sinks`` keys are
    visible to every query, ``k < num_sinks``. Compose it with a window and causality:
    ``(LocalMask((w, 0)) | SinkMask(4)) & CausalMask()``."""

    num_sinks: int = 4

    def __post_init__(self):
        if isinstance(self.num_sinks, bool) or not isinstance(self.num_sinks, int) \
                or self.num_sinks < 0:
            raise ValueError(f"num_sinks must be a non-negative int, got {self.num_sinks!r}")

    def _evaluate(self, q, k, xp):
        return _bcast4(xp.broadcast_to(k < self.num_sinks, (q.shape[0], k.shape[1])), xp)


@register_mask
class ModalityMutualMask(Mask):
    """Modality-mutual attention (AKI, "Seeing is Understanding", Wang et al. 2025).

    Allowed iff ``k <= q`` (causal) or (``modality[q] != modality[k]`` and ``k < answer_start``):
    tokens of one modality may look *forward* at another modality's tokens, but never at the
    answer span, so labels cannot leak. With ``forward_modality=m`` only rows of modality ``m``
    (the image tokens, in the released AKI code) look forward.

    Self-attention only (``T == S``). ``modality_ids``: int ``[T]`` or ``[B, T]``;
    ``answer_start``: int or int ``[B]`` (``>= T`` means no answer span).
    """

    modality_ids: Any = None
    answer_start: Any = None
    forward_modality: int | None = None
    _array_fields: ClassVar = ("modality_ids", "answer_start")

    def __post_init__(self):
        m = self.modality_ids
        if not is_array(m) or m.ndim not in (1, 2):
            raise ValueError(f"modality_ids must be an int array [T] or [B, T], got {m!r}")
        if self.answer_start is None:
            object.__setattr__(self, "answer_start", int(m.shape[-1]))

    @property
    def batch_size(self):
        if self.modality_ids.ndim == 2:
            return int(self.modality_ids.shape[0])
        a = self.answer_start
        return int(a.shape[0]) if is_array(a) and a.ndim == 1 else None

    def _check_lengths(self, q_len, kv_len):
        n = self.modality_ids.shape[-1]
        if q_len != n or kv_len != n:
            raise ValueError(
                f"ModalityMutualMask is for self-attention over {n} tokens, got T={q_len}, "
                f"S={kv_len}"
            )

    def _evaluate(self, q, k, xp):
        ids = self.modality_ids
        ids = ids if ids.ndim == 2 else ids[None]
        mq = _gather_ids(ids, q[:, 0], xp)[:, :, None]  # [b, tq, 1]
        mk = _gather_ids(ids, k[0], xp)[:, None, :]  # [b, 1, tk]
        ans = xp.asarray(self.answer_start)
        ans = ans[:, None, None] if ans.ndim == 1 else ans
        forward = (mq != mk) & (k[None] < ans)
        if self.forward_modality is not None:
            forward = forward & (mq == self.forward_modality)
        return ((k <= q)[None] | forward)[:, None]


@register_mask
class MultiHeadMask(CompositeMask):
    """A different mask per head (MoA-style heterogeneous attention spans): head ``h`` follows
    ``masks[h]``, each a head-independent mask (a composite whose children are ``masks``)."""

    masks: tuple = ()
    _mask_fields: ClassVar = ("masks",)

    def __post_init__(self):
        object.__setattr__(self, "masks", tuple(as_mask(m) for m in self.masks))
        if not self.masks:
            raise ValueError("MultiHeadMask needs at least one mask")
        for m in self.masks:
            if m.num_heads is not None:
                raise ValueError("MultiHeadMask entries must themselves be head-independent")

    @property
    def num_heads(self):
        return len(self.masks)

    @property
    def batch_size(self):
        sizes = {m.batch_size for m in self.masks} - {None}
        return sizes.pop() if sizes else None

    def _combine(self, parts, xp):
        b = max(p.shape[0] for p in parts)
        parts = [xp.broadcast_to(p, (b, 1) + p.shape[2:]) for p in parts]
        return xp.concatenate(parts, axis=1)


@register_mask
class ArrayMask(Mask):
    """An explicit boolean array broadcastable to ``[B, N, T, S]`` (rank 2, 3 or 4).

    Unlike the structured masks it fixes ``T`` and ``S``. It exists for references, tests and
    masks with no structure; kernels still get block metadata for it.
    """

    array: Any = None
    _array_fields: ClassVar = ("array",)

    def __post_init__(self):
        a = self.array
        if not is_array(a):
            a = np.asarray(a)
            object.__setattr__(self, "array", a)
        if a.dtype != np.bool_:
            raise TypeError(f"mask array must be boolean, got dtype {a.dtype}")
        if a.ndim not in (2, 3, 4):
            raise ValueError(f"mask array must have rank 2, 3 or 4, got shape {a.shape}")

    @property
    def _a4(self):
        a = self.array
        return a.reshape((1,) * (4 - a.ndim) + a.shape)

    @property
    def num_heads(self):
        n = self._a4.shape[1]
        return n if n > 1 else None

    @property
    def batch_size(self):
        b = self._a4.shape[0]
        return b if b > 1 else None

    def _check_lengths(self, q_len, kv_len):
        t, s = self.array.shape[-2:]
        if (t not in (1, q_len)) or (s not in (1, kv_len)):
            raise ValueError(
                f"mask array of shape {self.array.shape} does not broadcast to "
                f"[B, N, T={q_len}, S={kv_len}]"
            )

    def _evaluate(self, q, k, xp):
        a = xp.asarray(self._a4)
        t, s = a.shape[-2:]
        qi = xp.clip(q, 0, t - 1) if t > 1 else xp.zeros_like(q)
        ki = xp.clip(k, 0, s - 1) if s > 1 else xp.zeros_like(k)
        return a[:, :, qi, ki]


def as_mask(mask) -> Mask | None:
    """``None`` -> ``None``; a :class:`Mask` -> itself; a boolean array -> :class:`ArrayMask`."""
    if mask is None or isinstance(mask, Mask):
        return mask
    arr = mask if is_array(mask) else np.asarray(mask)
    return ArrayMask(arr)


def segment_ids_from_lengths(lengths, total_length: int):
    """Packed-document segment ids from per-document lengths.

    Args:
      lengths: int ``[..., n]``: the lengths of the ``n`` documents packed, in order, into each
        row (zeros allowed).
      total_length: the row length ``L`` (``>= sum(lengths)``; checked when concrete).

    Returns:
      int32 ``[..., L]``: document ``i``'s tokens get id ``i``; tokens after the last document
      (padding) get ``-1``, so they never attend to a document (only to other padding).
    """
    xp = np if not is_tracer(lengths) else jnp
    lengths = xp.asarray(lengths)
    if not xp.issubdtype(lengths.dtype, xp.integer):
        raise TypeError(f"lengths must be integer, got dtype {lengths.dtype}")
    if lengths.ndim < 1:
        raise ValueError(f"lengths must be [..., n_documents], got shape {lengths.shape}")
    ends = xp.cumsum(lengths, axis=-1)  # [..., n]
    if xp is np and (np.any(lengths < 0) or np.any(ends[..., -1:] > total_length)):
        raise ValueError(f"lengths {lengths.tolist()} must be >= 0 and sum to at most "
                         f"total_length={total_length}")
    pos = xp.arange(total_length)
    doc = xp.sum(pos[..., None] >= ends[..., None, :], axis=-1)  # [..., L]: documents ended
    pad = pos >= ends[..., -1:]
    return xp.where(pad, -1, doc).astype(np.int32)


def segment_ids_from_cu_seqlens(cu_seqlens, total_length: int | None = None):
    """Segment ids of one packed row from cumulative lengths (FlashAttention's varlen
    ``cu_seqlens``, ``[n + 1]`` starting at 0): ``[total_length]`` int32 (default
    ``cu_seqlens[-1]``; positions past it get ``-1``)."""
    cu = np.asarray(cu_seqlens) if not is_tracer(cu_seqlens) else cu_seqlens
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be [n_documents + 1], got shape {cu.shape}")
    if total_length is None:
        if is_tracer(cu):
            raise ValueError("total_length is required when cu_seqlens is traced")
        total_length = int(cu[-1])
    return segment_ids_from_lengths(cu[1:] - cu[:-1], total_length)
