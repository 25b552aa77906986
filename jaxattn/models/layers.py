"""Pieces the backbones share: a mixer choice as config, the MLP, the pre-norm block."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from jaxattn.nn.mixer import make_mixer

__all__ = ["MLP", "MixerConfig", "build_mixer"]


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """A registered mixer name and its options (``(("kernel_size", 7), ...)``: hashable, so
    configs stay frozen and usable as static arguments)."""

    name: str = "attention"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def with_options(self, **options: Any) -> MixerConfig:
        """A copy with ``options`` added or replaced."""
        return dataclasses.replace(self, options=tuple({**self.kwargs, **options}.items()))


def build_mixer(cfg: MixerConfig, *, features: int, num_heads: int, causal: bool,
                rngs: nnx.Rngs, **extra: Any) -> nnx.Module:
    """``make_mixer(cfg.name, ...)`` with ``cfg.options`` and then ``extra`` options."""
    return make_mixer(cfg.name, features=features, num_heads=num_heads, causal=causal,
                      rngs=rngs, **{**cfg.kwargs, **extra})


class MLP(nnx.Module):
    """``x [..., D] -> fc2(gelu(fc1(x))) [..., D]`` with hidden width ``ratio * D``."""

    def __init__(self, dim: int, ratio: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, ratio * dim, rngs=rngs)
        self.fc2 = nnx.Linear(ratio * dim, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))
