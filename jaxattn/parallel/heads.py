"""Head (tensor) parallel attention (Shoeybi et al., "Megatron-LM", 2019).

Attention is independent per head, so splitting heads over a mesh axis needs no communication
inside attention: the q/k/v projections are column-sharded (their ``heads`` / ``kv_heads`` axis
maps to ``tensor``), each device attends over its own heads, and the output projection is
row-sharded (its ``heads`` axis on ``tensor``; XLA inserts the one reduce after it). With
:data:`jaxattn.parallel.logical.DEFAULT_RULES` the NNX layer's parameter names give exactly this.

GQA with fewer kv heads than devices is not an error: each kv head is replicated so that every
device holds the kv head its query heads use (``K' = lcm(K, P)`` copies; query head ``n`` still
reads kv head ``n // (N // K)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxattn.ops.attention import dot_product_attention
from jaxattn.ops.call import make_call
from jaxattn.parallel import layout
from jaxattn.parallel.mesh_axes import (
    axes_size,
    pick_batch_axes,
    shard_map,
    spec_axes,
)

__all__ = ["head_parallel_attention"]


def head_parallel_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    mesh: Mesh,
    axis: str = "tensor",
    batch_axes="auto",
    is_causal: bool = False,
    query_segment_ids=None,
    kv_segment_ids=None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    sinks=None,
    implementation: str | None = None,
    return_lse: bool = False,
):
    """:func:`jaxattn.dot_product_attention` with heads split over mesh axis ``axis``.

    Shapes as there: ``query [B, T, N, H]``, ``key/value [B, S, K, H|Hv]``, ``bias``
    broadcastable to ``[B, N, T, S]``, ``sinks [N]``; ``N`` must be divisible by the axis size
    (``K`` need not be: kv heads are replicated). The batch is also split over ``batch_axes``
    (default: ``data`` / ``fsdp`` where they divide ``B``).

    Returns ``[B, T, N, Hv]`` (and the f32 LSE ``[B, T, N]`` with ``return_lse``).
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has {dict(mesh.shape)}")
    call, squeezed = make_call(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
        logits_soft_cap=logits_soft_cap, sinks=sinks, return_lse=return_lse,
    )
    q, k, v = call.query, call.key, call.value
    b, t, n, _ = q.shape
    s = k.shape[1]
    p = mesh.shape[axis]
    if n % p:
        raise ValueError(f"N={n} query heads are not divisible by the size {p} of mesh axis "
                         f"{axis!r}")
    k, v = layout.expand_kv_heads(k, v, n, p)
    batch_ax = pick_batch_axes(mesh, batch_axes, b, axis)
    bspec = spec_axes(batch_ax)
    n_loc, b_loc = n // p, b // axes_size(mesh, batch_ax)

    gmask = call.mask
    static = None if gmask is None else gmask.static()
    if gmask is not None and static is None:
        raise ValueError("head_parallel_attention needs a mask without traced arrays; pass "
                         "segment ids as query_segment_ids / kv_segment_ids")
    per_head = static is not None and static.num_heads is not None
    per_batch = static is not None and static.batch_size is not None and bool(batch_ax)
    has_seg = call.q_segment_ids is not None
    seg_q = call.q_segment_ids if has_seg else jnp.zeros((b, t), jnp.int32)
    seg_kv = call.kv_segment_ids if has_seg else jnp.zeros((b, s), jnp.int32)
    bias_ = call.bias
    extra, extra_spec = [], []
    if bias_ is not None:
        extra.append(bias_)
        extra_spec.append(P(bspec if bias_.shape[0] > 1 else None,
                            axis if bias_.shape[1] > 1 else None, None, None))
    if sinks is not None:
        extra.append(sinks)
        extra_spec.append(P(axis))

    def body(q, k, v, qs, ks, *rest):
        rest = list(rest)
        bl = rest.pop(0) if bias_ is not None else None
        sk = rest.pop(0) if sinks is not None else None
        m = static
        if per_head or per_batch:  # the mask's head / batch rows for this device's slice
            m = layout.AtPositions(
                static, jnp.arange(t), jnp.arange(s),
                head_start=jax.lax.axis_index(axis) * n_loc if per_head else None,
                head_count=n_loc if per_head else None,
                batch_start=jax.lax.axis_index(batch_ax) * b_loc if per_batch else None,
                batch_count=b_loc if per_batch else None,
            )
        return dot_product_attention(
            q, k, v, bl, m, scale=call.scale, logits_soft_cap=call.logits_soft_cap, sinks=sk,
            query_segment_ids=qs if has_seg else None, kv_segment_ids=ks if has_seg else None,
            return_lse=True, implementation=implementation,
        )

    spec = P(bspec, None, axis, None)
    fn = shard_map(body, mesh, in_specs=(spec, spec, spec, P(bspec), P(bspec), *extra_spec),
                    out_specs=(spec, P(bspec, None, axis)))
    out, lse = fn(q, k, v, seg_q, seg_kv, *extra)
    if squeezed:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out
