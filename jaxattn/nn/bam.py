"""BAM! Branch-Attend-Mix: parameter upcycling of dense models into a mixture of experts with
soft-routed attention experts (Zhang et al., "BAM! Just Like That: Simple and Efficient Parameter
Upcycling for Mixture of Experts", NeurIPS 2024). No official code is published; this follows the
paper's text (see ``../shared/papers/mechanisms.md`` §14 for what was read and what was not).

BAM branches ``E`` copies of a dense seed with the *parallel* block
``y = x + Attn(LN x) + FFN(LN x)``, continues pre-training each on one domain, and mixes them into
one MoE whose layer is (paper §3, the BAM layer)::

    y = x + sum_{e=1..E} g_e(x) MHA_e(LN x) + sum_{e in Top1(p(x))} p_e(x) FFN_e(LN x)

* attention experts, **soft routing**: ``g(x) = softmax(W_attn x)``; every token uses every
  attention expert. *Expert-KV*: expert ``e`` is the whole MHA (Q, K, V, O) of dense model ``e``;
  *Shared-KV*: Q and O per expert, one K/V shared by all experts (its initialisation is not stated
  in the paper: we use the average of the dense models' K/V - flagged);
* the paper's ablation routes attention top-``k`` instead (``top_k=1``): ``g = p * 1[top-k]``
  (the chosen probability, not renormalised, as the FFN gate), with the FFN's load-balance and
  z-losses on the attention router too (not stated in the paper - flagged);
* FFN experts: top-1 routing with the softmax probability as gate; load balance
  ``L_LB = E sum_i f_i P_i`` (``f_i`` fraction of tokens sent to expert ``i``, ``P_i`` mean router
  probability) and router z-loss ``L_z = mean_t (logsumexp_j z_tj)^2``, sown as ``"balance"``
  (times ``balance_weight``, default 0.01) and ``"router_z"`` (times ``z_weight``, 0.001); the
  paper does not give alpha / beta in the text read, these are Switch / ST-MoE's defaults.

With a one-hot router the mixture is exactly the chosen parent: every other expert is
multiplied by an exact 0 and added to the chosen output (``x + 0 == x``), so this module computes
the mixture as a sum over experts in order (:func:`bam_attention`, ``fused=False``, the default).
``fused=True`` folds the ``E`` experts into one attention call over ``E * N`` heads (Shared-KV is
then grouped-query attention with ``E * N / K`` query heads per K/V head); it agrees with the
reference to rounding. All experts are computed densely (no FLOP saving in top-k modes).

Layout: ``x [B, T, D]``, per-expert kernels with a leading expert axis: ``q_kernel [E, D, N, H]``,
``k_kernel, v_kernel [E_kv, D, K, H]`` (``E_kv = E`` Expert-KV, ``1`` Shared-KV),
``o_kernel [E, N, H, D_out]``; heads ``[B, T, N, H]`` as :func:`jaxattn.dot_product_attention`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxattn import masks as masks_lib
from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.attention import MultiHeadAttention, default_kernel_init
from jaxattn.nn.moh import top_k_mask
from jaxattn.nn.params import logical_param
from jaxattn.ops.attention import dot_product_attention

__all__ = [
    "BAMAttention",
    "BAMTopKAttention",
    "MoEFeedForward",
    "bam_attention",
    "bam_attention_reference",
    "load_balance_loss",
    "moe_ffn",
    "router_gates",
    "router_z_loss",
]


# ---- routing ----------------------------------------------------------------------------------
def router_gates(logits: jax.Array, top_k: int | None = None) -> jax.Array:
    """Expert gates from router logits ``[..., E]`` -> float32 ``[..., E]``.

    ``top_k=None``: soft routing ``softmax(logits)`` (BAM's attention experts). ``top_k=k``:
    ``softmax(logits) * 1[top-k]`` - the chosen experts' probabilities, not renormalised (the
    paper's FFN gate ``p_e(x)`` for ``e in Top1``; ties go to the lower index, ``lax.top_k``)."""
    e = logits.shape[-1]
    if top_k is not None and not 1 <= top_k <= e:
        raise ValueError(f"top_k must be None or in [1, E={e}], got {top_k}")
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return p if top_k is None else p * top_k_mask(p, top_k)


def load_balance_loss(logits: jax.Array, *, top_k: int = 1) -> jax.Array:
    """``L_LB = E * sum_i f_i P_i`` over router logits ``[T, E]`` (Switch Transformer's form;
    BAM §3): ``f_i`` = fraction of tokens whose top-``k`` includes expert ``i``, ``P_i`` = mean
    router probability of ``i``. Equals ``top_k`` at perfect balance. float32 scalar."""
    if logits.ndim != 2:
        raise ValueError(f"router logits must be [T, E], got shape {logits.shape}")
    e = logits.shape[-1]
    p = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    f = jnp.mean(top_k_mask(p, top_k), axis=0)
    return jnp.asarray(e, jnp.float32) * jnp.sum(f * jnp.mean(p, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """``L_z = (1/T) sum_t (logsumexp_j z_tj)^2`` over router logits ``[T, E]`` (ST-MoE's router
    z-loss, BAM §3). float32 scalar."""
    if logits.ndim != 2:
        raise ValueError(f"router logits must be [T, E], got shape {logits.shape}")
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(lse * lse)


# ---- attention experts: the reference and the computation --------------------------------------
def _check_attention_args(x, context, q_kernel, k_kernel, v_kernel, o_kernel, gates):
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, D], got shape {x.shape}")
    if q_kernel.ndim != 4 or o_kernel.ndim != 4:
        raise ValueError(f"q_kernel must be [E, D, N, H] and o_kernel [E, N, H, D_out], got "
                         f"{q_kernel.shape} and {o_kernel.shape}")
    e, d, n, h = q_kernel.shape
    if x.shape[-1] != d:
        raise ValueError(f"x's features {x.shape[-1]} != q_kernel's D = {d} (q_kernel "
                         f"{q_kernel.shape})")
    if o_kernel.shape[:3] != (e, n, h):
        raise ValueError(f"o_kernel {o_kernel.shape} must start with [E, N, H] = {(e, n, h)}")
    kv = context if context is not None else x
    if k_kernel.shape != v_kernel.shape or k_kernel.ndim != 4 or k_kernel.shape[0] not in (1, e) \
            or k_kernel.shape[1] != kv.shape[-1] or k_kernel.shape[3] != h \
            or n % k_kernel.shape[2]:
        raise ValueError(f"k_kernel and v_kernel must both be [E or 1, D_kv={kv.shape[-1]}, K, "
                         f"H={h}] with N={n} divisible by K; got {k_kernel.shape} and "
                         f"{v_kernel.shape}")
    if gates.shape != x.shape[:2] + (e,):
        raise ValueError(f"gates must be [B, T, E] = {x.shape[:2] + (e,)}, got {gates.shape}")
    if context is not None and (context.ndim != 3 or context.shape[0] != x.shape[0]):
        raise ValueError(f"context must be [B={x.shape[0]}, S, D_kv], got {context.shape}")


def _bias(b, i):
    return None if b is None else b[i]


def bam_attention_reference(x, q_kernel, k_kernel, v_kernel, o_kernel, gates, *, context=None,
                            q_bias=None, k_bias=None, v_bias=None, o_bias=None,
                            causal: bool = False, mask=None) -> jax.Array:
    """``sum_e g_e MHA_e(x)`` in plain einsums (the specification; float32 math).

    Args:
      x: ``[B, T, D]`` (the layer-normed token, as the paper's ``LN x``).
      q_kernel, o_kernel: ``[E, D, N, H]``, ``[E, N, H, D_out]``.
      k_kernel, v_kernel: ``[E_kv, D_kv, K, H]``, ``E_kv`` = ``E`` (Expert-KV) or 1 (Shared-KV).
      gates: ``[B, T, E]`` (e.g. :func:`router_gates`).
      context: optional ``[B, S, D_kv]`` keys/values source (cross attention).
      q_bias, k_bias, v_bias, o_bias: ``[E, N, H]``, ``[E_kv, K, H]`` (x2), ``[E, D_out]``.
      causal: key ``s`` visible to query ``t`` iff ``s <= t``.
      mask: boolean ``[T, S]`` (or a :class:`jaxattn.masks.Mask`), True = may attend; a fully
        masked query row gets zero attention output (its expert output is then ``o_bias``).

    Returns ``[B, T, D_out]`` in ``x.dtype``.
    """
    _check_attention_args(x, context, q_kernel, k_kernel, v_kernel, o_kernel, gates)
    f = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    xf, g = f(x), f(gates)
    cf = xf if context is None else f(context)
    t, s = xf.shape[1], cf.shape[1]
    allowed = jnp.ones((t, s), bool)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((t, s), bool))
    if mask is not None:
        allowed = allowed & jnp.asarray(masks_lib.as_mask(mask).to_array(t, s))
    e, _, n, h = q_kernel.shape
    groups = n // k_kernel.shape[2]
    y = 0.0
    for i in range(e):
        j = i if k_kernel.shape[0] == e else 0
        q = jnp.einsum("btd,dnh->btnh", xf, f(q_kernel[i]))
        k = jnp.einsum("bsd,dkh->bskh", cf, f(k_kernel[j]))
        v = jnp.einsum("bsd,dkh->bskh", cf, f(v_kernel[j]))
        if q_bias is not None:
            q, k, v = q + f(q_bias[i]), k + f(k_bias[j]), v + f(v_bias[j])
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)  # GQA
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(jnp.float32(h))
        logits = jnp.where(allowed, logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        w = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
        w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), 1e-30)  # empty rows -> 0
        heads = jnp.einsum("bnts,bsnh->btnh", w, v)
        out = jnp.einsum("btnh,nho->bto", heads, f(o_kernel[i]))
        if o_bias is not None:
            out = out + f(o_bias[i])
        y = y + g[..., i:i + 1] * out
    return y.astype(x.dtype)


def _project(x, kernel, bias):
    """``MultiHeadAttention``'s projection (same einsum, so a one-hot mixture is bit-exact)."""
    y = jnp.einsum("bld,dnh->blnh", x, kernel.astype(x.dtype))
    return y if bias is None else y + bias.astype(x.dtype)


def bam_attention(x, q_kernel, k_kernel, v_kernel, o_kernel, gates, *, context=None,
                  q_bias=None, k_bias=None, v_bias=None, o_bias=None, causal: bool = False,
                  mask=None, fused: bool = False,
                  attention_fn: Callable = dot_product_attention) -> jax.Array:
    """``sum_e g_e MHA_e(x)`` through :func:`jaxattn.dot_product_attention` (arguments as
    :func:`bam_attention_reference`; computed in ``x``'s dtype, parameters cast).

    ``fused=False``: one attention call per expert, outputs summed in expert order (a one-hot
    ``gates`` gives exactly that expert's :class:`~jaxattn.nn.MultiHeadAttention` output).
    ``fused=True``: one attention call over ``E * N`` heads; Expert-KV stacks the experts' K/V
    heads, Shared-KV orders the query heads ``[N, E]`` so that grouped-query attention maps each
    to its shared K/V head (query head ``n * E + e`` -> kv head ``n // (N / K)``).
    """
    _check_attention_args(x, context, q_kernel, k_kernel, v_kernel, o_kernel, gates)
    dtype = x.dtype
    kv_in = x if context is None else context.astype(dtype)
    mask = masks_lib.as_mask(mask)
    g = gates.astype(dtype)
    e, _, n, h = q_kernel.shape
    shared = k_kernel.shape[0] == 1 and e > 1
    if not fused:
        y = None
        for i in range(e):
            j = 0 if shared else i
            q = _project(x, q_kernel[i], _bias(q_bias, i))
            k = _project(kv_in, k_kernel[j], _bias(k_bias, j))
            v = _project(kv_in, v_kernel[j], _bias(v_bias, j))
            heads = attention_fn(q, k, v, None, mask=mask, is_causal=causal)
            out = jnp.einsum("btnh,nho->bto", heads, o_kernel[i].astype(dtype))
            if o_bias is not None:
                out = out + o_bias[i].astype(dtype)
            term = g[..., i:i + 1] * out
            y = term if y is None else y + term
        return y
    b, t = x.shape[:2]
    q = jnp.einsum("btd,ednh->btenh", x, q_kernel.astype(dtype))
    k = jnp.einsum("bsd,edkh->bsekh", kv_in, k_kernel.astype(dtype))
    v = jnp.einsum("bsd,edkh->bsekh", kv_in, v_kernel.astype(dtype))
    if q_bias is not None:
        q, k, v = q + q_bias.astype(dtype), k + k_bias.astype(dtype), v + v_bias.astype(dtype)
    s = k.shape[1]
    if shared:
        q = jnp.swapaxes(q, 2, 3).reshape(b, t, n * e, h)  # head index n * E + e
        k, v = k[:, :, 0], v[:, :, 0]
    else:
        q = q.reshape(b, t, e * n, h)  # head index e * N + n -> kv head e * K + n // (N / K)
        k, v = k.reshape(b, s, -1, h), v.reshape(b, s, -1, h)
    heads = attention_fn(q, k, v, None, mask=mask, is_causal=causal)
    heads = jnp.swapaxes(heads.reshape(b, t, n, e, h), 2, 3) if shared \
        else heads.reshape(b, t, e, n, h)
    y = jnp.einsum("btenh,bte,enho->bto", heads, g, o_kernel.astype(dtype))
    if o_bias is not None:
        y = y + jnp.einsum("bte,eo->bto", g, o_bias.astype(dtype))
    return y


# ---- the attention mixer ----------------------------------------------------------------------
def _stacked_init(init: Callable) -> Callable:
    """An initializer for ``[E, *shape]`` that draws each expert with ``init`` on ``shape`` (so
    fan-in/out are those of one expert's kernel)."""
    def f(key, shape, dtype):
        keys = jax.random.split(key, shape[0])
        return jnp.stack([init(k, shape[1:], dtype) for k in keys])
    return f


class BAMAttention(nnx.Module):
    """BAM's mixture of attention experts (token-mixer protocol; every pattern).

    Args:
      dim: features ``D``; ``num_heads`` heads of ``D / num_heads`` per expert.
      experts: ``E`` attention experts (``E = 1`` is plain multi-head attention).
      shared_kv: Q/O per expert, one K/V for all (BAM's Shared-KV); else Expert-KV.
      top_k: ``None`` (soft routing, BAM) or ``k`` (the paper's top-k attention ablation; use
        :class:`BAMTopKAttention`, which sows the router's aux losses).
      num_kv_heads: K/V heads ``K`` per expert (GQA), default ``num_heads``.
      use_bias: Q/K/V/O biases (as :class:`~jaxattn.nn.MultiHeadAttention`'s default).
      causal: causal attention. ``fused``: see :func:`bam_attention`.
      router_bias: a bias in the router ``W_attn`` (default False: not in the paper's formula).
      kernel_init: per-expert initializer of each kernel (random init; :meth:`from_dense` copies
        trained parents).

    Call: ``x [B, L, D]`` -> ``[B, L, D]``; :meth:`gates` gives float32 ``[B, L, E]``.
    """

    patterns = frozenset({"self", "causal_self", "cross", "causal_cross"})
    aux_loss_names: frozenset[str] = frozenset()

    def __init__(self, dim: int, num_heads: int, *, experts: int, shared_kv: bool = False,
                 top_k: int | None = None, num_kv_heads: int | None = None,
                 use_bias: bool = True, causal: bool = False, fused: bool = False,
                 router_bias: bool = False, balance_weight: float = 0.01,
                 z_weight: float = 0.001, kernel_init: Callable = default_kernel_init,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if experts < 1:
            raise ValueError(f"experts must be >= 1, got {experts}")
        if dim % num_heads or kv_heads < 1 or num_heads % kv_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}, and "
                             f"num_heads by num_kv_heads={kv_heads}")
        if top_k is not None and not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be None or in [1, experts={experts}], got {top_k}")
        h, e = dim // num_heads, experts
        e_kv = 1 if shared_kv else e
        self.dim, self.num_heads, self.num_kv_heads, self.head_dim = dim, num_heads, kv_heads, h
        self.experts, self.shared_kv, self.top_k = e, shared_kv, top_k
        self.causal, self.fused, self.use_bias = causal, fused, use_bias
        self.balance_weight, self.z_weight = balance_weight, z_weight
        init, zeros = _stacked_init(kernel_init), nnx.initializers.zeros_init()
        p = lambda i, shape, names: logical_param(rngs, i, shape, param_dtype, names)
        self.q_kernel = p(init, (e, dim, num_heads, h), ("experts", "embed", "heads", "head_dim"))
        self.k_kernel = p(init, (e_kv, dim, kv_heads, h),
                          ("experts", "embed", "kv_heads", "head_dim"))
        self.v_kernel = p(init, (e_kv, dim, kv_heads, h),
                          ("experts", "embed", "kv_heads", "head_dim"))
        self.o_kernel = p(init, (e, num_heads, h, dim), ("experts", "heads", "head_dim", "embed"))
        if use_bias:
            self.q_bias = p(zeros, (e, num_heads, h), ("experts", "heads", "head_dim"))
            self.k_bias = p(zeros, (e_kv, kv_heads, h), ("experts", "kv_heads", "head_dim"))
            self.v_bias = p(zeros, (e_kv, kv_heads, h), ("experts", "kv_heads", "head_dim"))
            self.o_bias = p(zeros, (e, dim), ("experts", "embed"))
        else:
            self.q_bias = self.k_bias = self.v_bias = self.o_bias = None
        self.router = nnx.Linear(dim, e, use_bias=router_bias, param_dtype=param_dtype,
                                 rngs=rngs)

    @classmethod
    def from_dense(cls, parents: Sequence[MultiHeadAttention], *, shared_kv: bool = False,
                   top_k: int | None = None, causal: bool | None = None, fused: bool = False,
                   rngs: nnx.Rngs, **options) -> BAMAttention:
        """Upcycle: expert ``e`` = parent ``e``'s Q/K/V/O (Expert-KV), or Q/O per parent and
        K/V = the parents' average (Shared-KV; not specified by the paper). The router is
        random (``rngs``). Parents must share shapes and ``use_bias``; ``top_k`` builds a
        :class:`BAMTopKAttention`."""
        if not parents:
            raise ValueError("from_dense needs at least one parent MultiHeadAttention")
        p0 = parents[0]
        for p in parents:
            if (p.query_kernel.shape, p.key_kernel.shape, p.use_bias) != \
                    (p0.query_kernel.shape, p0.key_kernel.shape, p0.use_bias):
                raise ValueError("parents must have the same shapes and use_bias")
            if p.rope_theta is not None or p.normalize_qk or p.sinks is not None:
                raise ValueError("from_dense supports plain MHA parents (no RoPE, QK-norm or "
                                 "sinks)")
        if p0.in_features != p0.out_features or p0.qkv_features != p0.in_features:
            raise ValueError("from_dense needs parents with qkv_features = out_features = D")
        klass = BAMTopKAttention if top_k is not None else cls
        bam = klass(p0.in_features, p0.num_heads, experts=len(parents), shared_kv=shared_kv,
                    top_k=top_k, num_kv_heads=p0.num_kv_heads, use_bias=p0.use_bias,
                    causal=p0.is_causal if causal is None else causal, fused=fused, rngs=rngs,
                    **options)
        stack = lambda name: jnp.stack([getattr(p, name)[...] for p in parents])
        kv = (lambda name: jnp.mean(stack(name), axis=0, keepdims=True)) if shared_kv else stack
        bam.q_kernel[...], bam.o_kernel[...] = stack("query_kernel"), stack("out_kernel")
        bam.k_kernel[...], bam.v_kernel[...] = kv("key_kernel"), kv("value_kernel")
        if p0.use_bias:
            bam.q_bias[...], bam.o_bias[...] = stack("query_bias"), stack("out_bias")
            bam.k_bias[...], bam.v_bias[...] = kv("key_bias"), kv("value_bias")
        return bam

    def router_logits(self, x: jax.Array) -> jax.Array:
        """``x [B, L, D]`` -> ``W_attn x`` float32 ``[B, L, E]`` (computed in ``x``'s dtype)."""
        y = x @ self.router.kernel[...].astype(x.dtype)
        if self.router.bias is not None:
            y = y + self.router.bias[...].astype(x.dtype)
        return y.astype(jnp.float32)

    def gates(self, x: jax.Array, *, deterministic: bool | None = True) -> jax.Array:
        """float32 ``[B, L, E]`` gates (sows the router losses in training mode when routed
        top-k by :class:`BAMTopKAttention`)."""
        return router_gates(self.router_logits(x), self.top_k)

    def __call__(self, x, *, context=None, mask=None, deterministic=None, rngs=None):
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, L, {self.dim}], got shape {x.shape}")
        g = self.gates(x, deterministic=deterministic)
        v = lambda a: None if a is None else a[...]
        return bam_attention(x, self.q_kernel[...], self.k_kernel[...], self.v_kernel[...],
                             self.o_kernel[...], g, context=context, q_bias=v(self.q_bias),
                             k_bias=v(self.k_bias), v_bias=v(self.v_bias),
                             o_bias=v(self.o_bias), causal=self.causal, mask=mask,
                             fused=self.fused)


class BAMTopKAttention(BAMAttention):
    """:class:`BAMAttention` with top-``k`` attention routing (the paper's ablation: top-1 /
    top-2 attention gives no gain over BTX). Sows ``"balance"`` and ``"router_z"`` for its router
    in training mode, as the FFN router (not stated in the paper for attention - flagged)."""

    aux_loss_names = frozenset({"balance", "router_z"})

    def gates(self, x, *, deterministic=True):
        logits = self.router_logits(x)
        if not deterministic:
            flat = logits.reshape(-1, self.experts)
            mixer_lib.sow_aux_loss(self, "balance", self.balance_weight
                                   * load_balance_loss(flat, top_k=self.top_k))
            mixer_lib.sow_aux_loss(self, "router_z", self.z_weight * router_z_loss(flat))
        return router_gates(logits, self.top_k)


def _make_bam_attention(*, features, num_heads, causal, rngs, experts: int = 4,
                        shared_kv: bool = False, top_k: int | None = None,
                        num_kv_heads: int | None = None, use_bias: bool = True,
                        fused: bool = False, router_bias: bool = False,
                        balance_weight: float = 0.01, z_weight: float = 0.001):
    """``"bam_attention"``: E (default 4, the paper's seed + 3 specialists) soft-routed MHA
    experts; ``top_k`` builds the top-k ablation."""
    klass = BAMAttention if top_k is None else BAMTopKAttention
    return klass(features, num_heads, experts=experts, shared_kv=shared_kv, top_k=top_k,
                 num_kv_heads=num_kv_heads, use_bias=use_bias, causal=causal, fused=fused,
                 router_bias=router_bias, balance_weight=balance_weight, z_weight=z_weight,
                 rngs=rngs)


mixer_lib.register_mixer(
    "bam_attention", _make_bam_attention, patterns=BAMAttention.patterns,
    paper="BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts "
          "(NeurIPS 2024)")


# ---- FFN experts ------------------------------------------------------------------------------
def _linear(x, kernel, bias):
    """``nnx.Linear``'s computation (``dot_general`` over the last axis, then the bias) in
    ``x``'s dtype, so an expert equals its dense parent's :class:`jaxattn.models.MLP` exactly."""
    y = jax.lax.dot_general(x, kernel.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())))
    return y + jnp.reshape(bias.astype(x.dtype), (1,) * (y.ndim - 1) + (-1,))


def moe_ffn(x, fc1_kernel, fc1_bias, fc2_kernel, fc2_bias, gates) -> jax.Array:
    """``sum_e g_e FFN_e(x)`` with ``FFN_e(x) = fc2_e(gelu(fc1_e(x)))`` (the paper's top-1 FFN
    experts when ``gates`` is :func:`router_gates` with ``top_k=1``).

    Args:
      x: ``[..., D]``; fc1: ``[E, D, F]``, ``[E, F]``; fc2: ``[E, F, D]``, ``[E, D]``;
      gates: ``[..., E]`` (every expert is computed; zero gates contribute an exact 0).

    Returns ``[..., D]`` in ``x.dtype``.
    """
    e = fc1_kernel.shape[0]
    if fc1_kernel.ndim != 3 or fc1_kernel.shape[1] != x.shape[-1] or \
            fc2_kernel.shape != (e, fc1_kernel.shape[2], x.shape[-1]):
        raise ValueError(f"fc1_kernel must be [E, D={x.shape[-1]}, F] and fc2_kernel [E, F, D]; "
                         f"got {fc1_kernel.shape} and {fc2_kernel.shape}")
    if gates.shape != x.shape[:-1] + (e,):
        raise ValueError(f"gates must be {x.shape[:-1] + (e,)}, got {gates.shape}")
    g = gates.astype(x.dtype)
    y = None
    for i in range(e):
        out = _linear(jax.nn.gelu(_linear(x, fc1_kernel[i], fc1_bias[i])), fc2_kernel[i],
                      fc2_bias[i])
        term = g[..., i:i + 1] * out
        y = term if y is None else y + term
    return y


class MoEFeedForward(nnx.Module):
    """Top-``k`` (default top-1) routed FFN experts of BTX / BAM (not a token mixer).

    Args:
      dim: features ``D``; ``hidden``: ``F`` per expert; ``experts``: ``E``.
      top_k: experts per token (gate = the chosen softmax probabilities).
      balance_weight, z_weight: weights of the sown ``"balance"`` (``E sum f P``) and
        ``"router_z"`` losses (training mode only).

    Call: ``x [..., D]`` -> ``[..., D]``.
    """

    aux_loss_names = frozenset({"balance", "router_z"})

    def __init__(self, dim: int, hidden: int, *, experts: int, top_k: int = 1,
                 balance_weight: float = 0.01, z_weight: float = 0.001,
                 router_bias: bool = False, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if experts < 1 or not 1 <= top_k <= experts:
            raise ValueError(f"need experts >= 1 and top_k in [1, experts]; got experts="
                             f"{experts}, top_k={top_k}")
        e = experts
        init, zeros = _stacked_init(default_kernel_init), nnx.initializers.zeros_init()
        p = lambda i, shape, names: logical_param(rngs, i, shape, param_dtype, names)
        self.fc1_kernel = p(init, (e, dim, hidden), ("experts", "embed", "mlp"))
        self.fc1_bias = p(zeros, (e, hidden), ("experts", "mlp"))
        self.fc2_kernel = p(init, (e, hidden, dim), ("experts", "mlp", "embed"))
        self.fc2_bias = p(zeros, (e, dim), ("experts", "embed"))
        self.router = nnx.Linear(dim, e, use_bias=router_bias, param_dtype=param_dtype,
                                 rngs=rngs)
        self.dim, self.experts, self.top_k = dim, e, top_k
        self.balance_weight, self.z_weight = balance_weight, z_weight

    @classmethod
    def from_dense(cls, parents: Sequence[Any], *, rngs: nnx.Rngs, **options) -> MoEFeedForward:
        """Upcycle: expert ``e`` = parent ``e``'s MLP (``fc1``/``fc2`` ``nnx.Linear``, e.g.
        :class:`jaxattn.models.MLP`); the router is random (``rngs``)."""
        if not parents:
            raise ValueError("from_dense needs at least one parent MLP")
        d, hidden = parents[0].fc1.kernel.shape
        for p in parents:
            if p.fc1.kernel.shape != (d, hidden) or p.fc1.bias is None:
                raise ValueError("parent MLPs must share fc1 [D, F] shapes and have biases")
        moe = cls(d, hidden, experts=len(parents), rngs=rngs, **options)
        stack = lambda f: jnp.stack([f(p)[...] for p in parents])
        moe.fc1_kernel[...] = stack(lambda p: p.fc1.kernel)
        moe.fc1_bias[...] = stack(lambda p: p.fc1.bias)
        moe.fc2_kernel[...] = stack(lambda p: p.fc2.kernel)
        moe.fc2_bias[...] = stack(lambda p: p.fc2.bias)
        return moe

    def router_logits(self, x):
        y = x @ self.router.kernel[...].astype(x.dtype)
        if self.router.bias is not None:
            y = y + self.router.bias[...].astype(x.dtype)
        return y.astype(jnp.float32)

    def __call__(self, x, *, deterministic: bool | None = None):
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must be [..., {self.dim}], got shape {x.shape}")
        logits = self.router_logits(x)
        if not deterministic:
            flat = logits.reshape(-1, self.experts)
            mixer_lib.sow_aux_loss(self, "balance", self.balance_weight
                                   * load_balance_loss(flat, top_k=self.top_k))
            mixer_lib.sow_aux_loss(self, "router_z", self.z_weight * router_z_loss(flat))
        return moe_ffn(x, self.fc1_kernel[...], self.fc1_bias[...], self.fc2_kernel[...],
                       self.fc2_bias[...], router_gates(logits, self.top_k))
