"""BaseConv (Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient
Language Models", 2023, eq. 2): a gated convolution ``y = conv(u) * (W u + b) + u``.

Written against the reference implementation (HazyResearch/zoology, ``mixers/base_conv.py``):
the convolution is a depthwise causal short convolution (``kernel_size > 0``) or the implicit long
convolution of Hyena-style filters (``kernel_size = -1``). Pure functions first
(:func:`causal_short_conv`, :func:`fft_causal_conv`); :class:`BaseConv` owns the parameters.
Registered as the mixer ``"baseconv"`` (causal self-mixing only: a convolution looks backwards).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.params import apply_linear, normal_linear

__all__ = ["BaseConv", "ImplicitFilter", "causal_short_conv", "fft_causal_conv"]


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


class ImplicitFilter(nnx.Module):
    """Implicit long-convolution filter of the reference (``ImplicitLongConvolution``):
    ``h(t) = MLP([t, cos(2 pi f t / L), sin(2 pi f t / L)]) * exp(-t |delta_d|)`` with one band
    ``f = 1e-4``, a 3 -> 16 -> 16 -> 16 -> D MLP with ``sin(w x)`` activations (``w`` learned,
    initialised to 1) and a fixed exponential decay per channel. ``()`` -> ``[L, D]``."""

    def __init__(self, dim: int, length: int, *, order: int = 16, rngs: nnx.Rngs):
        t = np.linspace(0.0, 1.0, length)[:, None]  # [L, 1]
        w = 2.0 * math.pi * np.arange(length)[:, None] / length
        z = np.concatenate([t, np.cos(1e-4 * w), -np.sin(1e-4 * w)], axis=-1)  # exp(-i f w)
        self.z = nnx.Variable(jnp.asarray(z, jnp.float32))
        self.t = nnx.Variable(jnp.asarray(t, jnp.float32))
        self.l1 = normal_linear(3, order, rngs)
        self.l2 = normal_linear(order, order, rngs)
        self.l3 = normal_linear(order, order, rngs)
        self.l4 = normal_linear(order, dim, rngs, bias=False)
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
    """BaseConv mixer: ``y = conv(u) * (W u + b) + u`` (token mixer protocol, causal self).

    Args:
      dim: features ``D``.
      max_length: the longest sequence (the implicit filter is built for it; unused by the
        short convolution).
      kernel_size: ``> 0`` for a depthwise causal short convolution, ``-1`` for the implicit
        long convolution.

    Call: ``u [B, L, D]`` (``L <= max_length`` for the long convolution) -> ``[B, L, D]``.
    """

    patterns = frozenset({"causal_self"})

    def __init__(self, dim: int, max_length: int = 1024, *, kernel_size: int = 3,
                 rngs: nnx.Rngs):
        self.projection = normal_linear(dim, dim, rngs)
        self.kernel_size, self.max_length = kernel_size, max_length
        if kernel_size > 0:
            bound = 1.0 / math.sqrt(kernel_size)  # PyTorch's Conv1d default init
            init = nnx.initializers.uniform(2 * bound)
            self.conv_kernel = nnx.Param(init(rngs.params(), (kernel_size, dim)) - bound)
            self.conv_bias = nnx.Param(init(rngs.params(), (dim,)) - bound)
            self.filter = None
        elif kernel_size == -1:
            self.filter = ImplicitFilter(dim, max_length, rngs=rngs)
        else:
            raise ValueError(f"kernel_size must be > 0 or -1 (long conv), got {kernel_size}")

    def __call__(self, u, *, context=None, mask=None, deterministic=None, rngs=None):
        mixer_lib.refuse_context(context, "baseconv")
        mixer_lib.refuse_mask(mask, "baseconv")
        if self.filter is None:
            conv = causal_short_conv(u, self.conv_kernel[...].astype(u.dtype),
                                     self.conv_bias[...].astype(u.dtype))
        else:
            if u.shape[1] > self.max_length:
                raise ValueError(f"sequence length {u.shape[1]} exceeds the long convolution's "
                                 f"max_length={self.max_length}")
            conv = fft_causal_conv(u, self.filter()[: u.shape[1]])
        return conv * apply_linear(self.projection, u) + u


def _make_baseconv(*, features, num_heads, causal, rngs, kernel_size: int = 3,
                   max_length: int = 1024):
    del num_heads, causal  # one channel-wise filter per feature; causal by construction
    return BaseConv(features, max_length, kernel_size=kernel_size, rngs=rngs)


mixer_lib.register_mixer(
    "baseconv", _make_baseconv, patterns=BaseConv.patterns,
    paper="Zoology: Measuring and Improving Recall in Efficient Language Models (2023)")
