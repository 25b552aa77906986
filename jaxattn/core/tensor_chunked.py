"""Exact tensor attention by online softmax over key-pair tiles (``implementation="xla_chunked"``).

For each query tile of ``block_q`` rows, a scan visits every pair of key tiles ``(a, c)`` (each
``block_kv`` keys) and folds the ``[block_q, block_kv, block_kv]`` logits of that pair into a
running max, sum and output, exactly as flash attention does over key tiles
(:mod:`jaxattn.core.chunked`). Memory is ``O(block_q * block_kv^2)`` per (batch, head) plus the
inputs: linear in ``T`` and ``S``, never ``T * S^2``. Causal pairs of tiles that no query of the
tile can see (``a`` or ``c`` starts after the tile's last query) are skipped with ``lax.cond``.

The backward pass (``custom_vjp``) recomputes each tile's probabilities from the saved LSE.
With ``s = scale * sum_l q_l k1_al k2_cl``, ``P = exp(s - lse)``, ``dP_ac = sum_l dO_l v1_al v2_cl``
and ``dS = P (dP - sum_l dO_l O_l + dlse)`` (``dlse``: the LSE output's cotangent)::

    dq_l   = scale sum_{a,c} dS_ac k1_al k2_cl      dk1_al = scale sum_{i,c} dS_iac q_il k2_cl
    dk2_cl = scale sum_{i,a} dS_iac q_il k1_al      dv1_al = sum_{i,c} P_iac dO_il v2_cl
    dv2_cl = sum_{i,a} P_iac dO_il v1_al

Specification: :func:`jaxattn.core.tensor.tensor_attention_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["DEFAULT_BLOCK_KV", "DEFAULT_BLOCK_Q", "tensor_attention_chunked"]

DEFAULT_BLOCK_Q = 16
DEFAULT_BLOCK_KV = 32
_F32 = jnp.float32


def _pad_to(x, axis: int, multiple: int):
    pad = (-x.shape[axis]) % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _tile(x, start, size):
    """``x[:, start:start + size]`` for ``x [B, L, ...]``."""
    return lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _add_tile(x, start, update):
    return lax.dynamic_update_slice_in_dim(x, _tile(x, start, update.shape[1]) + update, start,
                                           axis=1)


class _Geometry:
    """Static tiling of one call: padded lengths, tile counts, and the pair list."""

    def __init__(self, t, s, block_q, block_kv, is_causal):
        self.t, self.s, self.is_causal = t, s, is_causal
        self.bq, self.bk = min(block_q, t), min(block_kv, s)
        self.nq, self.nk = -(-t // self.bq), -(-s // self.bk)
        a, c = jnp.meshgrid(jnp.arange(self.nk), jnp.arange(self.nk), indexing="ij")
        self.pairs = (a.reshape(-1) * self.bk, c.reshape(-1) * self.bk)  # tile starts, (0, 0) first

    def allowed(self, q0, a0, c0):
        """``[bq, bk, bk]``: visible pairs of this tile triple (padding and causality)."""
        i = q0 + jnp.arange(self.bq)[:, None, None]
        j1 = a0 + jnp.arange(self.bk)[None, :, None]
        j2 = c0 + jnp.arange(self.bk)[None, None, :]
        ok = (j1 < self.s) & (j2 < self.s)
        if self.is_causal:
            ok = ok & (j1 <= i) & (j2 <= i)
        return ok

    def live(self, q0, a0, c0):
        """Whether any query of the tile can see any pair of the tile pair."""
        if not self.is_causal:
            return jnp.bool_(True)
        last = q0 + self.bq - 1
        return (a0 <= last) & (c0 <= last)


def _logits(qt, k1t, k2t, scale):
    """``[B, K, G, bq, bk, bk]`` f32 logits from ``qt [B, bq, K, G, H]``, ``k*t [B, bk, K, H]``."""
    qk1 = jnp.einsum("bqkgl,bakl->bkgqal", qt, k1t)
    return scale * jnp.einsum("bkgqal,bckl->bkgqac", qk1, k2t)


def _forward(q, k1, k2, v1, v2, scale, geo: _Geometry):
    """Padded f32 inputs (``q [B, Tp, K, G, H]``) -> ``out [B, Tp, K, G, Hv]``,
    ``lse [B, K, G, Tp]``."""
    b, _, kh, g, _ = q.shape
    hv = v1.shape[-1]

    def query_tile(qi):
        q0 = qi * geo.bq
        qt = _tile(q, q0, geo.bq)

        def pair_step(carry, starts):
            a0, c0 = starts

            def fold(carry):
                m, lsum, acc = carry
                k1t, k2t = _tile(k1, a0, geo.bk), _tile(k2, c0, geo.bk)
                v1t, v2t = _tile(v1, a0, geo.bk), _tile(v2, c0, geo.bk)
                ok = geo.allowed(q0, a0, c0)
                s = jnp.where(ok, _logits(qt, k1t, k2t, scale), -jnp.inf)
                m_new = jnp.maximum(m, jnp.max(s, axis=(-2, -1)))
                shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.where(ok, jnp.exp(s - shift[..., None, None]), 0.0)
                alpha = jnp.exp(m - shift)
                pv2 = jnp.einsum("bkgqac,bckl->bkgqal", p, v2t)
                contrib = jnp.einsum("bkgqal,bakl->bkgql", pv2, v1t)
                return m_new, lsum * alpha + p.sum(axis=(-2, -1)), acc * alpha[..., None] + contrib

            return lax.cond(geo.live(q0, a0, c0), fold, lambda c: c, carry), None

        init = (jnp.full((b, kh, g, geo.bq), -jnp.inf, _F32), jnp.zeros((b, kh, g, geo.bq), _F32),
                jnp.zeros((b, kh, g, geo.bq, hv), _F32))
        (m, lsum, acc), _ = lax.scan(pair_step, init, geo.pairs)
        out = acc / jnp.where(lsum > 0, lsum, 1.0)[..., None]
        return jnp.moveaxis(out, 3, 1), m + jnp.log(lsum)  # [B, bq, K, G, Hv], [B, K, G, bq]

    outs, lses = lax.map(query_tile, jnp.arange(geo.nq))  # [nq, B, bq, ...], [nq, B, K, G, bq]
    out = jnp.moveaxis(outs, 0, 1).reshape(b, geo.nq * geo.bq, kh, g, hv)
    lse = jnp.moveaxis(lses, 0, -2).reshape(b, kh, g, geo.nq * geo.bq)
    return out, lse


def _backward(q, k1, k2, v1, v2, out, lse, dout, dlse, scale, geo: _Geometry):
    """Gradients of the padded f32 inputs (shapes as :func:`_forward`'s inputs)."""
    delta = jnp.einsum("btkgl,btkgl->bkgt", dout, out) - dlse  # [B, K, G, Tp]

    def query_tile(grads, qi):
        q0 = qi * geo.bq
        qt, dot = _tile(q, q0, geo.bq), _tile(dout, q0, geo.bq)
        lse_t = lax.dynamic_slice_in_dim(lse, q0, geo.bq, axis=3)
        delta_t = lax.dynamic_slice_in_dim(delta, q0, geo.bq, axis=3)

        def pair_step(carry, starts):
            a0, c0 = starts

            def accumulate(carry):
                dq, dk1, dk2, dv1, dv2 = carry
                k1t, k2t = _tile(k1, a0, geo.bk), _tile(k2, c0, geo.bk)
                v1t, v2t = _tile(v1, a0, geo.bk), _tile(v2, c0, geo.bk)
                ok = geo.allowed(q0, a0, c0)
                s = _logits(qt, k1t, k2t, scale)
                p = jnp.where(ok, jnp.exp(s - lse_t[..., None, None]), 0.0)
                dov1 = jnp.einsum("bqkgl,bakl->bkgqal", dot, v1t)
                dp = jnp.einsum("bkgqal,bckl->bkgqac", dov1, v2t)
                ds = p * (dp - delta_t[..., None, None])
                ds_k2 = jnp.einsum("bkgqac,bckl->bkgqal", ds, k2t)  # shared by dq and dk1
                ds_k1 = jnp.einsum("bkgqac,bakl->bkgqcl", ds, k1t)
                p_v2 = jnp.einsum("bkgqac,bckl->bkgqal", p, v2t)
                p_v1 = jnp.einsum("bkgqac,bakl->bkgqcl", p, v1t)
                dq = dq + scale * jnp.einsum("bkgqal,bakl->bqkgl", ds_k2, k1t)
                dk1 = _add_tile(dk1, a0, scale * jnp.einsum("bkgqal,bqkgl->bakl", ds_k2, qt))
                dk2 = _add_tile(dk2, c0, scale * jnp.einsum("bkgqcl,bqkgl->bckl", ds_k1, qt))
                dv1 = _add_tile(dv1, a0, jnp.einsum("bkgqal,bqkgl->bakl", p_v2, dot))
                dv2 = _add_tile(dv2, c0, jnp.einsum("bkgqcl,bqkgl->bckl", p_v1, dot))
                return dq, dk1, dk2, dv1, dv2

            return lax.cond(geo.live(q0, a0, c0), accumulate, lambda c: c, carry), None

        init = (jnp.zeros_like(qt),) + grads
        (dq, *grads), _ = lax.scan(pair_step, init, geo.pairs)
        return tuple(grads), dq

    zeros = tuple(jnp.zeros_like(x) for x in (k1, k2, v1, v2))
    (dk1, dk2, dv1, dv2), dqs = lax.scan(query_tile, zeros, jnp.arange(geo.nq))
    dq = jnp.moveaxis(dqs, 0, 1).reshape(q.shape)
    return dq, dk1, dk2, dv1, dv2


def _prepare(query, key1, key2, value1, value2, geo: _Geometry):
    b, t, n, h = query.shape
    kh = key1.shape[2]
    q = query.astype(_F32).reshape(b, t, kh, n // kh, h)
    q = _pad_to(q, 1, geo.bq)
    rest = tuple(_pad_to(x.astype(_F32), 1, geo.bk) for x in (key1, key2, value1, value2))
    return (q,) + rest


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _chunked(query, key1, key2, value1, value2, scale, is_causal, block_q, block_kv):
    out, lse, _ = _chunked_fwd_impl(query, key1, key2, value1, value2, scale, is_causal, block_q,
                                    block_kv)
    return out, lse


def _chunked_fwd_impl(query, key1, key2, value1, value2, scale, is_causal, block_q, block_kv):
    b, t, n, _ = query.shape
    geo = _Geometry(t, key1.shape[1], block_q, block_kv, is_causal)
    padded = _prepare(query, key1, key2, value1, value2, geo)
    out_p, lse_p = _forward(*padded, scale, geo)
    out = out_p[:, :t].reshape(b, t, n, -1).astype(query.dtype)
    lse = jnp.transpose(lse_p[..., :t].reshape(b, n, t), (0, 2, 1))
    return out, lse, (out_p, lse_p)


def _chunked_fwd(query, key1, key2, value1, value2, scale, is_causal, block_q, block_kv):
    out, lse, (out_p, lse_p) = _chunked_fwd_impl(query, key1, key2, value1, value2, scale,
                                                 is_causal, block_q, block_kv)
    return (out, lse), (query, key1, key2, value1, value2, out_p, lse_p)


def _chunked_bwd(scale, is_causal, block_q, block_kv, res, cotangents):
    query, key1, key2, value1, value2, out_p, lse_p = res
    dout, dlse = cotangents
    b, t, n, _ = query.shape
    s, kh = key1.shape[1], key1.shape[2]
    geo = _Geometry(t, s, block_q, block_kv, is_causal)
    padded = _prepare(query, key1, key2, value1, value2, geo)
    do = dout.astype(_F32).reshape(b, t, kh, n // kh, -1)
    do = _pad_to(do, 1, geo.bq)
    dl = jnp.transpose(dlse.astype(_F32), (0, 2, 1)).reshape(b, kh, n // kh, t)
    dl = _pad_to(dl, 3, geo.bq)
    dq, dk1, dk2, dv1, dv2 = _backward(*padded, out_p, lse_p, do, dl, scale, geo)
    dq = dq[:, :t].reshape(query.shape).astype(query.dtype)
    trim = lambda d, like: d[:, :s].astype(like.dtype)
    return (dq, trim(dk1, key1), trim(dk2, key2), trim(dv1, value1), trim(dv2, value2))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def tensor_attention_chunked(query, key1, key2, value1, value2, *, scale: float | None = None,
                             is_causal: bool = False, block_q: int = DEFAULT_BLOCK_Q,
                             block_kv: int = DEFAULT_BLOCK_KV, return_lse: bool = False):
    """Exact tensor attention, tiled (shapes and semantics of
    :func:`jaxattn.core.tensor.tensor_attention_reference`).

    Args:
      query: ``[B, T, N, H]``; key1, key2: ``[B, S, K, H]``; value1, value2: ``[B, S, K, Hv]``.
      scale: a Python number (static under the ``custom_vjp``), default ``1 / H``.
      is_causal: drop pairs with ``j1 > i`` or ``j2 > i`` (``T == S``).
      block_q, block_kv: tile sizes (clipped to ``T`` / ``S``; lengths are padded to them).
      return_lse: also return the f32 LSE ``[B, T, N]`` (differentiable too).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype (and the LSE).
    """
    scale = 1.0 / query.shape[-1] if scale is None else float(scale)
    out, lse = _chunked(query, key1, key2, value1, value2, scale, bool(is_causal), int(block_q),
                        int(block_kv))
    return (out, lse) if return_lse else out
