"""Composite masks: :class:`CompositeMask`, the base class of masks built from other masks, and
the mask algebra ``a & b`` (:class:`AndMask`), ``a | b`` (:class:`OrMask`), ``~a``
(:class:`NotMask`)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxattn.masks.base import Mask, holds_masks, register_mask

__all__ = ["CompositeMask", "AndMask", "OrMask", "NotMask"]


def _or_chain(values):
    """``v0 or v1 or ...``: the first truthy value, else the last one (``None`` if empty)."""
    out = None
    for v in values:
        out = out or v
    return out


def _static_value(value):
    """The static form of a child field (a mask or a tuple of masks); ``None`` if traced."""
    if isinstance(value, Mask):
        return value.static()
    statics = tuple(m.static() for m in value)
    return None if any(s is None for s in statics) else statics


class CompositeMask(Mask):
    """A mask whose rule combines child masks held in its fields (each a mask or a tuple of
    masks); the child fields are pytree children (see :func:`register_mask`).

    It owns what composites share: the children (:meth:`children`), their arrays and static
    form, length checks by every child, head count and batch size taken from the children
    (the first one that is set), and :meth:`_evaluate` as :meth:`_combine` of the children's
    tiles. Subclasses name their child fields in ``_mask_fields`` and implement
    :meth:`_combine`.
    """

    # Fields that hold the child masks (each a mask or a tuple of masks), in field order.
    _mask_fields: ClassVar[tuple[str, ...]] = ()

    def _combine(self, parts: list, xp):
        """Children's tiles, each bool ``[b, n, tq, tk]``, in :meth:`children` order -> this
        mask's bool ``[b, n, tq, tk]``."""
        raise NotImplementedError

    def _child_fields(self) -> tuple[str, ...]:
        """The ``_mask_fields`` that hold masks (an unset child, ``None``, holds none)."""
        return tuple(n for n in self._mask_fields if holds_masks(getattr(self, n)))

    def children(self) -> tuple[Mask, ...]:
        """The child masks, in field order (a tuple field contributes its masks in order)."""
        out: list[Mask] = []
        for name in self._mask_fields:
            value = getattr(self, name)
            if isinstance(value, Mask):
                out.append(value)
            elif isinstance(value, tuple):
                out.extend(m for m in value if isinstance(m, Mask))
        return tuple(out)

    @property
    def num_heads(self):
        return _or_chain(m.num_heads for m in self.children())

    @property
    def batch_size(self):
        return _or_chain(m.batch_size for m in self.children())

    def _check_lengths(self, q_len, kv_len):
        for m in self.children():
            m._check_lengths(q_len, kv_len)

    def _evaluate(self, q, k, xp):
        return self._combine([m._evaluate(q, k, xp) for m in self.children()], xp)

    def _arrays(self) -> list:
        return super()._arrays() + [a for m in self.children() for a in m._arrays()]

    def static(self) -> Mask | None:
        """This mask with every child (and own array) static, or ``None`` if any is traced."""
        own = super().static()
        if own is None:
            return None
        changes = {}
        for name in self._child_fields():
            static = _static_value(getattr(self, name))
            if static is None:
                return None
            changes[name] = static
        return dataclasses.replace(own, **changes)


@register_mask
class AndMask(CompositeMask):
    """``left & right``."""

    left: Mask = None  # type: ignore[assignment]
    right: Mask = None  # type: ignore[assignment]
    _mask_fields: ClassVar = ("left", "right")

    def _combine(self, parts, xp):
        left, right = parts
        return left & right


@register_mask
class OrMask(CompositeMask):
    """``left | right``."""

    left: Mask = None  # type: ignore[assignment]
    right: Mask = None  # type: ignore[assignment]
    _mask_fields: ClassVar = ("left", "right")

    def _combine(self, parts, xp):
        left, right = parts
        return left | right


@register_mask
class NotMask(CompositeMask):
    """``~inner``."""

    inner: Mask = None  # type: ignore[assignment]
    _mask_fields: ClassVar = ("inner",)

    def _combine(self, parts, xp):
        (inner,) = parts
        return ~inner
