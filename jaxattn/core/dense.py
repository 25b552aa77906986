"""Reference scaled dot-product attention: the specification every fast path is tested against.

    logits = soft_cap(scale * Q K^T + bias)          (Vaswani et al., 2017; Gemma 2 soft-cap)
    P      = softmax(logits masked to -inf  [, sink])  (sinks: one extra logit per head)
    O      = dropout(P) V

It materialises ``[B, N, T, S]`` logits and accumulates in f32. Readability beats speed here;
never optimise this file.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxattn import masks as masks_lib
from jaxattn.core import dropout as dropout_lib
from jaxattn.core import softmax as sm
from jaxattn.core.score_mod import apply_score_mod

__all__ = ["attention_reference", "attention_probabilities"]


def _grouped(query, num_kv_heads):
    """[B, T, N, H] -> [B, T, K, G, H] (query head n = k * G + g uses kv head k)."""
    b, t, n, h = query.shape
    return query.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def _entry_indices(shape):
    """``(b, n, t, s)`` index arrays of a ``[B, N, T, S]`` array, shaped to broadcast
    (``[B, 1, 1, 1]``, ``[1, N, 1, 1]``, ...)."""
    return tuple(jnp.arange(d).reshape([-1 if i == j else 1 for j in range(4)])
                 for i, d in enumerate(shape))


def _logits(query, key, bias, mask, scale, logits_soft_cap, score_mod=None, score_mod_args=()):
    """f32 logits ``[B, N, T, S]`` with masked entries at -inf: ``scale * Q K^T + bias``, then
    ``score_mod`` (at every entry's indices), then the soft-cap, then the mask."""
    b, t, n, _ = query.shape
    s, k = key.shape[1], key.shape[2]
    qg = _grouped(query, k).astype(jnp.float32)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, key.astype(jnp.float32))
    logits = logits.reshape(b, n, t, s) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if score_mod is not None:
        logits = apply_score_mod(score_mod, logits, *_entry_indices(logits.shape),
                                 score_mod_args)
    logits = sm.soft_cap(logits, logits_soft_cap)
    mask = masks_lib.as_mask(mask)
    if mask is not None:
        allowed = mask.to_array(t, s)
        logits = jnp.where(allowed, logits, -jnp.inf)
    return logits


def attention_probabilities(
    query, key, bias=None, mask=None, *, scale=None, logits_soft_cap=None, sinks=None,
    score_mod=None, score_mod_args=(),
):
    """Attention probabilities ``P`` (f32 ``[B, N, T, S]``) and the natural-log LSE ``[B, T, N]``.

    Rows with no visible key are all zeros and have ``lse = -inf``. With ``sinks`` the
    probabilities sum to ``1 - p_sink`` (the sink absorbs the rest).
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = _logits(query, key, bias, mask, scale, logits_soft_cap, score_mod,
                     score_mod_args)  # [B, N, T, S]
    m = sm.safe_max(logits, axis=-1, keepdims=True)
    if sinks is not None:
        sink = sinks.astype(jnp.float32)[None, :, None, None]  # [1, N, 1, 1]
        m = jnp.maximum(m, sink)
    m = jax.lax.stop_gradient(m)  # softmax is shift-invariant; the shift needs no gradient
    e = jnp.exp(logits - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    probs = e / jnp.where(denom > 0, denom, 1.0)
    lse = (m + sm.safe_log(denom))[..., 0]  # [B, N, T]
    return probs, jnp.transpose(lse, (0, 2, 1))


def attention_reference(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    sinks=None,
    dropout_rate: float = 0.0,
    dropout_rng=None,
    return_lse: bool = False,
    dropout_index=None,
    score_mod=None,
    score_mod_args=(),
):
    """Plain attention. Shapes: ``query [B, T, N, H]``, ``key [B, S, K, H]``,
    ``value [B, S, K, Hv]`` with ``N % K == 0``; ``bias`` broadcastable to ``[B, N, T, S]``;
    ``mask`` a :class:`jaxattn.masks.Mask` or boolean array broadcastable to ``[B, N, T, S]``;
    ``sinks [N]``. ``dropout_index``: a :class:`jaxattn.core.dropout.DropoutIndex` when this
    call is a shard of a larger one (its seed replaces ``dropout_rng``). ``score_mod(score, b,
    h, q_idx, kv_idx, *score_mod_args)`` rewrites each scaled logit (after the bias, before the
    soft-cap and the mask; :mod:`jaxattn.core.score_mod`).

    Returns ``[B, T, N, Hv]`` in ``query.dtype`` (and the f32 LSE ``[B, T, N]`` with
    ``return_lse``). Arguments are not validated here; :func:`jaxattn.dot_product_attention`
    does that.
    """
    b, t, n, _ = query.shape
    k = key.shape[2]
    probs, lse = attention_probabilities(
        query, key, bias, mask, scale=scale, logits_soft_cap=logits_soft_cap, sinks=sinks,
        score_mod=score_mod, score_mod_args=score_mod_args,
    )
    if dropout_rate > 0.0:  # the position-hash mask every implementation shares
        bb, nn_, tt, ss = _entry_indices(probs.shape)
        seed = dropout_index if dropout_index is not None else \
            dropout_lib.dropout_seed(dropout_rng)
        keep = dropout_lib.keep_mask_of(seed, bb, nn_, tt, ss, dropout_rate, n)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    pg = probs.reshape(b, k, n // k, t, -1)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskh->btkgh", pg, value.astype(jnp.float32))
    out = out.reshape(b, t, n, value.shape[-1]).astype(query.dtype)
    return (out, lse) if return_lse else out
