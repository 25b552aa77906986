"""Tensor-attention token mixer (Alman & Song 2023): five projections and a softmax over key pairs.

Per head ``n``: ``q = x W_Q``, ``k1 = c W_K1``, ``k2 = c W_K2``, ``v1 = c W_V1``, ``v2 = c W_V2``
(``c = x`` for self-mixing, ``context`` for cross), then
:func:`jaxattn.tensor_attention` and an output projection ``W_O`` over the concatenated heads
(the spec's per-head ``W_Q, W_K1, W_K2, W_V1, W_V2 (d x d_h)`` and ``W_O``). The logit scale is
``1 / d_h``: the paper's ``1 / d`` with the head dimension in place of the model width.

Registered as the mixer ``"tensor_attention"`` (self, causal self and cross; no mask argument,
only causality).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.params import logical_param
from jaxattn.ops.tensor import tensor_attention

__all__ = ["TensorAttention"]

_default_init = nnx.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
_NAMES = ("query", "key1", "key2", "value1", "value2")


class TensorAttention(nnx.Module):
    """Multi-head tensor attention: ``x [B, L, D]`` (and ``context [B, S, Dc]``) -> ``[B, L, D]``.

    Args:
      features: model width ``D`` (input and output).
      num_heads: query heads ``N``.
      head_dim: ``H`` (default ``D // N``).
      num_kv_heads: key/value heads ``K`` (``N % K == 0``; default ``N``).
      causal: drop key pairs with ``j1 > i`` or ``j2 > i``.
      in_kv_features: width of ``context`` for cross-mixing (default ``D``).
      use_bias: biases on the five input projections and the output.
      kernel_init: initialiser of the ``[in, heads, head_dim]`` kernels (LeCun normal over
        ``in``); the output kernel ``[N, H, D]`` uses the same with fan-in ``N * H``.
      implementation, polynomial_degree, entry_bound: passed to :func:`jaxattn.tensor_attention`.
    """

    patterns = frozenset({"self", "causal_self", "cross"})

    def __init__(self, features: int, num_heads: int, *, head_dim: int | None = None,
                 num_kv_heads: int | None = None, causal: bool = False,
                 in_kv_features: int | None = None, use_bias: bool = False,
                 kernel_init: Callable = _default_init, param_dtype: Any = jnp.float32,
                 implementation: str | None = None, polynomial_degree: int | None = None,
                 entry_bound: float | None = None, rngs: nnx.Rngs):
        head_dim = features // num_heads if head_dim is None else head_dim
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1 (features={features}, "
                             f"num_heads={num_heads}), got {head_dim}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        in_kv = features if in_kv_features is None else in_kv_features
        self.features, self.num_heads, self.head_dim = features, num_heads, head_dim
        self.num_kv_heads, self.causal, self.use_bias = num_kv_heads, causal, use_bias
        self.implementation = implementation
        self.polynomial_degree, self.entry_bound = polynomial_degree, entry_bound
        n, k, h = num_heads, num_kv_heads, head_dim
        shapes = {"query": (features, n, h)} | {name: (in_kv, k, h) for name in _NAMES[1:]}
        heads = {"query": "heads"} | {name: "kv_heads" for name in _NAMES[1:]}
        for name in _NAMES:
            setattr(self, f"{name}_kernel", logical_param(
                rngs, kernel_init, shapes[name], param_dtype, ("embed", heads[name], "head_dim")))
            if use_bias:
                setattr(self, f"{name}_bias", logical_param(
                    rngs, nnx.initializers.zeros_init(), shapes[name][1:], param_dtype,
                    (heads[name], "head_dim")))
        out_init = nnx.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
        self.out_kernel = logical_param(rngs, out_init, (n, h, features), param_dtype,
                                        ("heads", "head_dim", "embed"))
        if use_bias:
            self.out_bias = logical_param(rngs, nnx.initializers.zeros_init(), (features,),
                                          param_dtype, ("embed",))

    def project(self, name: str, x: jax.Array) -> jax.Array:
        """``x [B, L, in] -> [B, L, heads, head_dim]`` with projection ``name`` (one of
        ``query, key1, key2, value1, value2``), computed in ``x``'s dtype."""
        y = jnp.einsum("bld,dnh->blnh", x, getattr(self, f"{name}_kernel")[...].astype(x.dtype))
        if self.use_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(x.dtype)
        return y

    def __call__(self, x, *, context=None, mask=None, deterministic=None, rngs=None):
        mixer_lib.refuse_mask(mask, "tensor_attention")
        if x.ndim != 3 or x.shape[-1] != self.features:
            raise ValueError(f"x must be [B, L, {self.features}], got shape {x.shape}")
        if context is not None and self.causal:
            raise ValueError("a causal tensor_attention mixer takes no context (causal cross "
                             "pairs are not defined)")
        c = x if context is None else context.astype(x.dtype)
        q = self.project("query", x)
        k1, k2, v1, v2 = (self.project(name, c) for name in _NAMES[1:])
        out = tensor_attention(q, k1, k2, v1, v2, is_causal=self.causal,
                               polynomial_degree=self.polynomial_degree,
                               entry_bound=self.entry_bound, implementation=self.implementation)
        y = jnp.einsum("blnh,nhd->bld", out, self.out_kernel[...].astype(out.dtype))
        if self.use_bias:
            y = y + self.out_bias[...].astype(y.dtype)
        return y


def _make_tensor_attention(*, features, num_heads, causal, rngs, head_dim: int | None = None,
                           num_kv_heads: int | None = None,
                           use_bias: bool = False, implementation: str | None = None,
                           polynomial_degree: int | None = None,
                           entry_bound: float | None = None):
    return TensorAttention(features, num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads,
                           causal=causal, use_bias=use_bias, implementation=implementation,
                           polynomial_degree=polynomial_degree, entry_bound=entry_bound,
                           rngs=rngs)


mixer_lib.register_mixer(
    "tensor_attention", _make_tensor_attention, patterns=TensorAttention.patterns,
    paper="How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to "
          "Kronecker Computation (Alman & Song, 2023)")
