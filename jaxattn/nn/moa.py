"""MoA: Mixture of Sparse Attention for automatic LLM compression (Fu et al., 2024; code
thu-nics/MoA). Heterogeneous elastic attention spans, their profiling and their search.

**Elastic rule** (the paper's elastic span ``S_h(N) = alpha_h + beta_h N``). Each head
``h`` of a causal layer keeps an *attention sink* of the first ``sink_h`` keys plus a sliding
window of the last ``window_h`` keys (the query's own key included), with a span that grows
with the *total* length ``N`` (prompt + generated tokens, fixed when the cache is built). The
rounding follows the official code (``MoA/attention/cache_utils.py``,
``moa_config_to_cache_config``)::

    S      = int(alpha + beta * N)                         # truncation toward zero
    S      = min(ceil(max(S, min_span) / span_block) * span_block, N)
    sink   = min(S, sink_size)          window = S - sink
    allowed[h, i, j] = j <= i and (j < sink_h or i - j < window_h)

with ``span_block = 64``, ``min_span = 128``, ``sink_size = 64`` (the code's defaults). The spec
sheet wrote the clip to ``N`` before the rounding; the code clips after it (so ``S <= N``
always), and that is what :func:`elastic_spans` does. The official *prefill* kernel applies the
same plan on a 64 x 64 block layout (``num_global_blocks`` sink blocks + band blocks); the
element rule above is that of its decode cache (``StaticCircularCache``: a static sink part and
a circular window), which is what this module implements for every call.

:func:`elastic_mask` returns that rule as a per-head :class:`jaxattn.masks.MultiHeadMask`, so
``jaxattn.dot_product_attention(..., mask=elastic_mask(...))`` gets block metadata: the Pallas
backend skips the empty tiles of each head, ``xla_chunked`` those empty in every head.

**Attention influence** (the paper's profiling; code
``MoA/models/llama/modify_llama_profile.py``):
for the post-softmax ``A [B, N, T, S]`` and ``G = dL/dA``, masking entry ``(i, j)`` (and
renormalising the row) changes the loss by, to first order,

    E_ij = - A_ij (G_ij - sum_n A_in G_in) / (1 - A_ij + eps)      (row 0: E_0j = -A_0j G_0j)

with ``eps`` the machine epsilon of ``G``'s dtype, as in the code. A candidate plan for a head
costs the sum of ``E`` over the causal entries its mask drops (:func:`plan_costs`; the code
sums ``E`` into 64 x 64 blocks and drops whole blocks, :func:`block_sums` gives those sums).

**Search** (the paper's optimisation step): pick one ``(alpha, beta)`` per head minimising
the predicted loss at each profiled length under a density budget. The code's density is the
*KV-cache* density, the mean over heads of ``S_h(N) / N`` (``_layout_to_density(mode="kv")``),
which is the default here; ``density="causal"`` (the spec's fraction of the causal triangle
kept) is an option. The code solves a multi-objective MILP with Gurobi (an epsilon-constraint
Pareto front, then the plan with the lowest loss at a longer validation length);
:func:`search_plan` solves the single-objective MILP "sum of the per-length losses, each
normalised by its largest head cost, with the budget at every profiled length" with
``scipy.optimize.milp`` (exact), or a Lagrangian bisection without SciPy
(``method="lagrangian"``).

Layout: ``q [B, T, N, H]``, ``k, v [B, S, K, H]`` (``N % K == 0``), as everywhere in jaxattn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxattn import masks as masks_lib
from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.ops.attention import dot_product_attention

__all__ = [
    "AttentionProbe",
    "AttentionRecord",
    "MoAAttention",
    "attention_influence",
    "block_sums",
    "candidate_grid",
    "elastic_mask",
    "elastic_spans",
    "moa_attention",
    "moa_attention_reference",
    "moa_layers",
    "plan_costs",
    "plan_density",
    "profile_influence",
    "search_plan",
]

SPAN_BLOCK, MIN_SPAN, SINK_SIZE = 64, 128, 64  # the official code's defaults


# ---- the elastic rule -----------------------------------------------------------------------
def _plan_arrays(alpha, beta, num_heads: int | None = None):
    a = np.atleast_1d(np.asarray(alpha, np.float64))
    b = np.atleast_1d(np.asarray(beta, np.float64))
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"alpha and beta must both be [H], got shapes {a.shape} and {b.shape}")
    if num_heads is not None and a.shape[0] != num_heads:
        raise ValueError(f"alpha / beta have {a.shape[0]} entries but there are {num_heads} "
                         "heads")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("alpha and beta must be finite")
    return a, b


def elastic_spans(alpha, beta, length: int, *, span_block: int = SPAN_BLOCK,
                  min_span: int = MIN_SPAN, sink_size: int = SINK_SIZE):
    """Per-head span, sink and window of the elastic rule at total length ``length``.

    Args:
      alpha, beta: float ``[H]`` (``alpha`` may be negative).
      length: the total length ``N`` (prompt + generated tokens), ``>= 1``.
      span_block, min_span, sink_size: the rounding (code defaults 64, 128, 64).

    Returns:
      ``(span, sink, window)``, NumPy int64 ``[H]`` each, ``span = sink + window <= length``.
    """
    a, b = _plan_arrays(alpha, beta)
    if int(length) < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if span_block < 1 or min_span < 0 or sink_size < 0:
        raise ValueError(f"need span_block >= 1, min_span >= 0, sink_size >= 0; got "
                         f"{span_block}, {min_span}, {sink_size}")
    raw = np.trunc(a + b * length)
    span = np.ceil(np.maximum(raw, min_span) / span_block) * span_block
    span = np.minimum(span, length).astype(np.int64)
    sink = np.minimum(span, sink_size).astype(np.int64)
    return span, sink, span - sink


def _head_mask(sink: int, window: int, length: int) -> masks_lib.Mask:
    """One head's rule: ``j <= i and (j < sink or i - j < window)``."""
    if sink + window >= length:
        return masks_lib.CausalMask()  # every causal key is in reach
    parts = []
    if sink > 0:
        parts.append(masks_lib.SinkMask(int(sink)))
    if window > 0:
        parts.append(masks_lib.LocalMask((int(window) - 1, 0)))
    if not parts:
        raise ValueError("a head with an empty span (sink = window = 0) sees nothing")
    rule = parts[0] if len(parts) == 1 else parts[0] | parts[1]
    return rule & masks_lib.CausalMask()


def elastic_mask(alpha, beta, length: int, *, span_block: int = SPAN_BLOCK,
                 min_span: int = MIN_SPAN, sink_size: int = SINK_SIZE) -> masks_lib.Mask:
    """The elastic sink + sliding-window rule of every head as a per-head jaxattn mask.

    Args:
      alpha, beta: float ``[H]``, one plan per head.
      length: the total length ``N`` the spans are computed for (the call's ``S`` for
        training / prefill; prompt + max new tokens for a decode cache).
      span_block, min_span, sink_size: see :func:`elastic_spans`.

    Returns:
      A :class:`jaxattn.masks.MultiHeadMask` of ``H`` head masks (shape-agnostic, causal
      included); ``to_array(T, S)`` is ``[H, T, S]`` and ``block_info`` has per-head tiles.
    """
    _, sink, window = elastic_spans(alpha, beta, length, span_block=span_block,
                                    min_span=min_span, sink_size=sink_size)
    return masks_lib.MultiHeadMask(tuple(_head_mask(int(s), int(w), int(length))
                                         for s, w in zip(sink, window, strict=True)))


def _rule_array(sink, window, q_len: int, kv_len: int) -> np.ndarray:
    """The elastic rule written out: bool ``[H, T, S]`` (the reference's mask)."""
    i = np.arange(q_len)[None, :, None]
    j = np.arange(kv_len)[None, None, :]
    s, w = np.asarray(sink)[:, None, None], np.asarray(window)[:, None, None]
    return (j <= i) & ((j < s) | (i - j < w))


# ---- attention with a plan -------------------------------------------------------------------
def _check_qkv(q, k, v, num_plan_heads: int):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, N, H] / [B, S, K, H], got shapes {q.shape}, "
                         f"{k.shape}, {v.shape}")
    if q.shape[2] % k.shape[2] or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"incompatible q {q.shape}, k {k.shape}, v {v.shape} (need N % K == 0 "
                         "and matching batch / kv shapes)")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"MoA is causal self-attention: T = {q.shape[1]} must equal S = "
                         f"{k.shape[1]}")
    if num_plan_heads != q.shape[2]:
        raise ValueError(f"the plan has {num_plan_heads} heads but q has N = {q.shape[2]}")


def moa_attention_reference(q, k, v, alpha, beta, *, total_length: int | None = None,
                            span_block: int = SPAN_BLOCK, min_span: int = MIN_SPAN,
                            sink_size: int = SINK_SIZE):
    """Plain einsum reference of MoA attention (the specification).

    ``out[b, i, h] = sum_j softmax_j(q_i . k_j / sqrt(H) over allowed[h, i, :]) v_j`` with
    ``allowed`` the elastic rule at ``N = total_length`` (default ``S``).

    Args:
      q: ``[B, T, N, H]``; k, v: ``[B, S, K, H]`` with ``T == S``, ``N % K == 0``.
      alpha, beta: float ``[N]``.

    Returns:
      ``[B, T, N, H]`` in ``q``'s dtype (computed in float32).
    """
    a, b = _plan_arrays(alpha, beta)
    _check_qkv(q, k, v, a.shape[0])
    t = q.shape[1]
    n_total = t if total_length is None else int(total_length)
    _, sink, window = elastic_spans(a, b, n_total, span_block=span_block, min_span=min_span,
                                    sink_size=sink_size)
    allowed = jnp.asarray(_rule_array(sink, window, t, t))  # [N, T, S]
    g = q.shape[2] // k.shape[2]
    kk = jnp.repeat(k.astype(jnp.float32), g, axis=2)
    vv = jnp.repeat(v.astype(jnp.float32), g, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kk) / math.sqrt(q.shape[-1])
    logits = jnp.where(allowed[None], logits, jnp.finfo(jnp.float32).min)
    probs = jnp.where(allowed[None], jax.nn.softmax(logits, axis=-1), 0.0)  # masked rows: 0
    return jnp.einsum("bnts,bsnh->btnh", probs, vv).astype(q.dtype)


def moa_attention(q, k, v, alpha, beta, *, total_length: int | None = None,
                  span_block: int = SPAN_BLOCK, min_span: int = MIN_SPAN,
                  sink_size: int = SINK_SIZE, implementation: str | None = None,
                  group_heads: bool = False):
    """MoA attention through :func:`jaxattn.dot_product_attention` with the per-head
    :func:`elastic_mask` (block-sparse on the backends that read block metadata).

    Same arguments and result as :func:`moa_attention_reference`; ``implementation`` picks the
    backend (``None``: automatic). ``group_heads=True`` runs the heads of each distinct
    ``(sink, window)`` as one call with a head-independent mask (the official code permutes
    heads of equal cache size together), so backends that skip only the tiles empty in every
    head of a call (``xla_chunked``) skip each group's own empty tiles; K / V heads are gathered
    per group (copied for GQA).
    """
    a, b = _plan_arrays(alpha, beta)
    _check_qkv(q, k, v, a.shape[0])
    n_total = q.shape[1] if total_length is None else int(total_length)
    rule = dict(span_block=span_block, min_span=min_span, sink_size=sink_size)
    if not group_heads:
        mask = elastic_mask(a, b, n_total, **rule)
        return dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                     implementation=implementation)
    _, sink, window = elastic_spans(a, b, n_total, **rule)
    g = q.shape[2] // k.shape[2]
    out = [None] * a.shape[0]
    for key in sorted(set(zip(sink.tolist(), window.tolist(), strict=True))):
        heads = [h for h in range(a.shape[0]) if (sink[h], window[h]) == key]
        kv = np.asarray(heads) // g
        y = dot_product_attention(q[:, :, heads], k[:, :, kv], v[:, :, kv],
                                  mask=_head_mask(key[0], key[1], n_total), is_causal=True,
                                  implementation=implementation)
        for i, h in enumerate(heads):
            out[h] = y[:, :, i]
    return jnp.stack(out, axis=2)


# ---- profiling: the attention influence ------------------------------------------------------
def attention_influence(probs: jax.Array, grad: jax.Array, *, eps: float | None = None
                        ) -> jax.Array:
    """First-order loss change of masking each attention entry (MoA Eq. 6, the code's form).

    Args:
      probs: post-softmax ``A [B, H, T, S]``.
      grad: ``G = dL/dA [B, H, T, S]``.
      eps: added to ``1 - A`` (default: machine epsilon of ``grad``'s dtype, as the code).

    Returns:
      float32 ``E [B, H, T, S]``: ``-A (G - sum_n A G) / (1 - A + eps)``; row 0 is
      ``-A_0j G_0j`` (its only causal entry has ``A = 1``).
    """
    if probs.ndim != 4 or probs.shape != grad.shape:
        raise ValueError(f"probs and grad must both be [B, H, T, S], got shapes {probs.shape} "
                         f"and {grad.shape}")
    eps = float(jnp.finfo(grad.dtype).eps) if eps is None else float(eps)
    a, g = probs.astype(jnp.float32), grad.astype(jnp.float32)
    ag = a * g
    effect = -a * (g - jnp.sum(ag, axis=-1, keepdims=True)) / (1.0 - a + eps)
    return effect.at[..., 0, :].set(-ag[..., 0, :])


def block_sums(x, block: int):
    """Sum ``x [..., T, S]`` over ``block x block`` tiles -> ``[..., ceil(T/b), ceil(S/b)]``
    (zero padded), the code's 64 x 64 aggregation of the influence."""
    x = jnp.asarray(x)
    t, s = x.shape[-2:]
    nt, ns = -(-t // block), -(-s // block)
    pad = [(0, 0)] * (x.ndim - 2) + [(0, nt * block - t), (0, ns * block - s)]
    x = jnp.pad(x, pad).reshape(x.shape[:-2] + (nt, block, ns, block))
    return x.sum(axis=(-3, -1))


class AttentionProbe(nnx.Variable):
    """A zero ``[B, N, T, S]`` added to a profiled layer's post-softmax matrix: its gradient
    is ``G = dL/dA`` (take it with ``nnx.grad(..., argnums=nnx.DiffState(0, AttentionProbe))``)."""


class AttentionRecord(nnx.Variable):
    """The post-softmax ``A [B, N, T, S]`` a profiled layer saw on its last call."""


def moa_layers(model: nnx.Module) -> list[MoAAttention]:
    """Every :class:`MoAAttention` in ``model``, in graph order."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, MoAAttention)]


def profile_influence(model: nnx.Module, loss_fn: Callable[[nnx.Module, Any], jax.Array],
                      batches: Sequence[Any], *, batch_size: int, length: int
                      ) -> list[np.ndarray]:
    """Average attention influence of every MoA layer of ``model`` over ``batches``.

    ``loss_fn(model, batch) -> scalar`` is the calibration loss (e.g. cross-entropy on the
    response tokens only). Each layer runs its explicit profiling path (dense causal softmax,
    whatever its plan) with an :class:`AttentionProbe`; ``G`` is the probe's gradient.

    Returns:
      One NumPy float32 ``[N, length, length]`` per layer: ``E`` summed over each batch's
      examples and averaged over the batches (with a batch-mean loss: the predicted change of
      the mean loss when an entry is masked in every example).
    """
    layers = moa_layers(model)
    if not layers:
        raise ValueError("profile_influence: the model has no MoAAttention layer")
    for m in layers:
        m.start_profiling(batch_size, length)

    @nnx.jit
    def step(model, batch):
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, AttentionProbe))(model, batch)
        by_path = {tuple(p[:-1]): g for p, g in nnx.to_flat_state(grads)}
        out = []
        for path, m in nnx.iter_modules(model):
            if isinstance(m, MoAAttention):
                g = by_path[tuple(path)]
                out.append(jnp.sum(attention_influence(m.record[...], g[...]), axis=0))
        return out

    try:
        total, count = None, 0
        for batch in batches:
            e = step(model, batch)
            total = e if total is None else [t + x for t, x in zip(total, e, strict=True)]
            count += 1
    finally:
        for m in layers:
            m.stop_profiling()
    return [np.asarray(t) / count for t in total]


# ---- search -----------------------------------------------------------------------------------
def candidate_grid(alphas: Sequence[float], betas: Sequence[float], *, lengths: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """All ``(alpha, beta)`` pairs whose raw span ``alpha + beta N`` is positive at the
    shortest and at most ``N`` at every length in ``lengths`` (the code's filter in
    ``ElasticBlockSparse.prepare_config``). Returns ``(alpha [C], beta [C])``."""
    a, b = np.meshgrid(np.asarray(alphas, np.float64), np.asarray(betas, np.float64),
                       indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    ok = a + b * min(lengths) > 0
    for n in lengths:
        ok &= a + b * n <= n
    if not ok.any():
        raise ValueError(f"no (alpha, beta) candidate is valid at lengths {list(lengths)}")
    return a[ok], b[ok]


def plan_density(alpha, beta, length: int, *, density: str = "kv", **rule) -> np.ndarray:
    """Density of each plan ``(alpha[c], beta[c])`` at ``length``: ``"kv"`` (the code's
    search): ``S / N``; ``"causal"``: the fraction of the causal triangle's entries kept.
    Returns float64 ``[C]``."""
    span, sink, window = elastic_spans(alpha, beta, length, **rule)
    if density == "kv":
        return span / float(length)
    if density == "causal":
        kept = _rule_array(sink, window, length, length).sum(axis=(1, 2))
        return kept / (length * (length + 1) / 2.0)
    raise ValueError(f"density must be 'kv' or 'causal', got {density!r}")


def plan_costs(influence, alpha, beta, length: int, **rule) -> np.ndarray:
    """Predicted loss increase of every candidate plan for every head.

    Args:
      influence: ``E [H, T, T]`` of one layer (``T >= length``; the top-left ``length`` square
        is used), e.g. from :func:`profile_influence`.
      alpha, beta: ``[C]`` candidates.
      length: the total length the spans are computed at.

    Returns:
      float64 ``[H, C]``: the sum of ``E`` over the causal entries each candidate drops.
    """
    e = np.asarray(influence, np.float64)
    if e.ndim != 3 or e.shape[1] < length or e.shape[2] < length:
        raise ValueError(f"influence must be [H, T, T] with T >= length={length}, got shape "
                         f"{e.shape}")
    e = e[:, :length, :length]
    _, sink, window = elastic_spans(alpha, beta, length, **rule)
    causal = np.tril(np.ones((length, length), bool))
    dropped = causal[None] & ~_rule_array(sink, window, length, length)  # [C, T, T]
    return np.einsum("hij,cij->hc", e, dropped.astype(np.float64))


def search_plan(costs: np.ndarray, densities: np.ndarray, budget: float, *,
                method: str = "milp") -> np.ndarray:
    """Choose one candidate per head: minimise the sum over profiled lengths of the predicted
    loss (each length's costs divided by its largest absolute head cost, so lengths weigh
    alike) subject to ``mean_h density[l, c_h] <= budget`` at every length ``l``.

    Args:
      costs: ``[Lens, heads, C]`` from :func:`plan_costs` (all layers' heads stacked).
      densities: ``[Lens, C]`` from :func:`plan_density`.
      budget: the mean density allowed (e.g. 0.5).
      method: ``"milp"`` (``scipy.optimize.milp``, exact) or ``"lagrangian"`` (bisection on
        one multiplier of the summed density constraints; no SciPy needed).

    Returns:
      int ``[heads]``: the chosen candidate of each head.
    """
    costs, densities = np.asarray(costs, np.float64), np.asarray(densities, np.float64)
    if costs.ndim != 3 or densities.shape != (costs.shape[0], costs.shape[2]):
        raise ValueError(f"costs must be [Lens, heads, C] and densities [Lens, C], got "
                         f"{costs.shape} and {densities.shape}")
    n_len, heads, c = costs.shape
    if np.min(densities.min(axis=1)) > budget:
        raise ValueError(f"budget {budget} is below the sparsest candidate's density "
                         f"{densities.min(axis=1).max():.3f}")
    scale = np.maximum(np.abs(costs).reshape(n_len, -1).max(axis=1), 1e-30)
    objective = (costs / scale[:, None, None]).sum(axis=0)  # [heads, C]
    if method == "milp":
        from scipy.optimize import Bounds, LinearConstraint, milp

        one_each = np.kron(np.eye(heads), np.ones((1, c)))  # sum_c x[h, c] = 1
        dens = np.stack([np.tile(d, heads) / heads for d in densities])  # [Lens, heads * C]
        res = milp(objective.reshape(-1), integrality=np.ones(heads * c),
                   bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1),
                                LinearConstraint(dens, -np.inf, budget)])
        if res.x is None:
            raise ValueError(f"search_plan: the MILP found no plan ({res.message})")
        return np.argmax(res.x.reshape(heads, c), axis=1)
    if method == "lagrangian":
        total = densities.sum(axis=0)  # [C]

        def pick(lam):
            return np.argmin(objective + lam * total[None], axis=1)

        def feasible(choice):
            return bool(np.all(densities[:, choice].mean(axis=1) <= budget + 1e-12))

        lo, hi = 0.0, 1.0
        while not feasible(pick(hi)):
            hi *= 2.0
            if hi > 1e12:
                raise ValueError("search_plan: no multiplier meets the budget")
        if feasible(pick(lo)):
            return pick(lo)
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if feasible(pick(mid)) else (mid, hi)
        return pick(hi)
    raise ValueError(f"method must be 'milp' or 'lagrangian', got {method!r}")


# ---- the token mixer --------------------------------------------------------------------------
class MoAAttention(nnx.Module):
    """Causal multi-head attention whose head ``h`` follows the elastic plan
    ``(alphas[h], betas[h])`` (token-mixer protocol, ``causal_self`` only).

    Args:
      dim: features ``D``; ``num_heads`` heads of ``D / num_heads``.
      alphas, betas: the plan, ``num_heads`` floats each. Default: ``alpha = 0, beta = 1``
        for every head, i.e. ``S = N``: exactly dense causal attention.
      total_length: the ``N`` of the rule (``None``: the call's sequence length).
      span_block, min_span, sink_size: the rule's rounding (code defaults 64, 128, 64).
      implementation: the ``dot_product_attention`` backend (``None``: automatic).
      attention options: forwarded to :class:`MultiHeadAttention` (``use_bias``,
        ``kernel_init``, ``rope_theta``, ...).

    Profiling: :meth:`start_profiling` makes the layer run an explicit dense causal softmax
    whatever its plan, record ``A`` in ``self.record`` and add the zero ``self.probe`` to it;
    :func:`profile_influence` drives it.
    """

    patterns = frozenset({"causal_self"})
    aux_loss_names = frozenset()

    def __init__(self, dim: int, num_heads: int, *, alphas: Sequence[float] | None = None,
                 betas: Sequence[float] | None = None, total_length: int | None = None,
                 span_block: int = SPAN_BLOCK, min_span: int = MIN_SPAN,
                 sink_size: int = SINK_SIZE, implementation: str | None = None,
                 rngs: nnx.Rngs, **attention_options):
        alphas = (0.0,) * num_heads if alphas is None else tuple(float(a) for a in alphas)
        betas = (1.0,) * num_heads if betas is None else tuple(float(b) for b in betas)
        _plan_arrays(alphas, betas, num_heads)
        if total_length is not None and total_length < 1:
            raise ValueError(f"total_length must be >= 1 or None, got {total_length}")
        elastic_spans(alphas, betas, 1, span_block=span_block, min_span=min_span,
                      sink_size=sink_size)  # validates the rounding arguments
        self.attn = MultiHeadAttention(num_heads, dim, is_causal=True,
                                       implementation=implementation, rngs=rngs,
                                       **attention_options)
        self.alphas, self.betas, self.total_length = alphas, betas, total_length
        self.rule = dict(span_block=span_block, min_span=min_span, sink_size=sink_size)
        self.probe = nnx.data(None)
        self.record = nnx.data(None)

    def set_plan(self, alphas: Sequence[float], betas: Sequence[float]) -> None:
        """Replace the plan (e.g. with a searched one); a jitted caller recompiles."""
        alphas, betas = tuple(float(a) for a in alphas), tuple(float(b) for b in betas)
        _plan_arrays(alphas, betas, self.attn.num_heads)
        self.alphas, self.betas = alphas, betas

    def plan_mask(self, length: int) -> masks_lib.Mask:
        """The per-head elastic mask of a ``length``-token call."""
        n_total = length if self.total_length is None else self.total_length
        if n_total < length:
            raise ValueError(f"total_length={n_total} is shorter than the call's length "
                             f"{length}")
        return elastic_mask(self.alphas, self.betas, n_total, **self.rule)

    def spans(self, length: int) -> np.ndarray:
        """Per-head span ``S_h(N)`` at total length ``length``: int ``[num_heads]``."""
        return elastic_spans(self.alphas, self.betas, length, **self.rule)[0]

    def start_profiling(self, batch_size: int, length: int) -> None:
        n = self.attn.num_heads
        shape = (batch_size, n, length, length)
        self.probe = AttentionProbe(jnp.zeros(shape, jnp.float32))
        self.record = AttentionRecord(jnp.zeros(shape, jnp.float32))

    def stop_profiling(self) -> None:
        self.probe = nnx.data(None)
        self.record = nnx.data(None)

    def _profiled(self, x):
        q, k, v = self.attn._project_qkv(x, None, None)
        t = q.shape[1]
        if self.probe[...].shape[-1] != t or self.probe[...].shape[0] != x.shape[0]:
            raise ValueError(f"profiling was started for [B, N, T, T] = {self.probe[...].shape}"
                             f", got a call with B={x.shape[0]}, T={t}")
        g = q.shape[2] // k.shape[2]
        kk, vv = (jnp.repeat(a.astype(jnp.float32), g, axis=2) for a in (k, v))
        logits = jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kk)
        logits = logits / math.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((t, t), bool))
        probs = jax.nn.softmax(jnp.where(causal, logits, jnp.finfo(jnp.float32).min), axis=-1)
        self.record[...] = probs
        out = jnp.einsum("bnts,bsnh->btnh", probs + self.probe[...], vv).astype(x.dtype)
        return self.attn._output(out)

    def __call__(self, x, *, context=None, mask=None, deterministic=None, rngs=None):
        mixer_lib.refuse_context(context, "moa")
        if x.ndim != 3:
            raise ValueError(f"x must be [B, L, D], got shape {x.shape}")
        if self.probe is not None:
            if mask is not None:
                raise ValueError("a profiling MoA layer runs dense causal attention; it takes "
                                 "no mask= (call stop_profiling() first)")
            return self._profiled(x)
        plan = self.plan_mask(x.shape[1])
        call_mask = masks_lib.as_mask(mask)
        full = plan if call_mask is None else plan & call_mask
        return self.attn(x, mask=full, deterministic=deterministic, rngs=rngs)


def _make_moa(*, features, num_heads, causal, rngs, alphas=None, betas=None,
              total_length: int | None = None, span_block: int = SPAN_BLOCK,
              min_span: int = MIN_SPAN, sink_size: int = SINK_SIZE,
              implementation: str | None = None, use_bias: bool = True,
              init_std: float | None = None):
    """Default plan: ``S = N`` for every head (dense causal attention). ``init_std``: N(0, std)
    projection kernels instead of LeCun-normal."""
    if not causal:
        raise ValueError("the moa mixer is causal only")
    init = {} if init_std is None else {"kernel_init": nnx.initializers.normal(init_std)}
    return MoAAttention(features, num_heads, alphas=alphas, betas=betas,
                        total_length=total_length, span_block=span_block, min_span=min_span,
                        sink_size=sink_size, implementation=implementation, use_bias=use_bias,
                        rngs=rngs, **init)


mixer_lib.register_mixer(
    "moa", _make_moa, patterns=MoAAttention.patterns,
    paper="MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression "
          "(2024)")
