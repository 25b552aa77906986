"""Sequence layouts for context parallelism: load-balancing permutations, masks evaluated at
global positions, and the static (device, hop) block table that lets the ring skip empty hops.

With a causal mask and contiguous sharding, device ``i`` of ``P`` sees ``i + 1`` non-empty KV
blocks, so the last device does ``P`` times the work of the first. Two reorderings fix that
(both permute the sequence *before* it is split into ``P`` contiguous shards):

* ``"zigzag"`` (ring-flash-attention / Llama 3 context parallelism): cut the sequence into
  ``2P`` chunks; device ``i`` holds chunks ``i`` and ``2P - 1 - i``.
* ``"striped"`` (Striped Attention, Brandon et al. 2023): device ``i`` holds positions
  ``i, i + P, i + 2P, ...``.

Because positions no longer equal local indices, every mask is evaluated at *global* positions
(:class:`AtPositions`); positions travel with the rotating KV blocks.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from jaxattn import masks as masks_lib

__all__ = [
    "LOAD_BALANCE",
    "sequence_permutation",
    "inverse_permutation",
    "AtPositions",
    "hop_kinds",
]

LOAD_BALANCE = (None, "zigzag", "striped")


def sequence_permutation(length: int, num_shards: int, load_balance: str | None) -> np.ndarray:
    """int32 ``[length]``: ``perm[j]`` is the global position stored at permuted index ``j``.

    Shard ``i`` (``length // num_shards`` consecutive permuted indices) then holds the positions
    its load-balancing scheme assigns it. ``None`` is the identity.
    """
    if load_balance not in LOAD_BALANCE:
        raise ValueError(f"load_balance must be one of {LOAD_BALANCE}, got {load_balance!r}")
    p = num_shards
    if load_balance is None:
        if length % p:
            raise ValueError(f"length {length} is not divisible by the axis size {p}")
        return np.arange(length, dtype=np.int32)
    if load_balance == "zigzag":
        if length % (2 * p):
            raise ValueError(
                f"zigzag load balancing needs the length ({length}) divisible by 2 x axis size "
                f"({2 * p})"
            )
        chunks = np.arange(length, dtype=np.int32).reshape(2 * p, length // (2 * p))
        order = [c for i in range(p) for c in (i, 2 * p - 1 - i)]
        return chunks[order].reshape(-1)
    if length % p:
        raise ValueError(f"length {length} is not divisible by the axis size {p}")
    return np.arange(length, dtype=np.int32).reshape(length // p, p).T.reshape(-1)


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=perm.dtype)
    return inv


def _take(ids, idx, xp):
    return xp.take(ids, xp.clip(idx, 0, ids.shape[0] - 1), axis=0)


@masks_lib.register_mask  # same pytree/dataclass registration as every other Mask
class AtPositions(masks_lib.Mask):
    """``inner`` evaluated at global positions: local query ``i`` sits at ``q_positions[i]``,
    local key ``j`` at ``kv_positions[j]``.

    ``q_positions [T_local]``, ``kv_positions [S_local]`` (int, may be traced). When the inner
    mask depends on the head (or batch) and the local array holds only a slice of the heads
    (batch rows), ``head_start``/``head_count`` (``batch_start``/``batch_count``) select it.
    """

    inner: masks_lib.Mask = None  # type: ignore[assignment]
    q_positions: Any = None
    kv_positions: Any = None
    head_start: Any = None
    head_count: int | None = None
    batch_start: Any = None
    batch_count: int | None = None
    _array_fields: ClassVar = ("q_positions", "kv_positions", "head_start", "batch_start")

    @property
    def num_heads(self):
        n = self.inner.num_heads
        return None if n is None else (self.head_count or n)

    @property
    def batch_size(self):
        b = self.inner.batch_size
        return None if b is None else (self.batch_count or b)

    def _check_lengths(self, q_len, kv_len):
        if self.q_positions.shape[0] != q_len or self.kv_positions.shape[0] != kv_len:
            raise ValueError(
                f"AtPositions has {self.q_positions.shape[0]} query / "
                f"{self.kv_positions.shape[0]} key positions for a [{q_len}, {kv_len}] problem"
            )

    def _arrays(self):
        own = [getattr(self, n) for n in self._array_fields if masks_lib.is_array(
            getattr(self, n))]
        return own + self.inner._arrays()

    def static(self):
        inner = self.inner.static()
        if inner is None or not all(not masks_lib.is_tracer(a) for a in self._arrays()):
            return None
        return self

    def _evaluate(self, q, k, xp):
        qp = _take(xp.asarray(self.q_positions), q[:, 0], xp).astype(np.int32)[:, None]
        kp = _take(xp.asarray(self.kv_positions), k[0], xp).astype(np.int32)[None, :]
        out = self.inner._evaluate(qp, kp, xp)  # [b, n, tq, tk]
        if self.head_count is not None and out.shape[1] > 1:
            out = _slice(out, 1, self.head_start, self.head_count, xp)
        if self.batch_count is not None and out.shape[0] > 1:
            out = _slice(out, 0, self.batch_start, self.batch_count, xp)
        return out


def _slice(x, axis, start, size, xp):
    if xp is np:
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(int(start), int(start) + size)
        return x[tuple(idx)]
    from jax import lax

    return lax.dynamic_slice_in_dim(x, start, size, axis)


def _pair_kind(allowed: np.ndarray) -> int:
    if not allowed.any():
        return masks_lib.EMPTY
    return masks_lib.FULL if allowed.all() else masks_lib.PARTIAL


# Host-side evaluation budget for masks that are not chunk-structured (striped order).
_MAX_HOST_ELEMENTS = 1 << 24


def hop_kinds(
    mask: masks_lib.Mask | None,
    q_perm: np.ndarray,
    kv_perm: np.ndarray,
    num_shards: int,
    load_balance: str | None,
) -> np.ndarray:
    """int8 ``[P, P]``: kind (EMPTY / PARTIAL / FULL) of the block that device ``i`` meets at
    ring hop ``h`` (KV from device ``(i - h) mod P``), valid for every batch row and head.

    Computed once on the host from the mask's structure; a mask holding traced arrays gives
    PARTIAL everywhere (decided at run time, tile by tile, by the attention kernel).
    """
    p = num_shards
    if mask is None:
        return np.full((p, p), masks_lib.FULL, np.int8)
    static = mask.static()
    kinds = np.full((p, p), masks_lib.PARTIAL, np.int8)
    if static is None:
        return kinds
    t, s = q_perm.shape[0], kv_perm.shape[0]
    tl, sl = t // p, s // p
    if load_balance != "striped":
        # Chunk-structured orders: the block kind of a device pair follows from the mask's
        # block metadata on the global grid at the granularity of contiguous runs.
        parts = 2 if load_balance == "zigzag" else 1
        uq, uk = tl // parts, sl // parts
        grid = static.block_info(t, s, uq, uk).union_kind()  # [t / uq, s / uk]
        for i in range(p):
            qb = [int(q_perm[i * tl + r * uq]) // uq for r in range(parts)]
            for h in range(p):
                src = (i - h) % p
                kb = [int(kv_perm[src * sl + r * uk]) // uk for r in range(parts)]
                sub = grid[np.ix_(qb, kb)]
                if (sub == masks_lib.EMPTY).all():
                    kinds[i, h] = masks_lib.EMPTY
                elif (sub == masks_lib.FULL).all():
                    kinds[i, h] = masks_lib.FULL
        return kinds
    if t * s > _MAX_HOST_ELEMENTS:
        return kinds  # too big to evaluate on the host: decide at run time
    for i in range(p):
        for h in range(p):
            src = (i - h) % p
            allowed = np.asarray(static.evaluate(q_perm[i * tl:(i + 1) * tl],
                                                 kv_perm[src * sl:(src + 1) * sl]))
            kinds[i, h] = _pair_kind(allowed)
    return kinds


def lcm_heads(num_kv_heads: int, shards: int) -> int:
    """Smallest kv-head count that is a multiple of both ``K`` and ``shards``."""
    return num_kv_heads * shards // math.gcd(num_kv_heads, shards)


def expand_kv_heads(key, value, num_heads: int, shards: int):
    """Repeat each kv head so that ``K' = lcm(K, shards)`` heads split evenly over ``shards``
    devices while query head ``n`` still uses (a copy of) kv head ``n // (N // K)``.

    Needs ``N % shards == 0``; returns ``key, value`` unchanged when ``K % shards == 0``.
    """
    k = key.shape[2]
    if k % shards == 0:
        return key, value
    target = lcm_heads(k, shards)
    if num_heads % target:
        raise ValueError(
            f"cannot split N={num_heads} query heads with K={k} kv heads over {shards} devices: "
            f"N must be a multiple of lcm(K, devices) = {target}"
        )
    r = target // k
    return jnp.repeat(key, r, axis=2), jnp.repeat(value, r, axis=2)


# ---- in-place relayout of sharded sequences (inside shard_map) ---------------------------------


def can_relayout_locally(length: int, num_shards: int, load_balance: str | None) -> bool:
    """Whether :func:`to_balanced` can reorder shards with point-to-point collectives (O(L/P)
    memory per device); otherwise the caller permutes the global array."""
    if load_balance == "zigzag":
        return length % (2 * num_shards) == 0
    if load_balance == "striped":
        return length % (num_shards * num_shards) == 0
    return True


def _zigzag_routes(p: int):
    """(perm for even chunks, perm for odd chunks): natural device ``i`` holds chunks ``2i`` and
    ``2i + 1``; zigzag device ``j`` wants chunks ``j`` and ``2p - 1 - j``."""
    dest = lambda m: m if m < p else 2 * p - 1 - m
    even = [(i, dest(2 * i)) for i in range(p)]
    odd = [(i, dest(2 * i + 1)) for i in range(p)]
    return even, odd


def to_balanced(x, axis_name: str, num_shards: int, load_balance: str | None, dim: int):
    """Local shard of the natural-order sequence -> local shard of the permuted order of
    :func:`sequence_permutation` (inside ``shard_map``; ``dim`` is the sequence dimension)."""
    from jax import lax

    p = num_shards
    if load_balance is None:
        return x
    if load_balance == "zigzag":
        lo, hi = jnp.split(x, 2, axis=dim)  # chunks 2i and 2i + 1
        even, odd = _zigzag_routes(p)
        got_even, got_odd = lax.ppermute(lo, axis_name, even), lax.ppermute(hi, axis_name, odd)
        # device j's first chunk is j: even when j is even
        j_even = lax.axis_index(axis_name) % 2 == 0
        first = jnp.where(j_even, got_even, got_odd)
        second = jnp.where(j_even, got_odd, got_even)
        return jnp.concatenate([first, second], axis=dim)
    # striped: residue b of every natural shard goes to device b, sources in order
    x = jnp.moveaxis(x, dim, 0)
    tl = x.shape[0]
    x = x.reshape((tl // p, p) + x.shape[1:])  # [a, b, ...]: position i*tl + a*p + b
    x = lax.all_to_all(x, axis_name, 1, 1, tiled=True)  # [a, source i, ...]
    x = jnp.swapaxes(x, 0, 1).reshape((tl,) + x.shape[2:])
    return jnp.moveaxis(x, 0, dim)


def from_balanced(x, axis_name: str, num_shards: int, load_balance: str | None, dim: int):
    """Inverse of :func:`to_balanced`."""
    from jax import lax

    p = num_shards
    if load_balance is None:
        return x
    if load_balance == "zigzag":
        first, second = jnp.split(x, 2, axis=dim)
        j_even = lax.axis_index(axis_name) % 2 == 0
        send_even = jnp.where(j_even, first, second)
        send_odd = jnp.where(j_even, second, first)
        even, odd = _zigzag_routes(p)
        back = lambda routes: [(d, s) for s, d in routes]
        lo = lax.ppermute(send_even, axis_name, back(even))
        hi = lax.ppermute(send_odd, axis_name, back(odd))
        return jnp.concatenate([lo, hi], axis=dim)
    x = jnp.moveaxis(x, dim, 0)
    tl = x.shape[0]
    x = jnp.swapaxes(x.reshape((p, tl // p) + x.shape[1:]), 0, 1)  # [a, source i, ...]
    x = lax.all_to_all(x, axis_name, 1, 1, tiled=True)  # [a, b, ...]
    x = x.reshape((tl,) + x.shape[2:])
    return jnp.moveaxis(x, 0, dim)


# Host-side budget (evaluated mask elements) for precomputing static per-block masks.
_MAX_STATIC_ELEMENTS = 1 << 26


def _shared_index(local, q_len: int, kv_len: int, seen: dict, masks: list) -> int:
    """Index of ``local``'s boolean ``[q_len, kv_len]`` pattern in ``masks``, appending it when
    new: blocks with the same pattern share one static mask (one compiled branch)."""
    pattern = np.asarray(local.evaluate(np.arange(q_len), np.arange(kv_len)))
    key = np.packbits(pattern).tobytes() + str(pattern.shape).encode()
    if key not in seen:
        seen[key] = len(masks)
        masks.append(local)
    return seen[key]


def static_partial_masks(
    mask: masks_lib.Mask | None,
    kinds: np.ndarray,
    q_perm: np.ndarray,
    kv_perm: np.ndarray,
    num_shards: int,
    static_base: int,
):
    """Give every PARTIAL (device, hop) block of :func:`hop_kinds` a *static* local mask.

    Returns ``(kinds', masks)`` where PARTIAL entries became ``static_base + m`` and ``masks[m]``
    is an :class:`AtPositions` with NumPy positions (so block metadata is known at trace time);
    blocks with the same boolean pattern share one mask (one compiled branch). Returns ``None``
    when the mask holds traced arrays or the host evaluation would exceed the budget; callers
    then evaluate the mask at traced positions.
    """
    if mask is None or not (kinds == masks_lib.PARTIAL).any():
        return None
    static = mask.static()
    if static is None:
        return None
    p = num_shards
    tl, sl = q_perm.shape[0] // p, kv_perm.shape[0] // p
    if int((kinds == masks_lib.PARTIAL).sum()) * tl * sl > _MAX_STATIC_ELEMENTS:
        return None
    out = kinds.astype(np.int32).copy()
    masks: list = []
    seen: dict[bytes, int] = {}
    for i, h in zip(*np.nonzero(kinds == masks_lib.PARTIAL), strict=True):
        src = (i - h) % p
        qp = q_perm[i * tl:(i + 1) * tl].astype(np.int32)
        kp = kv_perm[src * sl:(src + 1) * sl].astype(np.int32)
        out[i, h] = static_base + _shared_index(AtPositions(static, qp, kp), tl, sl, seen, masks)
    return out, tuple(masks)


def static_device_masks(
    mask: masks_lib.Mask | None,
    q_perm: np.ndarray,
    kv_perm: np.ndarray,
    num_shards: int,
    static_base: int,
):
    """All-gather context parallelism: a *static* mask for each device's queries against the
    gathered keys (which arrive in ``kv_perm`` order).

    Returns ``(kinds [P, 1], masks)`` in the encoding of :func:`static_partial_masks` (entry
    ``static_base + m`` = ``masks[m]``, identical patterns shared), or ``None`` when the mask is
    absent, holds traced arrays, or the host evaluation would exceed the budget.
    """
    static = None if mask is None else mask.static()
    if static is None:
        return None
    p = num_shards
    tl = q_perm.shape[0] // p
    if tl * kv_perm.shape[0] * p > _MAX_STATIC_ELEMENTS:
        return None
    kp = kv_perm.astype(np.int32)
    kinds = np.zeros((p, 1), np.int32)
    masks: list = []
    seen: dict[bytes, int] = {}
    for i in range(p):
        local = AtPositions(static, q_perm[i * tl:(i + 1) * tl].astype(np.int32), kp)
        kinds[i, 0] = static_base + _shared_index(local, tl, kp.shape[0], seen, masks)
    return kinds, tuple(masks)

