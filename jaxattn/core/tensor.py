"""Tensor (trilinear) attention: the reference and the polynomial method.

Alman & Song, "How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to
Kronecker Computation" (2023), the attention of their Definition 1.2 (the "tensor attention"
problem). With ``K = K1 (row-wise Kronecker) K2`` and ``V = V1 (row-wise Kronecker) V2``::

    A[i, (j1, j2)] = exp(scale * sum_l Q[i, l] K1[j1, l] K2[j2, l])      A in R^{n x n^2}
    D              = diag(A 1)
    Att            = D^-1 A V,   Att[i, l] = sum_{j1, j2} P[i, j1, j2] V1[j1, l] V2[j2, l]

with ``scale = 1 / d`` in the paper (the default here is ``1 / H``). The causal version used in
this library drops every pair with ``j1 > i`` or ``j2 > i`` (the pair ``(i, i)`` is always
visible, so no row is ever fully masked).

* :func:`tensor_attention_reference` enumerates every ``(j1, j2)`` pair: ``O(T S^2 H)`` work and
  ``[B, N, T, S, S]`` memory. It is the specification; never optimise it.
* :func:`tensor_attention_polynomial` is the paper's low-rank approximation (Section 4, the
  polynomial method): a degree-``g`` Taylor polynomial of ``exp`` factorises over the monomials
  of ``q * k1 * k2``, so ``A ~ U1 (U2 (row-wise Kronecker) U3)^T`` with ``r = C(H + g, g)``
  columns and ``A V ~ U1 [(U2^T V1) o (U3^T V2)]``: ``O(T r Hv)`` work, linear in the length.
  :func:`polynomial_error_bound` is the bound under which its weights stay positive.

Layout: ``query [B, T, N, H]``, ``key1, key2 [B, S, K, H]``, ``value1, value2 [B, S, K, Hv]``
with ``N % K == 0`` (query head ``n`` uses key/value head ``n // (N / K)``, as GQA).
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "causal_pairs",
    "monomial_exponents",
    "monomial_features",
    "min_polynomial_degree",
    "polynomial_error_bound",
    "polynomial_rank",
    "tensor_attention_polynomial",
    "tensor_attention_reference",
]

_F32 = jnp.float32


def _grouped(query, num_kv_heads):
    """``[B, T, N, H] -> [B, T, K, G, H]`` (query head ``n = k * G + g`` uses kv head ``k``)."""
    b, t, n, h = query.shape
    return query.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def causal_pairs(t: int, s: int, q_offset: int = 0, kv_offset: int = 0) -> jax.Array:
    """``allowed [t, s, s]``: key pair ``(j1, j2)`` is visible from query ``i`` iff
    ``j1 <= i`` and ``j2 <= i`` (positions shifted by the offsets)."""
    i = q_offset + jnp.arange(t)[:, None, None]
    j1 = kv_offset + jnp.arange(s)[None, :, None]
    j2 = kv_offset + jnp.arange(s)[None, None, :]
    return (j1 <= i) & (j2 <= i)


def tensor_attention_reference(query, key1, key2, value1, value2, *, scale: float | None = None,
                               is_causal: bool = False, return_lse: bool = False):
    """Exact tensor attention by enumerating every key pair (Alman & Song 2023, Def. 1.2).

    Args:
      query: ``[B, T, N, H]``; key1, key2: ``[B, S, K, H]``; value1, value2: ``[B, S, K, Hv]``.
      scale: logit scale, default ``1 / H`` (the paper's ``1 / d``).
      is_causal: drop pairs with ``j1 > i`` or ``j2 > i`` (needs ``T == S``).
      return_lse: also return the f32 log-sum-exp over pairs ``[B, T, N]``.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype (f32 accumulation), and the LSE with ``return_lse``.
    """
    b, t, n, h = query.shape
    s, k = key1.shape[1], key1.shape[2]
    scale = 1.0 / h if scale is None else scale
    q = _grouped(query, k).astype(_F32)
    k1, k2, v1, v2 = (x.astype(_F32) for x in (key1, key2, value1, value2))
    # logits[b, k, g, i, j1, j2] = scale * sum_l q[i, l] k1[j1, l] k2[j2, l]
    logits = scale * jnp.einsum("btkgl,bakl,bckl->bkgtac", q, k1, k2)
    if is_causal:
        logits = jnp.where(causal_pairs(t, s), logits, -jnp.inf)
    flat = logits.reshape(logits.shape[:4] + (s * s,))
    lse = jax.nn.logsumexp(flat, axis=-1)  # [B, K, G, T]
    probs = jnp.exp(logits - lse[..., None, None])
    # out[i, l] = sum_{j1, j2} P[i, j1, j2] v1[j1, l] v2[j2, l]
    out = jnp.einsum("bkgtac,bakl,bckl->btkgl", probs, v1, v2)
    out = out.reshape(b, t, n, -1).astype(query.dtype)
    if not return_lse:
        return out
    return out, jnp.transpose(lse.reshape(b, n, t), (0, 2, 1))


# ---- the polynomial method ---------------------------------------------------------------------


def polynomial_rank(head_dim: int, degree: int) -> int:
    """Number of monomials of degree ``<= degree`` in ``head_dim`` variables: ``C(H + g, g)``."""
    return math.comb(head_dim + degree, degree)


@functools.lru_cache(maxsize=64)
def monomial_exponents(head_dim: int, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Every monomial ``x^alpha`` with ``|alpha| <= degree`` in ``head_dim`` variables.

    Returns ``(index [r, degree], alpha [r, head_dim])``: row ``m`` of ``index`` lists the
    variables of monomial ``m`` with repetition, padded with ``head_dim`` (a constant-one column
    appended to the input), and ``alpha`` its exponent vector. Ordered by degree.
    """
    rows = [c + (head_dim,) * (degree - k)
            for k in range(degree + 1)
            for c in itertools.combinations_with_replacement(range(head_dim), k)]
    index = np.asarray(rows, np.int32).reshape(len(rows), degree)
    alpha = np.zeros((len(rows), head_dim + 1), np.int64)
    np.add.at(alpha, (np.repeat(np.arange(len(rows)), degree), index.reshape(-1)), 1)
    return index, alpha[:, :head_dim]


def monomial_features(x, degree: int, coefficients=None):
    """``x [..., H] -> [..., r]``: every monomial ``x^alpha`` (``|alpha| <= degree``), times
    ``coefficients [r]`` when given. f32."""
    h = x.shape[-1]
    index, _ = monomial_exponents(h, degree)
    ones = jnp.ones(x.shape[:-1] + (1,), _F32)
    ext = jnp.concatenate([x.astype(_F32), ones], axis=-1)  # [..., H + 1]
    feats = jnp.prod(ext[..., index], axis=-1) if degree else ones
    return feats if coefficients is None else feats * coefficients


def _taylor_coefficients(head_dim: int, degree: int, scale: float) -> np.ndarray:
    """``c_alpha = scale^|alpha| / alpha!`` so that ``sum_alpha c_alpha q^a k1^a k2^a`` is the
    degree-``g`` Taylor polynomial of ``exp(scale * <q, k1 o k2>)`` (multinomial theorem)."""
    _, alpha = monomial_exponents(head_dim, degree)
    fact = np.prod([[math.factorial(int(a)) for a in row] for row in alpha], axis=1)
    return (float(scale) ** alpha.sum(axis=1) / fact).astype(np.float32)


def polynomial_error_bound(entry_bound: float, head_dim: int, degree: int,
                           scale: float | None = None) -> float:
    """Relative error bound of every approximate weight: ``e^(2R) R^(g+1) / (g+1)!``.

    All entries of ``query``, ``key1``, ``key2`` in ``[-B, B]`` put every logit in ``[-R, R]``
    with ``R = |scale| * H * B^3`` (``= B^3`` at the default scale ``1 / H``, the paper's
    interval). Taylor's remainder is at most ``e^R R^(g+1) / (g+1)!`` and ``exp(x) >= e^-R``
    there. Below 1, every approximate weight is positive, so the normalised output is a convex
    combination within that relative error of the exact weights; at or above 1 it is not.
    """
    scale = 1.0 / head_dim if scale is None else scale
    r = abs(scale) * head_dim * float(entry_bound) ** 3
    log_eps = 2 * r + (degree + 1) * math.log(max(r, 1e-300)) - math.lgamma(degree + 2)
    return math.exp(min(log_eps, 700.0)) if r > 0 else 0.0


def min_polynomial_degree(entry_bound: float, head_dim: int, scale: float | None = None,
                          target: float = 1.0, max_degree: int = 64) -> int | None:
    """The smallest degree whose :func:`polynomial_error_bound` is below ``target`` (None if
    none up to ``max_degree``)."""
    for g in range(max_degree + 1):
        if polynomial_error_bound(entry_bound, head_dim, g, scale) < target:
            return g
    return None


def tensor_attention_polynomial(query, key1, key2, value1, value2, *, degree: int,
                                scale: float | None = None, is_causal: bool = False):
    """Approximate tensor attention by the polynomial method (Alman & Song 2023, Section 4).

    ``exp`` is replaced by its degree-``degree`` Taylor polynomial, which factorises as
    ``P(<q, k1 o k2>) = sum_alpha c_alpha q^alpha k1^alpha k2^alpha``, i.e. ``A ~ U1 (U2 (x) U3)^T``
    with ``U1 = c * Q^alpha``, ``U2 = K1^alpha``, ``U3 = K2^alpha`` (``r = C(H + g, g)`` columns).
    Then (the paper's identity ``(A (x) B)^T (C (x) D) = (A^T C) o (B^T D)``)::

        numerator   = U1 [(U2^T V1) o (U3^T V2)]      [T, Hv]
        denominator = U1 [(U2^T 1)  o (U3^T 1)]       [T]

    Causal: the same with prefix sums over ``j`` (``T == S``). Work ``O(T r Hv)``, memory
    ``O(S r Hv)`` (causal) or ``O(r Hv)`` per head. No guarantee outside
    :func:`polynomial_error_bound` ``< 1``; the dispatched ``implementation="polynomial"`` refuses
    such calls, this function does not (the error-vs-degree experiment needs both sides).

    Shapes as :func:`tensor_attention_reference`; returns ``[B, T, N, Hv]`` in the query dtype.
    """
    b, t, n, h = query.shape
    k = key1.shape[2]
    scale = 1.0 / h if scale is None else scale
    coef = jnp.asarray(_taylor_coefficients(h, degree, scale))
    u1 = monomial_features(_grouped(query, k), degree, coef)  # [B, T, K, G, r]
    u2 = monomial_features(key1, degree)  # [B, S, K, r]
    u3 = monomial_features(key2, degree)
    v1, v2 = value1.astype(_F32), value2.astype(_F32)
    if is_causal:
        m1 = jnp.cumsum(jnp.einsum("bskr,bskl->bskrl", u2, v1), axis=1)  # [B, S, K, r, Hv]
        m2 = jnp.cumsum(jnp.einsum("bskr,bskl->bskrl", u3, v2), axis=1)
        n1, n2 = jnp.cumsum(u2, axis=1), jnp.cumsum(u3, axis=1)  # [B, S, K, r]
        num = jnp.einsum("btkgr,btkrl->btkgl", u1, m1 * m2)
        den = jnp.einsum("btkgr,btkr->btkg", u1, n1 * n2)
    else:
        m1 = jnp.einsum("bskr,bskl->bkrl", u2, v1)  # U2^T V1  [B, K, r, Hv]
        m2 = jnp.einsum("bskr,bskl->bkrl", u3, v2)
        n1, n2 = u2.sum(axis=1), u3.sum(axis=1)  # U2^T 1  [B, K, r]
        num = jnp.einsum("btkgr,bkrl->btkgl", u1, m1 * m2)
        den = jnp.einsum("btkgr,bkr->btkg", u1, n1 * n2)
    out = num / den[..., None]
    return out.reshape(b, t, n, -1).astype(query.dtype)
