"""Based linear attention (Arora et al., "Simple linear attention language models balance the
recall-throughput tradeoff", 2024, section 3): softmax attention with ``exp(q.k / sqrt(f))``
replaced by its 2nd-order Taylor expansion, written as a feature map ``phi`` so that

    y_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)      (j <= i when causal)

Two views of the same map: quadratic (``A = phi(Q) phi(K)^T``, masked, row-normalised; for
training) and linear (prefix sums of ``phi(k_j) v_j^T`` and ``phi(k_j)``: the recurrent state, no
``L x L`` matrix). Written against HazyResearch/zoology ``mixers/based.py``: q and k are
projected to ``feature_dim`` per head (8 in Zoology's MQAR sweep, 16 in the paper), v to
``D / num_heads`` per head. Registered as the mixer ``"based"``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.params import apply_linear, normal_linear

__all__ = ["BasedLinearAttention", "based_linear", "based_quadratic", "taylor_feature_map"]


def taylor_feature_map(x: jax.Array) -> jax.Array:
    """2nd-order Taylor features of ``exp(q.k / sqrt(f))``: ``[..., f]`` -> ``[..., 1 + f + f^2]``
    with ``phi(q).phi(k) = 1 + q.k/sqrt(f) + (q.k)^2/(2f)``."""
    f = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (f * f,))
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    return jnp.concatenate(
        [ones, x / jnp.asarray(f ** 0.25, x.dtype), x2 / jnp.asarray(math.sqrt(2.0 * f), x.dtype)],
        axis=-1)


def based_quadratic(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = 1e-12, *,
                    causal: bool = True) -> jax.Array:
    """Taylor linear attention, quadratic ("parallel") view: ``A_ij = phi(q_i).phi(k_j)`` (for
    ``j <= i`` when causal), rows normalised.

    ``q, k [..., L, f]``, ``v [..., L, Dv]`` (leading dims: batch, heads) -> ``[..., L, Dv]``.
    """
    fq, fk = taylor_feature_map(q), taylor_feature_map(k)
    a = jnp.einsum("...if,...jf->...ij", fq, fk)  # [..., L, L]
    if causal:
        length = q.shape[-2]
        a = jnp.where(jnp.tril(jnp.ones((length, length), jnp.bool_)), a, 0.0)
    num = jnp.einsum("...ij,...jd->...id", a, v)
    return num / (jnp.sum(a, axis=-1, keepdims=True) + jnp.asarray(eps, a.dtype))


def based_linear(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = 1e-12, *,
                 causal: bool = True) -> jax.Array:
    """The same map in the linear ("recurrent") view: prefix sums (total sums when not causal)
    of ``phi(k_j) v_j^T`` and of ``phi(k_j)``; memory ``O(L F Dv)``, no ``L x L`` matrix. Equal
    to :func:`based_quadratic` up to rounding. Shapes as there."""
    fq, fk = taylor_feature_map(q), taylor_feature_map(k)
    kv = fk[..., :, None] * v[..., None, :]  # [..., L, F, Dv]
    if causal:
        kv, ksum = jnp.cumsum(kv, axis=-3), jnp.cumsum(fk, axis=-2)  # [..., L, F(, Dv)]
    else:
        kv = jnp.sum(kv, axis=-3, keepdims=True)
        ksum = jnp.sum(fk, axis=-2, keepdims=True)
    num = jnp.einsum("...lf,...lfd->...ld", fq, jnp.broadcast_to(kv, fq.shape + v.shape[-1:]))
    den = jnp.einsum("...lf,...lf->...l", fq, jnp.broadcast_to(ksum, fq.shape))[..., None]
    return num / (den + jnp.asarray(eps, den.dtype))


class BasedLinearAttention(nnx.Module):
    """Based linear attention mixer (token mixer protocol; self-mixing, causal or not).

    Args:
      dim: features ``D`` (divisible by ``num_heads``).
      num_heads: heads; q/k get ``feature_dim`` features per head, v ``D / num_heads``.
      feature_dim: q/k features per head before the Taylor map (``1 + f + f^2`` after).
      view: ``"quadratic"`` (train) or ``"linear"`` (recurrent); the same function.
      causal: attend to ``j <= i`` only.
      out_std: std of the output projection's init.

    Call: ``x [B, L, D]`` -> ``[B, L, D]``.
    """

    patterns = frozenset({"self", "causal_self"})

    def __init__(self, dim: int, *, num_heads: int = 1, feature_dim: int = 8,
                 view: str = "quadratic", causal: bool = True, out_std: float = 0.02,
                 rngs: nnx.Rngs):
        if view not in ("quadratic", "linear"):
            raise ValueError(f"view must be 'quadratic' or 'linear', got {view!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.view, self.causal, self.num_heads = view, causal, num_heads
        self.proj_q = normal_linear(dim, feature_dim * num_heads, rngs, bias=False)
        self.proj_k = normal_linear(dim, feature_dim * num_heads, rngs, bias=False)
        self.proj_v = normal_linear(dim, dim, rngs, bias=False)
        self.proj_o = normal_linear(dim, dim, rngs, bias=False, std=out_std)

    def _heads(self, x):  # [B, L, N * f] -> [B, N, L, f]
        b, length, _ = x.shape
        return x.reshape(b, length, self.num_heads, -1).transpose(0, 2, 1, 3)

    def __call__(self, x, *, context=None, mask=None, deterministic=None, rngs=None):
        mixer_lib.refuse_context(context, "based")
        mixer_lib.refuse_mask(mask, "based")
        q, k, v = (self._heads(apply_linear(p, x)) for p in (self.proj_q, self.proj_k, self.proj_v))
        fn = based_quadratic if self.view == "quadratic" else based_linear
        y = fn(q, k, v, causal=self.causal)  # [B, N, L, D / N]
        return apply_linear(self.proj_o, y.transpose(0, 2, 1, 3).reshape(x.shape))


def _make_based(*, features, num_heads, causal, rngs, feature_dim: int = 8,
                view: str = "quadratic", out_std: float = 0.02):
    return BasedLinearAttention(features, num_heads=num_heads, feature_dim=feature_dim,
                                view=view, causal=causal, out_std=out_std, rngs=rngs)


mixer_lib.register_mixer(
    "based", _make_based, patterns=BasedLinearAttention.patterns,
    paper="Simple linear attention language models balance the recall-throughput tradeoff "
          "(2024)")
