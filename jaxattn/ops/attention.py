"""``jaxattn.dot_product_attention``: validated, dispatched scaled dot-product attention."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import masks as masks_lib
from jaxattn.core import chunked as chunked_lib
from jaxattn.core import dense
from jaxattn.ops import registry
from jaxattn.typing import (
    Bias,
    BoolMask,
    Key,
    KVSegmentIds,
    Query,
    QuerySegmentIds,
    Sinks,
    Value,
)

__all__ = ["dot_product_attention", "explain", "AttentionCall", "make_call"]

PRIMITIVE = "attention"


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """A validated attention call, as backends see it.

    Arrays are rank 4 (a rank-3 call gets a batch of 1). ``mask`` combines the user's mask and
    ``is_causal`` but *not* the segment ids, which kernels take as arrays; ``full_mask`` adds them.
    """

    query: Any
    key: Any
    value: Any
    bias: Any
    mask: masks_lib.Mask | None
    q_segment_ids: Any
    kv_segment_ids: Any
    scale: float
    logits_soft_cap: float | None
    sinks: Any
    dropout_rate: float
    dropout_rng: Any
    return_lse: bool
    platform: str
    block_q: int | None = None  # tile sizes from ``Implementation``; None = the backend default
    block_kv: int | None = None

    @property
    def shape(self) -> dict[str, int]:
        b, t, n, h = self.query.shape
        _, s, k, hv = self.value.shape
        return dict(B=b, T=t, N=n, H=h, S=s, K=k, Hv=hv)

    @property
    def dtype(self):
        return self.query.dtype

    @property
    def full_mask(self) -> masks_lib.Mask | None:
        """The mask including segment ids (for references and the chunked path)."""
        if self.q_segment_ids is None:
            return self.mask
        seg = masks_lib.SegmentMask(self.q_segment_ids, self.kv_segment_ids)
        return seg if self.mask is None else self.mask & seg


def _platform_of(x) -> str:
    if not isinstance(x, jax.core.Tracer) and hasattr(x, "devices"):
        try:
            return next(iter(x.devices())).platform
        except Exception:  # noqa: BLE001 - deleted or abstract arrays fall through
            pass
    return jax.default_backend()


def _fmt(x) -> str:
    return f"shape {tuple(x.shape)} dtype {x.dtype}"


def make_call(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    scale=None,
    is_causal=False,
    query_segment_ids=None,
    kv_segment_ids=None,
    logits_soft_cap=None,
    sinks=None,
    dropout_rate=0.0,
    dropout_rng=None,
    return_lse=False,
) -> tuple[AttentionCall, bool]:
    """Validate arguments and build an :class:`AttentionCall`. Returns ``(call, squeezed)``
    where ``squeezed`` says the inputs were rank 3 (no batch) and outputs must drop the batch."""
    arrays = {"query": query, "key": key, "value": value}
    for name, x in arrays.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    ranks = {name: x.ndim for name, x in arrays.items()}
    if set(ranks.values()) == {3}:
        query, key, value = query[None], key[None], value[None]
        squeezed = True
    elif set(ranks.values()) == {4}:
        squeezed = False
    else:
        raise ValueError(
            "query, key and value must all be rank 4 [B, L, heads, head_dim] (or all rank 3), got "
            f"query {_fmt(query)}, key {_fmt(key)}, value {_fmt(value)}"
        )
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}; cast explicitly"
        )
    b, t, n, h = query.shape
    bk, s, k, hk = key.shape
    bv, sv, kv, hv = value.shape
    if not (b == bk == bv):
        raise ValueError(
            f"batch sizes differ: query {_fmt(query)}, key {_fmt(key)}, value {_fmt(value)}"
        )
    if s != sv or k != kv:
        raise ValueError(f"key {_fmt(key)} and value {_fmt(value)} must agree on [S, K]")
    if h != hk:
        raise ValueError(f"query head_dim {h} != key head_dim {hk} (query {_fmt(query)}, key "
                         f"{_fmt(key)})")
    if k == 0 or n % k:
        raise ValueError(
            f"number of query heads N={n} must be a multiple of key/value heads K={k} (GQA/MQA)"
        )
    if bias is not None:
        if not hasattr(bias, "dtype") or not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be a floating array, got {getattr(bias, 'dtype', bias)}")
        if bias.ndim > 4:
            raise ValueError(f"bias must have rank <= 4, got {_fmt(bias)}")
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
        for dim, size, full in zip("BNTS", bias.shape, (b, n, t, s), strict=True):
            if size not in (1, full):
                raise ValueError(
                    f"bias {_fmt(bias)} does not broadcast to [B, N, T, S] = {[b, n, t, s]} "
                    f"(dimension {dim})"
                )
    if mask is not None and not isinstance(mask, masks_lib.Mask):
        if not hasattr(mask, "dtype"):
            mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}; "
                            "pass additive masks as bias")
        if mask.ndim > 4:
            raise ValueError(f"mask must have rank <= 4, got {_fmt(mask)}")
        mask4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        for dim, size, full in zip("BNTS", mask4.shape, (b, n, t, s), strict=True):
            if size not in (1, full):
                raise ValueError(
                    f"mask {_fmt(mask)} does not broadcast to [B, N, T, S] = {[b, n, t, s]} "
                    f"(dimension {dim})"
                )
        mask = masks_lib.ArrayMask(mask4)
    if mask is not None:
        mask._check_lengths(t, s)
        if mask.num_heads not in (None, n):
            raise ValueError(f"mask has {mask.num_heads} heads but query has N={n}")
        if mask.batch_size not in (None, b):
            raise ValueError(f"mask has batch size {mask.batch_size} but query has B={b}")
    if is_causal:
        causal = masks_lib.CausalMask()
        mask = causal if mask is None else mask & causal
    if query_segment_ids is None and kv_segment_ids is not None:
        raise ValueError("kv_segment_ids given without query_segment_ids")
    if query_segment_ids is not None:
        if kv_segment_ids is None:
            if t != s:
                raise ValueError(f"kv_segment_ids is required when T={t} != S={s}")
            kv_segment_ids = query_segment_ids
        for name, ids, length in (("query_segment_ids", query_segment_ids, t),
                                  ("kv_segment_ids", kv_segment_ids, s)):
            if tuple(ids.shape) != (b, length):
                raise ValueError(f"{name} must have shape [B, L] = {(b, length)}, got {ids.shape}")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise TypeError(f"{name} must be integer, got {ids.dtype}")
    if scale is None:
        scale = h**-0.5
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
    if sinks is not None:
        if tuple(sinks.shape) != (n,):
            raise ValueError(f"sinks must have shape [N] = ({n},), got {sinks.shape}")
        if not jnp.issubdtype(sinks.dtype, jnp.floating):
            raise TypeError(f"sinks must be floating, got {sinks.dtype}")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
    if dropout_rate > 0.0 and dropout_rng is None:
        raise ValueError("dropout_rate > 0 needs dropout_rng")
    call = AttentionCall(
        query=query, key=key, value=value, bias=bias, mask=mask,
        q_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
        scale=float(scale) if not isinstance(scale, jax.core.Tracer) else scale,
        logits_soft_cap=logits_soft_cap, sinks=sinks, dropout_rate=float(dropout_rate),
        dropout_rng=dropout_rng, return_lse=return_lse, platform=_platform_of(query),
    )
    return call, squeezed


# ---- backends --------------------------------------------------------------------------------


def _run_reference(c: AttentionCall):
    return dense.attention_reference(
        c.query, c.key, c.value, c.bias, c.full_mask, scale=c.scale,
        logits_soft_cap=c.logits_soft_cap, sinks=c.sinks, dropout_rate=c.dropout_rate,
        dropout_rng=c.dropout_rng, return_lse=True,
    )


def _run_chunked(c: AttentionCall):
    return chunked_lib.chunked_attention(
        c.query, c.key, c.value, c.bias, c.full_mask, scale=c.scale,
        logits_soft_cap=c.logits_soft_cap, sinks=c.sinks, return_lse=True,
        block_q=c.block_q or chunked_lib.DEFAULT_BLOCK_Q,
        block_kv=c.block_kv or chunked_lib.DEFAULT_BLOCK_KV,
        dropout_rate=c.dropout_rate, dropout_rng=c.dropout_rng,
    )


def _chunked_supports(c: AttentionCall):
    if isinstance(c.scale, jax.core.Tracer):
        return "scale must be a Python number"
    return None


def _cudnn_mask_args(mask):
    """Map a structured mask onto jax.nn's cuDNN arguments, or return a refusal string."""
    if mask is None:
        return dict(is_causal=False)
    if mask == masks_lib.CausalMask():
        return dict(is_causal=True)
    if isinstance(mask, masks_lib.LocalMask) and mask.offset == 0 and mask.window[1] == 0:
        left = mask.window[0]
        if left is None:
            return dict(is_causal=True)
        return dict(is_causal=True, local_window_size=(left, 0))
    return f"cuDNN supports only causal / causal sliding-window masks here, not {mask!r}"


def _cudnn_supports(c: AttentionCall):
    if c.platform != "gpu":
        return f"cuDNN needs a GPU, this call runs on {c.platform!r}"
    if c.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bf16/fp16, got {c.dtype}"
    d = c.shape
    if d["H"] != d["Hv"] or d["H"] % 8 or d["H"] > 256:
        return f"cuDNN needs H == Hv, a multiple of 8 and <= 256 (H={d['H']}, Hv={d['Hv']})"
    for what, bad in (("soft-cap", c.logits_soft_cap is not None), ("sinks", c.sinks is not None),
                      ("segment ids", c.q_segment_ids is not None),
                      ("dropout", c.dropout_rate > 0), ("return_lse", c.return_lse)):
        if bad:
            return f"jax.nn's cuDNN path has no {what}"
    args = _cudnn_mask_args(c.mask)
    return args if isinstance(args, str) else None


def _run_cudnn(c: AttentionCall):
    out = jax.nn.dot_product_attention(
        c.query, c.key, c.value, c.bias, scale=c.scale, implementation="cudnn",
        **_cudnn_mask_args(c.mask),
    )
    return out, None


registry.register(PRIMITIVE, registry.Backend(
    "reference", _run_reference, supports=lambda c: None, priority=0))
registry.register(PRIMITIVE, registry.Backend(
    "xla_chunked", _run_chunked, supports=_chunked_supports, priority=10, tiled=True))
# No length heuristic between the two XLA paths: benchmarks/attention_cpu.py measured xla_chunked
# faster than the reference already at L=512 on CPU (one tile), and it never needs [T, S] memory.
registry.register(PRIMITIVE, registry.Backend(
    "cudnn", _run_cudnn, supports=_cudnn_supports, priority=30))


# ---- public API ------------------------------------------------------------------------------


def dot_product_attention(
    query: Query,
    key: Key,
    value: Value,
    bias: Bias | None = None,
    mask: masks_lib.Mask | BoolMask | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_segment_ids: QuerySegmentIds | None = None,
    kv_segment_ids: KVSegmentIds | None = None,
    logits_soft_cap: float | None = None,
    sinks: Sinks | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_lse: bool = False,
    implementation: str | registry.Implementation | None = None,
):
    """Scaled dot-product attention (Vaswani et al., "Attention Is All You Need", 2017).

    ``softmax(soft_cap(scale * Q K^T + bias), masked [, sinks]) V``, computed per head with
    grouped-query attention when ``K < N`` (query head ``n`` uses kv head ``n // (N // K)``, as in
    ``jax.nn.dot_product_attention``; K/V are never repeated in memory).

    Args:
      query: ``[B, T, N, H]``. Rank-3 ``[T, N, H]`` inputs (all three) are accepted too.
      key: ``[B, S, K, H]`` with ``N % K == 0``.
      value: ``[B, S, K, Hv]``.
      bias: additive logits bias broadcastable to ``[B, N, T, S]`` (rank <= 4, aligned right).
      mask: a :class:`jaxattn.masks.Mask` or a boolean array broadcastable to ``[B, N, T, S]``;
        ``True`` = may attend.
      scale: logit scale, default ``H ** -0.5``.
      is_causal: AND the mask with ``CausalMask()`` (``k <= q``, top-left aligned as jax.nn).
      query_segment_ids, kv_segment_ids: int ``[B, T]`` / ``[B, S]`` document ids; a query only
        sees keys of its own segment. ``kv_segment_ids`` defaults to the query's when ``T == S``.
      logits_soft_cap: ``c``: logits become ``c * tanh(logits / c)`` after scaling and bias.
      sinks: ``[N]`` one learnable logit per head that joins every softmax denominator
        (attention sinks; it takes probability mass but contributes no value).
      dropout_rate, dropout_rng: dropout on the probabilities (deterministic given the rng).
      return_lse: also return the natural-log sum-exp of the logits ``[B, T, N]`` (f32).
      implementation: ``"reference"``, ``"xla_chunked"``, ``"cudnn"`` (and any registered later,
        e.g. ``"pallas"``), or ``None`` for the best that can run this call here.
        :func:`explain` tells which one ``None`` picks and why the others were refused.
        ``jaxattn.Implementation("xla_chunked", block_q=128, block_kv=256)`` names a tiled
        backend with explicit tile sizes (memory/speed trade-off).

    Returns:
      ``[B, T, N, Hv]`` in the inputs' dtype, and with ``return_lse`` also ``[B, T, N]``. A query
      row with no visible key (and no sink) returns zeros, ``lse = -inf``, and zero gradients.

    Raises:
      ValueError / TypeError: on bad shapes or dtypes, naming the argument; ValueError when
        ``implementation`` names a backend that cannot run this call, saying why.
    """
    call, squeezed = make_call(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
        logits_soft_cap=logits_soft_cap, sinks=sinks, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, return_lse=return_lse,
    )
    impl = registry.as_implementation(implementation)
    if impl is not None and impl.has_tiles:
        call = dataclasses.replace(call, block_q=impl.block_q, block_kv=impl.block_kv)
    backend = registry.choose(PRIMITIVE, call, impl)
    out, lse = backend.run(call)
    if squeezed:
        out = out[0]
        lse = None if lse is None else lse[0]
    return (out, lse) if return_lse else out


def explain(*args, **kwargs) -> registry.Explanation:
    """Same arguments as :func:`dot_product_attention` (``implementation`` is ignored): which
    implementation ``None`` would run and each other's reason for refusal."""
    kwargs.pop("implementation", None)
    call, _ = make_call(*args, **kwargs)
    return registry.explain(PRIMITIVE, call)
from jaxattn.ops import pallas_backend  # noqa: E402,F401  (registers "pallas")
