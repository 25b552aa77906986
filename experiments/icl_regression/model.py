"""The one-layer multi-head attention model of He, Pan, Chen, Yang (ICML 2025), its data and the
readout of its learned circuits.

Model (the paper's Eq. for ``TF_theta``; tokens ``z_i = [x_i; y_i]``, query ``z_q = [x_q; 0]``,
all in ``R^{d+1}``; ``Z = [z_1 .. z_L]``)::

    y_hat = sum_h O^h V^h Z softmax(Z^T K^hT Q^h z_q / sqrt(d+1))

with full ``Q^h, K^h, V^h in R^{(d+1)x(d+1)}`` per head (head_dim = d + 1: heads are not a
split of one width) and ``O^h in R^{1x(d+1)}``; no bias, no positional encoding. Only the query
position is read out and the query is not one of its own keys: the query token is the attention
query, the L context tokens are the keys and values (``T = 1``, ``S = L``).

It is a configuration of :class:`jaxattn.nn.MultiHeadAttention` (cross attention of the query
on the context, ``num_heads = H``, ``qkv_features = H (d+1)``, ``out_features = 1``,
``use_bias=False``), whose attention function is :func:`jaxattn.dot_product_attention` with
``scale = 1/sqrt(d+1)``. The linear-attention baselines swap only the attention function
(:func:`linear_attention`).

Parameter layout of the layer and the paper's matrices (column-vector convention)::

    query_kernel [d+1, H, d+1]:  Q^h = query_kernel[:, h, :].T      (q^h = Q^h z_q)
    key_kernel   [d+1, H, d+1]:  K^h = key_kernel[:, h, :].T
    value_kernel [d+1, H, d+1]:  V^h = value_kernel[:, h, :].T
    out_kernel   [H, d+1, 1]:    O^h = out_kernel[h, :, 0]          (a row vector)

    KQ^h = Q^hT K^h        logit of key i: z_q^T KQ^h z_i / sqrt(d+1)
    OV^h = (O^h V^h)^T     head h adds sum_i a_i <OV^h, z_i>
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import dot_product_attention
from jaxattn.nn import MultiHeadAttention

__all__ = [
    "ATTENTIONS",
    "ICLModel",
    "ICLModelConfig",
    "circuits",
    "linear_attention",
    "sample_prompts",
    "set_circuit_params",
    "torch_linear_uniform",
]

ATTENTIONS = ("softmax", "linear", "linear_mean")


@dataclasses.dataclass(frozen=True)
class ICLModelConfig:
    """``heads`` H; ``attention``: ``"softmax"`` (the paper's model), ``"linear"`` (no
    normalisation: the raw scaled logits times the values summed over the context, divided by
    the fixed training length so that the init has the softmax model's scale; at any other test
    length the output grows like ``L / L_train``, exactly as an unnormalised linear attention
    would) or ``"linear_mean"`` (divided by the actual context length ``L``: a mean over the
    context, the length-normalised linear self-attention of Zhang, Frei & Bartlett 2024)."""

    heads: int = 4
    attention: str = "softmax"


def torch_linear_uniform(fan_in_axes: tuple[int, ...]) -> Callable:
    """Initializer ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in`` the product of the
    shape's ``fan_in_axes``: PyTorch's ``nn.Linear`` default (kaiming-uniform with ``a=sqrt(5)``),
    which the paper's code uses. ``(key, shape, dtype) -> array``."""

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[a] for a in fan_in_axes)
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def linear_attention(query, key, value, bias=None, *, mask=None, is_causal=False,
                     scale: float | None = None, length_divisor: float | None = None):
    """Linear attention: ``sum_s (scale q_t . k_s) v_s / length_divisor`` (no softmax).

    Args:
      query: ``[B, T, N, H]``; key, value: ``[B, S, N, H]``.
      bias, mask, is_causal: accepted for :class:`jaxattn.nn.MultiHeadAttention`'s call
        signature; only ``None`` / ``False`` are supported.
      scale: logit scale, default ``H ** -0.5``.
      length_divisor: divide the sum over keys by this constant; ``None`` divides by ``S`` (a
        mean over the keys).

    Returns:
      ``[B, T, N, H]`` in the query's dtype.
    """
    if bias is not None or mask is not None or is_causal:
        raise ValueError("linear_attention supports no bias, mask or is_causal")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    divisor = key.shape[1] if length_divisor is None else length_divisor
    logits = jnp.einsum("btnh,bsnh->bnts", query, key)
    out = jnp.einsum("bnts,bsnh->btnh", logits, value)
    return out * jnp.asarray(scale / divisor, out.dtype)


class ICLModel(nnx.Module):
    """One attention layer reading out the query position.

    ``dim`` is ``d`` (tokens have ``d + 1`` entries); ``train_length`` is the fixed divisor of the
    ``"linear"`` variant (unused by the others).

    Call: ``context [B, L, d+1]`` (rows ``[x_i; y_i]``), ``query [B, d+1]`` (``[x_q; 0]``) ->
    predictions ``[B]``. Any ``L`` works (the model has no positional parameters).
    """

    def __init__(self, cfg: ICLModelConfig, *, dim: int, train_length: int, rngs: nnx.Rngs):
        if cfg.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {cfg.attention!r}")
        token_dim = dim + 1
        self.cfg, self.dim = cfg, dim
        scale = 1.0 / math.sqrt(token_dim)
        if cfg.attention == "softmax":
            def attention_fn(q, k, v, bias=None, **kw):
                return dot_product_attention(q, k, v, bias, scale=scale, **kw)
        else:
            divisor = float(train_length) if cfg.attention == "linear" else None

            def attention_fn(q, k, v, bias=None, **kw):
                return linear_attention(q, k, v, bias, scale=scale, length_divisor=divisor,
                                        **kw)
        self.attention = MultiHeadAttention(
            cfg.heads, token_dim, qkv_features=cfg.heads * token_dim, out_features=1,
            use_bias=False, kernel_init=torch_linear_uniform((0,)),
            out_kernel_init=torch_linear_uniform((0, 1)), attention_fn=attention_fn,
            rngs=rngs)

    def __call__(self, context: jax.Array, query: jax.Array) -> jax.Array:
        out = self.attention(query[:, None, :], context=context)  # [B, 1, 1]
        return out[:, 0, 0]


# ---- data -------------------------------------------------------------------------------------
def sample_prompts(key: jax.Array, count: int, *, dim: int, length: int, noise_var: float
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Draw ``count`` in-context regression prompts from ``key`` (on device).

    Per prompt: ``x_1..x_L, x_q ~ N(0, I_d)``, ``beta ~ N(0, I_d / d)``, ``eps ~ N(0, noise_var)``,
    ``y = beta^T x + eps`` (the query's target is noisy too, as in the paper's code).

    Args:
      key: a typed PRNG key (``jax.random.key``); the prompts are a function of it alone.
      count, dim, length, noise_var: ``B``, ``d``, ``L``, ``sigma^2``.

    Returns:
      ``context [B, L, d+1]`` (rows ``[x_i; y_i]``), ``query [B, d+1]`` (``[x_q; 0]``) and
      ``target [B]`` (``y_q``), float32.
    """
    kx, kb, ke = jax.random.split(key, 3)
    x = jax.random.normal(kx, (count, length + 1, dim), jnp.float32)
    beta = jax.random.normal(kb, (count, dim), jnp.float32) * (1.0 / math.sqrt(dim))
    eps = jax.random.normal(ke, (count, length + 1), jnp.float32) * math.sqrt(noise_var)
    y = jnp.einsum("bld,bd->bl", x, beta) + eps
    context = jnp.concatenate([x[:, :length], y[:, :length, None]], axis=2)
    query = jnp.concatenate([x[:, length], jnp.zeros((count, 1), jnp.float32)], axis=1)
    return context, query, y[:, length]


# ---- learned circuits -------------------------------------------------------------------------
def circuits(model: ICLModel) -> tuple[np.ndarray, np.ndarray]:
    """``(KQ [H, d+1, d+1], OV [H, d+1])``: per head ``KQ^h = Q^hT K^h`` (rows: query
    coordinates, columns: key coordinates; logit ``z_q^T KQ^h z_i / sqrt(d+1)``) and
    ``OV^h = (O^h V^h)^T``."""
    att = model.attention
    wq = np.asarray(att.query_kernel[...], np.float64)  # [d+1, H, d+1]: Q^h = wq[:, h, :].T
    wk = np.asarray(att.key_kernel[...], np.float64)
    wv = np.asarray(att.value_kernel[...], np.float64)
    wo = np.asarray(att.out_kernel[...], np.float64)[..., 0]  # [H, d+1]: O^h = wo[h]
    kq = np.einsum("ihe,jhe->hij", wq, wk)  # Q^hT K^h = wq[:, h, :] @ wk[:, h, :].T
    ov = np.einsum("ihe,he->hi", wv, wo)  # V^hT O^hT = wv[:, h, :] @ wo[h]
    return kq, ov


def set_circuit_params(model: ICLModel, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                       o: np.ndarray) -> None:
    """Overwrite the layer's parameters with the paper's per-head matrices ``q, k, v
    [H, d+1, d+1]`` (``Q^h, K^h, V^h``) and ``o [H, d+1]`` (``O^h``)."""
    att = model.attention
    att.query_kernel[...] = jnp.asarray(np.transpose(q, (2, 0, 1)), jnp.float32)
    att.key_kernel[...] = jnp.asarray(np.transpose(k, (2, 0, 1)), jnp.float32)
    att.value_kernel[...] = jnp.asarray(np.transpose(v, (2, 0, 1)), jnp.float32)
    att.out_kernel[...] = jnp.asarray(o[..., None], jnp.float32)
