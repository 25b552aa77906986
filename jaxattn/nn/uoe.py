"""Union of Experts (Yang et al., "Union of Experts: Adapting Hierarchical Routing to Equivalently
Decomposed Transformer", 2025; official code YujiaoYang-work/UoE): selective multi-head attention
(SMHA, ``language_modeling/model/attention/SMHA_v3.py``) and the UoME MLP experts
(``language_modeling/model/mlp/UoME_DS.py``).

**Equivalent decomposition** (paper section 3.1). Multi-head attention is a sum of attention
experts, head ``e`` being the ``e``-th column slice of ``W_Q, W_K, W_V`` and row slice of
``W_O``::

    MHA(X) = sum_e softmax(X W_Q^e (X W_K^e)^T / sqrt(d_h)) X W_V^e W_O^e,

and an MLP is a sum of MLP experts, ``MLP(X) = sum_j act(X W_1^(j)) W_2^(j)`` (column blocks of
``W_1`` with the matching row blocks of ``W_2``). Summing every expert over every token is the
dense layer exactly.

**SMHA** (section 3.2, "patch-wise data selection"). A gate ``p_t = softmax(W_g x_t + b)`` over
the ``E = num_heads`` heads; each token keeps its top-``k`` heads (``k = E / 2`` in the code).
Head ``e`` then runs only on ``K_e``, the set of tokens routed to it: gather them (in the original
order), project with the head's own ``W_Q^e, W_K^e, W_V^e``, attend among them (causally in the
original order), project with ``W_O^e`` (+ the head's own output bias, as the code's
``RowParallelLinearWithMoE``) and scatter-add back::

    y_t = sum_{e : t in K_e} w_{t,e} (sum_{s in K_e, s <= t} a^e_{ts} v^e_s W_O^e + b_O^e),
    a^e_{t.} = softmax_{s in K_e, s <= t}(q^e_t . k^e_s / sqrt(d_h)).

Choices, code vs paper (the code's behaviour is the default):

* ``gate_weighting=False`` (code): ``w = 1``; the gate only picks indices and ``W_g`` receives no
  gradient from the task loss. ``gate_weighting=True`` (paper intent): ``w_{t,e} = gate_scale *
  p_{t,e} / sum_{e' kept} p_{t,e'}`` (normalised over the kept heads, as the long-range code;
  the language code normalises over the *batch* axis, which only matters for weighting, not for
  which tokens are kept; ``gate_scale`` is the code's ``capacity`` 1.0).
* ``selection="padded"`` (code): the code gathers ``n_max`` tokens for every head, ``n_max`` the
  largest per-head count; a head with fewer tokens is padded with zero-gate tokens that are
  computed like routed ones, so they are keys of the head's tokens and, with ``w = 1``, get the
  head's output added too. The code takes ``n_max`` over the whole batch and pads with whichever
  zero-gate tokens ``torch.topk`` returns first (unspecified among ties); we take ``n_max`` per
  sequence (otherwise batch rows would depend on each other) and pad with the unrouted tokens of
  the highest gate probability ``p_{t,e}`` (ties: the earlier position). Padding makes token
  ``t``'s output depend on the future (``n_max`` and the padding depend on later gates), so it is
  the default only of the non-causal ``"self"`` pattern. ``selection="exact"`` keeps exactly the
  routed tokens; it depends on each token's own gate only, so it is causal, and it is the default
  of ``"causal_self"`` (as ``sigmoid_lookup`` does with its global vs prefix rules). Under
  ``gate_weighting=True`` padded tokens have weight 0 and are also masked as keys, so they
  contribute exactly nothing: ``"padded"`` equals ``"exact"`` there.
* RoPE (``rope_theta``, default 10 000 as the code): ``rope_positions="compact"`` (code) rotates
  the ``i``-th gathered token of head ``e`` by position ``i`` (the rank inside the head's
  compacted sequence, padding included); ``"original"`` uses its position in the sequence.
* Static shapes under ``jit``: every head gathers ``capacity`` slots. ``capacity=None`` (default)
  is ``L``, which never drops a token, so the result is exactly the code's; ``capacity_factor=c``
  gives ``ceil(c * L * k / E)`` slots (at most ``L``) and a head with more tokens keeps its
  *earliest* ones (a causal rule; the code never drops). Unused slots are masked, so they cost
  compute but change nothing. The attention cost ``sum_e n_e^2 d_h`` is what a variable-length
  kernel would spend; :func:`attention_cost` reports it from the selection.
* Not implemented: Transformer-XL memories; the code's post-LN residual inside the layer (here
  the mixer returns the scatter-added sum and the backbone adds its own pre-norm residual).

An empty head (no token routed, nothing padded) outputs zeros (its rows are fully masked).

**UoME MLP** (:class:`UoMEMLP`): ``E`` MLP experts (column blocks of ``W_1``, row blocks of
``W_2``, each with its own biases); gate ``softmax(W_g x + b)``, top-``k`` experts per token,
then *expert choice*: each expert processes exactly ``ceil(token_fraction * L)`` tokens (0.5 in
the code), those with the largest masked gate (unrouted tokens last, ranked by their
probability), GELU (exact erf, ``torch.nn.GELU``), scatter-add, no gate weighting (the code's;
``gate_weighting=True`` multiplies by the kept-expert-normalised gate). The ranking runs over the
whole sequence, so it is not causal; the code also normalises the gate over the batch before
ranking, which couples batch rows: we rank the per-token masked gate instead.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.moh import top_k_mask
from jaxattn.nn.params import apply_linear, logical_param
from jaxattn.nn.rope import apply_rope
from jaxattn.ops.attention import dot_product_attention

__all__ = [
    "SMHAParams",
    "SelectiveMultiHeadAttention",
    "UoMEMLP",
    "attention_cost",
    "capacity_truncate",
    "padded_selection",
    "smha_gather",
    "smha_reference",
    "smha_route",
    "uome_mlp",
]

_EPS = 1e-6


class SMHAParams(NamedTuple):
    """Per-head (expert) parameters: ``wq, wk, wv [D, E, H]``, ``wo [E, H, D]``, biases
    ``bq, bk, bv [E, H]`` and the per-head output bias ``bo [E, D]``."""

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    bq: jax.Array
    bk: jax.Array
    bv: jax.Array
    bo: jax.Array


# ---- routing ----------------------------------------------------------------------------------
def smha_route(gate_logits: jax.Array, top_k: int, *, gate_scale: float = 1.0):
    """Per-token top-``k`` head routing.

    Args:
      gate_logits: ``[B, L, E]`` (``W_g x + b``).
      top_k: heads each token keeps, ``1 <= top_k <= E``.
      gate_scale: the code's ``capacity`` factor multiplying the normalised gates.

    Returns:
      ``(routed bool [B, L, E], probs f32 [B, L, E], gates f32 [B, L, E])``: the top-``k`` mask,
      ``softmax(gate_logits)`` and ``gate_scale * p m / sum_e(p m)`` (0 on unrouted heads).
    """
    e = gate_logits.shape[-1]
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k must be in [1, num_heads={e}], got {top_k}")
    p = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1)
    m = top_k_mask(p, top_k)
    kept = p * m
    gates = gate_scale * kept / (jnp.sum(kept, axis=-1, keepdims=True) + _EPS)
    return m > 0, p, gates


def _rank_desc(score: jax.Array) -> jax.Array:
    """``score [B, L, E]`` -> int32 rank of each token within its ``(b, e)`` column in
    descending order (0 = largest; ties: the earlier position ranks first)."""
    order = jnp.argsort(-score, axis=1, stable=True)
    return jnp.argsort(order, axis=1, stable=True).astype(jnp.int32)


def padded_selection(routed: jax.Array, probs: jax.Array) -> jax.Array:
    """The code's padding rule: every head gets ``n_max`` tokens (``n_max`` = the largest
    per-head count of the sequence), its routed ones plus the unrouted tokens of the highest
    ``probs`` (ties: earlier first). ``routed, probs [B, L, E]`` -> bool ``[B, L, E]``."""
    counts = jnp.sum(routed, axis=1, dtype=jnp.int32)  # [B, E]
    n_max = jnp.max(counts, axis=-1)  # [B]
    score = jnp.where(routed, 2.0, probs.astype(jnp.float32))  # routed tokens rank first
    return _rank_desc(score) < n_max[:, None, None]


def capacity_truncate(kept: jax.Array, capacity: int) -> jax.Array:
    """Keep at most ``capacity`` tokens per ``(b, head)``: the earliest ones (causal)."""
    return kept & (jnp.cumsum(kept, axis=1, dtype=jnp.int32) <= capacity)


def attention_cost(kept: jax.Array, head_dim: int) -> jax.Array:
    """``sum_e n_e^2 d_h`` per sequence (``kept [B, L, E]`` -> f32 ``[B]``); dense attention is
    ``E L^2 d_h``."""
    n = jnp.sum(kept, axis=1, dtype=jnp.float32)
    return jnp.sum(n * n, axis=-1) * head_dim


# ---- the computation --------------------------------------------------------------------------
def _check(x, kept, weights, params):
    if x.ndim != 3:
        raise ValueError(f"x must be [B, L, D], got shape {x.shape}")
    b, length, d = x.shape
    e, h = params.wq.shape[1], params.wq.shape[2]
    if params.wq.shape[0] != d:
        raise ValueError(f"wq must be [D={d}, E, H], got shape {params.wq.shape}")
    if kept.shape != (b, length, e):
        raise ValueError(f"kept must be [B, L, E] = {(b, length, e)}, got shape {kept.shape}")
    if weights is not None and weights.shape != kept.shape:
        raise ValueError(f"weights must be [B, L, E] = {kept.shape}, got shape {weights.shape}")
    if params.wo.shape != (e, h, d):
        raise ValueError(f"wo must be [E, H, D] = {(e, h, d)}, got shape {params.wo.shape}")


def _rope_per_head(z, positions, theta):
    """RoPE with a position per ``(token, head)``: ``z [B, T, E, H]``, ``positions [B, T, E]``."""
    one = lambda ze, pe: apply_rope(ze[:, :, None], pe, theta)[:, :, 0]
    return jax.vmap(one, in_axes=(2, 2), out_axes=2)(z, positions)


def _cast(a, dtype):
    return a.astype(dtype)


def smha_reference(x: jax.Array, kept: jax.Array, weights: jax.Array | None,
                   params: SMHAParams, *, is_causal: bool, rope_theta: float | None = 10_000.0,
                   rope_positions: str = "compact") -> jax.Array:
    """Selective multi-head attention as masked dense attention (the specification).

    ``y_t = sum_{e: kept[t, e]} w_{t,e} (softmax_{s: kept[s, e], s <= t}(q^e_t . k^e_s /
    sqrt(H)) v^e_s W_O^e + b_O^e)``, with RoPE at the compacted index ``#{s < t: kept[s, e]}``
    (``rope_positions="compact"``) or at ``t`` (``"original"``).

    Args:
      x: ``[B, L, D]``.
      kept: bool ``[B, L, E]``: the tokens head ``e`` processes (routed and padded).
      weights: ``[B, L, E]`` output weights ``w`` (None: 1).
      params: :class:`SMHAParams`.
      is_causal: attend only to ``s <= t``.

    Returns:
      ``[B, L, D]`` in ``x.dtype`` (the logits and softmax in f32).
    """
    _check(x, kept, weights, params)
    dt = x.dtype
    proj = lambda w, bias: (jnp.einsum("bld,deh->bleh", x, _cast(w, dt)) + _cast(bias, dt))
    q, k, v = proj(params.wq, params.bq), proj(params.wk, params.bk), proj(params.wv, params.bv)
    if rope_theta is not None:
        pos = _positions(kept, rope_positions)
        q, k = _rope_per_head(q, pos, rope_theta), _rope_per_head(k, pos, rope_theta)
    length = x.shape[1]
    logits = jnp.einsum("bteh,bseh->bets", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits / math.sqrt(q.shape[-1])
    km = jnp.transpose(kept, (0, 2, 1))  # [B, E, L]
    allowed = km[:, :, :, None] & km[:, :, None, :]
    if is_causal:
        allowed = allowed & jnp.tril(jnp.ones((length, length), jnp.bool_))
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    probs = jnp.where(allowed, jax.nn.softmax(logits, axis=-1), 0.0)
    o = jnp.einsum("bets,bseh->bteh", probs, v.astype(jnp.float32))  # [B, L, E, H]
    out = jnp.einsum("bteh,ehd->bted", o, params.wo.astype(jnp.float32))
    out = out + params.bo.astype(jnp.float32)
    w = kept.astype(jnp.float32)
    if weights is not None:
        w = w * weights.astype(jnp.float32)
    return jnp.einsum("bted,bte->btd", out, w).astype(dt)


def _positions(kept, rope_positions):
    if rope_positions == "compact":
        return jnp.cumsum(kept, axis=1, dtype=jnp.int32) - 1
    if rope_positions == "original":
        return jnp.broadcast_to(jnp.arange(kept.shape[1], dtype=jnp.int32)[None, :, None],
                                kept.shape)
    raise ValueError(f"rope_positions must be 'compact' or 'original', got {rope_positions!r}")


def smha_gather(x: jax.Array, kept: jax.Array, weights: jax.Array | None, params: SMHAParams,
                *, is_causal: bool, capacity: int, rope_theta: float | None = 10_000.0,
                rope_positions: str = "compact", dropout_rate: float = 0.0,
                dropout_rng: jax.Array | None = None,
                implementation: str | None = None) -> jax.Array:
    """SMHA by gather / compute / scatter-add, as the code: each head gathers ``capacity`` slots
    (its kept tokens first, in position order), projects, attends with
    :func:`jaxattn.dot_product_attention` over the valid slots, projects out and scatter-adds.

    Arguments as :func:`smha_reference`, plus ``capacity`` (static, ``1 <= capacity <= L``):
    slots per head. A head with more than ``capacity`` kept tokens keeps its earliest ones, i.e.
    the result equals ``smha_reference`` on ``capacity_truncate(kept, capacity)``. Dropout (on
    the attention probabilities) needs ``dropout_rng``.
    """
    _check(x, kept, weights, params)
    b, length, _ = x.shape
    if not 1 <= capacity <= length:
        raise ValueError(f"capacity must be in [1, L={length}], got {capacity}")
    dt = x.dtype
    pos = jnp.arange(length, dtype=jnp.int32)[None, :, None]
    order = jnp.argsort(jnp.where(kept, pos, pos + length), axis=1, stable=True)  # kept first
    idx = order[:, :capacity]  # [B, C, E]: token of each slot
    valid = jnp.take_along_axis(kept, idx, axis=1)  # [B, C, E]
    bi = jnp.arange(b)[:, None, None]
    xg = x[bi, idx]  # [B, C, E, D]
    proj = lambda w, bias: (jnp.einsum("bced,deh->bceh", xg, _cast(w, dt)) + _cast(bias, dt))
    q, k, v = proj(params.wq, params.bq), proj(params.wk, params.bk), proj(params.wv, params.bv)
    if rope_theta is not None:
        if rope_positions == "compact":
            slot_pos = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32)[None, :, None],
                                        idx.shape)
        elif rope_positions == "original":
            slot_pos = idx.astype(jnp.int32)
        else:
            raise ValueError("rope_positions must be 'compact' or 'original', got "
                             f"{rope_positions!r}")
        q, k = _rope_per_head(q, slot_pos, rope_theta), _rope_per_head(k, slot_pos, rope_theta)
    vm = jnp.transpose(valid, (0, 2, 1))  # [B, E, C]
    mask = vm[:, :, :, None] & vm[:, :, None, :]  # slots are in position order
    kw = dict(is_causal=is_causal)
    if implementation is not None:
        kw["implementation"] = implementation
    if dropout_rate > 0.0:
        kw.update(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    o = dot_product_attention(q, k, v, mask=mask, **kw)  # [B, C, E, H]
    out = jnp.einsum("bceh,ehd->bced", o, _cast(params.wo, dt)) + _cast(params.bo, dt)
    w = valid.astype(dt)
    if weights is not None:
        w = w * jnp.take_along_axis(weights, idx, axis=1).astype(dt)
    out = out * w[..., None]
    y = jnp.zeros(x.shape, dt).at[bi, idx].add(out)
    return y


# ---- the mixer --------------------------------------------------------------------------------
def _expert_init(in_axis, out_axis, batch_axis):
    """Xavier-normal per expert slice (the code's ``init.xavier_normal_``)."""
    return nnx.initializers.variance_scaling(1.0, "fan_avg", "normal", in_axis=in_axis,
                                             out_axis=out_axis, batch_axis=batch_axis)


class SelectiveMultiHeadAttention(nnx.Module):
    """SMHA token mixer (self patterns; see the module docstring for every choice).

    Args:
      dim: features ``D``; ``num_heads`` attention experts of ``D / num_heads``.
      top_k: heads each token keeps. Default ``num_heads // 2`` (the code's) from 4 heads on;
        with 2 or 3 heads the default is every head, so that the mixer conformance suite's
        2-head build routes trivially: hard top-``k`` routing is discontinuous in ``x``, and its
        central finite differences jump whenever a token's choice flips between ``x +- eps``
        (``tests/test_uoe.py`` checks routed causality and gradients with ``top_k=1``).
      gate_weighting: multiply each head's output by its normalised gate (paper intent);
        ``False`` = the code (the gate only selects).
      gate_scale: the code's ``capacity`` factor of the normalised gates (1.0).
      selection: ``"padded"`` (code; default when not causal) or ``"exact"`` (default when
        causal; padded selection would let the future change the past).
      rope_theta: RoPE base (None: no RoPE); ``rope_positions``: ``"compact"`` | ``"original"``.
      capacity / capacity_factor: static slots per head (default ``L``: exact).
      dropout_rate: on the attention probabilities.
      implementation: passed to :func:`jaxattn.dot_product_attention`.
      router: ``"learned"`` (the gate ``W_g``) or ``"random"`` (a control: each token keeps
        ``top_k`` heads drawn uniformly at random, from the call's ``rngs`` dropout stream, else
        a fixed key; no gate weighting).

    Call: ``x [B, L, D]`` -> ``[B, L, D]``; :meth:`selection` gives the kept mask and weights.
    """

    patterns = frozenset({"self", "causal_self"})
    aux_loss_names = frozenset()  # the code computes no auxiliary loss

    def __init__(self, dim: int, num_heads: int, *, top_k: int | None = None,
                 gate_weighting: bool = False, gate_scale: float = 1.0,
                 selection: str | None = None, rope_theta: float | None = 10_000.0,
                 rope_positions: str = "compact", capacity: int | None = None,
                 capacity_factor: float | None = None, dropout_rate: float = 0.0,
                 causal: bool = False, implementation: str | None = None,
                 router: str = "learned", param_dtype=jnp.float32, rngs: nnx.Rngs):
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if top_k is None:  # the code's E // 2; every head below 4 heads (see the docstring)
            top_k = num_heads // 2 if num_heads >= 4 else num_heads
        if not 1 <= top_k <= num_heads:
            raise ValueError(f"top_k={top_k} must be in [1, num_heads={num_heads}]")
        selection = ("exact" if causal else "padded") if selection is None else selection
        if selection not in ("padded", "exact"):
            raise ValueError(f"selection must be 'padded' or 'exact', got {selection!r}")
        if rope_positions not in ("compact", "original"):
            raise ValueError(f"rope_positions must be 'compact' or 'original', got "
                             f"{rope_positions!r}")
        if router not in ("learned", "random"):
            raise ValueError(f"router must be 'learned' or 'random', got {router!r}")
        if router == "random" and gate_weighting:
            raise ValueError("router='random' has no gate to weight with (gate_weighting=True)")
        h = dim // num_heads
        if rope_theta is not None and h % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {h}")
        if capacity is not None and capacity_factor is not None:
            raise ValueError("pass capacity or capacity_factor, not both")
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        e = num_heads
        self.num_heads, self.head_dim, self.top_k = e, h, top_k
        self.gate_weighting, self.gate_scale, self.selection_rule = (gate_weighting,
                                                                     gate_scale, selection)
        self.rope_theta, self.rope_positions, self.causal = rope_theta, rope_positions, causal
        self.capacity, self.capacity_factor = capacity, capacity_factor
        self.dropout_rate, self.implementation, self.router = (dropout_rate, implementation,
                                                                router)
        self.gate = nnx.Linear(dim, e, use_bias=True, param_dtype=param_dtype, rngs=rngs)
        qkv_init = _expert_init(0, 2, 1)
        names = ("embed", "heads", "head_dim")
        self.query_kernel = logical_param(rngs, qkv_init, (dim, e, h), param_dtype, names)
        self.key_kernel = logical_param(rngs, qkv_init, (dim, e, h), param_dtype, names)
        self.value_kernel = logical_param(rngs, qkv_init, (dim, e, h), param_dtype, names)
        self.out_kernel = logical_param(rngs, _expert_init(1, 2, 0), (e, h, dim), param_dtype,
                                        ("heads", "head_dim", "embed"))
        zeros = nnx.initializers.zeros_init()
        self.query_bias = logical_param(rngs, zeros, (e, h), param_dtype, ("heads", "head_dim"))
        self.key_bias = logical_param(rngs, zeros, (e, h), param_dtype, ("heads", "head_dim"))
        self.value_bias = logical_param(rngs, zeros, (e, h), param_dtype, ("heads", "head_dim"))
        self.out_bias = logical_param(rngs, zeros, (e, dim), param_dtype, ("heads", "embed"))
        self.rngs = rngs.fork() if dropout_rate > 0 else None

    def params(self) -> SMHAParams:
        return SMHAParams(self.query_kernel[...], self.key_kernel[...], self.value_kernel[...],
                          self.out_kernel[...], self.query_bias[...], self.key_bias[...],
                          self.value_bias[...], self.out_bias[...])

    def slots(self, length: int) -> int:
        """Static slots per head for a length-``length`` sequence."""
        if self.capacity is not None:
            return min(self.capacity, length)
        if self.capacity_factor is not None:
            c = math.ceil(self.capacity_factor * length * self.top_k / self.num_heads)
            return max(1, min(c, length))
        return length

    def selection(self, x: jax.Array, rngs: nnx.Rngs | None = None
                  ) -> tuple[jax.Array, jax.Array | None]:
        """``x [B, L, D]`` -> ``(kept bool [B, L, E], weights f32 [B, L, E] or None)``: the
        tokens each head processes (after padding and capacity) and their output weights.
        ``router="random"`` draws each token's heads uniformly (``rngs``' dropout stream, else a
        fixed key)."""
        if self.router == "random":
            key = rngs.dropout() if rngs is not None else jax.random.key(0)
            logits = jax.random.uniform(key, x.shape[:2] + (self.num_heads,), jnp.float32)
        else:
            logits = apply_linear(self.gate, x)
        routed, probs, gates = smha_route(logits, self.top_k, gate_scale=self.gate_scale)
        if self.gate_weighting or self.selection_rule == "exact":
            kept = routed  # padding has weight 0 under gate weighting: it is dropped entirely
        else:
            kept = padded_selection(routed, probs)
        kept = capacity_truncate(kept, self.slots(x.shape[1]))
        return kept, (gates if self.gate_weighting else None)

    def __call__(self, x, *, context=None, mask=None, deterministic=None, rngs=None):
        mixer_lib.refuse_context(context, "smha")
        mixer_lib.refuse_mask(mask, "smha")
        if x.ndim != 3 or x.shape[-1] != self.query_kernel.shape[0]:
            raise ValueError(f"x must be [B, L, {self.query_kernel.shape[0]}], got shape "
                             f"{x.shape}")
        kept, weights = self.selection(x, rngs)
        rate, key = 0.0, None
        if self.dropout_rate > 0 and not deterministic:
            source = rngs if rngs is not None else self.rngs
            rate, key = self.dropout_rate, source.dropout()
        return smha_gather(x, kept, weights, self.params(), is_causal=self.causal,
                           capacity=self.slots(x.shape[1]), rope_theta=self.rope_theta,
                           rope_positions=self.rope_positions, dropout_rate=rate,
                           dropout_rng=key, implementation=self.implementation)


def _make_smha(*, features, num_heads, causal, rngs, top_k: int | None = None,
               gate_weighting: bool = False, gate_scale: float = 1.0,
               selection: str | None = None, rope_theta: float | None = 10_000.0,
               rope_positions: str = "compact", capacity: int | None = None,
               capacity_factor: float | None = None, dropout_rate: float = 0.0,
               implementation: str | None = None, router: str = "learned"):
    """Defaults: the code's (top half of the heads per token from 4 heads on, no gate
    weighting, compact RoPE, padded selection when not causal, exact when causal)."""
    return SelectiveMultiHeadAttention(
        features, num_heads, top_k=top_k, gate_weighting=gate_weighting, gate_scale=gate_scale,
        selection=selection, rope_theta=rope_theta, rope_positions=rope_positions,
        capacity=capacity, capacity_factor=capacity_factor, dropout_rate=dropout_rate,
        causal=causal, implementation=implementation, router=router, rngs=rngs)


mixer_lib.register_mixer(
    "smha", _make_smha, patterns=SelectiveMultiHeadAttention.patterns,
    paper="Union of Experts: Adapting Hierarchical Routing to Equivalently Decomposed "
          "Transformer (2025)")


# ---- UoME MLP experts -------------------------------------------------------------------------
def uome_mlp(x: jax.Array, kept: jax.Array, weights: jax.Array | None, w1: jax.Array,
             b1: jax.Array, w2: jax.Array, b2: jax.Array, *,
             approximate_gelu: bool = False) -> jax.Array:
    """MLP experts on selected tokens: ``y_t = sum_{j: kept[t, j]} w_{t,j}
    (gelu(x_t W_1^(j) + b_1^(j)) W_2^(j) + b_2^(j))``.

    Args:
      x: ``[B, L, D]``; kept: bool ``[B, L, E]``; weights: ``[B, L, E]`` or None (1).
      w1: ``[E, D, F]``, b1 ``[E, F]``, w2 ``[E, F, D]``, b2 ``[E, D]`` (``F`` = hidden / E).

    Returns ``[B, L, D]``. Computed densely over experts and masked (the reference; with every
    token kept it is the dense MLP with ``W_1 = [W_1^(1) ... W_1^(E)]``).
    """
    if x.ndim != 3 or kept.shape != x.shape[:2] + (w1.shape[0],):
        raise ValueError(f"x must be [B, L, D] and kept [B, L, E={w1.shape[0]}], got shapes "
                         f"{x.shape} and {kept.shape}")
    if w1.shape[1] != x.shape[-1] or w2.shape != (w1.shape[0], w1.shape[2], x.shape[-1]):
        raise ValueError(f"w1 must be [E, D={x.shape[-1]}, F] and w2 [E, F, D], got shapes "
                         f"{w1.shape} and {w2.shape}")
    dt = x.dtype
    hid = jnp.einsum("bld,edf->blef", x, w1.astype(dt)) + b1.astype(dt)
    hid = jax.nn.gelu(hid, approximate=approximate_gelu)
    out = jnp.einsum("blef,efd->bled", hid, w2.astype(dt)) + b2.astype(dt)
    w = kept.astype(dt) if weights is None else kept.astype(dt) * weights.astype(dt)
    return jnp.einsum("bled,ble->bld", out, w)


class UoMEMLP(nnx.Module):
    """UoME MLP experts (``UoME_DS.py``'s ``U_MLP``): ``x [B, L, D] -> [B, L, D]``.

    Args:
      dim: ``D``; hidden: total hidden width (split into ``num_experts`` blocks).
      num_experts: ``E`` (4 in the spec); top_k: experts each token routes to (default
        ``E // 2``); token_fraction: share of the sequence each expert processes (0.5).
      gate_weighting: multiply by the kept-expert-normalised gate (False = the code).

    Not causal (expert choice over the sequence); not a token mixer.
    """

    def __init__(self, dim: int, hidden: int, *, num_experts: int = 4, top_k: int | None = None,
                 token_fraction: float = 0.5, gate_weighting: bool = False,
                 approximate_gelu: bool = False, rngs: nnx.Rngs):
        if hidden % num_experts:
            raise ValueError(f"hidden={hidden} must be divisible by num_experts={num_experts}")
        top_k = max(1, num_experts // 2) if top_k is None else top_k
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if not 0.0 < token_fraction <= 1.0:
            raise ValueError(f"token_fraction must lie in (0, 1], got {token_fraction}")
        e, f = num_experts, hidden // num_experts
        self.num_experts, self.top_k, self.token_fraction = e, top_k, token_fraction
        self.gate_weighting, self.approximate_gelu = gate_weighting, approximate_gelu
        self.gate = nnx.Linear(dim, e, use_bias=True, rngs=rngs)
        self.w1 = nnx.Param(_expert_init(1, 2, 0)(rngs.params(), (e, dim, f)))
        self.b1 = nnx.Param(jnp.zeros((e, f)))
        self.w2 = nnx.Param(_expert_init(1, 2, 0)(rngs.params(), (e, f, dim)))
        self.b2 = nnx.Param(jnp.zeros((e, dim)))

    def selection(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``(kept bool [B, L, E], weights or None)``: each expert keeps its
        ``ceil(token_fraction * L)`` tokens of largest masked gate."""
        routed, probs, gates = smha_route(apply_linear(self.gate, x), self.top_k)
        n = max(1, math.ceil(self.token_fraction * x.shape[1]))
        score = jnp.where(routed, 1.0 + probs, probs)  # routed first, by gate; then the rest
        kept = _rank_desc(score) < n
        return kept, ((gates * kept.astype(gates.dtype)) if self.gate_weighting else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        kept, weights = self.selection(x)
        return uome_mlp(x, kept, weights, self.w1[...], self.b1[...], self.w2[...],
                        self.b2[...], approximate_gelu=self.approximate_gelu)
