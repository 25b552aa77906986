"""Arrays whose sharding is part of their type (mesh axes of ``jax.sharding.AxisType.Explicit``,
what ``jax.make_mesh`` creates by default).

Under explicit sharding every operation must have an unambiguous output sharding; attention on
sequence-sharded queries *and* keys does not (``Q K^T`` would be sharded twice over one axis).
jaxattn's entry points therefore run their math with the Explicit axes turned into Auto ones
(``jax.sharding.auto_axes``, JAX's tool for code that is not written against sharding types)
and give the result the sharding a user expects: the query's, for ``[B, T, N, H]`` outputs.
Nothing changes for arrays on Auto meshes or on one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec

__all__ = ["explicit_mesh_of", "in_auto_axes", "explicit_spec"]


def _explicit_type():
    return getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)


def explicit_mesh_of(*arrays):
    """The abstract mesh of the first array whose type carries Explicit mesh axes, else None
    (also None on JAX without sharding in types, and for NumPy arrays)."""
    explicit = _explicit_type()
    typeof = getattr(jax, "typeof", None)
    if explicit is None or typeof is None:
        return None
    for x in arrays:
        if not _is_array(x):
            continue
        sharding = getattr(typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        types = tuple(getattr(mesh, "axis_types", ()) or ())
        if explicit in types:
            return mesh
    return None


def explicit_spec(x, rank: int | None = None) -> PartitionSpec:
    """The Explicit part of ``x``'s sharding type (first ``rank`` entries when given)."""
    spec = tuple(jax.typeof(x).sharding.spec)
    spec = spec + (None,) * (x.ndim - len(spec))
    return PartitionSpec(*(spec if rank is None else spec[:rank]))


def _is_array(x) -> bool:
    return isinstance(x, jax.Array | jax.core.Tracer)


def in_auto_axes(fn: Callable, mesh, out_sharding, *args: Any, **kwargs: Any):
    """``fn(*args, **kwargs)`` traced with every Explicit axis of ``mesh`` (an abstract mesh, see
    :func:`explicit_mesh_of`) turned Auto; the result is placed as ``out_sharding`` (a pytree of
    ``PartitionSpec`` matching ``fn``'s output). Array leaves of the arguments (masks and other
    pytrees included) are passed through ``auto_axes``; every other leaf stays static."""
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    where = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]

    def body(*arrays):
        full = list(leaves)
        for i, a in zip(where, arrays, strict=True):
            full[i] = a
        a, kw = jax.tree_util.tree_unflatten(treedef, full)
        return fn(*a, **kw)

    with jax.sharding.use_abstract_mesh(mesh):
        return jax.sharding.auto_axes(body, out_sharding=out_sharding)(*[leaves[i] for i in where])
