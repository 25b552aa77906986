"""One slot for every token mixer: the call protocol, auxiliary losses and the registry.

**Protocol.** A token mixer is an ``nnx.Module`` called as::

    y = mixer(x, *, context=None, mask=None, deterministic=None, rngs=None)

with ``x [B, L, D]``, ``context [B, S, D]`` for cross attention (``None``: self), ``mask`` a
:class:`jaxattn.masks.Mask` (or boolean array) for the mixers that take one (the others raise when
given one), ``deterministic`` switching dropout/noise off, ``rngs`` an optional per-call
``nnx.Rngs`` with a ``dropout`` stream (else the mixer's own), and ``y [B, L, D]``. Each mixer
class declares ``patterns``, a subset of :data:`PATTERNS` (the four patterns of CAB, Zhang et
al. 2024: non-causal / causal self, non-causal / causal cross).

**Auxiliary losses** (load balance, commitment, ...) are sown, never returned:
``sow_aux_loss(self, "balance", value)`` stores a scalar as an :class:`AuxLoss` (an
``nnx.Intermediate``). :func:`capture_aux_losses` runs a forward pass and returns its output and
``{path: scalar}``; the training loop adds their sum, times a configurable weight, to the loss.
:func:`aux_losses` collects (and removes) what was sown on a module outside a capture.

**Registry.** ``register_mixer(name, factory, patterns=..., paper=...)`` adds an entry to
:data:`MIXERS`; ``make_mixer(name, features=, num_heads=, causal=, rngs=, **options)`` builds one
with defaults for every other option. The conformance suite (``tests/conformance/mixers.py``)
runs over every entry of :data:`MIXERS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "PATTERNS",
    "AuxLoss",
    "MixerSpec",
    "MIXERS",
    "TokenMixer",
    "aux_losses",
    "capture_aux_losses",
    "make_mixer",
    "pattern_name",
    "refuse_context",
    "refuse_mask",
    "register_mixer",
    "sow_aux_loss",
    "total_aux_loss",
]

PATTERNS = frozenset({"self", "causal_self", "cross", "causal_cross"})


class AuxLoss(nnx.Intermediate):
    """A scalar auxiliary loss sown by a mixer (collected by :func:`capture_aux_losses`)."""


def sow_aux_loss(module: nnx.Module, name: str, value) -> None:
    """Record ``value`` (a scalar) as the auxiliary loss ``name`` of ``module`` (float32)."""
    value = jnp.asarray(value, jnp.float32)
    if value.shape != ():
        raise ValueError(f"aux loss {name!r} must be a scalar, got shape {value.shape}")
    module.sow(AuxLoss, name, value)


def _flatten_aux(state: nnx.State) -> dict[str, jax.Array]:
    """``{"path/to/module/name": sum of the values sown there}`` of an ``AuxLoss`` state."""
    out: dict[str, jax.Array] = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        values = value if isinstance(value, tuple) else (value,)
        key = "/".join(str(p) for p in path)
        out[key] = sum(values[1:], values[0])
    return out


def capture_aux_losses(fn: Callable, module: nnx.Module, *args, **kwargs):
    """Run ``fn(module, *args, **kwargs)`` and collect the aux losses sown during it.

    Returns ``(result, {path: scalar})``; the dict is empty when no mixer sowed anything.
    """
    result, state = nnx.capture(fn, AuxLoss)(module, *args, **kwargs)
    return result, _flatten_aux(state)


def aux_losses(model: nnx.Module | nnx.State) -> dict[str, jax.Array]:
    """``{path: scalar}`` of the aux losses sown on ``model`` (removed from it), or of an
    ``AuxLoss`` state returned by ``nnx.capture``."""
    if isinstance(model, nnx.Module):
        model = nnx.pop(model, AuxLoss)
    return _flatten_aux(model)


def total_aux_loss(losses: Mapping[str, jax.Array]) -> jax.Array:
    """Sum of a :func:`aux_losses` dict (0 when empty), float32 scalar."""
    return sum(losses.values(), jnp.zeros((), jnp.float32))


class TokenMixer(nnx.Module):
    """Optional base class documenting the protocol (any module with this call works).

    ``patterns``: the patterns the mixer supports; ``aux_loss_names``: the aux losses it sows
    in training mode (``deterministic=False``), checked by the conformance suite.
    """

    patterns: ClassVar[frozenset[str]] = frozenset()
    aux_loss_names: ClassVar[frozenset[str]] = frozenset()

    def __call__(self, x, *, context=None, mask=None, deterministic=None, rngs=None):
        raise NotImplementedError


def pattern_name(*, causal: bool, cross: bool) -> str:
    """``"self" | "causal_self" | "cross" | "causal_cross"``."""
    return ("causal_" if causal else "") + ("cross" if cross else "self")


def refuse_mask(mask, name: str) -> None:
    """Raise when a mixer that takes no mask is given one (never silently ignore it)."""
    if mask is not None:
        raise ValueError(f"the {name} mixer takes no mask= (got {type(mask).__name__}); it mixes "
                         "causally or not by construction")


def refuse_context(context, name: str) -> None:
    """Raise when a self-only mixer is given ``context``."""
    if context is not None:
        raise ValueError(f"the {name} mixer supports self-mixing only; got context of shape "
                         f"{getattr(context, 'shape', None)}")


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """A registered mixer: ``factory(*, features, num_heads, causal, rngs, **options)``."""

    name: str
    factory: Callable[..., nnx.Module]
    patterns: frozenset[str]
    paper: str


MIXERS: dict[str, MixerSpec] = {}


def register_mixer(name: str, factory: Callable[..., nnx.Module], *, patterns,
                   paper: str, replace: bool = False) -> MixerSpec:
    """Add a mixer to :data:`MIXERS`. ``patterns`` is a non-empty subset of :data:`PATTERNS`;
    ``paper`` names the paper (title, year) the mechanism comes from."""
    patterns = frozenset(patterns)
    if not patterns or not patterns <= PATTERNS:
        raise ValueError(f"patterns of mixer {name!r} must be a non-empty subset of "
                         f"{sorted(PATTERNS)}, got {sorted(patterns)}")
    if name in MIXERS and not replace:
        raise ValueError(f"mixer {name!r} is already registered")
    spec = MixerSpec(name, factory, patterns, paper)
    MIXERS[name] = spec
    return spec


def make_mixer(name: str, *, features: int, num_heads: int, causal: bool, rngs: nnx.Rngs,
               cross: bool = False, **options: Any) -> nnx.Module:
    """Build the registered mixer ``name`` mapping ``[B, L, features] -> [B, L, features]``.

    ``causal`` / ``cross`` choose the pattern, which the mixer must support; ``options`` are the
    mixer's own keyword arguments (each has a default). Raises ``ValueError`` for an unknown name
    or an unsupported pattern.
    """
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; registered: {sorted(MIXERS)}")
    spec = MIXERS[name]
    pattern = pattern_name(causal=causal, cross=cross)
    if pattern not in spec.patterns:
        raise ValueError(f"mixer {name!r} does not support the {pattern!r} pattern; it supports "
                         f"{sorted(spec.patterns)}")
    return spec.factory(features=features, num_heads=num_heads, causal=causal, rngs=rngs,
                        **options)
