"""Mesh-axis helpers shared by head and context parallelism."""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "auto_part",
    "axes_size",
    "explicit_part",
    "has_explicit_axes",
    "pick_batch_axes",
    "pick_head_axis",
    "place_like",
    "reshard_to_specs",
    "shard_map",
    "spec_axes",
]


def shard_map(f, mesh, in_specs, out_specs):
    """``jax.shard_map`` without replication checks (``jax.experimental`` before jax 0.7).

    On a mesh with Explicit axes (``jax.make_mesh``'s default) ``shard_map`` requires each input's
    sharding to already match its ``in_specs`` entry; the returned function reshards the
    arguments to their specs first, so callers pass global arrays of any sharding on any mesh
    kind (Auto meshes reshard implicitly and are left alone)."""
    current = getattr(jax, "shard_map", None)
    if current is not None:
        mapped = current(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    else:
        from jax.experimental.shard_map import shard_map as legacy  # jax < 0.7

        mapped = legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
    if not has_explicit_axes(mesh):
        return mapped

    def resharded(*args):
        return mapped(*reshard_to_specs(args, in_specs, mesh))

    return resharded


def has_explicit_axes(mesh) -> bool:
    """Whether any axis of ``mesh`` is ``AxisType.Explicit`` (False on JAX without axis types)."""
    return any(_axis_is_explicit(mesh).values())


def reshard_to_specs(args, specs, mesh):
    """``args`` with every array moved to ``NamedSharding(mesh, spec)`` of its entry in
    ``specs`` (a pytree prefix of ``args`` whose leaves are ``PartitionSpec``s). Only the
    Explicit axes of a spec are placed (``jax.sharding.reshard`` refuses Auto ones; shard_map
    moves data along those itself)."""
    is_spec = lambda x: isinstance(x, PartitionSpec)

    def place(spec, sub):
        return jax.tree_util.tree_map(lambda x: _reshard_explicit(x, spec, mesh), sub)

    return tuple(jax.tree_util.tree_map(place, tuple(specs), tuple(args), is_leaf=is_spec))


def explicit_part(spec: PartitionSpec, mesh) -> PartitionSpec:
    """``spec`` keeping only the mesh axes of type Explicit (others become unsharded)."""
    return _part_of_kind(spec, mesh, explicit=True)


def auto_part(spec: PartitionSpec, mesh) -> PartitionSpec:
    """``spec`` keeping only the mesh axes that are not Explicit."""
    return _part_of_kind(spec, mesh, explicit=False)


def _part_of_kind(spec: PartitionSpec, mesh, *, explicit: bool) -> PartitionSpec:
    kinds = _axis_is_explicit(mesh)

    def keep(entry):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        return spec_axes(tuple(a for a in names if kinds[a] == explicit))

    return PartitionSpec(*(keep(e) for e in spec))


def _axis_is_explicit(mesh) -> dict[str, bool]:
    """Axis name -> whether it is Explicit where we are: the types of the current abstract mesh
    when one with the same axes is set (inside ``jax.sharding.auto_axes`` Explicit axes are
    Auto), else ``mesh``'s own."""
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    types = getattr(mesh, "axis_types", None) or (None,) * len(mesh.axis_names)
    current = getattr(jax.sharding, "get_abstract_mesh", lambda: None)()
    if current is not None and tuple(getattr(current, "axis_names", ())) == tuple(mesh.axis_names):
        types = current.axis_types
    return {a: t is not None and t == explicit for a, t in zip(mesh.axis_names, types, strict=True)}


def _reshard_explicit(x, spec: PartitionSpec, mesh):
    """``jax.sharding.reshard`` of ``x`` to the Explicit axes of ``spec``."""
    return jax.sharding.reshard(x, NamedSharding(mesh, explicit_part(spec, mesh)))


def place_like(x, spec: PartitionSpec, mesh):
    """``x`` placed as ``spec`` on ``mesh`` of any axis kind: ``jax.sharding.reshard`` for the
    Explicit axes (sharding in types), ``with_sharding_constraint`` for the Auto ones; on an Auto
    mesh this is exactly ``with_sharding_constraint``."""
    if has_explicit_axes(mesh):
        x = _reshard_explicit(x, spec, mesh)
        spec = auto_part(spec, mesh)
        if all(e is None for e in spec):
            return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


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
