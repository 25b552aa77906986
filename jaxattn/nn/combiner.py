"""Combiner (Ren, Dai, Dai, Chen, Yang, Leskovec, Schuurmans & Dai, "Combiner: Full Attention
Transformer with Sparse Computation Cost", NeurIPS 2021): full-support attention at sparse cost.

Attention is the conditional expectation ``A(x_i) = E_{p(j|i)}[v_j]`` (eq. 2). Combiner splits the
support ``Omega_i`` (``j <= i`` when causal) into a direct set ``Omega_i^0`` and regions
``Omega_i^1 .. Omega_i^{n_i}`` and assumes ``j`` independent of ``i`` given its region (eq. 6-8):

    A(x_i) = sum_{j in Omega_i^0} p~(j|i) v_j  +  sum_{r >= 1} p(Omega_i^r|i) s_r        (eq. 9)
    s_r    = sum_{j in Omega^r} softmax_j(q_{Omega^r} . k_j / sqrt(d)) v_j                 (eq. 10)

``p~(j|i) ∝ exp(q_i.k_j/sqrt(d))`` and ``p(Omega^r|i) ∝ exp(q_i.k_{Omega^r}/sqrt(d))`` share one
softmax; the region key ``k_{Omega^r}`` and span query ``q_{Omega^r}`` are max-pools over the
region (eq. 11; DeepSets ``max relu(W k_j)`` as an option). The span value ``s_r`` does not depend
on ``i``, so it is computed once per region. The implied distribution

    q(j|i) = p~(j|i) [j in Omega_i^0] + sum_r p(Omega_i^r|i) p(j|Omega^r) [j in Omega^r]

has full support and sums to one; :func:`effective_attention` materialises it and
``combiner_attention(q, k, v) == effective_attention(q, k) @ v`` (exact: ``s_r`` is linear in v).

Instantiations (paper section 4; the official JAX code, google-research ``combiner/jax/model/
layer.py``), ``L`` padded to a multiple of ``segment`` (padded keys are never visible):

* ``"fixed"`` (Combiner-Fixed, ``_SelfAttSqrtn``): direct = own segment (causal), regions = each
  earlier segment. ``O(L (s + L/s))``, ``O(L sqrt(L))`` at ``s = sqrt(L)``.
* ``"logsparse"`` (``_SelfAttLogn``): query ``i`` sees ``{i}`` and, at level ``l`` (block size
  ``2^l``), the block ``[i - i mod 2^l - 2^l, i - i mod 2^l)`` iff bit ``l`` of ``i`` is 1 (the
  dyadic decomposition of ``[0, i)``; level 0 is ``{i - 1}``). ``O(L log L)``; no segment.
* ``"axial"`` (Combiner-Axial-rowmajor, ``_SelfAttAxialRowmajor``): rows of ``segment``; direct
  = own row (causal), regions = each earlier row ``r``, whose summary *depends on the query's
  column c*: value = the non-causal row attention of ``q_{r,c}`` over row ``r``; key = the given
  ``summary_keys`` at ``(r, c)`` (the mixer's learned ``Dense(LN(x + Dense(rowout)))``, as in
  code) or, by default, the same row attention applied to the keys (a parameter-free stand-in).
* ``"mixture"`` (``_AxialMixtureAtt``, code: one joint softmax over the union of the vertical and
  horizontal plans; earlier-row positions are reached twice) and ``"mixture_avg"`` (paper eq. 12:
  the mean of the two separately normalised plans). Causal only. Groups for query ``(r, c)``:
  (1) column ``c`` rows ``< r``; (2) row ``r`` columns ``<= c`` (both direct); (3) for each
  column ``c' != c`` the summary of rows ``< r`` of ``c'`` (vertical plan); (4)/(5) for each
  row ``t < r`` the summary of its columns ``< c`` / ``> c`` (horizontal plan). Pools are
  prefix/suffix ``cummax`` (the JAX code; the TF twin uses sums).

Bidirectional (``causal=False``; paper appendix): direct = own segment / row in full, regions =
every other segment / row; logsparse mirrors the dyadic blocks onto the suffix. Mixture is causal
only. Scaling is the standard ``1/sqrt(H)`` everywhere (the code's pre-scaled query times
``sqrt(H)`` for the span attention nets out to it). Computation in float32, output in the input
dtype.

Registered mixers: ``"combiner_fixed"``, ``"combiner_logsparse"``, ``"combiner_axial"``,
``"combiner_mixture"`` (option ``mixture="joint" | "avg"``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.params import apply_linear, normal_linear

__all__ = [
    "VARIANTS",
    "CombinerAttention",
    "combiner_attention",
    "combiner_reference",
    "default_segment",
    "effective_attention",
    "sparse_pattern",
]

VARIANTS = ("fixed", "logsparse", "axial", "mixture", "mixture_avg")
_NEG = float(np.finfo(np.float32).min)


def default_segment(length: int) -> int:
    """``ceil(sqrt(L))``: the segment / row length minimising ``s + L/s``."""
    return max(1, math.isqrt(max(length - 1, 0)) + 1) if length > 1 else 1


# ---- argument checks -----------------------------------------------------------------------


def _check(q, k, v, variant, segment, causal, pool_keys, summary_keys):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [B, L, N, H], got shape {getattr(x, 'shape', None)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, L, N, H], got q {q.shape}, "
                         f"k {k.shape} (self-attention only)")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, L, N, Hv] matching q {q.shape} in B, L, N; got v "
                         f"{v.shape}")
    for name, x in (("pool_keys", pool_keys), ("summary_keys", summary_keys)):
        if x is not None and tuple(x.shape) != tuple(k.shape):
            raise ValueError(f"{name} must have k's shape {k.shape}, got {x.shape}")
    if summary_keys is not None and variant != "axial":
        raise ValueError(f"summary_keys is used by variant 'axial' only, got variant {variant!r}")
    if variant.startswith("mixture") and not causal:
        raise ValueError(f"variant {variant!r} is causal only (causal=False given)")
    length = q.shape[1]
    if segment is None:
        segment = default_segment(length)
    if not isinstance(segment, int | np.integer) or segment < 1:
        raise ValueError(f"segment must be a positive int, got {segment!r}")
    return int(segment)


def _pad_to(x, length, axis=1):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _masked_max(x, valid, axis):
    """Max over ``axis`` of the entries where ``valid``; 0 where none is valid (finite grads)."""
    pooled = jnp.max(jnp.where(valid, x, _NEG), axis=axis)
    return jnp.where(jnp.any(valid, axis=axis), pooled, 0.0)


def _masked_softmax(logits, valid, axis=-1):
    return jax.nn.softmax(jnp.where(valid, logits, _NEG), axis=axis)


# ---- the fast paths ------------------------------------------------------------------------


def _fixed(q, k, v, pk, s, causal, length):
    """Combiner-Fixed. ``q, k, pk [B, Lp, N, H]``, ``v [B, Lp, N, Hv]`` with ``Lp = n s``."""
    b, lp, nh, h = q.shape
    n = lp // s
    scale = 1.0 / math.sqrt(h)
    seg = lambda x: x.reshape(b, n, s, nh, x.shape[-1])
    qs, ks, vs, pks = seg(q), seg(k), seg(v), seg(pk)
    valid = (jnp.arange(lp) < length).reshape(1, n, s, 1, 1)
    span_q = _masked_max(qs, valid, 2)  # [B, n, N, H]
    span_k = _masked_max(pks, valid, 2)
    span_logits = jnp.einsum("bmhd,bmkhd->bmhk", span_q, ks) * scale
    span_w = _masked_softmax(span_logits, valid[..., 0].transpose(0, 1, 3, 2))
    span_v = jnp.einsum("bmhk,bmkhd->bmhd", span_w, vs)  # [B, n, N, Hv]  (eq. 10)
    local = jnp.einsum("bnqhd,bnkhd->bnhqk", qs, ks) * scale  # [B, n, N, s, s]
    pos = jnp.arange(s)
    kvalid = valid[:, :, :, 0, 0][:, :, None, None, :]
    local_ok = kvalid & ((pos[None, :] <= pos[:, None]) if causal else True)
    glob = jnp.einsum("bnqhd,bmhd->bnhqm", qs, span_k) * scale  # [B, n, N, s, n]
    seg_i = jnp.arange(n)
    glob_ok = (seg_i[None, :] < seg_i[:, None]) if causal else (seg_i[None, :] != seg_i[:, None])
    glob_ok = glob_ok[None, :, None, None, :]
    logits = jnp.concatenate([jnp.where(local_ok, local, _NEG), jnp.where(glob_ok, glob, _NEG)],
                             axis=-1)
    w = jax.nn.softmax(logits, axis=-1)  # one softmax (eq. 9)
    out = (jnp.einsum("bnhqk,bnkhd->bnqhd", w[..., :s], vs)
           + jnp.einsum("bnhqm,bmhd->bnqhd", w[..., s:], span_v))
    return out.reshape(b, lp, nh, -1)


def _log_levels(length):
    """Levels ``0 .. nlev-1``: the bits of the largest query index ``L - 1``."""
    return (length - 1).bit_length()


def _logsparse_terms(q, k, v, pk, length):
    """Logits ``[B, L, N, nlev]`` and span values ``[B, L, N, nlev, Hv]`` of the dyadic blocks
    each query attends to (causal side), with validity ``[L, nlev]``."""
    b, _, nh, h = q.shape
    scale = 1.0 / math.sqrt(h)
    i = jnp.arange(length)
    logits, values, oks = [], [], []
    for lev in range(_log_levels(length)):
        c = 2 ** lev
        nb = -(-length // c)
        blk = lambda x, c=c, nb=nb: _pad_to(x, nb * c).reshape(b, nb, c, nh, x.shape[-1])
        qb, kb, vb, pkb = blk(q), blk(k), blk(v), blk(pk)
        valid = (jnp.arange(nb * c) < length).reshape(1, nb, c, 1, 1)
        if c == 1:
            span_k, span_v = pkb[:, :, 0], vb[:, :, 0]
        else:
            span_q = _masked_max(qb, valid, 2)
            span_k = _masked_max(pkb, valid, 2)
            sl = jnp.einsum("bmhd,bmkhd->bmhk", span_q, kb) * scale
            sw = _masked_softmax(sl, valid[..., 0].transpose(0, 1, 3, 2))
            span_v = jnp.einsum("bmhk,bmkhd->bmhd", sw, vb)  # [B, nb, N, Hv]
        ok = ((i >> lev) & 1) == 1
        idx = jnp.clip((i >> lev) - 1, 0, nb - 1)
        key_i = jnp.take(span_k, idx, axis=1)  # [B, L, N, H]
        logits.append(jnp.einsum("blhd,blhd->blh", q, key_i) * scale)
        values.append(jnp.take(span_v, idx, axis=1))
        oks.append(ok)
    return (jnp.stack(logits, -1), jnp.stack(values, -2), jnp.stack(oks, -1))


def _logsparse(q, k, v, pk, causal, length):
    """Combiner-Logsparse: self + the dyadic blocks of ``[0, i)`` (and, bidirectional, of the
    mirrored suffix), one softmax. ``[B, L, N, .]`` (no padding)."""
    h = q.shape[-1]
    self_logit = jnp.einsum("blhd,blhd->blh", q, k)[..., None] / math.sqrt(h)
    lg, vals, ok = _logsparse_terms(q, k, v, pk, length)
    parts_l, parts_v, parts_ok = [self_logit, lg], [v[..., None, :], vals], [
        jnp.ones((length, 1), bool), ok]
    if not causal:
        flip = lambda x: jnp.flip(x, axis=1)
        lg2, vals2, ok2 = _logsparse_terms(flip(q), flip(k), flip(v), flip(pk), length)
        parts_l.append(flip(lg2))
        parts_v.append(flip(vals2))
        parts_ok.append(jnp.flip(ok2, axis=0))
    logits = jnp.concatenate(parts_l, -1)
    okall = jnp.concatenate(parts_ok, -1)[None, :, None, :]
    w = _masked_softmax(logits, okall)
    return jnp.einsum("blhr,blhrd->blhd", w, jnp.concatenate(parts_v, -2))


def _axial_row_attention(q, k, v, valid, scale):
    """Non-causal attention inside each row: ``[B, R, m, N, .]`` -> ``[B, R, m, N, .]``."""
    lg = jnp.einsum("brqhd,brkhd->brhqk", q, k) * scale
    w = _masked_softmax(lg, valid[:, :, None, None, :])
    return w, jnp.einsum("brhqk,brkhd->brqhd", w, v)


def _axial(q, k, v, sk, m, causal, length):
    """Combiner-Axial-rowmajor. ``[B, Lp, N, .]`` with ``Lp = R m``; ``sk``: summary keys or
    None (row attention of the keys)."""
    b, lp, nh, h = q.shape
    rows = lp // m
    scale = 1.0 / math.sqrt(h)
    grid = lambda x: x.reshape(b, rows, m, nh, x.shape[-1])
    qg, kg, vg = grid(q), grid(k), grid(v)
    valid = (jnp.arange(lp) < length).reshape(1, rows, m)
    w_row, row_out = _axial_row_attention(qg, kg, vg, valid, scale)  # [B, R, m, N, Hv]
    skg = jnp.einsum("brhqk,brkhd->brqhd", w_row, kg) if sk is None else grid(sk)
    local = jnp.einsum("brqhd,brkhd->brhqk", qg, kg) * scale  # [B, R, N, m, m]
    col = jnp.arange(m)
    local_ok = valid[:, :, None, None, :] & ((col[None, :] <= col[:, None]) if causal else True)
    glob = jnp.einsum("brchd,bschd->brhcs", qg, skg) * scale  # [B, R, N, m, R]: same column
    ri = jnp.arange(rows)
    glob_ok = (ri[None, :] < ri[:, None]) if causal else (ri[None, :] != ri[:, None])
    glob_ok = glob_ok[None, :, None, None, :]  # a padded (r, c) summarises row r as a mean
    logits = jnp.concatenate([jnp.where(local_ok, local, _NEG), jnp.where(glob_ok, glob, _NEG)],
                             axis=-1)
    w = jax.nn.softmax(logits, axis=-1)
    out = (jnp.einsum("brhqk,brkhd->brqhd", w[..., :m], vg)
           + jnp.einsum("brhcs,bschd->brchd", w[..., m:], row_out))
    return out.reshape(b, lp, nh, -1)


def _excl_cummax(x, axis, reverse=False):
    """Exclusive running max along ``axis`` (0 where empty): the pool of the strict prefix
    (suffix when ``reverse``)."""
    run = jax.lax.cummax(x, axis=axis, reverse=reverse)
    n = x.shape[axis]
    fill = jnp.zeros_like(jax.lax.slice_in_dim(run, 0, 1, axis=axis))
    if reverse:
        return jnp.concatenate([jax.lax.slice_in_dim(run, 1, n, axis=axis), fill], axis=axis)
    return jnp.concatenate([fill, jax.lax.slice_in_dim(run, 0, n - 1, axis=axis)], axis=axis)


def _prefix_summary(qg, kg, vg, axis, reverse, scale):
    """Span values of the strict prefixes (suffixes) along ``axis`` of a ``[B, R, m, N, .]``
    grid: entry ``(r, c)`` attends, with the cummax query of the strict prefix, over it.
    Returns ``[B, R, m, N, Hv]`` (zeros where the prefix is empty)."""
    # move the scan axis next to the heads: [B, other, n, N, .]
    if axis == 1:
        qg, kg, vg = (x.transpose(0, 2, 1, 3, 4) for x in (qg, kg, vg))
    n = qg.shape[2]
    sq = _excl_cummax(qg, 2, reverse)  # query of the strict prefix ending before each entry
    lg = jnp.einsum("bophd,bokhd->bohpk", sq, kg) * scale  # [B, o, N, n(prefix), n(key)]
    p, kk = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    ok = (kk > p) if reverse else (kk < p)
    w = _masked_softmax(lg, ok)
    out = jnp.einsum("bohpk,bokhd->bophd", w, vg)
    out = jnp.where(jnp.any(ok, -1)[None, None, :, None, None], out, 0.0)
    return out.transpose(0, 2, 1, 3, 4) if axis == 1 else out


def _mixture(q, k, v, pk, m, avg):
    """Combiner-Mixture (causal). ``[B, Lp, N, .]``, ``Lp = R m`` (padding only in the last
    row, after every real query, so it needs no masks)."""
    b, lp, nh, h = q.shape
    rows = lp // m
    scale = 1.0 / math.sqrt(h)
    grid = lambda x: x.reshape(b, rows, m, nh, x.shape[-1])
    qg, kg, vg, pkg = grid(q), grid(k), grid(v), grid(pk)
    ri, ci = jnp.arange(rows), jnp.arange(m)
    # (1) same column, rows above: [B, R, N, m, R(s)]
    g1 = jnp.einsum("brchd,bschd->brhcs", qg, kg) * scale
    ok1 = (ri[None, :] < ri[:, None])[None, :, None, None, :]
    # (2) same row, columns <= c: [B, R, N, m, m]
    g2 = jnp.einsum("brchd,brehd->brhce", qg, kg) * scale
    ok2 = (ci[None, :] <= ci[:, None])[None, None, None]
    # (3) column c' != c, rows < r: key / value pooled over the strict row prefix
    k3 = _excl_cummax(pkg, 1)  # [B, R, m, N, H]
    v3 = _prefix_summary(qg, kg, vg, 1, False, scale)
    g3 = jnp.einsum("brchd,brehd->brhce", qg, k3) * scale
    ok3 = ((ci[None, :] != ci[:, None])[None, None, None] & (ri > 0)[None, :, None, None, None])
    # (4) / (5) rows t < r, columns < c / > c of row t
    k4, k5 = _excl_cummax(pkg, 2), _excl_cummax(pkg, 2, reverse=True)
    v4 = _prefix_summary(qg, kg, vg, 2, False, scale)
    v5 = _prefix_summary(qg, kg, vg, 2, True, scale)
    g4 = jnp.einsum("brchd,btchd->brhct", qg, k4) * scale  # same column c of the pooled grid
    g5 = jnp.einsum("brchd,btchd->brhct", qg, k5) * scale
    ok4 = ok1 & (ci > 0)[None, None, None, :, None]
    ok5 = ok1 & (ci < m - 1)[None, None, None, :, None]
    groups = [(g1, ok1), (g2, ok2), (g3, ok3), (g4, ok4), (g5, ok5)]
    lg = [jnp.where(ok, g, _NEG) for g, ok in groups]
    vals = ["col", "row", "sum3", "sum4", "sum5"]

    def merge(ws, names):
        out = 0.0
        for w, name in zip(ws, names, strict=True):
            if name == "col":
                out = out + jnp.einsum("brhcs,bschd->brchd", w, vg)
            elif name == "row":
                out = out + jnp.einsum("brhce,brehd->brchd", w, vg)
            elif name == "sum3":
                out = out + jnp.einsum("brhce,brehd->brchd", w, v3)
            else:
                out = out + jnp.einsum("brhct,btchd->brchd", w, v4 if name == "sum4" else v5)
        return out

    def plan(idx):
        sizes = [lg[i].shape[-1] for i in idx]
        w = jax.nn.softmax(jnp.concatenate([lg[i] for i in idx], -1), axis=-1)
        ws = jnp.split(w, np.cumsum(sizes)[:-1].tolist(), axis=-1)
        return merge(ws, [vals[i] for i in idx])

    out = 0.5 * (plan([0, 1, 2]) + plan([0, 1, 3, 4])) if avg else plan([0, 1, 2, 3, 4])
    return out.reshape(b, lp, nh, -1)


def combiner_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, variant: str = "fixed",
                       segment: int | None = None, causal: bool = True,
                       pool_keys: jax.Array | None = None,
                       summary_keys: jax.Array | None = None) -> jax.Array:
    """Combiner attention (Ren et al. 2021, eq. 9-11), the sub-quadratic path.

    Args:
      q, k: ``[B, L, N, H]`` (self-attention; unscaled, the ``1/sqrt(H)`` is applied here).
      v: ``[B, L, N, Hv]``.
      variant: ``"fixed"``, ``"logsparse"``, ``"axial"``, ``"mixture"`` (the code's joint
        softmax) or ``"mixture_avg"`` (the paper's mean of two plans).
      segment: segment / row length ``s`` (default ``ceil(sqrt(L))``; ignored by logsparse).
        ``L`` not divisible by ``s`` is zero-padded and the padding masked.
      causal: ``j <= i`` (LM); False: the bidirectional variants (not mixture).
      pool_keys: ``[B, L, N, H]`` vectors max-pooled into region keys (default ``k``; the
        DeepSets option passes ``relu(W k)``). Not used by axial.
      summary_keys: axial only, ``[B, L, N, H]``: the key of row ``r`` seen from column ``c``
        at position ``(r, c)`` (default: the row attention of ``q_{r,c}`` applied to keys).

    Returns:
      ``[B, L, N, Hv]`` in ``v``'s dtype (computed in float32), equal to
      ``effective_attention(q, k, ...) @ v``.

    Cost: fixed / axial ``O(L (s + L/s))`` time and memory, logsparse ``O(L log L)``, mixture
    ``O(L (s + L/s))``.
    """
    segment = _check(q, k, v, variant, segment, causal, pool_keys, summary_keys)
    dtype = v.dtype
    length = q.shape[1]
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    q, k, v = f32(q), f32(k), f32(v)
    pk = k if pool_keys is None else f32(pool_keys)
    sk = f32(summary_keys)
    if variant == "logsparse":
        return _logsparse(q, k, v, pk, causal, length).astype(dtype)
    lp = -(-length // segment) * segment
    q, k, v, pk = (_pad_to(x, lp) for x in (q, k, v, pk))
    sk = None if sk is None else _pad_to(sk, lp)
    if variant == "fixed":
        out = _fixed(q, k, v, pk, segment, causal, length)
    elif variant == "axial":
        out = _axial(q, k, v, sk, segment, causal, length)
    else:
        out = _mixture(q, k, v, pk, segment, avg=variant == "mixture_avg")
    return out[:, :length].astype(dtype)


# ---- the reference: the implied distribution q(j|i) ---------------------------------------


def _plans(length: int, variant: str, segment: int, causal: bool):
    """The factorisation plan(s) as NumPy data: a list of ``(direct [L, L], members [R, L],
    visible [L, R], span_query_pos [R])`` (``span_query_pos`` = -1: max-pooled span query and
    key; ``p >= 0``: axial, span query ``q_p`` and summary key at ``p``)."""
    L, s = length, segment
    pos = np.arange(L)
    tri = pos[None, :] <= pos[:, None]
    if variant == "fixed":
        sid = pos // s
        same = sid[:, None] == sid[None, :]
        direct = same & tri if causal else same
        nseg = -(-L // s)
        members = sid[None, :] == np.arange(nseg)[:, None]
        visible = ((np.arange(nseg)[None, :] < sid[:, None]) if causal
                   else (np.arange(nseg)[None, :] != sid[:, None]))
        return [(direct, members, visible, -np.ones(nseg, int))]
    if variant == "logsparse":
        direct = np.eye(L, dtype=bool)
        blocks, vis = [], []
        for lev in range(_log_levels(L)):
            c = 2 ** lev
            for i in range(L):
                for mirror in ((False,) if causal else (False, True)):
                    ii = L - 1 - i if mirror else i
                    if (ii >> lev) & 1:
                        start = ((ii >> lev) - 1) * c
                        m = np.zeros(L, bool)
                        m[start:start + c] = True
                        blocks.append(m[::-1] if mirror else m)
                        vis.append(i)
        members = np.array(blocks, bool).reshape(-1, L)
        visible = np.zeros((L, len(blocks)), bool)
        visible[np.array(vis, int), np.arange(len(blocks))] = True
        return [(direct, members, visible, -np.ones(len(blocks), int))]
    row, col = pos // s, pos % s
    if variant == "axial":
        same = row[:, None] == row[None, :]
        direct = same & tri if causal else same
        # region p = the row of p seen from p's column, p on the padded grid: a padded p of the
        # last, partial row summarises that row with a zero span query (a plain mean)
        gp = np.arange(-(-L // s) * s)
        members = row[None, :] == (gp // s)[:, None]
        above = ((gp // s)[None, :] < row[:, None]) if causal else \
            ((gp // s)[None, :] != row[:, None])
        visible = above & ((gp % s)[None, :] == col[:, None])
        return [(direct, members, visible, gp.copy())]
    # mixture: regions indexed by position p = (r, c) of the padded grid (a query of the last,
    # partial row still sees the column summaries of the padded columns)
    gp = np.arange(-(-L // s) * s)
    prow, pcol = gp // s, gp % s
    direct = (((col[:, None] == col[None, :]) & (row[None, :] < row[:, None]))
              | ((row[:, None] == row[None, :]) & (col[None, :] <= col[:, None])))
    m3 = (col[None, :] == pcol[:, None]) & (row[None, :] < prow[:, None])  # col c rows < r
    v3 = (row[:, None] == prow[None, :]) & (col[:, None] != pcol[None, :]) & (row[:, None] > 0)
    m4 = (row[None, :] == prow[:, None]) & (col[None, :] < pcol[:, None])  # row r cols < c
    m5 = (row[None, :] == prow[:, None]) & (col[None, :] > pcol[:, None])
    v45 = (col[:, None] == pcol[None, :]) & (prow[None, :] < row[:, None])
    v4 = v45 & (pcol[None, :] > 0)
    v5 = v45 & (pcol[None, :] < s - 1)
    neg = -np.ones(gp.size, int)
    vertical = (direct, m3, v3, neg)
    horizontal = (direct, np.concatenate([m4, m5]), np.concatenate([v4, v5], 1),
                  np.concatenate([neg, neg]))
    if variant == "mixture_avg":
        return [vertical, horizontal]
    return [(direct, np.concatenate([m3, m4, m5]), np.concatenate([v3, v4, v5], 1),
             np.concatenate([neg, neg, neg]))]


def _effective_one(q, k, pk, sk, plan):
    """``q(j|i)`` of one plan for one batch row and head: ``q, k [L, H]`` -> ``[L, L]``."""
    direct, members, visible, span_pos = (jnp.asarray(a) for a in plan)
    scale = 1.0 / math.sqrt(q.shape[-1])
    pooled = span_pos < 0
    mem = members[:, :, None]
    pad = lambda x: _pad_to(x, max(int(plan[3].max()) + 1, x.shape[0]), axis=0)
    span_q = jnp.where(pooled[:, None], _masked_max(q[None], mem, 1),
                       pad(q)[jnp.clip(span_pos, 0)])  # [R, H]
    span_logits = span_q @ k.T * scale
    p_in = jnp.where(members, _masked_softmax(span_logits, members), 0.0)  # p(j | Omega^r)  [R, L]
    if sk is None:
        sk = jnp.where(pooled[:, None], 0.0, p_in @ k)  # axial default: row attention of keys
    else:
        sk = pad(sk)[jnp.clip(span_pos, 0)]
    region_k = jnp.where(pooled[:, None], _masked_max(pk[None], mem, 1), sk)
    logits = jnp.concatenate([jnp.where(direct, q @ k.T * scale, _NEG),
                              jnp.where(visible, q @ region_k.T * scale, _NEG)], -1)
    w = jax.nn.softmax(logits, -1)  # eq. 9: one softmax over direct logits and regions
    length = q.shape[0]
    return jnp.where(direct, w[:, :length], 0.0) + w[:, length:] @ p_in


def effective_attention(q: jax.Array, k: jax.Array, *, variant: str = "fixed",
                        segment: int | None = None, causal: bool = True,
                        pool_keys: jax.Array | None = None,
                        summary_keys: jax.Array | None = None) -> jax.Array:
    """The distribution Combiner implies, ``q(j|i)`` (paper eq. 9 with eq. 10 expanded):

        q(j|i) = p~(j|i) [j in Omega_i^0] + sum_r p(Omega_i^r|i) p(j|Omega^r) [j in Omega^r]

    materialised densely from the variant's factorisation plan (a plain reference, ``O(L^2)``
    per region set; for tests and pictures). ``q, k [B, L, N, H]`` -> ``[B, N, L, L]`` (float32);
    arguments as :func:`combiner_attention`. Rows are non-negative, sum to 1 and cover every
    ``j <= i`` (every ``j`` when not causal); ``"mixture_avg"`` is the mean of the two plans.
    """
    segment = _check(q, k, k, variant, segment, causal, pool_keys, summary_keys)
    length = q.shape[1]
    plans = _plans(length, variant, segment, causal)
    tr = lambda x: None if x is None else jnp.asarray(x, jnp.float32).transpose(0, 2, 1, 3)
    qt, kt = tr(q), tr(k)
    pkt = kt if pool_keys is None else tr(pool_keys)
    skt = tr(summary_keys)

    def one(qq, kk, pp, ss):
        return sum(_effective_one(qq, kk, pp, ss, p) for p in plans) / len(plans)

    fn = one
    for _ in range(2):  # over heads, then batch
        fn = jax.vmap(fn, in_axes=(0, 0, 0, None if skt is None else 0))
    return fn(qt, kt, pkt, skt)


def combiner_reference(q, k, v, **kwargs) -> jax.Array:
    """``effective_attention(q, k, **kwargs) @ v`` in the ``[B, L, N, Hv]`` layout (float32)."""
    a = effective_attention(q, k, **kwargs)
    return jnp.einsum("bnij,bjnd->bind", a, jnp.asarray(v, jnp.float32))


def sparse_pattern(length: int, variant: str, segment: int | None = None) -> np.ndarray:
    """The causal sparse-attention pattern each Combiner variant improves on (bool ``[L, L]``):
    ``"fixed"``: own segment + the last token of each earlier segment (Child et al. 2019);
    ``"logsparse"``: ``j = i`` or ``i - j`` a power of two (Li et al. 2019); ``"axial"``: own
    row + same column above (Ho et al. 2019)."""
    s = default_segment(length) if segment is None else segment
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    causal = j <= i
    if variant == "fixed":
        return causal & ((i // s == j // s) | (j % s == s - 1))
    if variant == "logsparse":
        d = i - j
        return causal & ((d == 0) | ((d > 0) & ((d & (d - 1)) == 0)))
    if variant == "axial":
        return causal & ((i // s == j // s) | (i % s == j % s))
    raise ValueError(f"variant must be 'fixed', 'logsparse' or 'axial', got {variant!r}")


# ---- the mixer -----------------------------------------------------------------------------


class CombinerAttention(nnx.Module):
    """Combiner multi-head self-attention (token mixer protocol).

    Args:
      dim: features ``D`` (divisible by ``num_heads``).
      num_heads: heads ``N`` (head size ``D / N``).
      variant: one of :data:`VARIANTS`.
      segment: segment / row length (default ``ceil(sqrt(L))`` of each call's length).
      causal: LM (True) or bidirectional.
      pool: ``"max"`` (max-pooled region keys) or ``"deepsets"`` (``max relu(W k)``, one extra
        ``D x D`` dense); axial uses its learned summary keys instead.
      out_std: std of the output projection's init.

    As in the official code, q/k/v/out projections have no bias; axial adds the code's summary
    key ``Dense(LN(x + Dense(row_out)))``. Call: ``x [B, L, D] -> [B, L, D]``.
    """

    patterns = frozenset({"self", "causal_self"})

    def __init__(self, dim: int, *, num_heads: int = 1, variant: str = "fixed",
                 segment: int | None = None, causal: bool = True, pool: str = "max",
                 out_std: float = 0.02, rngs: nnx.Rngs):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if pool not in ("max", "deepsets"):
            raise ValueError(f"pool must be 'max' or 'deepsets', got {pool!r}")
        if variant.startswith("mixture") and not causal:
            raise ValueError(f"Combiner variant {variant!r} is causal only")
        self.variant, self.segment, self.causal, self.num_heads = variant, segment, causal, \
            num_heads
        self.pool = pool
        self.proj_q = normal_linear(dim, dim, rngs, bias=False)
        self.proj_k = normal_linear(dim, dim, rngs, bias=False)
        self.proj_v = normal_linear(dim, dim, rngs, bias=False)
        self.proj_o = normal_linear(dim, dim, rngs, bias=False, std=out_std)
        self.deepsets = (normal_linear(dim, dim, rngs, bias=False)
                         if pool == "deepsets" and variant != "axial" else None)
        if variant == "axial":
            self.summary_in = normal_linear(dim, dim, rngs, bias=False)
            self.summary_norm = nnx.LayerNorm(dim, rngs=rngs)
            self.summary_key = normal_linear(dim, dim, rngs, bias=False)

    def _heads(self, x):  # [B, L, D] -> [B, L, N, D / N]
        return x.reshape(x.shape[:2] + (self.num_heads, -1))

    def __call__(self, x, *, context=None, mask=None, deterministic=None, rngs=None):
        name = f"combiner_{self.variant}"
        mixer_lib.refuse_context(context, name)
        mixer_lib.refuse_mask(mask, name)
        q, k, v = (apply_linear(p, x) for p in (self.proj_q, self.proj_k, self.proj_v))
        segment = self.segment or default_segment(x.shape[1])
        pool_keys = summary_keys = None
        if self.deepsets is not None:
            pool_keys = self._heads(jax.nn.relu(apply_linear(self.deepsets, k)))
        if self.variant == "axial":
            summary_keys = self._summary_keys(x, q, k, v, segment)
        y = combiner_attention(self._heads(q), self._heads(k), self._heads(v),
                               variant=self.variant, segment=segment, causal=self.causal,
                               pool_keys=pool_keys, summary_keys=summary_keys)
        return apply_linear(self.proj_o, y.reshape(x.shape))

    def _summary_keys(self, x, q, k, v, m):
        """The code's axial summary key at ``(r, c)``: ``Wk LN(x + Win row_out)``, ``row_out``
        the non-causal row attention at ``(r, c)`` (``[B, L, N, H]``)."""
        b, length, d = x.shape
        dtype = x.dtype
        x, q, k, v = (t.astype(jnp.float32) for t in (x, q, k, v))  # LayerNorm in float32
        lp = -(-length // m) * m
        grid = lambda t: _pad_to(self._heads(t), lp).reshape(b, lp // m, m, self.num_heads, -1)
        valid = (jnp.arange(lp) < length).reshape(1, lp // m, m)
        scale = 1.0 / math.sqrt(d // self.num_heads)
        _, row_out = _axial_row_attention(grid(q), grid(k), grid(v), valid, scale)
        row_out = row_out.reshape(b, lp, d)[:, :length]
        h = self.summary_norm(x + apply_linear(self.summary_in, row_out))
        return self._heads(apply_linear(self.summary_key, h)).astype(dtype)


def _factory(variant: str):
    def make(*, features, num_heads, causal, rngs, segment: int | None = None,
             pool: str = "max", out_std: float = 0.02, mixture: str = "joint"):
        v = variant
        if variant == "mixture":
            if mixture not in ("joint", "avg"):
                raise ValueError(f"mixture must be 'joint' or 'avg', got {mixture!r}")
            v = "mixture" if mixture == "joint" else "mixture_avg"
        return CombinerAttention(features, num_heads=num_heads, variant=v, segment=segment,
                                 causal=causal, pool=pool, out_std=out_std, rngs=rngs)
    return make


_PAPER = "Combiner: Full Attention Transformer with Sparse Computation Cost (NeurIPS 2021)"
for _v in ("fixed", "logsparse", "axial"):
    mixer_lib.register_mixer(f"combiner_{_v}", _factory(_v), patterns={"self", "causal_self"},
                             paper=_PAPER)
mixer_lib.register_mixer("combiner_mixture", _factory("mixture"), patterns={"causal_self"},
                         paper=_PAPER)
