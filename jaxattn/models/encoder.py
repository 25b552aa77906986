"""An encoder backbone: a ViT on patches with a classifier head, taking a mixer per layer.

Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021) at small
scale: non-overlapping ``patch x patch`` patches -> linear embedding + learned positions ->
pre-norm blocks ``x + mixer(LN(x)); x + MLP(LN(x))`` (non-causal mixers; a 2-D mixer reads
the square patch grid) -> LayerNorm -> mean pool -> linear head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.models.layers import MLP, MixerConfig, build_mixer

__all__ = ["ViTClassifier", "ViTConfig", "patchify"]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 8
    patch_size: int = 2
    in_channels: int = 1
    num_classes: int = 10
    width: int = 64
    num_heads: int = 4
    mixers: tuple[MixerConfig, ...] = (MixerConfig("attention"),) * 2
    mlp_ratio: int = 2


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, (H/p) * (W/p), p * p * C]`` (row-major patch order)."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible into {patch}x{patch} patches")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class ViTClassifier(nnx.Module):
    """Images ``[B, H, W]`` or ``[B, H, W, C]`` -> logits ``[B, num_classes]``."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        side = cfg.image_size // cfg.patch_size
        d = cfg.width
        self.cfg = cfg
        self.embed = nnx.Linear(cfg.patch_size ** 2 * cfg.in_channels, d, rngs=rngs)
        self.pos = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (side * side, d)))
        self.norms1 = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in cfg.mixers])
        self.mixers = nnx.List([
            build_mixer(m, features=d, num_heads=cfg.num_heads, causal=False, rngs=rngs)
            for m in cfg.mixers])
        self.norms2 = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in cfg.mixers])
        self.mlps = nnx.List([MLP(d, cfg.mlp_ratio, rngs=rngs) for _ in cfg.mixers])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.head = nnx.Linear(d, cfg.num_classes, rngs=rngs)

    def embed_tokens(self, images) -> jax.Array:
        """Images ``[B, H, W]`` or ``[B, H, W, C]`` -> patch tokens with positions ``[B, P, D]``."""
        x = images[..., None] if images.ndim == 3 else images
        return self.embed(patchify(x.astype(jnp.float32), self.cfg.patch_size)) + self.pos[...]

    def block(self, i: int, x, *, deterministic: bool | None = None, rngs=None) -> jax.Array:
        """Layer ``i``: ``x + mixer(LN(x)); x + MLP(LN(x))`` on ``[B, P, D]``; the input of the
        mixer is ``norms1[i](x)``."""
        x = x + self.mixers[i](self.norms1[i](x), deterministic=deterministic, rngs=rngs)
        return x + self.mlps[i](self.norms2[i](x))

    def __call__(self, images, *, deterministic: bool | None = None, rngs=None):
        x = self.embed_tokens(images)
        for i in range(len(self.mixers)):
            x = self.block(i, x, deterministic=deterministic, rngs=rngs)
        return self.head(self.norm(jnp.mean(x, axis=1)))
