"""``jaxattn.decode_attention``: attention of a decoding step against a KV cache, with the work
bounded by the live cache length (:mod:`jaxattn.core.decode`'s tile loop).

It takes :func:`jaxattn.dot_product_attention`'s arguments (validated by the same
:func:`jaxattn.ops.call.make_call`) and gives the same result; ``key_value_seq_lengths`` is what
bounds the loop. It is the default ``decode_attention_fn`` of
:class:`jaxattn.nn.MultiHeadAttention`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxattn import masks as masks_lib
from jaxattn.core.decode import DEFAULT_DECODE_BLOCK_KV, DecodeResult, decode_attention_tiles
from jaxattn.ops.call import make_call
from jaxattn.ops.explicit_axes import explicit_mesh_of, explicit_spec, in_auto_axes
from jaxattn.typing import Bias, BoolMask, Key, KVSegmentIds, Query, QuerySegmentIds, Sinks, Value

__all__ = ["decode_attention", "decode_attention_with_stats"]


def decode_attention(
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
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    return_lse: bool = False,
    block_kv: int = DEFAULT_DECODE_BLOCK_KV,
):
    """Scaled dot-product attention for decoding: a few new queries against a long KV cache.

    Same arguments and result as :func:`jaxattn.dot_product_attention` (dropout and
    ``score_mod`` excepted), computed by flash-decoding's tile loop
    (:func:`jaxattn.core.decode.decode_attention_tiles`): key tiles of ``block_kv`` positions in
    a ``lax.while_loop`` of ``ceil(max(key_value_seq_lengths) / block_kv)`` iterations, so under
    ``jax.jit`` a step reads only the cache's live prefix, not all ``S_max`` positions.

    Args:
      query: ``[B, T, N, H]`` (``T``: the step's tokens; any ``T`` works, small is the point).
      key: ``[B, S_max, K, H]`` (the whole cache), ``N % K == 0``.
      value: ``[B, S_max, K, Hv]``.
      bias, mask, scale, is_causal, query_segment_ids, kv_segment_ids, logits_soft_cap, sinks,
        query_seq_lengths, local_window_size, return_lse: as
        :func:`jaxattn.dot_product_attention` (a decode step's causal mask is
        ``jaxattn.masks.CausalMask(offset=cache_index)``, with an int ``[B]`` offset for a
        ragged batch).
      key_value_seq_lengths: int ``[B]``: the live cache length of each sequence; keys at or
        beyond it are invisible and are never read. ``None``: every tile is read.
      block_kv: keys per tile (clipped to ``S_max``).

    Returns:
      ``[B, T, N, Hv]`` in the query's dtype (and the f32 LSE ``[B, T, N]`` with
      ``return_lse``). A row with no visible key (and no sink) is zero.

    Raises:
      ValueError / TypeError: bad shapes or dtypes, naming the argument (the checks of
        :func:`jaxattn.dot_product_attention`), or a non-positive ``block_kv``.

    Forward only (no reverse-mode gradient through the loop); train with
    :func:`jaxattn.dot_product_attention`. Inputs sharded over Explicit mesh axes are computed
    on Auto axes and the output is sharded like the query (as ``dot_product_attention``).
    """
    mesh = explicit_mesh_of(query, key, value)
    if mesh is not None:  # sharding in types: run the loop on Auto axes
        arguments = dict(locals())
        del arguments["mesh"]
        return _on_auto_axes(mesh, arguments)
    result, squeezed = _run(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                            query_segment_ids=query_segment_ids,
                            kv_segment_ids=kv_segment_ids, logits_soft_cap=logits_soft_cap,
                            sinks=sinks, query_seq_lengths=query_seq_lengths,
                            key_value_seq_lengths=key_value_seq_lengths,
                            local_window_size=local_window_size, block_kv=block_kv)
    out, lse = result.out, result.lse
    if squeezed:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _on_auto_axes(mesh, arguments: dict):
    """:func:`decode_attention` of ``arguments`` with the Explicit axes of ``mesh`` turned Auto;
    the output is sharded like the query (its last axis unsharded), the LSE like the query
    without its last axis."""
    want_lse = arguments["return_lse"]
    arguments["return_lse"] = True
    spec = tuple(explicit_spec(arguments["query"]))
    out, lse = in_auto_axes(lambda **kw: decode_attention(**kw), mesh,
                            (PartitionSpec(*spec[:-1], None), PartitionSpec(*spec[:-1])),
                            **arguments)
    return (out, lse) if want_lse else out


def decode_attention_with_stats(query, key, value, bias=None, mask=None, **kwargs) -> DecodeResult:
    """:func:`decode_attention` for tests and benchmarks: returns the
    :class:`jaxattn.core.decode.DecodeResult` ``(out [B, T, N, Hv], lse [B, T, N],
    tiles_visited)``, where ``tiles_visited`` is the loop's own count of the tiles it read
    (rank-4 inputs only; same keyword arguments, ``return_lse`` excepted)."""
    if query.ndim != 4:
        raise ValueError(f"decode_attention_with_stats takes rank-4 [B, T, N, H] inputs, got "
                         f"query of shape {tuple(query.shape)}")
    result, _ = _run(query, key, value, bias, mask, **kwargs)
    return result


def _run(query, key, value, bias, mask, *, block_kv: int = DEFAULT_DECODE_BLOCK_KV,
         key_value_seq_lengths=None, **kwargs) -> tuple[DecodeResult, bool]:
    """Validate like :func:`jaxattn.dot_product_attention` and run the tile loop."""
    if isinstance(block_kv, bool) or not isinstance(block_kv, int) or block_kv < 1:
        raise ValueError(f"block_kv must be a positive int, got {block_kv!r}")
    call, squeezed = make_call(query, key, value, bias, mask,
                               key_value_seq_lengths=key_value_seq_lengths, **kwargs)
    num_live = None if key_value_seq_lengths is None else \
        jnp.asarray(key_value_seq_lengths, jnp.int32)
    result = decode_attention_tiles(
        call.query, call.key, call.value, num_live=num_live, bias=call.bias,
        mask=call.full_mask, scale=call.scale, logits_soft_cap=call.logits_soft_cap,
        sinks=call.sinks, block_kv=block_kv)
    return result, squeezed
