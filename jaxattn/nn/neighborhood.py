"""Neighborhood attention layers (Flax NNX) and their token-mixer form.

Neighborhood Attention Transformer (Hassani et al., CVPR 2023), dilated NA (DiNAT, 2022) and
strided NA (GNA, 2025). The layers are thin shells: q/k/v projections, optional relative-position
bias table, then :func:`jaxattn.ops.neighborhood.neighborhood_attention`, then an output
projection. Parameters carry logical sharding names (``embed``, ``heads``, ``kv_heads``,
``head_dim``).
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxattn.nn.mixer import register_mixer
from jaxattn.nn.params import logical_param
from jaxattn.ops.neighborhood import neighborhood_attention

__all__ = [
    "NeighborhoodAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "NeighborhoodMixer",
]


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
        self.q_kernel = logical_param(rngs, init, (in_features, num_heads, head_dim),
                                      param_dtype, ("embed", "heads", "head_dim"))
        self.kv_kernel = logical_param(rngs, init, (2, in_features, num_kv_heads, head_dim),
                                       param_dtype, (None, "embed", "kv_heads", "head_dim"))
        self.q_bias = self.kv_bias = nnx.data(None)
        if qkv_bias:
            self.q_bias = logical_param(rngs, zeros, (num_heads, head_dim), param_dtype,
                                        ("heads", "head_dim"))
            self.kv_bias = logical_param(rngs, zeros, (2, num_kv_heads, head_dim), param_dtype,
                                         (None, "kv_heads", "head_dim"))
        self.out_kernel = logical_param(rngs, init, (num_heads, head_dim, out_features),
                                        param_dtype, ("heads", "head_dim", "embed"))
        self.out_bias = logical_param(rngs, zeros, (out_features,), param_dtype, ("embed",))
        self.rpb = nnx.data(None)
        if use_rpb:
            table = (num_heads, *(2 * k - 1 for k in self.kernel_size))
            self.rpb = logical_param(rngs, nnx.initializers.truncated_normal(0.02), table,
                                     param_dtype, ("heads",) + (None,) * ndim)

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


# ---- the token-mixer slot ------------------------------------------------------------------


class NeighborhoodMixer(NeighborhoodAttention):
    """Neighborhood attention as a token mixer (:mod:`jaxattn.nn.mixer`): ``x [B, L, C]`` is read
    as a grid (``grid``; ``None``: the sequence itself in 1-D, a square in 2-D), attended, and
    flattened back. ``context [B, S, C]``, if given, is attended by every query (NATTEN's
    additional keys/values). ``causal`` is causal along every grid dimension, which never looks
    ahead in raster (row-major) order."""

    patterns = frozenset({"self", "causal_self"})

    def __init__(self, in_features: int, num_heads: int, kernel_size, *, ndim: int,
                 grid: tuple[int, ...] | None = None, **kwargs):
        super().__init__(in_features, num_heads, kernel_size, ndim=ndim, **kwargs)
        if grid is not None and len(grid) != ndim:
            raise ValueError(f"grid {grid} needs {ndim} dimensions")
        self.grid = None if grid is None else tuple(int(g) for g in grid)

    def _grid_of(self, length: int) -> tuple[int, ...]:
        if self.grid is not None:
            if math.prod(self.grid) != length:
                raise ValueError(f"grid {self.grid} has {math.prod(self.grid)} cells but the "
                                 f"sequence has L={length} tokens")
            return self.grid
        side = round(length ** (1.0 / self.ndim))
        if side ** self.ndim != length:
            raise ValueError(f"L={length} is not a {self.ndim}-D square grid; pass grid=")
        return (side,) * self.ndim

    def __call__(self, x, context=None, *, mask=None, deterministic=None, rngs=None):
        if mask is not None:
            raise ValueError("the neighborhood mixer takes no mask=; its window is the mask")
        if x.ndim != 3:
            raise ValueError(f"the neighborhood mixer expects x [B, L, C], got shape {x.shape}")
        b, length, _ = x.shape
        y = super().__call__(x.reshape(b, *self._grid_of(length), x.shape[-1]), context)
        return y.reshape(b, length, y.shape[-1])


def _neighborhood_factory(ndim: int):
    def make(*, features, num_heads, causal, rngs, kernel_size=7, dilation=1, stride=1,
             grid=None, num_kv_heads=None, use_rpb=False, implementation=None):
        return NeighborhoodMixer(features, num_heads, kernel_size, ndim=ndim, grid=grid,
                                 dilation=dilation, stride=stride, is_causal=causal,
                                 num_kv_heads=num_kv_heads, use_rpb=use_rpb,
                                 implementation=implementation, rngs=rngs)
    return make


for _ndim in (1, 2):
    register_mixer(
        f"neighborhood_{_ndim}d", _neighborhood_factory(_ndim),
        patterns=NeighborhoodMixer.patterns,
        paper="Neighborhood Attention Transformer (CVPR 2023); DiNAT (2022)")
