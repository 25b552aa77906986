"""Logical axis names, the rules table that maps them to mesh axes, and mesh construction.

Layers name the axes of their parameters and activations with *logical* names (``batch``,
``length``, ``heads``, ``kv_heads``, ``embed``, ``mlp``, ``head_dim``, ``vocab``); one rules table
per experiment maps each logical name to zero or more *mesh* axes (``data``, ``fsdp``,
``tensor``, ``context``). Changing the parallelism is then a change of table, not of model code
(the scheme of GSPMD, Xu et al. 2021, as used by t5x / MaxText / flax's logical partitioning).

Resolution rules (:func:`logical_to_spec`):

* mesh axes the mesh does not have, or of size 1, are dropped, so one table serves every mesh;
* a mesh axis is used at most once per array: the first logical axis (left to right) that asks
  for it gets it (so ``embed -> fsdp`` shards weights but not ``[batch, length, embed]``
  activations whose batch already took ``fsdp``);
* an axis whose size is not divisible by the mesh axes is left unsharded rather than failing.

:func:`constrain` is a no-op outside an :func:`axis_rules` context, so library code can annotate
activations unconditionally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxattn.parallel.mesh_axes import place_like

__all__ = [
    "MESH_AXES",
    "LOGICAL_AXES",
    "DEFAULT_RULES",
    "MeshConfig",
    "make_mesh",
    "logical_to_spec",
    "logical_sharding",
    "axis_rules",
    "current_rules",
    "constrain",
    "state_shardings",
]

MESH_AXES = ("data", "fsdp", "tensor", "context")
LOGICAL_AXES = ("batch", "length", "heads", "kv_heads", "embed", "mlp", "head_dim", "vocab")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# batch over data-parallel axes, sequence over context, heads / mlp / vocab over tensor,
# weights' embed dimension over fsdp (ZeRO-3 style), head_dim never sharded.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the four mesh axes and the run's extra logical-axis rules.

    One size may be ``-1``: that axis takes the devices the others leave. The default is pure
    data parallelism over every device (``data=-1``, the others 1), the training loop's default
    (``jaxattn.train.ExperimentConfig.mesh``). ``make_mesh(tensor=8)`` (keyword sizes) instead
    builds the mesh it names, with every axis it does not name of size 1.

    ``rules`` are ``(logical_name, mesh_axis)`` pairs placed in front of :data:`DEFAULT_RULES`
    by the training loop (``jaxattn.train.mesh_rules``; the first rule for a name wins), so the
    defaults already give FSDP when ``fsdp > 1`` (weights' ``embed`` and the batch over
    ``fsdp``) and tensor parallelism when ``tensor > 1``. :func:`make_mesh` does not read them.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1
    rules: tuple[tuple[str, str], ...] = ()

    def sizes(self) -> tuple[int, int, int, int]:
        """``(data, fsdp, tensor, context)`` as given (``-1`` unresolved)."""
        return (self.data, self.fsdp, self.tensor, self.context)

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """The four axis sizes over ``num_devices`` devices (the ``-1`` resolved).

        Raises ``ValueError`` when two sizes are ``-1``, a size is 0 or below ``-1``, or the
        sizes do not multiply to ``num_devices``."""
        sizes = list(self.sizes())
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive (or one -1), got {self}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not split into {self}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} "
                f"devices, {num_devices} are available"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig | None = None, devices: Sequence | None = None, **sizes) -> Mesh:
    """Build a ``Mesh`` with axes ``("data", "fsdp", "tensor", "context")`` (all ``Auto``).

    ``make_mesh(MeshConfig(data=2, context=4))``, or axis sizes as keywords:
    ``make_mesh(context=-1)``, ``make_mesh(data=2, tensor=4)`` (axes not named have size 1).
    ``devices`` defaults to all devices (every process's, under ``jax.distributed``); the mesh
    uses all of them, so the sizes must multiply to their number (``ValueError`` otherwise).
    """
    if config is None:
        config = MeshConfig(**{"data": 1, **sizes})
    elif sizes:
        raise TypeError("pass either a MeshConfig or axis sizes, not both")
    devices = list(jax.devices() if devices is None else devices)
    shape = config.shape(len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _as_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def _check_rules(rules) -> Rules:
    out = []
    for entry in rules:
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"a rule is (logical_name, mesh_axes), got {entry!r}")
        out.append((entry[0], entry[1]))
    return tuple(out)


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules | None = None,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Logical names (one per array axis, ``None`` = replicated) -> ``PartitionSpec``.

    Args:
      names: e.g. ``("batch", "length", "heads", "head_dim")``.
      rules: the table (default: the active :func:`axis_rules`, else :data:`DEFAULT_RULES`).
      mesh: drop mesh axes it lacks or that have size 1 (default: the active context's mesh).
      shape: the array's shape; an axis not divisible by its mesh axes stays unsharded.
    """
    ctx = _STATE.stack[-1] if _STATE.stack else None
    if rules is None:
        rules = ctx[0] if ctx else DEFAULT_RULES
    if mesh is None and ctx:
        mesh = ctx[1]
    table: dict[str, tuple[str, ...]] = {}
    for logical, axes in _check_rules(rules):
        table.setdefault(logical, _as_tuple(axes))  # first rule for a name wins
    used: set[str] = set()
    spec: list = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
        axes = [a for a in table[name] if a not in used]
        if mesh is not None:
            axes = [a for a in axes if a in mesh.shape and mesh.shape[a] > 1]
        if shape is not None and mesh is not None:
            # keep the longest prefix of mesh axes that divides the dimension
            while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def logical_sharding(names, mesh: Mesh, rules: Rules | None = None, shape=None) -> NamedSharding:
    """``NamedSharding`` for an array with logical axis ``names`` on ``mesh``."""
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


class _State(threading.local):
    def __init__(self):
        self.stack: list[tuple[Rules, Mesh]] = []


_STATE = _State()


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Activate ``rules`` on ``mesh``: inside, :func:`constrain` places sharding constraints."""
    _STATE.stack.append((_check_rules(rules), mesh))
    try:
        yield
    finally:
        _STATE.stack.pop()


def current_rules() -> tuple[Rules, Mesh] | None:
    """``(rules, mesh)`` of the innermost active :func:`axis_rules`, or ``None``."""
    return _STATE.stack[-1] if _STATE.stack else None


def constrain(x, names: Sequence[str | None]):
    """``with_sharding_constraint`` of ``x`` to its logical ``names`` under the active rules.

    Outside :func:`axis_rules` it returns ``x`` unchanged (so layers may call it always).
    """
    ctx = current_rules()
    if ctx is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"{len(names)} logical names {tuple(names)} for an array of rank {x.ndim}")
    rules, mesh = ctx
    return place_like(x, logical_to_spec(names, rules, mesh, x.shape), mesh)


def state_shardings(state, mesh: Mesh, rules: Rules | None = None):
    """``NamedSharding`` tree for an ``nnx.State`` whose variables carry logical names.

    Variables annotated with ``out_sharding`` / ``sharding_names`` metadata (as
    ``jaxattn.nn.MultiHeadAttention``'s parameters are) get their mapped spec; others are
    replicated. Use with ``jax.jit(..., in_shardings=...)`` or ``jax.device_put``.
    """
    from flax import nnx  # local import: flax is only needed for this helper

    def one(x):
        if isinstance(x, nnx.Variable):
            meta = x.get_metadata()
            names = None
            for key in ("out_sharding", "sharding_names", "sharding"):
                if meta.get(key) is not None:
                    names = meta[key]
                    break
            value = x.get_value() if hasattr(x, "get_value") else x.value
            if names is None:
                return x.replace(NamedSharding(mesh, PartitionSpec()))
            return x.replace(logical_sharding(tuple(names), mesh, rules, value.shape))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
