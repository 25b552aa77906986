"""Neighborhood attention layers (Flax NNX) and a small hierarchical NAT classifier.

Neighborhood Attention Transformer (Hassani et al., CVPR 2023), dilated NA (DiNAT, 2022) and
strided NA (GNA, 2025). The layers are thin shells: q/k/v projections, optional relative-position
bias table, then :func:`jaxattn.ops.neighborhood.neighborhood_attention`, then an output
projection. Parameters carry logical sharding names (``embed``, ``heads``, ``kv_heads``,
``head_dim``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.ops.neighborhood import neighborhood_attention

__all__ = [
    "NeighborhoodAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "NATConfig",
    "NATClassifier",
]


def _param(rngs, init, shape, dtype, names):
    """A parameter with logical axis names; sharded eagerly only under flax's eager sharding."""
    eager = nnx.using_eager_sharding() and jax.sharding.get_abstract_mesh().axis_names != ()
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=eager)


def _per_dim(x, ndim):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,) * ndim


class NeighborhoodAttention(nnx.Module):
    """Multi-head neighborhood attention over ``[B, *spatial, C]`` (``ndim`` spatial dims).

    Args:
      in_features: ``C``.
      num_heads: query heads ``N``; ``num_kv_heads`` (default ``N``) must divide it (GQA).
      kernel_size, dilation, stride, is_causal: NATTEN window arguments, int/bool or per dim.
      ndim: number of spatial dimensions (1, 2 or 3); the 1D/2D/3D subclasses fix it.
      head_dim: default ``in_features // num_heads``.
      out_features: default ``in_features``.
      qkv_bias: bias on the q/k/v projections (NATTEN's default: True).
      qk_scale: logit scale, default ``head_dim ** -0.5``.
      use_rpb: learn a relative-position bias table ``[N, 2k_1-1, ...]`` (NAT / DiNAT).
      dtype: computation dtype (default: the input's); param_dtype: parameter dtype.
      implementation: passed to :func:`neighborhood_attention` (None: automatic).
      rngs: ``nnx.Rngs``.

    Call: ``x [B, *spatial, C]`` (optionally ``context [B, S, C]`` attended by every query, as
    NATTEN's additional keys/values) -> ``[B, *spatial, out_features]``.
    """

    def __init__(self, in_features: int, num_heads: int, kernel_size, dilation=1, stride=1,
                 is_causal=False, *, ndim: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, out_features: int | None = None,
                 qkv_bias: bool = True, qk_scale: float | None = None, use_rpb: bool = False,
                 dtype: Any = None, param_dtype: Any = jnp.float32,
                 implementation: str | None = None, rngs: nnx.Rngs):
        if ndim not in (1, 2, 3):
            raise ValueError(f"ndim must be 1, 2 or 3, got {ndim}")
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        head_dim = head_dim or in_features // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1 (in_features={in_features}, "
                             f"num_heads={num_heads})")
        self.ndim, self.num_heads, self.num_kv_heads, self.head_dim = ndim, num_heads, \
            num_kv_heads, head_dim
        self.kernel_size = _per_dim(kernel_size, ndim)
        self.dilation, self.stride = _per_dim(dilation, ndim), _per_dim(stride, ndim)
        self.is_causal = _per_dim(is_causal, ndim)
        self.scale = qk_scale
        self.dtype, self.implementation = dtype, implementation
        out_features = out_features or in_features
        init = nnx.initializers.lecun_normal()
        zeros = nnx.initializers.zeros_init()
        self.q_kernel = _param(rngs, init, (in_features, num_heads, head_dim), param_dtype,
                               ("embed", "heads", "head_dim"))
        self.kv_kernel = _param(rngs, init, (2, in_features, num_kv_heads, head_dim), param_dtype,
                                (None, "embed", "kv_heads", "head_dim"))
        self.q_bias = self.kv_bias = nnx.data(None)
        if qkv_bias:
            self.q_bias = _param(rngs, zeros, (num_heads, head_dim), param_dtype,
                                 ("heads", "head_dim"))
            self.kv_bias = _param(rngs, zeros, (2, num_kv_heads, head_dim), param_dtype,
                                  (None, "kv_heads", "head_dim"))
        self.out_kernel = _param(rngs, init, (num_heads, head_dim, out_features), param_dtype,
                                 ("heads", "head_dim", "embed"))
        self.out_bias = _param(rngs, zeros, (out_features,), param_dtype, ("embed",))
        self.rpb = nnx.data(None)
        if use_rpb:
            table = (num_heads, *(2 * k - 1 for k in self.kernel_size))
            self.rpb = _param(rngs, nnx.initializers.truncated_normal(0.02), table, param_dtype,
                              ("heads",) + (None,) * ndim)

    def _project_kv(self, x, dtype):
        kv = jnp.einsum("...c,zckh->z...kh", x, self.kv_kernel[...].astype(dtype))
        if self.kv_bias is not None:
            bias = self.kv_bias[...].astype(dtype)
            kv = kv + bias.reshape((2,) + (1,) * (x.ndim - 1) + bias.shape[1:])
        return kv[0], kv[1]

    def __call__(self, x, context=None):
        if x.ndim != self.ndim + 2:
            raise ValueError(f"expected input [B, *spatial ({self.ndim} dims), C], got shape "
                             f"{x.shape}")
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        q = jnp.einsum("...c,cnh->...nh", x, self.q_kernel[...].astype(dtype))
        if self.q_bias is not None:
            q = q + self.q_bias[...].astype(dtype)
        k, v = self._project_kv(x, dtype)
        extra = {}
        if context is not None:
            ak, av = self._project_kv(context.astype(dtype), dtype)
            extra = dict(additional_keys=ak, additional_values=av)
        out = neighborhood_attention(
            q, k, v, self.kernel_size, dilation=self.dilation, stride=self.stride,
            is_causal=self.is_causal, scale=self.scale,
            bias=None if self.rpb is None else self.rpb[...], implementation=self.implementation,
            **extra)
        y = jnp.einsum("...nh,nho->...o", out, self.out_kernel[...].astype(dtype))
        return y + self.out_bias[...].astype(dtype)


class NeighborhoodAttention1D(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` over ``[B, L, C]``."""

    def __init__(self, in_features, num_heads, kernel_size, dilation=1, stride=1,
                 is_causal=False, **kwargs):
        super().__init__(in_features, num_heads, kernel_size, dilation, stride, is_causal,
                         ndim=1, **kwargs)


class NeighborhoodAttention2D(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` over ``[B, X, Y, C]``."""

    def __init__(self, in_features, num_heads, kernel_size, dilation=1, stride=1,
                 is_causal=False, **kwargs):
        super().__init__(in_features, num_heads, kernel_size, dilation, stride, is_causal,
                         ndim=2, **kwargs)


class NeighborhoodAttention3D(NeighborhoodAttention):
    """:class:`NeighborhoodAttention` over ``[B, X, Y, Z, C]``."""

    def __init__(self, in_features, num_heads, kernel_size, dilation=1, stride=1,
                 is_causal=False, **kwargs):
        super().__init__(in_features, num_heads, kernel_size, dilation, stride, is_causal,
                         ndim=3, **kwargs)


# ---- a small hierarchical NAT ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NATConfig:
    """A tiny NAT (Hassani et al., 2023) for small images such as 8x8 digits.

    Stages run at full, then halved resolution; between stages 2x2 patches merge (channels x2).
    """

    image_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    dims: tuple[int, ...] = (32, 64)
    depths: tuple[int, ...] = (1, 1)
    heads: tuple[int, ...] = (2, 4)
    kernel_size: int | tuple[int, ...] = 3  # one int for every stage, or one per stage
    dilations: tuple[int, ...] = (1, 1)
    mlp_ratio: int = 2
    use_rpb: bool = True


class _NATBlock(nnx.Module):
    """Pre-norm block: x + NA(LN(x)); x + MLP(LN(x))."""

    def __init__(self, dim, heads, kernel_size, dilation, mlp_ratio, use_rpb, rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = NeighborhoodAttention2D(dim, heads, kernel_size, dilation, use_rpb=use_rpb,
                                            rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp_ratio * dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_ratio * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))


class NATClassifier(nnx.Module):
    """Hierarchical neighborhood-attention image classifier.

    Call: images ``[B, H, W]`` or ``[B, H, W, C_in]`` -> logits ``[B, num_classes]``.
    """

    def __init__(self, config: NATConfig = NATConfig(), *, rngs: nnx.Rngs):
        c = config
        if not (len(c.dims) == len(c.depths) == len(c.heads) == len(c.dilations)):
            raise ValueError("dims, depths, heads and dilations need one entry per stage")
        self.config = c
        self.stem = nnx.Linear(c.in_channels, c.dims[0], rngs=rngs)
        self.stages = nnx.List()
        self.merges = nnx.List()
        size = c.image_size
        kernels = c.kernel_size if isinstance(c.kernel_size, tuple) else (c.kernel_size,) * len(
            c.dims)
        if len(kernels) != len(c.dims):
            raise ValueError(f"kernel_size {c.kernel_size} needs one entry per stage")
        for i, dim in enumerate(c.dims):
            if kernels[i] * c.dilations[i] > size:
                raise ValueError(f"stage {i} at resolution {size} is too small for kernel "
                                 f"{kernels[i]} x dilation {c.dilations[i]}")
            self.stages.append(nnx.List([
                _NATBlock(dim, c.heads[i], kernels[i], c.dilations[i], c.mlp_ratio,
                          c.use_rpb, rngs) for _ in range(c.depths[i])]))
            if i + 1 < len(c.dims):
                self.merges.append(nnx.Linear(4 * dim, c.dims[i + 1], rngs=rngs))
                size //= 2
        self.norm = nnx.LayerNorm(c.dims[-1], rngs=rngs)
        self.head = nnx.Linear(c.dims[-1], c.num_classes, rngs=rngs)

    def __call__(self, images):
        x = images[..., None] if images.ndim == 3 else images
        x = self.stem(x.astype(jnp.float32))  # [B, H, W, D0]
        for i, blocks in enumerate(self.stages):
            for block in blocks:
                x = block(x)
            if i < len(self.merges):  # 2x2 patch merging
                b, h, w, d = x.shape
                x = x.reshape(b, h // 2, 2, w // 2, 2, d).transpose(0, 1, 3, 2, 4, 5)
                x = self.merges[i](x.reshape(b, h // 2, w // 2, 4 * d))
        return self.head(self.norm(jnp.mean(x, axis=(1, 2))))
