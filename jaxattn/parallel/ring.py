"""Ring attention inside ``shard_map``: K/V blocks rotate around a mesh axis, partial results are
merged by their log-sum-exp (Liu et al., "Ring Attention with Blockwise Transformers for
Near-Infinite Context", 2023; Brandon et al., "Striped Attention", 2023).

Per device (``P`` devices on the axis, this one with index ``i``): at hop ``h`` the device holds
the K/V block (and its global positions and segment ids) of device ``(i - h) mod P``. It starts
sending that block to ``i + 1`` *before* computing on it, so the transfer can overlap compute.

Backward is a ``custom_vjp`` that rotates K/V again together with their gradient accumulators
``dk, dv`` (which end back home with one last shift), so no device ever holds more than two K/V
blocks: memory stays O(S / P). Each hop's gradient is the vjp of the hop's attention with
cotangents re-weighted by ``w = exp(lse_hop - lse)``, which turns the hop-local softmax into the
global one exactly (it recomputes the hop's forward; the backend is any registered one).

Hop skipping is static: the host computes for every (device, hop) whether the block is EMPTY,
FULL or PARTIAL under the mask at global positions (:func:`jaxattn.parallel.layout.hop_kinds`);
trailing hops that are empty on every device are not run (nor their transfers), and per device
a ``lax.switch`` picks skip / unmasked / masked attention. For static masks every partial block
also gets a static local mask (deduplicated by pattern, :func:`layout.static_partial_masks`), so
the per-device kernel skips empty tiles at compile time and kernels that need static block
metadata (Pallas) can run every hop; masks with traced arrays are evaluated at the traced
positions instead (tiles then skipped at run time).

Segment ids travel with K/V and reach the kernel as arrays (``query_segment_ids`` /
``kv_segment_ids``), not as a mask.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import masks as masks_lib
from jaxattn.core.dropout import DropoutIndex
from jaxattn.ops.attention import dot_product_attention
from jaxattn.parallel.layout import AtPositions

__all__ = ["RingStatic", "ring_attention_local", "local_mask", "attend", "dropout_index",
           "STATIC_BASE"]


@dataclasses.dataclass(frozen=True)
class RingStatic:
    """Static description of one sharded attention call (hashable: a custom_vjp static arg)."""

    axis: str
    axis_size: int
    kinds: tuple[tuple[int, ...], ...]  # [P devices][num_hops]
    mask_def: Any  # treedef of the global mask (None: no mask)
    scale: float
    soft_cap: float | None
    implementation: str | None
    head_axis: str | None = None
    head_count: int | None = None  # query heads per device (for per-head masks)
    batch_axes: tuple[str, ...] = ()
    batch_count: int | None = None
    static_mask: Any = None  # the global mask when it holds no traced arrays (then no leaves)
    # Static local masks of PARTIAL blocks, deduplicated; ``kinds`` entry STATIC_BASE + m means
    # "this block's mask is partial_masks[m]" (compile-time block metadata: static tile
    # skipping, and kernels that need a static mask, e.g. Pallas, can run the hop).
    partial_masks: tuple = ()
    # attention dropout at global indices (the whole call's N heads; batch / head shard offsets)
    dropout_rate: float = 0.0
    dropout_heads: int = 0
    dropout_batch_axes: tuple[str, ...] = ()
    dropout_batch_count: int = 0
    dropout_head_axis: str | None = None
    dropout_head_count: int = 0

    @property
    def num_hops(self) -> int:
        return len(self.kinds[0])


STATIC_BASE = 3  # kinds >= STATIC_BASE index RingStatic.partial_masks


def local_mask(st: RingStatic, kind: int, q_pos, kv_pos, leaves, head_start=None):
    """The mask of one local block (segment ids excluded: they go to the kernel as arrays):
    nothing for FULL, a precomputed static mask, or the global mask evaluated at the (traced)
    global positions. Runs inside ``shard_map``."""
    if kind >= STATIC_BASE:
        return st.partial_masks[kind - STATIC_BASE]
    if kind == masks_lib.FULL or (st.mask_def is None and st.static_mask is None):
        return None
    inner = st.static_mask
    if inner is None:
        inner = jax.tree_util.tree_unflatten(st.mask_def, leaves)
    if head_start is None and st.head_axis is not None:
        head_start = jax.lax.axis_index(st.head_axis) * st.head_count
    batch_start = None
    if st.batch_axes:
        batch_start = jax.lax.axis_index(st.batch_axes) * st.batch_count
    return AtPositions(
        inner, q_pos, kv_pos,
        head_start=head_start, head_count=st.head_count if head_start is not None else None,
        batch_start=batch_start, batch_count=st.batch_count if st.batch_axes else None,
    )


def dropout_index(st: RingStatic, seed, q_pos, kv_pos, head_start=None):
    """The :class:`DropoutIndex` of this device's block (None without dropout): the global
    positions of its query rows / key columns, its batch and head offsets in the whole call.
    Runs inside ``shard_map``."""
    if not st.dropout_rate:
        return None
    batch_start = 0
    if st.dropout_batch_axes:
        batch_start = jax.lax.axis_index(st.dropout_batch_axes) * st.dropout_batch_count
    if head_start is None:
        head_start = 0 if st.dropout_head_axis is None else \
            jax.lax.axis_index(st.dropout_head_axis) * st.dropout_head_count
    return DropoutIndex(seed, st.dropout_heads, batch_start, head_start, q_pos, kv_pos)


def attend(st: RingStatic, q, k, v, mask, q_seg=None, kv_seg=None, bias=None, drop=None):
    """One local attention call ``(out, lse)`` on the configured backend (``drop``: its
    :func:`dropout_index`, when the call has dropout)."""
    kw = {} if drop is None else dict(dropout_rate=st.dropout_rate, dropout_index=drop)
    return dot_product_attention(
        q, k, v, bias, mask, scale=st.scale, logits_soft_cap=st.soft_cap, return_lse=True,
        query_segment_ids=q_seg, kv_segment_ids=None if q_seg is None else kv_seg,
        implementation=st.implementation, **kw,
    )


def _shift(xs, axis, size, by):
    """Send every array in ``xs`` from device ``d`` to ``(d + by) mod size``."""
    if by % size == 0:
        return xs
    perm = [(d, (d + by) % size) for d in range(size)]
    return jax.tree_util.tree_map(lambda x: jax.lax.ppermute(x, axis, perm), xs)


def dispatch_kind(st: RingStatic, h, fns: dict, operands):
    """Run ``fns[kind]`` for this device's block kind at hop ``h`` (a traced loop index).

    Only the kinds that occur somewhere in the table get a branch; with a single kind there is
    no switch at all.
    """
    present = sorted({c for row in st.kinds for c in row})
    if len(present) == 1:
        return fns[present[0]](*operands)
    table = np.array([[present.index(c) for c in row] for row in st.kinds], np.int32)
    index = jnp.asarray(table)[jax.lax.axis_index(st.axis), h]
    return jax.lax.switch(index, [fns[k] for k in present], *operands)


def _hops(st: RingStatic, step, carry, block):
    """Run ``carry = step(h, carry, block, rotating)`` for every hop while the block rotates by
    one device per hop. The transfer of the next block is issued before the hop's compute so the
    two can overlap. (The last hop's transfer is not needed by the forward pass; sending it keeps
    one loop body to compile instead of two.)"""
    hops = st.num_hops
    if hops == 1:  # the mask never reaches another device's block: no communication at all
        return step(0, carry, block, False)

    def body(state, h):
        carry, block = state
        nxt = _shift(block, st.axis, st.axis_size, 1)
        return (step(h, carry, block, True), nxt), None

    (carry, _), _ = jax.lax.scan(body, (carry, block), jnp.arange(hops))
    return carry


def _source(st: RingStatic, h):
    """The device whose kv block this device holds at hop ``h`` (blocks move one device on)."""
    return (jax.lax.axis_index(st.axis) - h) % st.axis_size


def _bias_block(st: RingStatic, bias, h, kv_len):
    """Columns of the local bias rows ``[Bb, Nb, Tl|1, S|1]`` for the kv block held at hop ``h``
    (it came from device ``(d - h) mod P``; columns are in the sharded kv order)."""
    if bias is None or bias.shape[3] == 1:
        return bias
    return jax.lax.dynamic_slice_in_dim(bias, _source(st, h) * kv_len, kv_len, 3)


def _forward(st: RingStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg, leaves, bias, seed):
    b, t, n, _ = q.shape
    hv = v.shape[-1]
    out = jnp.zeros((b, t, n, hv), jnp.float32)
    lse = jnp.full((b, t, n), -jnp.inf, jnp.float32)  # running merged result

    def run(kind):
        def fn(k_, v_, kv_pos_, kv_seg_, bias_):
            mask = local_mask(st, kind, q_pos, kv_pos_, leaves)
            drop = dropout_index(st, seed, q_pos, kv_pos_)
            o, l = attend(st, q, k_, v_, mask, q_seg, kv_seg_, bias_, drop)
            return o.astype(jnp.float32), l

        return fn

    def empty(*_):
        return jnp.zeros((b, t, n, hv), jnp.float32), jnp.full((b, t, n), -jnp.inf, jnp.float32)

    fns = {c: (empty if c == masks_lib.EMPTY else run(c)) for row in st.kinds for c in row}

    def step(h, carry, block, _):
        out, lse = carry
        o_h, l_h = dispatch_kind(st, h, fns, (*block, _bias_block(st, bias, h, k.shape[1])))
        # online LSE merge of the running result with this hop's partial result
        m = jnp.maximum(lse, l_h)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        w_old, w_new = jnp.exp(lse - m), jnp.exp(l_h - m)
        tot = w_old + w_new
        safe = jnp.where(tot > 0, tot, 1.0)
        out = (out * (w_old / safe)[..., None]) + o_h * (w_new / safe)[..., None]
        lse = jnp.where(tot > 0, m + jnp.log(safe), -jnp.inf)
        return out, lse

    out, lse = _hops(st, step, (out, lse), (k, v, kv_pos, kv_seg))
    return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def ring_attention_local(st: RingStatic, q, k, v, q_pos, kv_pos, q_seg, kv_seg, leaves,
                         bias=None, seed=None):
    """Per-device ring attention (call inside ``shard_map`` over ``st.axis``).

    Shapes (local): ``q [B, Tl, N, H]``, ``k, v [B, Sl, K, H|Hv]``, ``q_pos [Tl]``,
    ``kv_pos [Sl]`` (global positions), ``q_seg [B, Tl]`` / ``kv_seg [B, Sl]`` or None, ``leaves``
    the global mask's array leaves, ``bias`` None or this device's query rows of the additive
    bias against every key, ``[B|1, N|1, Tl|1, S|1]`` (key columns in the sharded kv order; it
    gets ``dbias``), ``seed`` the whole call's ``uint32 [2]`` dropout seed (with
    ``st.dropout_rate``; each hop drops the entries the unsharded call drops). Returns
    ``out [B, Tl, N, Hv]`` and f32 ``lse [B, Tl, N]``.
    """
    return _forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, leaves, bias, seed)


def _ring_fwd(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, leaves, bias, seed):
    out, lse = _forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, leaves, bias, seed)
    return (out, lse), (q, k, v, q_pos, kv_pos, q_seg, kv_seg, leaves, bias, seed, out, lse)


def _ring_bwd(st, res, cts):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, leaves, bias, seed, out, lse = res
    dout, dlse = cts
    dout = dout.astype(jnp.float32)
    dlse = dlse.astype(jnp.float32)
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    # <dO, O> per row; a hop's lse cotangent is w * (<dO, O_hop> - <dO, O> + dlse)
    do_o = jnp.sum(dout * out.astype(jnp.float32), axis=-1)

    def grads(kind):
        def fn(k_, v_, kv_pos_, kv_seg_, bias_):
            mask = local_mask(st, kind, q_pos, kv_pos_, leaves)
            drop = dropout_index(st, seed, q_pos, kv_pos_)
            (o_h, l_h), vjp = jax.vjp(
                lambda a, b_, c, d: attend(st, a, b_, c, mask, q_seg, kv_seg_, d, drop),
                q, k_, v_, bias_)
            w = jnp.where(jnp.isfinite(l_h), jnp.exp(l_h - lse_safe), 0.0)  # [B, Tl, N]
            do_h = (w[..., None] * dout).astype(o_h.dtype)
            dl_h = w * (jnp.sum(dout * o_h.astype(jnp.float32), axis=-1) - do_o + dlse)
            dq, dk, dv, db = vjp((do_h, dl_h))
            f32 = lambda x: None if x is None else x.astype(jnp.float32)
            return f32(dq), f32(dk), f32(dv), f32(db)

        return fn

    def empty(k_, v_, kv_pos_, kv_seg_, bias_):
        zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)
        return zeros(q), zeros(k_), zeros(v_), zeros(bias_)

    fns = {c: (empty if c == masks_lib.EMPTY else grads(c)) for row in st.kinds for c in row}
    kv_len = k.shape[1]
    split = bias is not None and bias.shape[3] > 1  # dbias columns land in the hop's block

    def step(h, carry, block, rotating):
        dq, dk, dv, db = carry
        dq_h, dk_h, dv_h, db_h = dispatch_kind(st, h, fns, (*block, _bias_block(st, bias, h,
                                                                                  kv_len)))
        dq, dk, dv = dq + dq_h, dk + dk_h, dv + dv_h
        if db is not None and split:
            src = _source(st, h)
            cur = jax.lax.dynamic_slice_in_dim(db, src * kv_len, kv_len, 3)
            db = jax.lax.dynamic_update_slice_in_dim(db, cur + db_h, src * kv_len, 3)
        elif db is not None:
            db = db + db_h
        if rotating:  # dK/dV accumulators travel with their block
            dk, dv = _shift((dk, dv), st.axis, st.axis_size, 1)
        return dq, dk, dv, db

    zeros = lambda x: None if x is None else jnp.zeros(x.shape, jnp.float32)
    dq, dk, dv, db = _hops(st, step, (zeros(q), zeros(k), zeros(v), zeros(bias)),
                           (k, v, kv_pos, kv_seg))
    if st.num_hops > 1:  # after h shifts the accumulators sit h devices on: send them home
        dk, dv = _shift((dk, dv), st.axis, st.axis_size, -st.num_hops)
    none = jax.tree_util.tree_map(lambda _: None, (q_pos, kv_pos, q_seg, kv_seg, leaves))
    db = None if db is None else db.astype(bias.dtype)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), *none, db, None)


ring_attention_local.defvjp(_ring_fwd, _ring_bwd)
