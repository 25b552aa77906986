"""Distributed attention on ``jax.sharding`` meshes.

* :mod:`~jaxattn.parallel.logical`: logical axis names, rules table, mesh from config,
  :func:`constrain`.
* :func:`head_parallel_attention`: heads split over ``tensor``.
* :func:`context_parallel_attention`: sequence split over ``context`` with the ``all_gather``,
  ``ring`` or ``ulysses`` strategy, optional ``zigzag`` / ``striped`` load balancing.
"""

from jaxattn.parallel.context import STRATEGIES, context_parallel_attention
from jaxattn.parallel.heads import head_parallel_attention
from jaxattn.parallel.layout import inverse_permutation, sequence_permutation
from jaxattn.parallel.logical import (
    DEFAULT_RULES,
    LOGICAL_AXES,
    MESH_AXES,
    MeshConfig,
    axis_rules,
    constrain,
    current_rules,
    logical_sharding,
    logical_to_spec,
    make_mesh,
    state_shardings,
)

__all__ = [
    "STRATEGIES",
    "context_parallel_attention",
    "head_parallel_attention",
    "sequence_permutation",
    "inverse_permutation",
    "DEFAULT_RULES",
    "LOGICAL_AXES",
    "MESH_AXES",
    "MeshConfig",
    "axis_rules",
    "constrain",
    "current_rules",
    "logical_sharding",
    "logical_to_spec",
    "make_mesh",
    "state_shardings",
]
