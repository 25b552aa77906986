"""The :class:`Mask` base class, its pytree registration and the array helpers masks share.

A mask subclass is a frozen dataclass registered with :func:`register_mask`: fields named in
``_array_fields`` that hold arrays, and fields that hold masks (or tuples of masks), are pytree
children; every other field is static metadata. Hashing and equality go by value
(:meth:`Mask._key`), so a concrete mask can be a static ``jit`` argument or an ``lru_cache`` key.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.masks.blocks import BlockInfo, cached_block_info

__all__ = ["Mask", "register_mask", "is_array", "is_tracer", "holds_masks"]


def is_array(x: Any) -> bool:
    """True for a NumPy or JAX array (a tracer included)."""
    return isinstance(x, np.ndarray | jax.Array)


def is_tracer(x: Any) -> bool:
    """True for a JAX tracer (a value only known at run time)."""
    return isinstance(x, jax.core.Tracer)


def holds_masks(value: Any) -> bool:
    """True for a :class:`Mask` or a tuple holding one: such a field is a pytree child."""
    return isinstance(value, Mask) or (
        isinstance(value, tuple) and any(isinstance(x, Mask) for x in value))


def _to_numpy_or_none(x: Any):
    """Concrete arrays become NumPy; tracers give ``None`` (the mask is dynamic)."""
    if is_tracer(x):
        return None
    return np.asarray(x)


def _xp_of(*arrays):
    """``jax.numpy`` if any argument is a JAX array, else NumPy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _array_key(a) -> tuple:
    """Hashable value key of a concrete array: shape, dtype and a digest of its bytes."""
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

    def check_lengths(self, q_len: int, kv_len: int) -> None:
        """Raise ``ValueError`` (naming the lengths) if this mask cannot apply to a
        ``q_len x kv_len`` call (e.g. segment ids or an array of another length)."""
        self._check_lengths(q_len, kv_len)

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
        return cached_block_info(static, int(q_len), int(kv_len), int(block_q), int(block_kv))

    def static(self) -> Mask | None:
        """This mask with every array as NumPy, or ``None`` if some array is a tracer."""
        changes = {}
        for name in self._array_fields:
            value = getattr(self, name)
            if is_array(value):
                arr = _to_numpy_or_none(value)
                if arr is None:
                    return None
                changes[name] = arr
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def is_static(self) -> bool:
        """True when the whole rule is known at trace time (no traced arrays)."""
        return all(not is_tracer(a) for a in self._arrays())

    def _arrays(self) -> list:
        """The arrays this mask holds (the values of its array-valued ``_array_fields``)."""
        return [getattr(self, n) for n in self._array_fields if is_array(getattr(self, n))]

    # ---- algebra (the composites live in composite.py, which imports this module) ----------
    def __and__(self, other: Mask) -> Mask:
        from jaxattn.masks.composite import AndMask
        from jaxattn.masks.library import as_mask

        return AndMask(self, as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        from jaxattn.masks.composite import OrMask
        from jaxattn.masks.library import as_mask

        return OrMask(self, as_mask(other))

    def __invert__(self) -> Mask:
        from jaxattn.masks.composite import NotMask

        return NotMask(self)

    # ---- hashing (for caching block metadata) ----------------------------------------------
    def _field_key(self, value) -> Any:
        """Hashable stand-in for one field value: arrays by content, masks by their key."""
        if is_array(value):
            if is_tracer(value):
                raise TypeError(f"{type(self).__name__} holding a tracer is not hashable")
            return _array_key(value)
        if isinstance(value, Mask):
            return value._key()
        if isinstance(value, tuple):
            return tuple(x._key() if isinstance(x, Mask) else x for x in value)
        return value

    def _key(self) -> tuple:
        """Value key: the class name and every field's :meth:`_field_key`."""
        fields = dataclasses.fields(self)
        return (type(self).__name__, *(self._field_key(getattr(self, f.name)) for f in fields))

    def __hash__(self) -> int:
        return hash(self._key())

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._key() == other._key()  # type: ignore[union-attr]


def register_mask(cls):
    """Make ``cls`` a frozen dataclass and a pytree whose children are its array-valued
    ``_array_fields`` and its mask-valued fields (see :func:`holds_masks`); the rest is static.

    Use as a class decorator on every concrete :class:`Mask` subclass.
    """
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    names = [f.name for f in dataclasses.fields(cls)]

    def is_child(m, n):
        v = getattr(m, n)
        return (n in cls._array_fields and is_array(v)) or holds_masks(v)

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
