"""Parameter helpers shared by the NNX layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

__all__ = ["apply_linear", "logical_param", "normal_linear"]


def logical_param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], dtype: Any,
                  names: tuple[str, ...]) -> nnx.Param:
    """A parameter ``init(key, shape, dtype)`` annotated with logical axis ``names``
    (``out_sharding`` metadata for :mod:`jaxattn.parallel` rules). It is created unsharded unless
    flax's eager sharding is on inside a mesh context whose axes are those names (flax reads them
    as mesh axes; logical names are mapped by the rules when the state is placed, e.g. by
    :func:`jaxattn.parallel.state_shardings` or the training loop)."""
    mesh_axes = jax.sharding.get_abstract_mesh().axis_names
    eager = (nnx.using_eager_sharding() and mesh_axes != ()
             and all(n is None or n in mesh_axes for n in names))
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=eager)


def normal_linear(din: int, dout: int, rngs: nnx.Rngs, *, bias: bool = True,
                  std: float = 0.02) -> nnx.Linear:
    """``nnx.Linear(din, dout)`` with an ``N(0, std)`` kernel (GPT-2 / Zoology's 0.02 default)."""
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=nnx.initializers.normal(std),
                      rngs=rngs)


def apply_linear(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """``x @ kernel + bias`` of an ``nnx.Linear`` computed in ``x``'s dtype (parameters cast),
    so a bf16 activation with f32 parameters stays bf16 under strict dtype promotion."""
    y = x @ layer.kernel[...].astype(x.dtype)
    if layer.bias is not None:
        y = y + layer.bias[...].astype(x.dtype)
    return y
