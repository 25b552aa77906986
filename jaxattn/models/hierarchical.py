"""A hierarchical vision backbone (NAT-style stages with patch merging) taking a mixer per stage.

Neighborhood Attention Transformer (Hassani et al., CVPR 2023) is the config
:func:`nat_config`: stages of pre-norm blocks ``x + mixer(LN(x)); x + MLP(LN(x))`` at full,
then halved resolution, 2x2 patch merging (channels x2) between stages, mean pooling, a linear
head. Any registered 2-D mixer fits (it receives ``grid=(h, w)`` of its stage).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import MLP, MixerConfig, build_mixer

__all__ = ["HierarchicalClassifier", "HierarchicalConfig", "nat_config"]


@dataclasses.dataclass(frozen=True)
class HierarchicalConfig:
    """Stages ``i = 0..`` at resolution ``image_size / 2^i`` with ``dims[i]`` channels,
    ``depths[i]`` blocks and ``heads[i]`` heads; ``mixers[i]`` is stage ``i``'s mixer."""

    image_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    dims: tuple[int, ...] = (32, 64)
    depths: tuple[int, ...] = (1, 1)
    heads: tuple[int, ...] = (2, 4)
    mixers: tuple[MixerConfig, ...] = (MixerConfig("neighborhood_2d"),) * 2
    mlp_ratio: int = 2


def nat_config(kernel_size: int | tuple[int, ...] = 3, dilations: tuple[int, ...] = (1, 1),
               use_rpb: bool = True, **fields: Any) -> HierarchicalConfig:
    """The tiny NAT for small images: neighborhood attention with ``kernel_size`` (one per
    stage, or one for all) and a relative-position bias; ``fields`` set the other
    :class:`HierarchicalConfig` fields."""
    stages = len(fields.get("dims", HierarchicalConfig.dims))
    kernels = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * stages
    if not len(kernels) == len(dilations) == stages:
        raise ValueError(f"kernel_size {kernel_size} and dilations {dilations} need one entry "
                         f"per stage ({stages})")
    mixers = tuple(
        MixerConfig("neighborhood_2d", (("kernel_size", k), ("dilation", d), ("use_rpb", use_rpb)))
        for k, d in zip(kernels, dilations, strict=True))
    return HierarchicalConfig(mixers=mixers, **fields)


class _Block(nnx.Module):
    """Pre-norm block on a ``[B, h, w, D]`` map: ``x + mixer(LN(x)); x + MLP(LN(x))``."""

    def __init__(self, dim, heads, grid, mixer: MixerConfig, mlp_ratio, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = build_mixer(mixer, features=dim, num_heads=heads, causal=False, rngs=rngs,
                                grid=grid)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = MLP(dim, mlp_ratio, rngs=rngs)

    def __call__(self, x, *, deterministic=None):
        b, h, w, d = x.shape
        y = self.attn(self.norm1(x).reshape(b, h * w, d), deterministic=deterministic)
        x = x + y.reshape(b, h, w, d)
        return x + self.mlp(self.norm2(x))


class HierarchicalClassifier(nnx.Module):
    """Images ``[B, H, W]`` or ``[B, H, W, C_in]`` -> logits ``[B, num_classes]``."""

    def __init__(self, config: HierarchicalConfig = HierarchicalConfig(), *, rngs: nnx.Rngs):
        c = config
        if not len(c.dims) == len(c.depths) == len(c.heads) == len(c.mixers):
            raise ValueError("dims, depths, heads and mixers need one entry per stage, got "
                             f"{c.dims}, {c.depths}, {c.heads}, {len(c.mixers)} mixers")
        self.config = c
        self.stem = nnx.Linear(c.in_channels, c.dims[0], rngs=rngs)
        self.stages, self.merges = nnx.List(), nnx.List()
        size = c.image_size
        for i, dim in enumerate(c.dims):
            self.stages.append(nnx.List([
                _Block(dim, c.heads[i], (size, size), c.mixers[i], c.mlp_ratio, rngs)
                for _ in range(c.depths[i])]))
            if i + 1 < len(c.dims):
                self.merges.append(nnx.Linear(4 * dim, c.dims[i + 1], rngs=rngs))
                size //= 2
        self.norm = nnx.LayerNorm(c.dims[-1], rngs=rngs)
        self.head = nnx.Linear(c.dims[-1], c.num_classes, rngs=rngs)

    def __call__(self, images, *, deterministic=None):
        x = images[..., None] if images.ndim == 3 else images
        x = self.stem(x.astype(jnp.float32))  # [B, H, W, D0]
        for i, blocks in enumerate(self.stages):
            for block in blocks:
                x = block(x, deterministic=deterministic)
            if i < len(self.merges):  # 2x2 patch merging
                b, h, w, d = x.shape
                x = x.reshape(b, h // 2, 2, w // 2, 2, d).transpose(0, 1, 3, 2, 4, 5)
                x = self.merges[i](x.reshape(b, h // 2, w // 2, 4 * d))
        return self.head(self.norm(jnp.mean(x, axis=(1, 2))))
