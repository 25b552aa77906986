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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Mask",
    "FullMask",
    "CausalMask",
    "LocalMask",
    "ChunkedCausalMask",
    "PrefixLMMask",
    "SegmentMask",
    "LengthMask",
    "ModalityMutualMask",
    "MultiHeadMask",
    "ArrayMask",
    "AndMask",
    "OrMask",
    "NotMask",
    "BlockInfo",
    "as_mask",
    "EMPTY",
    "PARTIAL",
    "FULL",
]

EMPTY, PARTIAL, FULL = 0, 1, 2


def _is_array(x: Any) -> bool:
    return isinstance(x, np.ndarray | jax.Array)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _to_numpy_or_none(x: Any):
    """Concrete arrays become NumPy; tracers give ``None`` (the mask is dynamic)."""
    if _is_tracer(x):
        return None
    return np.asarray(x)


def _xp_of(*arrays):
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _array_key(a) -> tuple:
    a = np.asarray(a)
    return (a.shape, str(a.dtype), hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest())


class Mask:
    """Base class: a rule ``allowed(b, n, q, k)`` over query and key positions.

    Subclasses are frozen dataclasses implementing :meth:`_evaluate`. The public entry points
    are :meth:`evaluate`, :meth:`to_array` and :meth:`block_info`.
    """

    # Fields that may hold arrays (pytree leaves). Everything else is static.
    _array_fields: ClassVar[tuple[str, ...]] = ()

    # ---- subclasses implement -------------------------------------------------------------
    def _evaluate(self, q, k, xp):
        """``q``: int32 ``[tq, 1]``, ``k``: int32 ``[1, tk]`` -> bool ``[b, n, tq, tk]``."""
        raise NotImplementedError

    @property
    def batch_size(self) -> int | None:
        """Leading batch size the mask depends on, or ``None`` if batch-independent."""
        return None

    @property
    def num_heads(self) -> int | None:
        """Number of heads the mask distinguishes, or ``None`` if head-independent."""
        return None

    def _check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise ``ValueError`` if the mask cannot describe a ``[q_len, kv_len]`` problem."""

    # ---- public ---------------------------------------------------------------------------
    def evaluate(self, q_idx, kv_idx):
        """Evaluate the rule on a tile.

        Args:
          q_idx: int ``[tq]`` query positions.
          kv_idx: int ``[tk]`` key positions.

        Returns:
          bool ``[b, n, tq, tk]`` with ``b`` in ``{1, B}``, ``n`` in ``{1, N}``. Uses NumPy when
          the indices and the mask's data are NumPy, ``jax.numpy`` otherwise (inside kernels).
        """
        xp = _xp_of(q_idx, kv_idx, *self._arrays())
        mask = jax.tree_util.tree_map(jnp.asarray, self) if xp is jnp else self
        q = xp.asarray(q_idx).astype(np.int32)[:, None]
        k = xp.asarray(kv_idx).astype(np.int32)[None, :]
        out = mask._evaluate(q, k, xp)
        if out.ndim != 4:
            raise AssertionError(f"{type(self).__name__}._evaluate returned rank {out.ndim}")
        return out

    def to_array(self, q_len: int, kv_len: int):
        """Materialise the mask for a ``[q_len, kv_len]`` problem (references and tests only).

        Returns:
          bool ``[T, S]`` for masks that depend on neither batch nor head, ``[N, T, S]`` for
          per-head masks, ``[B, 1, T, S]`` or ``[B, N, T, S]`` for batch-dependent masks; each
          broadcasts to ``[B, N, T, S]``.
        """
        self._check_lengths(q_len, kv_len)
        xp = _xp_of(*self._arrays())
        full = self.evaluate(xp.arange(q_len), xp.arange(kv_len))
        if full.shape[0] == 1:
            full = full[0]
            if full.shape[0] == 1:
                full = full[0]
        return full

    def block_info(self, q_len: int, kv_len: int, block_q: int, block_kv: int) -> BlockInfo:
        """Summarise the mask on a ``ceil(T/bq) x ceil(S/bk)`` block grid (host-side NumPy).

        Key positions ``>= kv_len`` in the last block are masked; query rows ``>= q_len`` are
        ignored when classifying blocks (their outputs are discarded by every kernel).

        Raises:
          ValueError: if the mask holds traced data (its structure is only known at run time;
            kernels take such masks, e.g. segment ids, as arrays instead).
        """
        static = self.static()
        if static is None:
            raise ValueError(
                f"{type(self).__name__} holds traced arrays, so its block structure is not known "
                "at trace time; pass concrete arrays, or let the kernel evaluate it dynamically."
            )
        self._check_lengths(q_len, kv_len)
        return _block_info_cached(static, int(q_len), int(kv_len), int(block_q), int(block_kv))

    def static(self) -> Mask | None:
        """This mask with every array as NumPy, or ``None`` if some array is a tracer."""
        changes = {}
        for name in self._array_fields:
            value = getattr(self, name)
            if _is_array(value):
                arr = _to_numpy_or_none(value)
                if arr is None:
                    return None
                changes[name] = arr
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def is_static(self) -> bool:
        """True when the whole rule is known at trace time (no traced arrays)."""
        return all(not _is_tracer(a) for a in self._arrays())

    def _arrays(self) -> list:
        return [getattr(self, n) for n in self._array_fields if _is_array(getattr(self, n))]

    # ---- algebra --------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return AndMask(self, as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return OrMask(self, as_mask(other))

    def __invert__(self) -> Mask:
        return NotMask(self)

    # ---- hashing (for caching block metadata) ----------------------------------------------
    def _key(self) -> tuple:
        parts: list[Any] = [type(self).__name__]
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if _is_array(v):
                if _is_tracer(v):
                    raise TypeError(f"{type(self).__name__} holding a tracer is not hashable")
                parts.append(_array_key(v))
            elif isinstance(v, Mask):
                parts.append(v._key())
            elif isinstance(v, tuple):
                parts.append(tuple(x._key() if isinstance(x, Mask) else x for x in v))
            else:
                parts.append(v)
        return tuple(parts)

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._key() == other._key()  # type: ignore[union-attr]


def _register(cls):
    """Frozen dataclass + pytree whose array-valued fields are leaves."""
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    names = [f.name for f in dataclasses.fields(cls)]

    def is_child(m, n):
        v = getattr(m, n)
        if n in cls._array_fields and _is_array(v):
            return True
        return isinstance(v, Mask) or (isinstance(v, tuple) and any(isinstance(x, Mask) for x in v))

    def flatten(m):
        leaf_names = tuple(n for n in names if is_child(m, n))
        leaves = [getattr(m, n) for n in leaf_names]
        static = tuple((n, getattr(m, n)) for n in names if n not in leaf_names)
        return leaves, (leaf_names, static)

    def unflatten(aux, leaves):
        leaf_names, static = aux
        obj = object.__new__(cls)
        for n, v in static:
            object.__setattr__(obj, n, v)
        for n, v in zip(leaf_names, leaves, strict=True):
            object.__setattr__(obj, n, v)
        return obj

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    return cls


def _ones(q, k, xp):
    return xp.ones((1, 1, q.shape[0], k.shape[1]), dtype=bool)


def _bcast4(x, xp):
    """[tq, tk] -> [1, 1, tq, tk]."""
    return x[None, None]


@_register
class FullMask(Mask):
    """Every query sees every key."""

    def _evaluate(self, q, k, xp):
        return _ones(q, k, xp)


@_register
class CausalMask(Mask):
    """``k <= q + offset``.

    ``offset=0`` is the top-left aligned causal mask of ``jax.nn.dot_product_attention``
    (``is_causal=True``). For decoding T new queries against S cached keys use
    ``offset = S - T`` (bottom-right alignment). ``offset`` may be a traced scalar.
    """

    offset: Any = 0
    _array_fields: ClassVar = ("offset",)

    def _evaluate(self, q, k, xp):
        return _bcast4(k <= q + self.offset, xp)


@_register
class LocalMask(Mask):
    """Sliding window: ``q + offset - left <= k <= q + offset + right``.

    ``window=(left, right)``; ``None`` on a side means unbounded. ``LocalMask((w, 0))`` is the
    causal sliding window of Mistral/Gemma with ``w`` keys of history plus the diagonal. Same
    semantics as ``local_window_size`` of ``jax.nn.dot_product_attention``.
    """

    window: tuple[int | None, int | None] = (None, None)
    offset: int = 0

    def __post_init__(self):
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


@_register
class ChunkedCausalMask(Mask):
    """Causal attention inside fixed chunks: ``k <= q`` and ``k // c == q // c`` (Llama 4)."""

    chunk_size: int = 1

    def __post_init__(self):
        if not isinstance(self.chunk_size, int | np.integer) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")

    def _evaluate(self, q, k, xp):
        c = self.chunk_size
        return _bcast4((k <= q) & (k // c == q // c), xp)


@_register
class PrefixLMMask(Mask):
    """Prefix-LM: bidirectional over the first ``prefix_len`` keys, causal after.

    ``k <= q or k < prefix_len``. ``prefix_len`` is an int or an int array ``[B]``.
    """

    prefix_len: Any = 0
    _array_fields: ClassVar = ("prefix_len",)

    @property
    def batch_size(self):
        p = self.prefix_len
        return int(p.shape[0]) if _is_array(p) and p.ndim == 1 else None

    def _evaluate(self, q, k, xp):
        p = self.prefix_len
        if _is_array(p) and p.ndim == 1:
            return ((k <= q) | (k < p[:, None, None]))[:, None]  # [B, 1, tq, tk]
        return _bcast4((k <= q) | (k < p), xp)


def _gather_ids(ids, idx, xp):
    """ids [B, L], idx [..] -> ids[:, clip(idx)] (positions past the end read the last id)."""
    n = ids.shape[1]
    return xp.take(ids, xp.clip(idx, 0, n - 1), axis=1)


@_register
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
            if not _is_array(a) or a.ndim != 2:
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


@_register
class LengthMask(Mask):
    """Padding mask: key ``k`` is visible iff ``k < kv_lengths[b]``; optionally query rows
    ``q >= q_lengths[b]`` see nothing (their outputs are zero)."""

    kv_lengths: Any = None
    q_lengths: Any = None
    _array_fields: ClassVar = ("kv_lengths", "q_lengths")

    @property
    def batch_size(self):
        for a in (self.kv_lengths, self.q_lengths):
            if a is not None:
                return int(np.shape(a)[0])
        return None

    def _evaluate(self, q, k, xp):
        out = xp.ones((1, 1, q.shape[0], k.shape[1]), dtype=bool)
        if self.kv_lengths is not None:
            out = out & (k[None, None] < xp.asarray(self.kv_lengths)[:, None, None, None])
        if self.q_lengths is not None:
            out = out & (q[None, None] < xp.asarray(self.q_lengths)[:, None, None, None])
        return out


@_register
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
        if not _is_array(m) or m.ndim not in (1, 2):
            raise ValueError(f"modality_ids must be an int array [T] or [B, T], got {m!r}")
        if self.answer_start is None:
            object.__setattr__(self, "answer_start", int(m.shape[-1]))

    @property
    def batch_size(self):
        if self.modality_ids.ndim == 2:
            return int(self.modality_ids.shape[0])
        a = self.answer_start
        return int(a.shape[0]) if _is_array(a) and a.ndim == 1 else None

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


@_register
class MultiHeadMask(Mask):
    """A different mask per head (MoA-style heterogeneous attention spans)."""

    masks: tuple = ()

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

    def _check_lengths(self, q_len, kv_len):
        for m in self.masks:
            m._check_lengths(q_len, kv_len)

    def _evaluate(self, q, k, xp):
        parts = [m._evaluate(q, k, xp) for m in self.masks]
        b = max(p.shape[0] for p in parts)
        parts = [xp.broadcast_to(p, (b, 1) + p.shape[2:]) for p in parts]
        return xp.concatenate(parts, axis=1)


@_register
class ArrayMask(Mask):
    """An explicit boolean array broadcastable to ``[B, N, T, S]`` (rank 2, 3 or 4).

    Unlike the structured masks it fixes ``T`` and ``S``. It exists for references, tests and
    masks with no structure; kernels still get block metadata for it.
    """

    array: Any = None
    _array_fields: ClassVar = ("array",)

    def __post_init__(self):
        a = self.array
        if not _is_array(a):
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


@_register
class AndMask(Mask):
    """``left & right``."""

    left: Mask = None  # type: ignore[assignment]
    right: Mask = None  # type: ignore[assignment]

    @property
    def num_heads(self):
        return self.left.num_heads or self.right.num_heads

    @property
    def batch_size(self):
        return self.left.batch_size or self.right.batch_size

    def _check_lengths(self, q_len, kv_len):
        self.left._check_lengths(q_len, kv_len)
        self.right._check_lengths(q_len, kv_len)

    def _evaluate(self, q, k, xp):
        return self.left._evaluate(q, k, xp) & self.right._evaluate(q, k, xp)


@_register
class OrMask(AndMask):
    """``left | right``."""

    def _evaluate(self, q, k, xp):
        return self.left._evaluate(q, k, xp) | self.right._evaluate(q, k, xp)


@_register
class NotMask(Mask):
    """``~inner``."""

    inner: Mask = None  # type: ignore[assignment]

    @property
    def num_heads(self):
        return self.inner.num_heads

    @property
    def batch_size(self):
        return self.inner.batch_size

    def _check_lengths(self, q_len, kv_len):
        self.inner._check_lengths(q_len, kv_len)

    def _evaluate(self, q, k, xp):
        return ~self.inner._evaluate(q, k, xp)


def _composite_arrays(self) -> list:
    out = []
    for f in dataclasses.fields(self):
        v = getattr(self, f.name)
        if isinstance(v, Mask):
            out.extend(v._arrays())
        elif isinstance(v, tuple):
            out.extend(a for m in v if isinstance(m, Mask) for a in m._arrays())
    return out


def _composite_static(self):
    changes = {}
    for f in dataclasses.fields(self):
        v = getattr(self, f.name)
        if isinstance(v, Mask):
            s = v.static()
            if s is None:
                return None
            changes[f.name] = s
        elif isinstance(v, tuple) and v and isinstance(v[0], Mask):
            ss = tuple(m.static() for m in v)
            if any(s is None for s in ss):
                return None
            changes[f.name] = ss
    return dataclasses.replace(self, **changes)


for _cls in (AndMask, OrMask, NotMask, MultiHeadMask):
    _cls._arrays = _composite_arrays
    _cls.static = _composite_static


def as_mask(mask) -> Mask | None:
    """``None`` -> ``None``; a :class:`Mask` -> itself; a boolean array -> :class:`ArrayMask`."""
    if mask is None or isinstance(mask, Mask):
        return mask
    arr = mask if _is_array(mask) else np.asarray(mask)
    return ArrayMask(arr)


# ----------------------------------------------------------------------------------------------
# Block metadata
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class BlockInfo:
    """Block-sparse summary of a mask on a ``[num_q_blocks, num_kv_blocks]`` grid.

    Attributes:
      q_len, kv_len: the unpadded lengths T and S.
      block_q, block_kv: tile sizes.
      kind: int8 ``[b, n, num_q_blocks, num_kv_blocks]`` with values ``EMPTY`` (0, skip),
        ``PARTIAL`` (1, apply the element mask) and ``FULL`` (2, no mask needed); ``b`` in
        ``{1, B}``, ``n`` in ``{1, N}``.
      partial_index: int32, same shape as ``kind``: index into ``partial_blocks`` for partial
        tiles, ``-1`` elsewhere.
      partial_blocks: bool ``[P, block_q, block_kv]``: the distinct element masks of the partial
        tiles (deduplicated, as Splash does). Padded key columns are ``False``.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    kind: np.ndarray
    partial_index: np.ndarray
    partial_blocks: np.ndarray

    @property
    def grid(self) -> tuple[int, int]:
        return self.kind.shape[-2], self.kind.shape[-1]

    @property
    def num_empty(self) -> int:
        return int((self.kind == EMPTY).sum())

    @property
    def num_partial(self) -> int:
        return int((self.kind == PARTIAL).sum())

    @property
    def num_full(self) -> int:
        return int((self.kind == FULL).sum())

    @property
    def num_visited(self) -> int:
        """Tiles a block-sparse kernel must compute (partial + full), over all ``b, n``."""
        return int((self.kind != EMPTY).sum())

    def union_kind(self) -> np.ndarray:
        """``[num_q_blocks, num_kv_blocks]`` kind valid for every batch row and head: EMPTY only
        if empty everywhere, FULL only if full everywhere, PARTIAL otherwise."""
        k = self.kind.reshape(-1, *self.grid)
        empty = (k == EMPTY).all(0)
        full = (k == FULL).all(0)
        return np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)


@functools.lru_cache(maxsize=256)
def _block_info_cached(mask: Mask, q_len: int, kv_len: int, bq: int, bk: int) -> BlockInfo:
    if bq < 1 or bk < 1:
        raise ValueError(f"block sizes must be positive, got block_q={bq}, block_kv={bk}")
    nq, nk = -(-q_len // bq), -(-kv_len // bk)
    kinds = None
    p_index = None
    blocks: list[np.ndarray] = []
    seen: dict[bytes, int] = {}
    kv_all = np.arange(nk * bk)
    kv_valid = kv_all < kv_len
    for i in range(nq):
        q_idx = np.arange(i * bq, (i + 1) * bq)
        q_valid = q_idx < q_len
        row = np.asarray(mask.evaluate(q_idx, kv_all))  # [b, n, bq, nk*bk]
        row = row & kv_valid
        if kinds is None:
            kinds = np.zeros(row.shape[:2] + (nq, nk), np.int8)
            p_index = np.full(row.shape[:2] + (nq, nk), -1, np.int32)
        tiles = row.reshape(row.shape[:2] + (bq, nk, bk)).transpose(0, 1, 3, 2, 4)
        valid_tiles = tiles[:, :, :, q_valid, :]  # ignore padded query rows
        anyv = valid_tiles.any(axis=(-1, -2))
        kv_tile_valid = kv_valid.reshape(nk, bk)
        allv = (valid_tiles | ~kv_tile_valid[None, None, :, None, :]).all(axis=(-1, -2))
        allv &= kv_tile_valid.all(-1)  # a tile with padded keys is never FULL
        kinds[:, :, i] = np.where(anyv, np.where(allv, FULL, PARTIAL), EMPTY)
        for b, n, j in zip(*np.nonzero(kinds[:, :, i] == PARTIAL), strict=True):
            tile = tiles[b, n, j] & q_valid[:, None]
            key = tile.tobytes()
            if key not in seen:
                seen[key] = len(blocks)
                blocks.append(tile)
            p_index[b, n, i, j] = seen[key]
    pb = np.stack(blocks) if blocks else np.zeros((0, bq, bk), bool)
    return BlockInfo(q_len, kv_len, bq, bk, kinds, p_index, pb)
