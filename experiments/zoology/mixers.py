"""Sequence mixers of Zoology (Arora, Eyuboglu et al., "Zoology: Measuring and Improving
Recall in Efficient Language Models", 2023), written against the reference implementation
(HazyResearch/zoology, ``zoology/mixers/``): softmax attention (jaxattn's MHA), BaseConv with a
short or an implicit long convolution, Based Taylor linear attention (Arora et al., "Simple
linear attention language models balance the recall-throughput tradeoff", 2024) and the
input-dependent sparse attention "SigmoidLookups".

Pure functions first (``causal_short_conv``, ``fft_causal_conv``, ``taylor_feature_map``,
``based_quadratic``, ``based_linear``); the NNX modules own parameters and call them.
All mixers map ``x [B, L, D] -> (y [B, L, D], aux_loss scalar)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import masks
from jaxattn.nn import MultiHeadAttention

__all__ = [
    "Attention",
    "BaseConv",
    "BasedLinearAttention",
    "SigmoidLookupAttention",
    "based_linear",
    "based_quadratic",
    "causal_short_conv",
    "fft_causal_conv",
    "make_mixer",
    "taylor_feature_map",
]

_STD = 0.02  # the reference initialises every Linear and Embedding with N(0, 0.02)


def _normal(std: float):
    return nnx.initializers.normal(std)


def _linear(din: int, dout: int, rngs: nnx.Rngs, *, bias: bool = True,
            std: float = _STD) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=_normal(std), rngs=rngs)


# ---- pure functions ---------------------------------------------------------------------------
def causal_short_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """Depthwise causal convolution: ``y[t] = bias + sum_j kernel[j] * x[t - (k-1) + j]``.

    ``x [B, L, D]``, ``kernel [k, D]``, ``bias [D]`` -> ``[B, L, D]`` (left zero padding ``k-1``,
    as ``nn.Conv1d(groups=D, padding=k-1)`` truncated to ``L`` in the reference).
    """
    k = kernel.shape[0]
    length = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
    y = sum(xp[:, j:j + length, :] * kernel[j] for j in range(k))
    return y + bias


def fft_causal_conv(u: jax.Array, filt: jax.Array) -> jax.Array:
    """Causal long convolution by FFT of size ``2L``, plus the skip ``+u`` of the reference's
    ``fft_conv``: ``y[t] = sum_{s<=t} filt[s] * u[t-s] + u[t]``.

    ``u [B, L, D]``, ``filt [L, D]`` -> ``[B, L, D]``.
    """
    length = u.shape[1]
    n = 2 * length
    u_f = jnp.fft.rfft(u.astype(jnp.float32), n=n, axis=1)
    k_f = jnp.fft.rfft(filt.astype(jnp.float32), n=n, axis=0)
    y = jnp.fft.irfft(u_f * k_f[None], n=n, axis=1)[:, :length]
    return (y + u.astype(jnp.float32)).astype(u.dtype)


def taylor_feature_map(x: jax.Array) -> jax.Array:
    """2nd-order Taylor features of ``exp(q.k / sqrt(f))`` (Based): ``[..., f]`` ->
    ``[..., 1 + f + f^2]`` with ``phi(q).phi(k) = 1 + q.k/sqrt(f) + (q.k)^2/(2f)``."""
    f = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (f * f,))
    ones = jnp.ones(x.shape[:-1] + (1,), x.dtype)
    return jnp.concatenate(
        [ones, x / jnp.asarray(f ** 0.25, x.dtype), x2 / jnp.asarray(math.sqrt(2.0 * f), x.dtype)],
        axis=-1)


def based_quadratic(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Causal Taylor linear attention, quadratic ("parallel") view: build ``A [B, L, L]`` with
    ``A_ij = phi(q_i).phi(k_j)`` for ``j <= i`` and normalise rows.

    ``q, k [B, L, f]``, ``v [B, L, D]`` -> ``[B, L, D]``.
    """
    fq, fk = taylor_feature_map(q), taylor_feature_map(k)
    a = jnp.einsum("bif,bjf->bij", fq, fk)  # [B, L, L]
    length = q.shape[1]
    a = jnp.where(jnp.tril(jnp.ones((length, length), jnp.bool_))[None], a, 0.0)
    num = jnp.einsum("bij,bjd->bid", a, v)
    return num / (jnp.sum(a, axis=-1, keepdims=True) + jnp.asarray(eps, a.dtype))


def based_linear(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = 1e-12) -> jax.Array:
    """The same map in the linear ("recurrent") view: prefix sums of ``phi(k_j) v_j^T`` and of
    ``phi(k_j)``, memory ``O(L f^2 D)`` but no ``L x L`` matrix. Equal to
    :func:`based_quadratic` up to rounding."""
    fq, fk = taylor_feature_map(q), taylor_feature_map(k)
    kv = jnp.cumsum(fk[..., :, None] * v[..., None, :], axis=1)  # [B, L, F, D]
    ksum = jnp.cumsum(fk, axis=1)  # [B, L, F]
    num = jnp.einsum("blf,blfd->bld", fq, kv)
    den = jnp.einsum("blf,blf->bl", fq, ksum)[..., None]
    return num / (den + jnp.asarray(eps, den.dtype))


# ---- modules ----------------------------------------------------------------------------------
class Attention(nnx.Module):
    """Causal softmax attention (1 head in the paper's sweep), ``jaxattn.nn.MultiHeadAttention``."""

    def __init__(self, dim: int, *, num_heads: int = 1, dropout: float = 0.0,
                 init_std: float = _STD, out_std: float = _STD,
                 rope_theta: float | None = None, rngs: nnx.Rngs):
        self.mha = MultiHeadAttention(
            num_heads, dim, is_causal=True, dropout_rate=dropout, kernel_init=_normal(init_std),
            out_kernel_init=_normal(out_std), rope_theta=rope_theta, rngs=rngs)

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        y = self.mha(x, deterministic=deterministic, rngs=rngs)
        return y, jnp.zeros((), jnp.float32)


class ImplicitFilter(nnx.Module):
    """Implicit long-convolution filter of the reference (``ImplicitLongConvolution``):
    ``h(t) = MLP([t, cos(2 pi f t / L), sin(2 pi f t / L)]) * exp(-t |delta_d|)`` with one band
    ``f = 1e-4``, a 3 -> 16 -> 16 -> 16 -> D MLP with ``sin(w x)`` activations (``w`` learned,
    initialised to 1) and a fixed exponential decay per channel."""

    def __init__(self, dim: int, length: int, *, order: int = 16, rngs: nnx.Rngs):
        t = np.linspace(0.0, 1.0, length)[:, None]  # [L, 1]
        w = 2.0 * math.pi * np.arange(length)[:, None] / length
        z = np.concatenate([t, np.cos(1e-4 * w), -np.sin(1e-4 * w)], axis=-1)  # exp(-i f w)
        self.z = nnx.Variable(jnp.asarray(z, jnp.float32))
        self.t = nnx.Variable(jnp.asarray(t, jnp.float32))
        self.l1 = _linear(3, order, rngs)
        self.l2 = _linear(order, order, rngs)
        self.l3 = _linear(order, order, rngs)
        self.l4 = _linear(order, dim, rngs, bias=False)
        self.freq = nnx.Param(jnp.ones((order,), jnp.float32))
        lo, hi = math.log(1e-2) / 1.5, math.log(1e-2) / 0.3
        self.deltas = nnx.Variable(jnp.linspace(lo, hi, dim, dtype=jnp.float32))

    def __call__(self) -> jax.Array:
        act = lambda h: jnp.sin(self.freq[...].astype(h.dtype) * h)
        h = act(self.l1(self.z[...]))
        h = act(self.l2(h))
        h = act(self.l3(h))
        h = self.l4(h)  # [L, D]
        decay = jnp.exp(-self.t[...] * jnp.abs(self.deltas[...]))
        return h * decay.astype(h.dtype)


class BaseConv(nnx.Module):
    """BaseConv: ``y = conv(u) * (W u + b) + u``, with a depthwise causal short convolution
    (``kernel_size > 0``) or the implicit long convolution (``kernel_size = -1``)."""

    def __init__(self, dim: int, length: int, *, kernel_size: int = 3, rngs: nnx.Rngs):
        self.projection = _linear(dim, dim, rngs)
        self.kernel_size = kernel_size
        if kernel_size > 0:
            bound = 1.0 / math.sqrt(kernel_size)  # PyTorch's Conv1d default init
            init = nnx.initializers.uniform(2 * bound)
            self.conv_kernel = nnx.Param(init(rngs.params(), (kernel_size, dim)) - bound)
            self.conv_bias = nnx.Param(init(rngs.params(), (dim,)) - bound)
            self.filter = None
        elif kernel_size == -1:
            self.filter = ImplicitFilter(dim, length, rngs=rngs)
        else:
            raise ValueError(f"kernel_size must be > 0 or -1 (long conv), got {kernel_size}")

    def __call__(self, u, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        if self.filter is None:
            conv = causal_short_conv(u, self.conv_kernel[...].astype(u.dtype),
                                     self.conv_bias[...].astype(u.dtype))
        else:
            conv = fft_causal_conv(u, self.filter()[: u.shape[1]])
        return conv * self.projection(u) + u, jnp.zeros((), jnp.float32)


class BasedLinearAttention(nnx.Module):
    """Based linear attention: q, k projected to ``feature_dim`` (8), v to ``D``, 1 head, Taylor
    feature map, causal; ``view`` picks the quadratic (train) or linear (recurrent) form."""

    def __init__(self, dim: int, *, feature_dim: int = 8, view: str = "quadratic",
                 out_std: float = _STD, rngs: nnx.Rngs):
        if view not in ("quadratic", "linear"):
            raise ValueError(f"view must be 'quadratic' or 'linear', got {view!r}")
        self.view = view
        self.proj_q = _linear(dim, feature_dim, rngs, bias=False)
        self.proj_k = _linear(dim, feature_dim, rngs, bias=False)
        self.proj_v = _linear(dim, dim, rngs, bias=False)
        self.proj_o = _linear(dim, dim, rngs, bias=False, std=out_std)

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        q, k, v = self.proj_q(x), self.proj_k(x), self.proj_v(x)
        fn = based_quadratic if self.view == "quadratic" else based_linear
        return self.proj_o(fn(q, k, v)), jnp.zeros((), jnp.float32)


class SigmoidLookupAttention(nnx.Module):
    """Input-dependent sparse attention ("SigmoidLookups", zoology ``mixers/selective.py``).

    ``s_i = sigmoid(w . x_i)``. Training: ``y = Attn(x) * s + x`` and the auxiliary loss
    ``aux_weight * relu(mean(s) - k/L)`` with ``k = ceil(sqrt(L))``. Evaluation: only the ``k``
    positions with the largest ``s`` get ``Attn(x) * s`` (the attention is computed for those
    ``k`` queries only, ``O(k L D)``); all others pass ``x`` through.
    """

    def __init__(self, dim: int, *, num_lookups: int | None = None, aux_weight: float = 1e-3,
                 dropout: float = 0.0, init_std: float = _STD, out_std: float = _STD,
                 rngs: nnx.Rngs):
        self.gate = _linear(dim, 1, rngs, bias=False)
        self.attn = MultiHeadAttention(
            1, dim, is_causal=False, dropout_rate=dropout, kernel_init=_normal(init_std),
            out_kernel_init=_normal(out_std), rngs=rngs)
        self.num_lookups, self.aux_weight = num_lookups, aux_weight

    def __call__(self, x, *, deterministic: bool = True, rngs: nnx.Rngs | None = None):
        b, length, _ = x.shape
        k = self.num_lookups or math.ceil(math.sqrt(length))
        s = jax.nn.sigmoid(self.gate(x))  # [B, L, 1]
        if not deterministic:
            y = self.attn(x, mask=masks.CausalMask(), deterministic=False, rngs=rngs)
            excess = jnp.mean(s.astype(jnp.float32)) - jnp.asarray(k / length, jnp.float32)
            aux = jnp.asarray(self.aux_weight, jnp.float32) * jax.nn.relu(excess)
            return y * s + x, aux
        _, idx = jax.lax.top_k(s[..., 0], k)  # [B, k] selected query positions
        xq = jnp.take_along_axis(x, idx[..., None], axis=1)  # [B, k, D]
        causal = idx[:, None, :, None] >= jnp.arange(length)[None, None, None, :]  # [B,1,k,L]
        yq = self.attn(xq, x, mask=masks.ArrayMask(causal), deterministic=True)
        sq = jnp.take_along_axis(s, idx[..., None], axis=1)
        y = x.at[jnp.arange(b)[:, None], idx].add(yq * sq)
        return y, jnp.zeros((), jnp.float32)


MIXERS = ("attention", "baseconv_short", "baseconv_long", "based", "based_linear", "sparse")


def make_mixer(name: str, dim: int, length: int, *, n_layers: int, dropout: float,
               rope_theta: float | None = None, attn_init_std: float | None = None,
               rngs: nnx.Rngs) -> nnx.Module:
    """Build a mixer by name (one of :data:`MIXERS`).

    ``rope_theta`` only affects ``attention``. ``attn_init_std`` is the std of the q/k/v
    kernels of the softmax attentions (``attention`` and the lookups of ``sparse``); None keeps
    the reference's 0.02. Output kernels always get ``0.02 / sqrt(2 n_layers)``.
    """
    out_std = _STD / math.sqrt(2 * n_layers)
    qkv_std = _STD if attn_init_std is None else attn_init_std
    if name == "attention":
        return Attention(dim, dropout=dropout, init_std=qkv_std, out_std=out_std,
                         rope_theta=rope_theta, rngs=rngs)
    if name == "baseconv_short":
        return BaseConv(dim, length, kernel_size=3, rngs=rngs)
    if name == "baseconv_long":
        return BaseConv(dim, length, kernel_size=-1, rngs=rngs)
    if name in ("based", "based_linear"):
        view = "linear" if name == "based_linear" else "quadratic"
        return BasedLinearAttention(dim, view=view, out_std=out_std, rngs=rngs)
    if name == "sparse":
        return SigmoidLookupAttention(dim, dropout=dropout, init_std=qkv_std, out_std=out_std,
                                      rngs=rngs)
    raise ValueError(f"unknown mixer {name!r}; choose from {MIXERS}")
