"""Routing attention (Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention
with Routing Transformers", TACL 2021; arXiv:2003.05997), written against the official code
(google-research ``routing_transformer/utils.py``, ``sparse_transformer.py``).

A layer's heads are split into *local* heads and *routing* heads.

* **Local heads** (paper section 4.1, "local attention"): the sequence is cut into blocks of
  ``block`` positions; a query of block ``b`` attends to its own block (causally in a decoder)
  plus a *memory flange* of the ``flange`` positions before the block (and after it when not
  causal). Expressed as the mask :class:`BlockLocalMask`, so the attention kernels skip the empty
  tiles (cost ``O(L (block + flange))``).
* **Routing heads** (section 4.2): ``q <- LN(q)``, ``k <- LN(k)`` (layer norm without scale or
  bias, so vectors lie near the sphere of radius ``sqrt(H)``; in a decoder ``k := q``, the code's
  ``share_qk``). With centroids ``mu [C, H]`` the score of position ``i`` for cluster ``c`` is
  ``q_i . mu_c`` (nearest centroid = largest dot product on the sphere). As in the code, the
  clusters are *balanced*: centroid ``c`` takes the ``w`` positions of largest score
  (:func:`balanced_assignment`), sorted in time order; attention is dense inside each cluster
  (paper eq. 6 with ``C_i`` the cluster of ``i``; lower-triangular over slots when causal), and
  the outputs are scattered back, a position picked by several clusters getting
  ``sum / (count + 0.01)`` (:func:`routing_attention`). Work per head: ``C w^2`` logits, i.e.
  ``O(L w)`` for ``C w ~ L``, not ``O(L^2)``.
* **Centroids** are state, not parameters: an online k-means with exponential moving averages
  (paper eq. 9-10; the code's form): with the hard nearest-centroid assignment ``c(x)`` of every
  routed vector (queries, and keys when not shared),
  ``count_c <- l count_c + (1 - l) n_c``, ``sum_c <- l sum_c + (1 - l) sum_{c(x)=c} x``, counts
  Laplace-smoothed ``count <- (count + eps) / (n + C eps) n`` (``n = sum_c count_c``,
  ``eps = 1e-5``), ``mu_c = sum_c / count_c`` (:func:`kmeans_ema_update`, ``l = 0.999``). The
  commitment loss ``beta mean_x ||x - sg(mu_c(x))||^2`` (``beta = 1e-4``) pulls the routed
  vectors towards their centroids (:func:`commitment_loss`, sown as the aux loss
  ``"commitment"``).

**Training vs evaluation.** The mixer updates its centroids (an ``nnx.Variable`` subclass,
:class:`KMeansState`, so the optimizer never sees them) only when called with
``deterministic=False``; ``deterministic=None`` or ``True`` leaves them unchanged. The output of a
call always uses the centroids from before its update. In ``jaxattn.train`` the train step
returns the model's non-parameter state after the forward pass, so the updated centroids are
carried to the next step; the eval step discards state. A training-mode call on a module that
cannot be written (used under a JAX transform it was not created in, e.g. ``jax.vjp`` of a
closure over a merged module) raises instead of silently skipping the update;
``update_centroids=False`` trains with fixed centroids.

**Departures and caveats.** (1) Balanced top-``w`` membership is decided over the whole
sequence, as in the code's training path: whether an earlier position belongs to a cluster can
depend on the scores of later positions, so with ``w < L`` a causal routing head is causal in its
*attention* (slot ``i`` reads slots ``j <= i``, which are earlier positions) but not in its
*membership* (the code blanks future positions only in fast decoding). (2) A window larger than
the sequence is clamped to ``L`` (every position in every cluster). (3) EMA state starts from
``count = 1``, ``sum = mu_0`` with ``mu_0 = LN(N(0, 1))``. (4) No relative position embeddings in
the routing heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import errors, nnx

from jaxattn.masks.base import Mask, register_mask
from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.params import apply_linear, normal_linear
from jaxattn.ops.attention import dot_product_attention

__all__ = [
    "BlockLocalMask",
    "KMeansState",
    "RoutingAttention",
    "balanced_assignment",
    "cluster_membership",
    "commitment_loss",
    "kmeans_ema_update",
    "nearest_centroid",
    "routing_attention",
    "scale_free_layer_norm",
]

_SCATTER_EPS = 0.01  # the code's ``sum / (count + 0.01)``


# ---- local heads: the block-local mask ----------------------------------------------------------
@register_mask
class BlockLocalMask(Mask):
    """Block-local attention with a memory flange (Routing Transformer's local heads).

    Query ``q`` of block ``b = q // block`` sees keys ``k`` with
    ``b * block - flange <= k`` and ``k <= q`` when ``causal``, else
    ``b * block - flange <= k < (b + 1) * block + flange``.
    """

    block: int = 256
    flange: int = 256
    causal: bool = True

    def __post_init__(self):
        for name in ("block", "flange"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or v < (1 if name == "block" else 0):
                raise ValueError(f"BlockLocalMask {name} must be an int >= "
                                 f"{1 if name == 'block' else 0}, got {v!r}")

    def _evaluate(self, q, k, xp):
        start = (q // self.block) * self.block
        ok = k >= start - self.flange
        if self.causal:
            ok = ok & (k <= q)
        else:
            ok = ok & (k < start + self.block + self.flange)
        return ok[None, None]


# ---- routing heads: pure functions --------------------------------------------------------------
def scale_free_layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Layer norm over the last axis without scale or bias, computed in float32 and returned
    in ``x``'s dtype: ``(x - mean) / sqrt(var + eps)`` (norm close to ``sqrt(H)``)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def balanced_assignment(scores: jax.Array, window: int) -> jax.Array:
    """Balanced cluster assignment: the ``window`` positions of largest score per centroid.

    Args:
      scores: ``[..., C, L]`` (``q_i . mu_c`` of position ``i`` for centroid ``c``).
      window: ``w``, positions per cluster, ``1 <= w <= L``.

    Returns:
      int32 ``[..., C, w]``: for each centroid, the indices of its ``w`` largest scores
      (``lax.top_k`` tie-breaking: the lower index wins), sorted ascending (time order).
    """
    if scores.ndim < 2:
        raise ValueError(f"scores must be [..., C, L], got shape {scores.shape}")
    length = scores.shape[-1]
    if not isinstance(window, int | np.integer) or not 1 <= window <= length:
        raise ValueError(f"window must be an int in [1, L={length}] for scores of shape "
                         f"{scores.shape}, got {window!r}")
    _, idx = jax.lax.top_k(scores, int(window))
    return jnp.sort(idx, axis=-1).astype(jnp.int32)


def _check_qkv(q, k, v, centroids):
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be [B, L, N, H] with equal B, L, N (and q, k equal): got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if centroids.ndim != 3 or centroids.shape[0] != q.shape[2] or \
            centroids.shape[2] != q.shape[3]:
        raise ValueError(f"centroids must be [N={q.shape[2]}, C, H={q.shape[3]}], got shape "
                         f"{centroids.shape}")


def _gather(x, idx):
    """``x [B, N, L, H]``, ``idx [B, N, C, w]`` -> ``[B, N, C, w, H]``."""
    b, n, c, w = idx.shape
    flat = jnp.take_along_axis(x, idx.reshape(b, n, c * w)[..., None], axis=2)
    return flat.reshape(b, n, c, w, x.shape[-1])


def cluster_membership(q: jax.Array, k: jax.Array, centroids: jax.Array, *, window: int,
                       is_causal: bool) -> tuple[jax.Array, jax.Array]:
    """Query and key cluster indices of :func:`routing_attention`.

    ``q, k [B, L, N, H]`` (normalised), ``centroids [N, C, H]`` -> ``(q_idx, k_idx)``, int32
    ``[B, N, C, w]`` each; ``k_idx is q_idx`` when ``is_causal`` (shared q/k routing)."""
    mu = centroids.astype(q.dtype)
    q_idx = balanced_assignment(jnp.einsum("blnh,nch->bncl", q, mu), window)
    if is_causal:
        return q_idx, q_idx
    return q_idx, balanced_assignment(jnp.einsum("blnh,nch->bncl", k, mu), window)


def routing_attention(q: jax.Array, k: jax.Array, v: jax.Array, centroids: jax.Array, *,
                      window: int, is_causal: bool, scale: float | None = None,
                      exact_mean: bool = False) -> jax.Array:
    """Routing attention of Roy et al. (2021), balanced clusters as in the official code.

    For each batch row and head, centroid ``c`` selects the ``w`` queries and the ``w`` keys
    with the largest dot product with ``mu_c`` (:func:`balanced_assignment`; the keys are the
    queries' positions when ``is_causal``), each in time order. Inside the cluster,

        out_c = softmax(scale * Q_c K_c^T [+ slot-causal mask]) V_c          (paper eq. 6)

    and a position ``i`` selected by clusters ``S_i`` gets
    ``sum_{c in S_i} out_c[i] / (|S_i| + 0.01)`` (``/ |S_i|`` with ``exact_mean``; 0 when
    ``S_i`` is empty).

    Args:
      q, k: ``[B, L, N, H]``, already layer-normalised (the mixer does it). When ``is_causal``
        the routing uses ``q`` for both (the code's ``share_qk``); ``k`` is still what the
        logits use (pass ``k = q`` for the code's model).
      v: ``[B, L, N, Hv]``.
      centroids: ``[N, C, H]``, one set per head.
      window: ``w``, positions per cluster, ``1 <= w <= L``.
      is_causal: lower-triangular mask over slot index (exactly causal since slot order is time
        order when queries and keys share their indices).
      scale: logit scale; ``None`` is ``H ** -0.5``.
      exact_mean: divide by the count instead of ``count + 0.01``.

    Returns:
      ``[B, L, N, Hv]`` in ``q``'s dtype. Work and memory ``O(B N C w^2)``.

    With one centroid, ``window = L`` and ``exact_mean=True`` this is full attention.
    """
    _check_qkv(q, k, v, centroids)
    length, head_dim = q.shape[1], q.shape[3]
    if not isinstance(window, int | np.integer) or not 1 <= window <= length:
        raise ValueError(f"window must be an int in [1, L={length}] (q of shape {q.shape}), "
                         f"got {window!r}")
    scale = head_dim ** -0.5 if scale is None else scale
    q_idx, k_idx = cluster_membership(q, k, centroids, window=window, is_causal=is_causal)
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N, L, H]
    qc, kc, vc = _gather(qt, q_idx), _gather(kt, k_idx), _gather(vt, k_idx)  # [B, N, C, w, H]
    logits = jnp.einsum("bncih,bncjh->bncij", qc, kc).astype(jnp.float32) * scale
    if is_causal:
        tri = jnp.tril(jnp.ones((window, window), jnp.bool_))
        logits = jnp.where(tri, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out_c = jnp.einsum("bncij,bncjh->bncih", probs, vc)  # [B, N, C, w, Hv]
    b, n, c, w = q_idx.shape
    flat_idx = q_idx.reshape(b, n, c * w)
    rows = jnp.arange(b)[:, None, None], jnp.arange(n)[None, :, None]
    total = jnp.zeros(vt.shape, jnp.float32).at[rows[0], rows[1], flat_idx].add(
        out_c.reshape(b, n, c * w, -1).astype(jnp.float32))
    count = jnp.zeros((b, n, length), jnp.float32).at[rows[0], rows[1], flat_idx].add(1.0)
    if exact_mean:
        out = total / jnp.maximum(count, 1.0)[..., None]
    else:
        out = total / (count + _SCATTER_EPS)[..., None]
    return out.astype(q.dtype).transpose(0, 2, 1, 3)


def nearest_centroid(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Hard assignment ``argmax_c x . mu_c``: ``x [B, L, N, H]``, ``centroids [N, C, H]`` ->
    int32 ``[B, L, N]``."""
    scores = jnp.einsum("blnh,nch->blnc", x.astype(jnp.float32),
                        centroids.astype(jnp.float32))
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def kmeans_ema_update(x: jax.Array, centroids: jax.Array, count: jax.Array, total: jax.Array,
                      *, decay: float = 0.999, eps: float = 1e-5,
                      valid: jax.Array | None = None):
    """One online k-means step with exponential moving averages (the official code's rule).

    Args:
      x: ``[B, L, N, H]`` routed vectors (layer-normalised queries; stack keys along ``L`` when
        they are not shared).
      centroids: ``[N, C, H]`` current means, used for the hard assignment.
      count: ``[N, C]`` EMA cluster sizes; total: ``[N, C, H]`` EMA cluster sums.
      decay: ``lambda``; eps: Laplace smoothing of the counts.
      valid: optional bool ``[B, L]``; padding positions (False) are left out.

    Returns:
      ``(centroids, count, total)`` float32, with no gradient:
      ``count <- l count + (1 - l) n_c``, ``total <- l total + (1 - l) sum_{c(x)=c} x``,
      ``count <- (count + eps) / (n + C eps) n`` with ``n = sum_c count``,
      ``centroids = total / count``.
    """
    x = jax.lax.stop_gradient(x.astype(jnp.float32))
    c = centroids.shape[1]
    onehot = jax.nn.one_hot(nearest_centroid(x, centroids), c, dtype=jnp.float32)  # [B,L,N,C]
    if valid is not None:
        onehot = onehot * valid.astype(jnp.float32)[:, :, None, None]
    n_c = jnp.sum(onehot, axis=(0, 1))  # [N, C]
    s_c = jnp.einsum("blnc,blnh->nch", onehot, x)
    count = decay * count.astype(jnp.float32) + (1.0 - decay) * n_c
    total = decay * total.astype(jnp.float32) + (1.0 - decay) * s_c
    n = jnp.sum(count, axis=-1, keepdims=True)
    count = (count + eps) / (n + c * eps) * n
    return total / count[..., None], count, total


def commitment_loss(x: jax.Array, centroids: jax.Array, valid: jax.Array | None = None
                    ) -> jax.Array:
    """``mean_x ||x - sg(mu_c(x))||^2`` over positions and heads (float32 scalar); ``x [B, L, N,
    H]``, ``centroids [N, C, H]``; ``valid [B, L]`` excludes padding. Multiply by ``beta``."""
    mu = jax.lax.stop_gradient(centroids.astype(jnp.float32))
    assign = nearest_centroid(jax.lax.stop_gradient(x), mu)  # [B, L, N]
    chosen = mu[jnp.arange(mu.shape[0])[None, None, :], assign]  # [B, L, N, H]
    sq = jnp.sum(jnp.square(x.astype(jnp.float32) - chosen), axis=-1)  # [B, L, N]
    if valid is None:
        return jnp.mean(sq)
    w = valid.astype(jnp.float32)[:, :, None]
    return jnp.sum(sq * w) / jnp.maximum(jnp.sum(w) * sq.shape[-1], 1.0)


# ---- the mixer ----------------------------------------------------------------------------------
class KMeansState(nnx.Variable):
    """Centroids and EMA statistics of the routing heads: state the train step updates
    functionally (not an ``nnx.Param``: the optimizer skips it)."""


class RoutingAttention(nnx.Module):
    """Routing Transformer self-attention mixer: local heads + routing heads.

    Args:
      dim: features ``D``; ``num_heads`` heads of ``H = D / num_heads``.
      routing_heads: heads ``num_heads - routing_heads .. num_heads - 1`` route (the first
        ``num_heads - routing_heads`` are local). 0: local only.
      num_clusters: ``C`` centroids per routing head.
      window: ``w`` positions per cluster (clamped to the sequence length).
      block, flange: the local heads' block and memory flange.
      causal: decoder (routing shares q and k; slot-causal masks).
      decay, eps: EMA k-means decay and Laplace smoothing.
      commitment_weight: ``beta`` of the sown commitment loss.
      update_centroids: with ``deterministic=False``, update the k-means state (default). If
        the module cannot be written (used under a JAX transform it was not created in) the
        call raises; ``False`` keeps the centroids fixed (the commitment loss is still sown).

    Call: ``x [B, L, D]`` -> ``[B, L, D]``; with ``deterministic=False`` the centroids are
    updated (after the output is computed with the old ones) and the commitment loss is sown.
    """

    patterns = frozenset({"self", "causal_self"})
    aux_loss_names = frozenset({"commitment"})

    def __init__(self, dim: int, num_heads: int, *, routing_heads: int, num_clusters: int = 8,
                 window: int = 64, block: int = 32, flange: int = 32, causal: bool = True,
                 decay: float = 0.999, eps: float = 1e-5, commitment_weight: float = 1e-4,
                 update_centroids: bool = True, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if not 0 <= routing_heads <= num_heads:
            raise ValueError(f"routing_heads={routing_heads} must be in [0, num_heads="
                             f"{num_heads}]")
        if num_clusters < 1 or window < 1:
            raise ValueError(f"num_clusters and window must be >= 1, got {num_clusters}, "
                             f"{window}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.routing_heads, self.local_heads = routing_heads, num_heads - routing_heads
        self.num_clusters, self.window, self.causal = num_clusters, window, causal
        self.decay, self.eps, self.commitment_weight = decay, eps, commitment_weight
        self.update_centroids = bool(update_centroids)
        self.local_mask = BlockLocalMask(block=block, flange=flange, causal=causal)
        std = 1.0 / math.sqrt(dim)
        h = self.head_dim
        # causal routing heads share q and k, so k is projected for the other heads only
        k_heads = self.local_heads + (0 if causal else routing_heads)
        self.proj_q = normal_linear(dim, num_heads * h, rngs, bias=False, std=std)
        self.proj_k = normal_linear(dim, k_heads * h, rngs, bias=False, std=std) \
            if k_heads else None
        self.proj_v = normal_linear(dim, num_heads * h, rngs, bias=False, std=std)
        self.proj_o = normal_linear(dim, dim, rngs, bias=False, std=std)
        if routing_heads:
            mu0 = scale_free_layer_norm(jax.random.normal(
                rngs.params(), (routing_heads, num_clusters, h), jnp.float32))
            self.centroids = KMeansState(mu0)
            self.ema_count = KMeansState(jnp.ones((routing_heads, num_clusters), jnp.float32))
            # a separate buffer: two Variables holding one array make the train step donate
            # the same buffer twice (an error that crashes XLA's CPU client)
            self.ema_sum = KMeansState(jnp.array(mu0, copy=True))
        else:
            self.centroids = self.ema_count = self.ema_sum = None

    def routed_vectors(self, x: jax.Array):
        """``x [B, L, D]`` -> ``(q, k, v)`` of the routing heads, ``[B, L, N_r, H]``, q and k
        layer-normalised (``k is q`` when causal)."""
        q, k, v = self._project(x)
        r = slice(self.local_heads, None)
        return self._routed(q, k, v, r)

    def _project(self, x):
        b, length, _ = x.shape
        heads = lambda y: y.reshape(b, length, -1, self.head_dim)
        q, v = heads(apply_linear(self.proj_q, x)), heads(apply_linear(self.proj_v, x))
        k = heads(apply_linear(self.proj_k, x)) if self.proj_k is not None else None
        return q, k, v

    def _routed(self, q, k, v, r):
        qr = scale_free_layer_norm(q[:, :, r])
        kr = qr if self.causal else scale_free_layer_norm(k[:, :, self.local_heads:])
        return qr, kr, v[:, :, r]

    def _store(self, mu, count, total):
        """Write the updated k-means state by replacing the three ``KMeansState`` Variables
        (same type and shape, so ``nnx.state`` keeps its structure). Replacing rather than
        writing in place matters under ``jax.value_and_grad`` of a function that merges the
        module (``jaxattn.train``'s step): the non-differentiated state's Variables were
        unflattened by the enclosing ``jit``, a different trace level, and NNX refuses an
        in-place write to them, while the module itself was built in the current trace.
        A module used under a JAX transform it was not created in (e.g. ``jax.vjp`` of a
        closure over an already-merged module) cannot be updated at all: that raises, rather
        than silently training with frozen centroids; pass ``update_centroids=False`` (or
        merge the module inside the transformed function, or use the ``nnx`` transforms)."""
        try:
            self.centroids = KMeansState(mu)
            self.ema_count = KMeansState(count)
            self.ema_sum = KMeansState(total)
        except errors.TraceContextError as e:
            raise RuntimeError(
                "routing: cannot write the k-means centroids: the module is used under a JAX "
                "transform it was not created in. Merge it inside the transformed function "
                "(nnx.split outside, nnx.merge inside), use the nnx transforms, or build the "
                "mixer with update_centroids=False to train with fixed centroids.") from e

    def __call__(self, x, *, context=None, mask=None, deterministic=None, rngs=None):
        mixer_lib.refuse_context(context, "routing")
        mixer_lib.refuse_mask(mask, "routing")
        if x.ndim != 3:
            raise ValueError(f"x must be [B, L, D], got shape {x.shape}")
        q, k, v = self._project(x)
        outs = []
        nl = self.local_heads
        if nl:
            outs.append(dot_product_attention(q[:, :, :nl], k[:, :, :nl], v[:, :, :nl],
                                              mask=self.local_mask))
        if self.routing_heads:
            qr, kr, vr = self._routed(q, k, v, slice(nl, None))
            window = min(self.window, x.shape[1])
            mu = self.centroids[...]
            outs.append(routing_attention(qr, kr, vr, mu, window=window,
                                          is_causal=self.causal))
            if deterministic is False:
                routed = qr if self.causal else jnp.concatenate([qr, kr], axis=1)
                loss = commitment_loss(routed, mu)
                mixer_lib.sow_aux_loss(self, "commitment", self.commitment_weight * loss)
                if self.update_centroids:
                    self._store(*kmeans_ema_update(
                        routed, mu, self.ema_count[...], self.ema_sum[...], decay=self.decay,
                        eps=self.eps))
        y = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]
        return apply_linear(self.proj_o, y.reshape(x.shape))


def _make_routing(*, features, num_heads, causal, rngs, routing_heads: int | None = None,
                  num_clusters: int = 8, window: int = 64, block: int = 32, flange: int = 32,
                  decay: float = 0.999, eps: float = 1e-5, commitment_weight: float = 1e-4,
                  update_centroids: bool = True):
    """Defaults: half the heads route (at least one), C = 8, w = 64, block = flange = 32 (the
    CPU experiment of ``experiments/routing``)."""
    r = max(1, num_heads // 2) if routing_heads is None else routing_heads
    return RoutingAttention(features, num_heads, routing_heads=r, num_clusters=num_clusters,
                            window=window, block=block, flange=flange, causal=causal,
                            decay=decay, eps=eps, commitment_weight=commitment_weight,
                            update_centroids=update_centroids, rngs=rngs)


mixer_lib.register_mixer(
    "routing", _make_routing, patterns=RoutingAttention.patterns,
    paper="Efficient Content-Based Sparse Attention with Routing Transformers (2021)")
