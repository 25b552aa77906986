"""Context (sequence) parallel attention over a mesh axis: all-gather KV, ring, Ulysses.

Three strategies, one signature (:func:`context_parallel_attention`), the masking arguments of
:func:`jaxattn.dot_product_attention`:

* ``"all_gather"``: queries stay sequence-sharded; K/V (and their positions, segment ids) are
  all-gathered (Llama 3 context parallelism, Dubey et al. 2024; MaxText's default). Memory per
  device O(S) for K/V, O(T/P) for everything else. Backward: autodiff (all-gather transposes to
  a reduce-scatter of dK/dV).
* ``"ring"``: K/V blocks rotate with ``ppermute``, partial results merged by LSE (Liu et al.,
  "Ring Attention", 2023); custom backward that rotates dK/dV with their blocks
  (:mod:`jaxattn.parallel.ring`). Memory O(S/P).
* ``"ulysses"``: all-to-all from sequence-sharded to head-sharded, full-sequence attention on
  ``N/P`` heads, all-to-all back (Jacobs et al., "DeepSpeed Ulysses", 2023). Needs the (local)
  head count divisible by the axis size; kv heads fewer than that are replicated.

Masks are evaluated at global positions, so they stay right under load balancing
(``load_balance="zigzag"`` / ``"striped"``, :mod:`jaxattn.parallel.layout`); the inputs are given
in natural order and permuted / un-permuted here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxattn import masks as masks_lib
from jaxattn.core import dropout as dropout_lib
from jaxattn.ops.call import make_call
from jaxattn.parallel import layout
from jaxattn.parallel.mesh_axes import (
    axes_size,
    has_explicit_axes,
    pick_batch_axes,
    pick_head_axis,
    place_like,
    shard_map,
    spec_axes,
)
from jaxattn.parallel.ring import (
    STATIC_BASE,
    RingStatic,
    attend,
    dispatch_kind,
    dropout_index,
    local_mask,
    ring_attention_local,
)
from jaxattn.typing import Bias, Key, KVSegmentIds, Query, QuerySegmentIds, Sinks, Value

__all__ = ["context_parallel_attention", "STRATEGIES"]


# ---- where a call lives on the mesh -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Layout:
    """Host-side placement of one call: the sequence axis, batch / head axes, the balancing."""

    axis: str
    axis_size: int  # P, devices along ``axis``
    batch_axes: tuple[str, ...]
    head_axis: str | None
    head_shards: int  # size of ``head_axis`` (1 when None)
    load_balance: str | None  # the balancing the strategy uses (never for ulysses)
    local_balance: str | None  # reordered shard-locally inside shard_map (else globally)
    q_perm: np.ndarray = dataclasses.field(compare=False)  # [T] natural -> balanced order
    kv_perm: np.ndarray = dataclasses.field(compare=False)  # [S]

    @property
    def global_balance(self) -> str | None:
        """The balancing done by a global gather before sharding (when not shard-local)."""
        return self.load_balance if self.local_balance is None else None

    @property
    def batch_spec(self):
        return spec_axes(self.batch_axes)


def _static_kinds(kinds) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(x) for x in row) for row in kinds)


# ---- the three strategies: one small object each ----------------------------------------------
# Each has ``balances_load`` (whether load balancing reorders its shards), ``refuse(lay, n)``
# (raise for what it cannot do), ``kv_head_shards(lay)`` (how many ways K/V heads are split),
# ``bias_spec(bias, lay)`` and ``local_step(st, lay, global_mask, n_loc)``: the per-device
# function ``(q, k, v, q_pos, kv_pos, q_seg, kv_seg, leaves, bias) -> (out, lse)``.
class _RowSharded:
    """What all_gather and ring share: every layout works, kv heads follow the query heads'
    sharding, and a bias is split by query rows."""

    balances_load: ClassVar[bool] = True

    def refuse(self, lay: _Layout, num_heads: int) -> None:
        del lay, num_heads  # every layout works

    def kv_head_shards(self, lay: _Layout) -> int:
        return lay.head_shards

    def bias_spec(self, bias, lay: _Layout) -> P:
        return _rows_spec(bias, lay.batch_spec, lay.head_axis, lay.axis)


@dataclasses.dataclass(frozen=True)
class _AllGather(_RowSharded):
    """Queries stay sequence-sharded; K/V, their positions and segment ids are all-gathered."""

    def local_step(self, st: RingStatic, lay: _Layout, global_mask, n_loc: int):
        del global_mask, n_loc
        if st.head_axis is None and not st.batch_axes:
            # A static global mask gives every device a static local mask (one compiled branch
            # per distinct pattern): compile-time tile skipping, and Pallas can run it.
            per_device = layout.static_device_masks(st.static_mask, lay.q_perm, lay.kv_perm,
                                                    lay.axis_size, STATIC_BASE)
            if per_device is not None:
                kinds, partial_masks = per_device
                st = _replace(st, kinds=_static_kinds(kinds), partial_masks=partial_masks)
        return functools.partial(_all_gather_local, st)


@dataclasses.dataclass(frozen=True)
class _Ring(_RowSharded):
    """K/V blocks rotate around the axis (:mod:`jaxattn.parallel.ring`); empty trailing hops
    are dropped and static masks give every partial hop a static local mask."""

    def local_step(self, st: RingStatic, lay: _Layout, global_mask, n_loc: int):
        del n_loc
        p = lay.axis_size
        kinds = layout.hop_kinds(global_mask, lay.q_perm, lay.kv_perm, p, lay.load_balance)
        busy = np.nonzero((kinds != masks_lib.EMPTY).any(axis=0))[0]
        hops = int(busy.max()) + 1 if busy.size else 1
        kinds = kinds[:, :hops]
        partial_masks: tuple = ()
        if st.head_axis is None and not st.batch_axes:  # no traced head / batch slicing needed
            static_cases = layout.static_partial_masks(
                st.static_mask, kinds, lay.q_perm, lay.kv_perm, p, STATIC_BASE)
            if static_cases is not None:
                kinds, partial_masks = static_cases
        st = _replace(st, kinds=_static_kinds(kinds), partial_masks=partial_masks)
        return functools.partial(ring_attention_local, st)


@dataclasses.dataclass(frozen=True)
class _Ulysses:
    """All-to-all from sequence- to head-sharded, full-length attention, and back; every device
    sees the whole sequence, so load balancing does not apply."""

    balances_load: ClassVar[bool] = False

    def refuse(self, lay: _Layout, num_heads: int) -> None:
        per_device = num_heads // lay.head_shards
        if per_device % lay.axis_size:
            raise ValueError(
                f"ulysses needs the heads per device ({num_heads} heads / {lay.head_shards} on "
                f"{lay.head_axis!r} = {per_device}) divisible by the size {lay.axis_size} of "
                f"mesh axis {lay.axis!r}; use 'ring' or 'all_gather'"
            )

    def kv_head_shards(self, lay: _Layout) -> int:
        return lay.head_shards * lay.axis_size

    def bias_spec(self, bias, lay: _Layout) -> P:
        # heads split over (head axis, context), the whole sequence on every device
        heads = spec_axes(tuple(a for a in (lay.head_axis, lay.axis) if a))
        return P(lay.batch_spec if bias.shape[0] > 1 else None,
                 heads if bias.shape[1] > 1 else None, None, None)

    def local_step(self, st: RingStatic, lay: _Layout, global_mask, n_loc: int):
        del lay, global_mask
        return functools.partial(_ulysses_local, st, n_loc=n_loc)


_STRATEGIES = {"all_gather": _AllGather(), "ring": _Ring(), "ulysses": _Ulysses()}
STRATEGIES = tuple(_STRATEGIES)


def context_parallel_attention(
    query: Query,
    key: Key,
    value: Value,
    bias: Bias | None = None,
    mask: masks_lib.Mask | None = None,
    *,
    mesh: Mesh,
    axis: str = "context",
    strategy: str = "all_gather",
    is_causal: bool = False,
    query_segment_ids: QuerySegmentIds | None = None,
    kv_segment_ids: KVSegmentIds | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    sinks: Sinks | None = None,
    load_balance: str | None = None,
    implementation: str | None = None,
    return_lse: bool = False,
    batch_axes="auto",
    head_axis="auto",
    dropout_rate: float = 0.0,
    dropout_rng=None,
):
    """Attention with the sequence sharded over mesh axis ``axis`` (context parallelism).

    Same math and masking arguments as :func:`jaxattn.dot_product_attention`; the result equals
    the unsharded computation. Call it on global arrays (under ``jax.jit`` or eagerly); inputs
    are resharded to ``[batch_axes, axis, head_axis, None]`` as needed.

    Args:
      query: ``[B, T, N, H]``; key ``[B, S, K, H]``; value ``[B, S, K, Hv]``; ``N % K == 0``.
      bias: additive bias broadcastable to ``[B, N, T, S]`` (differentiable). Each device holds
        its query rows against every key (``[B, N, T/P, S]``; ring hops slice the columns of the
        block they hold), so a full bias costs ``O(T S / P)`` memory per device.
      mask: a :class:`jaxattn.masks.Mask` (evaluated at global positions) or boolean array.
      mesh: the ``jax.sharding.Mesh``; ``axis``: the mesh axis to split the sequence over.
      strategy: ``"all_gather"``, ``"ring"`` or ``"ulysses"`` (see the module docstring).
      is_causal, query_segment_ids, kv_segment_ids, scale, logits_soft_cap, sinks: as in
        :func:`jaxattn.dot_product_attention` (segment ids are sharded with the sequence and
        travel with K/V).
      load_balance: ``None``, ``"zigzag"`` or ``"striped"``: reorder the sequence before sharding
        so causal work is even over devices (self-attention, ``T == S``). Masks stay exact.
        Inputs and outputs stay in natural order: the reorder runs shard-locally (ppermute for
        zigzag, all_to_all for striped when ``T % P**2 == 0``; else a global gather). Ignored
        by ``"ulysses"``, whose devices each see the whole sequence.
      implementation: the per-device attention backend (``"xla_chunked"``, ``"reference"``, a
        registered Pallas backend, or None for automatic); it must return the LSE.
      return_lse: also return the f32 LSE ``[B, T, N]``.
      batch_axes: mesh axes for the batch (default: ``data`` / ``fsdp`` where they divide B).
      head_axis: mesh axis for heads (default: ``tensor`` when it divides N); kv heads fewer
        than its size are replicated.
      dropout_rate, dropout_rng: attention dropout; every device hashes the global (batch, head,
        query, key) indices of its entries (:class:`jaxattn.core.dropout.DropoutIndex`), so
        exactly the entries the unsharded call drops for the same rng are dropped, under every
        strategy and load balancing (the per-device backend must take ``dropout_index``:
        ``xla_chunked`` or ``reference``).

    Returns:
      ``[B, T, N, Hv]`` (and ``[B, T, N]`` with ``return_lse``).

    Raises:
      ValueError: lengths not divisible by the axis size (by twice it for zigzag), heads not
        divisible for Ulysses, unknown strategy / axis.
    """
    strat = _pick_strategy(strategy)
    _check_mesh_axis(mesh, axis)
    call, squeezed = make_call(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
        logits_soft_cap=logits_soft_cap, return_lse=return_lse, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    if isinstance(call.scale, jax.core.Tracer):
        raise TypeError("scale must be a Python number for context_parallel_attention")
    lay = _plan_layout(strat, mesh, axis, call, load_balance, batch_axes, head_axis)
    out, lse = _sharded_attention(strat, lay, mesh, call, implementation)
    if sinks is not None:
        out, lse = _apply_sinks(out, lse, sinks)
    if squeezed:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out


def _pick_strategy(strategy: str):
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return _STRATEGIES[strategy]


def _check_mesh_axis(mesh, axis: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not a mesh axis; the mesh has {dict(mesh.shape)}")


def _plan_layout(strat, mesh: Mesh, axis: str, call, load_balance, batch_axes, head_axis
                 ) -> _Layout:
    """Check the lengths and the balancing, pick the batch / head axes, and let the strategy
    refuse what it cannot run."""
    b, t, n, _ = call.query.shape
    s = call.key.shape[1]
    p = mesh.shape[axis]
    for name, length in (("query", t), ("key/value", s)):
        if length % p:
            raise ValueError(
                f"{name} length {length} is not divisible by the size {p} of mesh axis {axis!r}; "
                "pad the sequence (and mask the padding) to a multiple of it"
            )
    if load_balance is not None and t != s:
        raise ValueError(f"load_balance needs self-attention lengths (T == S), got T={t}, S={s}")
    layout.sequence_permutation(t, p, load_balance)  # validates load_balance and divisibility
    if not strat.balances_load:
        load_balance = None
    # reorder shard-locally with ppermute / all_to_all when the layout allows (O(T/P) memory),
    # else by a global gather before sharding
    local_lb = load_balance if layout.can_relayout_locally(t, p, load_balance) else None
    batch_ax = pick_batch_axes(mesh, batch_axes, b, axis)
    head_ax = pick_head_axis(mesh, head_axis, n, axis)
    lay = _Layout(axis=axis, axis_size=p, batch_axes=batch_ax, head_axis=head_ax,
                  head_shards=axes_size(mesh, head_ax), load_balance=load_balance,
                  local_balance=local_lb, q_perm=layout.sequence_permutation(t, p, load_balance),
                  kv_perm=layout.sequence_permutation(s, p, load_balance))
    strat.refuse(lay, n)
    return lay


def _mask_parts(global_mask):
    """``(static_mask, mask_def, leaves)``: a static mask is a compile-time constant (no
    leaves); any other mask travels as its array leaves and treedef."""
    static_mask = None if global_mask is None else global_mask.static()
    if static_mask is not None or global_mask is None:
        return static_mask, None, []
    leaves, mask_def = jax.tree_util.tree_flatten(global_mask)
    return None, mask_def, [jnp.asarray(x) for x in leaves]


def _balance_globally(lay: _Layout, mesh: Mesh, q, k, v, q_seg, kv_seg, bias):
    """Reorder what the shard-local relayout does not: the sequence (when it cannot be done
    shard-locally) and the bias rows / columns (always, when balancing). On meshes with Explicit
    axes the gathered arrays are first made whole along the sequence (:func:`_take_whole`)."""
    whole = P(lay.batch_spec, None, lay.head_axis, None)
    take = lambda x, perm, ax, spec: _take_whole(x, perm, ax, spec, mesh)
    if lay.global_balance is not None:
        q, k, v = (take(x, perm, 1, whole) for x, perm in
                   ((q, lay.q_perm), (k, lay.kv_perm), (v, lay.kv_perm)))
        if q_seg is not None:
            seg_whole = P(lay.batch_spec, None)
            q_seg = take(q_seg, lay.q_perm, 1, seg_whole)
            kv_seg = take(kv_seg, lay.kv_perm, 1, seg_whole)
    if lay.load_balance is not None and bias is not None:
        if bias.shape[2] > 1:
            bias = take(bias, lay.q_perm, 2, P())
        if bias.shape[3] > 1:
            bias = take(bias, lay.kv_perm, 3, P())
    return q, k, v, q_seg, kv_seg, bias


def _take_whole(x, perm, axis: int, whole_spec: P, mesh: Mesh):
    """``jnp.take(x, perm, axis)``; on meshes with Explicit axes ``x`` is first placed as
    ``whole_spec`` (``axis`` unsharded: a gather along a sharded axis has no unambiguous output
    sharding there)."""
    if has_explicit_axes(mesh):
        x = place_like(x, whole_spec, mesh)
    return jnp.take(x, jnp.asarray(perm), axis=axis)


def _ring_static(call, lay: _Layout, static_mask, mask_def, b_loc: int, n_loc: int,
                 implementation) -> RingStatic:
    """The static description every strategy's local step starts from (``b_loc`` / ``n_loc``:
    batch rows / query heads per device)."""
    global_mask = call.mask
    per_head = global_mask is not None and global_mask.num_heads is not None
    per_batch = global_mask is not None and bool(global_mask.batch_size)
    return RingStatic(
        axis=lay.axis, axis_size=lay.axis_size, kinds=((),), mask_def=mask_def,
        static_mask=static_mask, scale=call.scale, soft_cap=call.logits_soft_cap,
        implementation=implementation, head_axis=lay.head_axis if per_head else None,
        head_count=n_loc if per_head else None, batch_axes=lay.batch_axes if per_batch else (),
        batch_count=b_loc, dropout_rate=call.dropout_rate, dropout_heads=call.shape["N"],
        dropout_batch_axes=lay.batch_axes, dropout_batch_count=b_loc,
        dropout_head_axis=lay.head_axis, dropout_head_count=n_loc,
    )


def _sharded_attention(strat, lay: _Layout, mesh: Mesh, call, implementation):
    """``(out [B, T, N, Hv], lse [B, T, N])`` in natural order: the strategy's local step under
    ``shard_map`` over ``[batch_axes, axis, head_axis, None]`` shards."""
    q, k, v = call.query, call.key, call.value
    b, t, n, _ = q.shape
    s = k.shape[1]
    k, v = layout.expand_kv_heads(k, v, n, strat.kv_head_shards(lay))
    static_mask, mask_def, leaves = _mask_parts(call.mask)
    q, k, v, q_seg, kv_seg, bias = _balance_globally(
        lay, mesh, q, k, v, call.q_segment_ids, call.kv_segment_ids, call.bias)
    n_loc = n // lay.head_shards
    st = _ring_static(call, lay, static_mask, mask_def, b // axes_size(mesh, lay.batch_axes), n_loc,
                      implementation)
    has_seg = q_seg is not None
    if not has_seg:  # placeholders that keep one shard_map signature; never read
        q_seg, kv_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    local = strat.local_step(st, lay, call.mask, n_loc)
    bias_args = [] if bias is None else [bias]
    bias_spec = [] if bias is None else [strat.bias_spec(bias, lay)]
    qkv_spec = P(lay.batch_spec, lay.axis, lay.head_axis, None)
    seg_spec, pos_spec = P(lay.batch_spec, lay.axis), P(lay.axis)
    seed = dropout_lib.dropout_seed(call.dropout_rng) if call.dropout_rate else \
        jnp.zeros((2,), jnp.uint32)  # the whole call's dropout seed, the same on every device
    fn = shard_map(_local_body(lay, local, has_seg), mesh,
                    in_specs=(qkv_spec, qkv_spec, qkv_spec, pos_spec, pos_spec, seg_spec,
                              seg_spec, [P()] * len(leaves), P(), *bias_spec),
                    out_specs=(qkv_spec, P(lay.batch_spec, lay.axis, lay.head_axis)))
    out, lse = fn(q, k, v, jnp.asarray(lay.q_perm), jnp.asarray(lay.kv_perm), q_seg, kv_seg,
                  leaves, seed, *bias_args)
    if lay.global_balance is not None:  # back to natural order, then sequence-sharded again
        inv = layout.inverse_permutation(lay.q_perm)
        out = _take_whole(out, inv, 1, P(lay.batch_spec, None, lay.head_axis, None), mesh)
        lse = _take_whole(lse, inv, 1, P(lay.batch_spec, None, lay.head_axis), mesh)
        out, lse = place_like(out, qkv_spec, mesh), place_like(lse, P(*qkv_spec[:3]), mesh)
    return out, lse


def _local_body(lay: _Layout, local, has_seg: bool):
    """The ``shard_map`` body: shard-local reorder into the balanced layout, the strategy's
    local step, and back."""
    p, lb = lay.axis_size, lay.local_balance

    def body(q, k, v, qp, kp, qs, ks, leaves, seed, *bias_local):
        seq = lambda x: layout.to_balanced(x, lay.axis, p, lb, 1)
        q, k, v = seq(q), seq(k), seq(v)
        qs, ks = (seq(qs), seq(ks)) if has_seg else (None, None)
        bl = bias_local[0] if bias_local else None
        out, lse = local(q, k, v, qp, kp, qs, ks, leaves, bl, seed)
        back = lambda x: layout.from_balanced(x, lay.axis, p, lb, 1)
        return back(out), back(lse)

    return body


def _rows_spec(bias, bspec, hspec, axis):
    """Bias sharding for strategies that keep queries local: rows over ``axis``, all keys."""
    return P(bspec if bias.shape[0] > 1 else None, hspec if bias.shape[1] > 1 else None,
             axis if bias.shape[2] > 1 else None, None)


def _replace(st, **kw):
    return dataclasses.replace(st, **kw)


def _apply_sinks(out, lse, sinks):
    """Add one sink logit per head to every softmax: ``lse' = logaddexp(lse, sink)`` and the
    output shrinks by ``exp(lse - lse')`` (the sink carries probability but no value)."""
    if tuple(sinks.shape) != (out.shape[2],):
        raise ValueError(f"sinks must have shape [N] = ({out.shape[2]},), got {sinks.shape}")
    s = sinks.astype(jnp.float32)[None, None, :]
    new = jnp.logaddexp(lse, s)
    w = jnp.where(jnp.isfinite(lse), jnp.exp(lse - new), 0.0)
    return (out.astype(jnp.float32) * w[..., None]).astype(out.dtype), new


def _all_gather_local(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, leaves, bias, seed):
    """Queries stay local; K/V, their positions and segment ids are gathered along the axis."""
    gather = lambda x, ax: jax.lax.all_gather(x, st.axis, axis=ax, tiled=True)
    k, v, kv_pos = gather(k, 1), gather(v, 1), gather(kv_pos, 0)
    kv_seg = None if kv_seg is None else gather(kv_seg, 1)
    drop = dropout_index(st, seed, q_pos, kv_pos)
    if st.partial_masks:  # static per-device masks (see static_device_masks)
        fns = {kind: (lambda m: lambda *a: attend(st, *a[:3], m, *a[3:], drop))(
            local_mask(st, kind, None, None, leaves)) for kind in {r[0] for r in st.kinds}}
        return dispatch_kind(st, 0, fns, (q, k, v, q_seg, kv_seg, bias))
    mask = local_mask(st, masks_lib.PARTIAL, q_pos, kv_pos, leaves)
    return attend(st, q, k, v, mask, q_seg, kv_seg, bias, drop)


def _ulysses_local(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, leaves, bias, seed, n_loc):
    """Sequence-sharded -> head-sharded (all-to-all), full-length attention, and back. The
    sequence is in natural order (Ulysses never load-balances)."""
    a2a = lambda x, split, concat: jax.lax.all_to_all(x, st.axis, split, concat, tiled=True)
    q, k, v = a2a(q, 2, 1), a2a(k, 2, 1), a2a(v, 2, 1)  # [B, T, N_loc / P, H]
    gather = lambda x, ax: jax.lax.all_gather(x, st.axis, axis=ax, tiled=True)
    q_pos, kv_pos = gather(q_pos, 0), gather(kv_pos, 0)
    if q_seg is not None:
        q_seg, kv_seg = gather(q_seg, 1), gather(kv_seg, 1)
    heads_here = n_loc // st.axis_size
    # this device holds heads [start, start + heads_here) of the whole call
    base = 0 if st.dropout_head_axis is None else \
        jax.lax.axis_index(st.dropout_head_axis) * n_loc
    first_head = base + jax.lax.axis_index(st.axis) * heads_here
    drop = dropout_index(st, seed, q_pos, kv_pos, head_start=first_head)
    head_start = None
    if st.head_count is not None:  # a per-head mask
        head_start = first_head
        st = _replace(st, head_count=heads_here)
    has_mask = st.mask_def is not None or st.static_mask is not None
    if has_mask and head_start is None and not st.batch_axes:
        # positions are 0..T-1 after the all-to-all: the global mask applies as is (static
        # block skipping inside the kernel when the mask is static)
        mask = st.static_mask
        if mask is None:
            mask = jax.tree_util.tree_unflatten(st.mask_def, leaves)
    else:
        mask = local_mask(st, masks_lib.PARTIAL, q_pos, kv_pos, leaves, head_start=head_start)
    out, lse = attend(st, q, k, v, mask, q_seg, kv_seg, bias, drop)  # [B, T, N_loc/P, Hv]
    return a2a(out, 1, 2), a2a(lse, 1, 2)
