"""Input-dependent sparse attention, "SigmoidLookups" (Arora, Eyuboglu et al., "Zoology", 2023,
section 5; HazyResearch/zoology ``mixers/selective.py``).

A gate ``s_i = sigmoid(w . x_i)`` decides which positions run attention. Training:
``y = Attn(x) * s + x`` with the auxiliary loss ``aux_weight * relu(mean(s) - k/L)``,
``k = ceil(sqrt(L))``, which pushes the gate towards ``k`` open positions. Evaluation: only the
selected positions get ``Attn(x)_i * s_i``; all others pass ``x`` through.

Causality of the selection. The reference selects the ``k`` positions with the largest ``s``
over the *whole* sequence, so a future token changes which earlier positions attend: it is not
causal as written (``selection="global"``, registered for the non-causal ``"self"`` pattern
only). The causal pattern uses ``selection="prefix"``: position ``t`` is selected iff fewer than
``k`` positions ``j <= t`` have a larger gate (``s_t`` is among the top ``k`` of ``s_0..s_t``),
which depends on the past only. The global rule computes attention for the ``k`` selected
queries only (``O(k L D)``); the prefix rule may select more than ``k`` positions, so it computes
every query's attention and gates it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn import masks
from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.nn.params import apply_linear, normal_linear

__all__ = ["SigmoidLookupAttention", "prefix_top_k"]


def prefix_top_k(s: jax.Array, k: int) -> jax.Array:
    """``s [B, L]`` -> bool ``[B, L]``: ``True`` where ``s_t`` is among the ``k`` largest of
    ``s_0..s_t`` (fewer than ``k`` earlier-or-equal positions have a strictly larger value)."""
    length = s.shape[1]
    earlier = jnp.tril(jnp.ones((length, length), jnp.bool_))  # [t, j]: j <= t
    larger = (s[:, None, :] > s[:, :, None]) & earlier  # [B, t, j]
    return jnp.sum(larger, axis=-1) < k


class SigmoidLookupAttention(nnx.Module):
    """SigmoidLookups mixer (token mixer protocol; self-mixing).

    Args:
      dim: features ``D``; the attention has ``num_heads`` heads (1 in Zoology).
      num_lookups: ``k`` (default ``ceil(sqrt(L))`` of the call).
      aux_weight: weight of the gate budget loss (sown as the aux loss ``"budget"``).
      causal: causal attention and the prefix selection rule; ``False``: bidirectional
        attention and the reference's global top-``k`` (see the module docstring).
      init_std, out_std: stds of the q/k/v and output kernels.

    Call: ``x [B, L, D]`` -> ``[B, L, D]``.
    """

    patterns = frozenset({"self", "causal_self"})
    aux_loss_names = frozenset({"budget"})  # sown in training mode

    def __init__(self, dim: int, *, num_heads: int = 1, num_lookups: int | None = None,
                 aux_weight: float = 1e-3, dropout: float = 0.0, causal: bool = True,
                 init_std: float = 0.02, out_std: float = 0.02, rngs: nnx.Rngs):
        self.gate = normal_linear(dim, 1, rngs, bias=False)
        self.attn = MultiHeadAttention(
            num_heads, dim, is_causal=False, dropout_rate=dropout, broadcast_dropout=False,
            kernel_init=nnx.initializers.normal(init_std),
            out_kernel_init=nnx.initializers.normal(out_std), rngs=rngs)
        self.num_lookups, self.aux_weight, self.causal = num_lookups, aux_weight, causal

    def _attend(self, x, rngs, deterministic):
        mask = masks.CausalMask() if self.causal else None
        return self.attn(x, mask=mask, deterministic=deterministic, rngs=rngs)

    def __call__(self, x, *, context=None, mask=None, deterministic=None, rngs=None):
        mixer_lib.refuse_context(context, "sigmoid_lookup")
        mixer_lib.refuse_mask(mask, "sigmoid_lookup")
        length = x.shape[1]
        k = min(self.num_lookups or math.ceil(math.sqrt(length)), length)
        s = jax.nn.sigmoid(apply_linear(self.gate, x))  # [B, L, 1]
        if not deterministic:
            excess = jnp.mean(s.astype(jnp.float32)) - jnp.asarray(k / length, jnp.float32)
            mixer_lib.sow_aux_loss(self, "budget", jnp.asarray(self.aux_weight, jnp.float32)
                                   * jax.nn.relu(excess))
            return self._attend(x, rngs, False) * s + x
        if self.causal:
            selected = prefix_top_k(s[..., 0], k)[..., None]  # [B, L, 1]
            return jnp.where(selected, self._attend(x, None, True) * s, 0.0).astype(x.dtype) + x
        return self._global_lookup(x, s, k)

    def _global_lookup(self, x, s, k):
        """The reference's evaluation path: attention for the ``k`` globally selected queries."""
        b, length, _ = x.shape
        _, idx = jax.lax.top_k(s[..., 0], k)  # [B, k] selected query positions
        xq = jnp.take_along_axis(x, idx[..., None], axis=1)  # [B, k, D]
        yq = self.attn(xq, x, deterministic=True)
        sq = jnp.take_along_axis(s, idx[..., None], axis=1)
        return x.at[jnp.arange(b)[:, None], idx].add(yq * sq)


def _make_sigmoid_lookup(*, features, num_heads, causal, rngs, num_lookups: int | None = None,
                         aux_weight: float = 1e-3, dropout: float = 0.0, init_std: float = 0.02,
                         out_std: float = 0.02):
    return SigmoidLookupAttention(features, num_heads=num_heads, num_lookups=num_lookups,
                                  aux_weight=aux_weight, dropout=dropout, causal=causal,
                                  init_std=init_std, out_std=out_std, rngs=rngs)


mixer_lib.register_mixer(
    "sigmoid_lookup", _make_sigmoid_lookup, patterns=SigmoidLookupAttention.patterns,
    paper="Zoology: Measuring and Improving Recall in Efficient Language Models (2023)")
