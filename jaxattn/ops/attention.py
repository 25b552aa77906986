"""``jaxattn.dot_product_attention``: validated, dispatched scaled dot-product attention.

Arguments are checked and bound by :func:`jaxattn.ops.call.make_call`; the backends live in
:mod:`jaxattn.ops.backends` (one module each, registered there) and :func:`explain` reports their
verdicts.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import PartitionSpec

from jaxattn import masks as masks_lib
from jaxattn.core.dense import attention_probabilities
from jaxattn.ops import backends as _backends  # noqa: F401  (registers every backend)
from jaxattn.ops import registry
from jaxattn.ops.call import ATTENTION, AttentionCall, float_mask_as_bool, make_call
from jaxattn.ops.explicit_axes import explicit_mesh_of, explicit_spec, in_auto_axes
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

__all__ = ["dot_product_attention", "attention_weights", "explain", "AttentionCall", "make_call",
           "PRIMITIVE"]

PRIMITIVE = ATTENTION


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
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    return_residual: bool = False,
    dropout_index=None,
    score_mod=None,
    score_mod_args=(),
    deterministic: bool | None = None,
    broadcast_dropout: bool | None = None,
    dtype=None,
    precision=None,
    module=None,
    promote_dtype=None,
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
        backend with explicit tile sizes (memory/speed trade-off). ``"xla"`` (jax.nn's name)
        runs the XLA path: ``"xla_chunked"``, or ``"reference"`` where the chunked path refuses.
      query_seq_lengths, key_value_seq_lengths: int ``[B]`` (as ``jax.nn``): keys at or beyond
        ``key_value_seq_lengths[b]`` are invisible and query rows at or beyond
        ``query_seq_lengths[b]`` are zero (a :class:`jaxattn.masks.LengthMask` ANDed in).
      local_window_size: ``w`` or ``(left, right)`` (as ``jax.nn``): query ``q`` sees keys
        ``q - left .. q + right`` (a :class:`jaxattn.masks.LocalMask` ANDed in).
      return_residual: ``jax.nn``'s name for ``return_lse``: also return the LSE ``[B, T, N]``.
      score_mod, score_mod_args: FlexAttention's score function:
        ``score_mod(score, b, h, q_idx, kv_idx, *score_mod_args) -> score`` rewrites every
        scaled logit (after ``bias``, before the soft-cap and the mask) from its indices (int32
        arrays broadcasting like ``[B, 1, 1, 1]``, ``[1, N, 1, 1]``, ``[1, 1, T, 1]``,
        ``[1, 1, 1, S]``); ``score_mod_args`` (arrays: ALiBi slopes, a relative-position table)
        get gradients. ``xla_chunked`` applies it per tile, forward and backward, so no
        ``[T, S]`` bias is built; ready-made ones in :mod:`jaxattn.score_mods`.
      deterministic, broadcast_dropout, dtype, precision, module, promote_dtype: the keywords
        ``flax.nnx.MultiHeadAttention`` passes its ``attention_fn``, so this function can be
        one: ``deterministic=True`` turns dropout off; ``broadcast_dropout=True`` with dropout
        on is refused (jaxattn draws one keep decision per entry; build the flax layer with
        ``broadcast_dropout=False``); ``dtype`` casts q, k, v; ``module`` receives the
        probabilities ``[B, N, T, S]`` as ``nnx.Intermediate`` ``attention_weights`` (flax's
        ``sow_weights``); ``precision`` / ``promote_dtype`` other than None are refused. A float
        0/1 mask (flax's ``make_causal_mask``) is read as boolean.
      dropout_index: for sharded callers: a :class:`jaxattn.core.dropout.DropoutIndex` giving
        this call's place (batch / head offsets, global query / key positions, the seed) in the
        larger call it is a shard of, so it drops exactly that call's entries
        (``jaxattn.parallel`` uses it; the ``reference`` and ``xla_chunked`` backends take it).

    Differences from ``jax.nn.dot_product_attention`` (on purpose): a query row that sees no key
    (e.g. a mask row that is all False) returns zeros here; ``jax.nn`` returns the mean of the
    values. Padded query rows (``query_seq_lengths``) are zeros in both.

    Returns:
      ``[B, T, N, Hv]`` in the inputs' dtype, and with ``return_lse`` also ``[B, T, N]``. A query
      row with no visible key (and no sink) returns zeros, ``lse = -inf``, and zero gradients.

    Raises:
      ValueError / TypeError: on bad shapes or dtypes, naming the argument; ValueError when
        ``implementation`` names a backend that cannot run this call, saying why.
    """
    flax_options = dict(deterministic=deterministic, broadcast_dropout=broadcast_dropout,
                        dtype=dtype, precision=precision, module=module,
                        promote_dtype=promote_dtype)
    if any(v is not None for v in flax_options.values()):  # called as flax's attention_fn
        arguments = {k: v for k, v in locals().items() if k not in flax_options
                     and k != "flax_options"}
        return _as_flax_attention_fn(arguments, **flax_options)
    explicit_mesh = explicit_mesh_of(query, key, value)
    if explicit_mesh is not None:  # sharding in types: run the math on Auto axes
        arguments = dict(locals())
        del arguments["explicit_mesh"], arguments["flax_options"]
        return _on_auto_axes(explicit_mesh, arguments)
    call, squeezed = make_call(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
        logits_soft_cap=logits_soft_cap, sinks=sinks, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, return_lse=return_lse or return_residual,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, dropout_index=dropout_index,
        score_mod=score_mod, score_mod_args=score_mod_args,
    )
    return_lse = return_lse or return_residual
    impl = _xla_alias(registry.as_implementation(implementation), call)
    if impl is not None and impl.has_tiles:
        call = dataclasses.replace(call, block_q=impl.block_q, block_kv=impl.block_kv)
    backend = registry.choose(PRIMITIVE, call, impl)
    out, lse = backend.run(call)
    if squeezed:
        out = out[0]
        lse = None if lse is None else lse[0]
    return (out, lse) if return_lse else out


def _as_flax_attention_fn(arguments: dict, *, deterministic, broadcast_dropout, dtype,
                          precision, module, promote_dtype):
    """:func:`dot_product_attention` of ``arguments`` under the keywords flax passes its
    ``attention_fn`` (see the docstring there)."""
    if precision is not None:
        raise ValueError(f"precision={precision!r} is not supported (jaxattn computes logits and "
                         "softmax in f32 whatever the input dtype); pass precision=None")
    if promote_dtype is not None:
        raise ValueError("promote_dtype is not supported: pass q, k, v of one dtype (or dtype=)")
    if deterministic:
        arguments.update(dropout_rate=0.0, dropout_rng=None)
    if arguments["dropout_rate"] > 0 and broadcast_dropout:
        raise ValueError("broadcast_dropout=True shares one dropout mask over batch and heads; "
                         "jaxattn draws one keep decision per entry (the same in every backend): "
                         "build the flax layer with broadcast_dropout=False")
    if dtype is not None:
        for name in ("query", "key", "value"):
            arguments[name] = arguments[name].astype(dtype)
    arguments["mask"] = float_mask_as_bool(arguments["mask"])
    out = dot_product_attention(**arguments)
    if module is not None:
        from flax import nnx

        weight_args = {k: arguments[k] for k in _WEIGHT_ARGS}
        probs = attention_weights(arguments["query"], arguments["key"], **weight_args)
        module.sow(nnx.Intermediate, "attention_weights", probs.astype(arguments["query"].dtype))
    return out


# the arguments of dot_product_attention that decide the probabilities (attention_weights)
_WEIGHT_ARGS = ("bias", "mask", "scale", "is_causal", "query_segment_ids", "kv_segment_ids",
                "logits_soft_cap", "sinks", "score_mod", "score_mod_args")


def attention_weights(query, key, bias=None, mask=None, *, scale=None, is_causal=False,
                      query_segment_ids=None, kv_segment_ids=None, logits_soft_cap=None,
                      sinks=None, score_mod=None, score_mod_args=()):
    """The probabilities :func:`dot_product_attention` uses, before dropout: f32
    ``[B, N, T, S]`` (``query [B, T, N, H]``, ``key [B, S, K, H]``; arguments as there, checked
    the same way). Dense, O(T S) memory: what flax's ``sow_weights`` stores."""
    call, _ = make_call(query, key, key, bias, mask, scale=scale, is_causal=is_causal,
                        query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
                        logits_soft_cap=logits_soft_cap, sinks=sinks, score_mod=score_mod,
                        score_mod_args=score_mod_args)
    probs, _ = attention_probabilities(
        call.query, call.key, call.bias, call.full_mask, scale=call.scale,
        logits_soft_cap=call.logits_soft_cap, sinks=call.sinks, score_mod=call.score_mod,
        score_mod_args=call.score_mod_args)
    return probs


def _on_auto_axes(mesh, arguments: dict):
    """:func:`dot_product_attention` of ``arguments`` with the Explicit axes of ``mesh`` turned
    Auto (:mod:`jaxattn.ops.explicit_axes`); the output is sharded like the query (its last
    axis unsharded), the LSE like the query without its last axis."""
    want_lse = arguments["return_lse"] or arguments["return_residual"]
    arguments.update(return_lse=True, return_residual=False)
    spec = tuple(explicit_spec(arguments["query"]))
    out_spec = PartitionSpec(*spec[:-1], None)
    out, lse = in_auto_axes(lambda **kw: dot_product_attention(**kw), mesh,
                            (out_spec, PartitionSpec(*spec[:-1])), **arguments)
    return (out, lse) if want_lse else out


def _xla_alias(impl: registry.Implementation | None, call: AttentionCall):
    """``"xla"`` (``jax.nn``'s name for its XLA path) -> ``"xla_chunked"``, or ``"reference"``
    where the chunked path cannot run the call."""
    if impl is None or impl.name != "xla":
        return impl
    chunked = next(b for b in registry.backends(PRIMITIVE) if b.name == "xla_chunked")
    name = "xla_chunked" if chunked.supports(call) is None else "reference"
    return dataclasses.replace(impl, name=name) if name == "xla_chunked" else \
        registry.Implementation(name)


def explain(*args, **kwargs) -> registry.Explanation:
    """Same arguments as :func:`dot_product_attention` (``implementation`` is ignored): which
    implementation ``None`` would run and each other's reason for refusal."""
    kwargs.pop("implementation", None)
    if kwargs.pop("return_residual", False):
        kwargs["return_lse"] = True
    call, _ = make_call(*args, **kwargs)
    return registry.explain(PRIMITIVE, call)
