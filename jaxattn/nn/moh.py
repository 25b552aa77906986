"""MoH: Multi-Head Attention as Mixture-of-Head Attention (Jin, Zhu, Yuan, Yan, 2024).

Multi-head attention is a sum over heads, ``MHA(X)_t = sum_i H^i_t W_O^i``; MoH weights it per
token, ``MoH(X)_t = sum_i g_{t,i} H^i_t W_O^i`` (paper eq. 4), with heads ``1..h_s`` *shared*
(always on) and the ``h_r = h - h_s`` others *routed* (top-``K`` per token). The gates follow the
official code (SkyworkAI/MoH, ``MoH-ViT/attention.py``), which rescales the paper's eq. 5-6:

* shared: ``s = h_s * softmax(W_s x)`` (the constant 1 when ``h_s = 1``, no ``W_s``);
* routed: ``p = softmax(W_r x)``, ``m`` = top-``K`` one-hot, ``r = K * p m / sum(p m)``;
* two-stage: ``[a_1, a_2] = 2 * softmax(W_h x)``; gates ``[a_1 s, a_2 r]`` (only when both kinds
  exist; shared-only layers use ``s`` alone over all heads, routed-only layers ``r`` alone).

With a uniform router every active head weighs exactly 1 (MoH starts as MHA on its active
heads); the paper's unscaled gates (``alpha * softmax``) are not implemented. The load-balance
loss is the code's Switch form ``E^2 mean_i(P_i f_i)`` over the ``E = h_r`` routed heads (``K`` at
perfect balance), sown as the aux loss ``"balance"`` times ``balance_weight`` (0.01) in training.
The MoH-LLaMA3 parameter-free router (``router="query_norm"``) scores routed head ``i`` by
``||q_t^(i)||`` divided by the std of the scores across heads, takes the top-``K`` of their
softmax, and gates with ``{0, 1}`` forward and a straight-through gradient to the softmax;
shared heads weigh 1 and there is no balance loss. ``router="random"`` is the experiments'
control: each token keeps ``K`` routed heads drawn uniformly at random (the call's ``rngs``
``dropout`` stream, else a fixed key), weight 1, shared heads 1, no parameters or loss.

All heads are computed densely and unselected heads are multiplied by an exact 0 (no FLOP saving
in training, as in the code).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.nn.params import apply_linear

__all__ = ["MoHAttention", "moh_balance_loss", "moh_gates", "query_norm_gates", "top_k_mask"]

_EPS = 1e-6


def top_k_mask(probs: jax.Array, k: int) -> jax.Array:
    """``[..., E]`` -> float ``[..., E]``: 1 at the ``k`` largest entries (``lax.top_k``'s
    tie-breaking: the lower index wins), 0 elsewhere."""
    _, idx = jax.lax.top_k(probs, k)
    return jnp.sum(jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype), axis=-2)


def _routed_gates(routed_logits: jax.Array, top_k: int) -> jax.Array:
    p = jax.nn.softmax(routed_logits.astype(jnp.float32), axis=-1)
    kept = p * top_k_mask(p, top_k)
    return top_k * kept / jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), _EPS)


def moh_gates(shared_logits: jax.Array, routed_logits: jax.Array,
              stage_logits: jax.Array | None = None, *, top_k: int) -> jax.Array:
    """Per-token head gates of MoH, as the official code computes them.

    Args:
      shared_logits: ``[..., h_s]`` (``W_s x``; ``h_s`` may be 0; with ``h_s = 1`` the gate is 1).
      routed_logits: ``[..., h_r]`` (``W_r x``; ``h_r`` may be 0).
      stage_logits: ``[..., 2]`` (``W_h x``); required when ``h_s > 0`` and ``h_r > 0``.
      top_k: routed heads kept per token, ``1 <= top_k <= h_r`` (0 when ``h_r = 0``).

    Returns:
      ``[..., h_s + h_r]`` float32: ``[a_1 * h_s softmax(shared), a_2 * K renorm-top-K(routed)]``.
    """
    h_s, h_r = shared_logits.shape[-1], routed_logits.shape[-1]
    if h_s + h_r == 0:
        raise ValueError("moh_gates needs at least one head (shared_logits and routed_logits "
                         "both have 0 columns)")
    if not (h_r == 0 and top_k == 0) and not 1 <= top_k <= h_r:
        raise ValueError(f"top_k must be in [1, h_r={h_r}] (0 when there are no routed heads), "
                         f"got {top_k}")
    parts = []
    if h_s:
        parts.append(h_s * jax.nn.softmax(shared_logits.astype(jnp.float32), axis=-1))
    if h_r:
        parts.append(_routed_gates(routed_logits, top_k))
    if h_s and h_r:
        if stage_logits is None or stage_logits.shape[-1] != 2:
            raise ValueError("stage_logits [..., 2] are required with shared and routed heads, "
                             f"got {None if stage_logits is None else stage_logits.shape}")
        a = 2.0 * jax.nn.softmax(stage_logits.astype(jnp.float32), axis=-1)
        parts = [a[..., :1] * parts[0], a[..., 1:] * parts[1]]
    return jnp.concatenate(parts, axis=-1)


def moh_balance_loss(routed_logits: jax.Array, *, top_k: int,
                     valid: jax.Array | None = None) -> jax.Array:
    """The official code's load-balance loss ``E^2 * mean_i(P_i f_i)`` over ``E`` routed heads.

    Args:
      routed_logits: ``[T, E]`` router logits of ``T`` tokens.
      top_k: routed heads each token keeps.
      valid: optional bool ``[T]``; padding tokens (False) are excluded from ``P`` and ``f``.

    Returns:
      float32 scalar; ``P_i`` = mean routed softmax of head ``i``, ``f_i`` = fraction of tokens
      whose top-``K`` includes ``i``; equals ``top_k`` at perfect balance.
    """
    if routed_logits.ndim != 2:
        raise ValueError(f"routed_logits must be [T, E], got shape {routed_logits.shape}")
    e = routed_logits.shape[-1]
    p = jax.nn.softmax(routed_logits.astype(jnp.float32), axis=-1)  # [T, E]
    chosen = top_k_mask(p, top_k)
    w = jnp.ones(p.shape[:1], jnp.float32) if valid is None else valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w), 1.0)
    big_p = jnp.sum(p * w[:, None], axis=0) / count
    f = jnp.sum(chosen * w[:, None], axis=0) / count
    return jnp.asarray(e * e, jnp.float32) * jnp.mean(big_p * f)


def query_norm_gates(q_routed: jax.Array, top_k: int) -> jax.Array:
    """MoH-LLaMA3's parameter-free router: ``q_routed [..., h_r, H]`` -> gates ``[..., h_r]`` in
    {0, 1} forward, with the straight-through gradient of the softmax of the std-normalised
    query norms."""
    score = jnp.linalg.norm(q_routed.astype(jnp.float32), axis=-1)  # [..., h_r]
    std = jnp.std(score, axis=-1, keepdims=True)
    p = jax.nn.softmax(score / jnp.maximum(std, _EPS), axis=-1)
    hard = top_k_mask(p, top_k)
    return p + jax.lax.stop_gradient(hard - p)


class MoHAttention(nnx.Module):
    """Mixture-of-head attention (token mixer protocol; every pattern, gates are per query token).

    Args:
      dim: features ``D``; ``num_heads`` heads of ``D / num_heads``.
      shared_heads: ``h_s`` always-on heads (the first ones).
      top_k: routed heads kept per token (``0`` iff ``h_s = num_heads``).
      router: ``"learned"`` (``W_s, W_r, W_h``, bias-free), ``"query_norm"`` (MoH-LLaMA3) or
        ``"random"`` (a control: ``K`` random routed heads per token).
      balance_weight: weight of the sown balance loss (``beta = 0.01``).
      causal: causal attention.
      attention options: forwarded to :class:`MultiHeadAttention` (``num_kv_heads``,
        ``kernel_init``, ``rope_theta``, ...).

    Call: ``x [B, L, D]`` -> ``[B, L, D]``; :meth:`gates` gives ``[B, L, num_heads]``.
    """

    patterns = frozenset({"self", "causal_self", "cross", "causal_cross"})
    aux_loss_names = frozenset({"balance"})

    def __init__(self, dim: int, num_heads: int, *, shared_heads: int, top_k: int,
                 router: str = "learned", balance_weight: float = 0.01, causal: bool = False,
                 rngs: nnx.Rngs, **attention_options):
        routed = num_heads - shared_heads
        if not 0 <= shared_heads <= num_heads:
            raise ValueError(f"shared_heads={shared_heads} must be in [0, num_heads={num_heads}]")
        if not ((routed == 0 and top_k == 0) or 1 <= top_k <= routed):
            raise ValueError(f"top_k={top_k} must be in [1, {routed}] routed heads (0 when every "
                             "head is shared)")
        if router not in ("learned", "query_norm", "random"):
            raise ValueError(f"router must be 'learned', 'query_norm' or 'random', got {router!r}")
        self.attn = MultiHeadAttention(num_heads, dim, is_causal=causal, rngs=rngs,
                                       **attention_options)
        self.shared_heads, self.routed_heads, self.top_k = shared_heads, routed, top_k
        self.router, self.balance_weight = router, balance_weight
        lin = lambda n: nnx.Linear(dim, n, use_bias=False, rngs=rngs)
        learned = router == "learned"
        self.shared_router = lin(shared_heads) if learned and shared_heads > 1 else None
        self.routed_router = lin(routed) if learned and routed else None
        self.stage_router = lin(2) if learned and shared_heads and routed else None

    def _logits(self, layer, x, width):
        if layer is None:
            return jnp.zeros(x.shape[:-1] + (width,), jnp.float32)
        return apply_linear(layer, x).astype(jnp.float32)

    def gates(self, x: jax.Array, *, deterministic: bool | None = True,
              rngs: nnx.Rngs | None = None) -> jax.Array:
        """``x [B, L, D]`` -> float32 gates ``[B, L, num_heads]`` (sows the balance loss in
        training mode)."""
        if self.router == "query_norm":
            return self._query_norm_gates(x)
        if self.router == "random":
            return self._random_gates(x, rngs)
        routed_logits = self._logits(self.routed_router, x, self.routed_heads)
        g = moh_gates(self._logits(self.shared_router, x, self.shared_heads), routed_logits,
                      self._logits(self.stage_router, x, 2), top_k=self.top_k)
        if not deterministic and self.routed_heads:
            loss = moh_balance_loss(routed_logits.reshape(-1, self.routed_heads),
                                    top_k=self.top_k)
            mixer_lib.sow_aux_loss(self, "balance", self.balance_weight * loss)
        return g

    def _query_norm_gates(self, x):
        q = self.attn.project_query(x)  # [B, L, N, H]
        shared = jnp.ones(q.shape[:2] + (self.shared_heads,), jnp.float32)
        if not self.routed_heads:
            return shared
        routed = query_norm_gates(q[:, :, self.shared_heads:], self.top_k)
        return jnp.concatenate([shared, routed], axis=-1)

    def _random_gates(self, x, rngs):
        shared = jnp.ones(x.shape[:2] + (self.shared_heads,), jnp.float32)
        key = rngs.dropout() if rngs is not None else jax.random.key(0)
        noise = jax.random.uniform(key, x.shape[:2] + (self.routed_heads,))
        routed = top_k_mask(noise, self.top_k) if self.routed_heads else noise
        return jnp.concatenate([shared, routed], axis=-1)

    def __call__(self, x, *, context=None, mask=None, deterministic=None, rngs=None):
        g = self.gates(x, deterministic=deterministic, rngs=rngs)
        return self.attn(x, context=context, mask=mask, deterministic=deterministic, rngs=rngs,
                         head_weights=g.astype(x.dtype))


def _make_moh(*, features, num_heads, causal, rngs, shared_heads: int | None = None,
              top_k: int | None = None, router: str = "learned", balance_weight: float = 0.01,
              num_kv_heads: int | None = None, rope_theta: float | None = None):
    """Defaults: half the heads shared, half of the routed ones active per token."""
    shared = num_heads // 2 if shared_heads is None else shared_heads
    routed = num_heads - shared
    k = (max(1, routed // 2) if routed else 0) if top_k is None else top_k
    return MoHAttention(features, num_heads, shared_heads=shared, top_k=k, router=router,
                        balance_weight=balance_weight, causal=causal, num_kv_heads=num_kv_heads,
                        rope_theta=rope_theta, rngs=rngs)


mixer_lib.register_mixer(
    "moh", _make_moh, patterns=MoHAttention.patterns,
    paper="MoH: Multi-Head Attention as Mixture-of-Head Attention (2024)")
