"""Mesh-axis helpers shared by head and context parallelism."""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh

__all__ = ["axes_size", "pick_batch_axes", "pick_head_axis", "shard_map", "spec_axes"]


def shard_map(f, mesh, in_specs, out_specs):
    """``jax.shard_map`` without replication checks (``jax.experimental`` before jax 0.7)."""
    current = getattr(jax, "shard_map", None)
    if current is not None:
        return current(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy  # jax < 0.7

    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def axes_size(mesh: Mesh, axes) -> int:
    """Devices along ``axes`` (a name, a tuple of names or None) of ``mesh``."""
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def pick_batch_axes(mesh, batch_axes, batch: int, context_axis: str) -> tuple[str, ...]:
    """The mesh axes the batch is split over: ``"auto"`` takes ``data``/``fsdp`` where they
    divide ``batch``; explicit axes are checked (raises naming the axis and the sizes)."""
    if batch_axes == "auto":
        chosen: list[str] = []
        for a in ("data", "fsdp"):
            if a in mesh.shape and a != context_axis and mesh.shape[a] > 1:
                if batch % (axes_size(mesh, chosen) * mesh.shape[a]) == 0:
                    chosen.append(a)
        return tuple(chosen)
    axes = () if batch_axes is None else (
        (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes))
    for a in axes:
        if a not in mesh.shape:
            raise ValueError(f"batch axis {a!r} is not in the mesh {dict(mesh.shape)}")
    if batch % axes_size(mesh, axes):
        raise ValueError(f"batch {batch} is not divisible by mesh axes {axes} "
                         f"(size {axes_size(mesh, axes)})")
    return axes


def pick_head_axis(mesh, head_axis, num_heads: int, context_axis: str) -> str | None:
    """The mesh axis heads are split over (``"auto"``: ``tensor`` when it divides them)."""
    if head_axis == "auto":
        a = "tensor"
        ok = a in mesh.shape and a != context_axis and mesh.shape[a] > 1
        return a if ok and num_heads % mesh.shape[a] == 0 else None
    if head_axis is None:
        return None
    if head_axis not in mesh.shape:
        raise ValueError(f"head axis {head_axis!r} is not in the mesh {dict(mesh.shape)}")
    if num_heads % mesh.shape[head_axis]:
        raise ValueError(f"N={num_heads} heads are not divisible by mesh axis {head_axis!r} "
                         f"(size {mesh.shape[head_axis]})")
    return head_axis


def spec_axes(axes):
    """A ``PartitionSpec`` entry for a tuple of axes: None, one name, or the tuple."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)
