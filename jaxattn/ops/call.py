"""Argument binding for the dispatched primitives: validated calls, as backends see them.

Every public primitive checks its arguments here and hands its backends one frozen call object:
:class:`AttentionCall` (from :func:`make_call`) and :class:`NeighborhoodCall` (from
:func:`make_neighborhood_call`). The small checks both share (arrays, floating dtypes, ranks,
broadcasting, one description format for shapes in error messages) are public helpers, so every
primitive words the same mistake the same way. Nothing here computes attention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn import masks as masks_lib
from jaxattn.core import neighborhood as na_ref

__all__ = [
    "ATTENTION", "NEIGHBORHOOD", "AttentionCall", "make_call", "NeighborhoodCall",
    "make_neighborhood_call", "platform_of", "describe", "describe_all", "check_arrays",
    "check_floating_same_dtype", "check_floating_array", "check_common_rank", "pad_to_rank",
    "check_broadcast", "TENSOR", "TensorAttentionCall", "make_tensor_call", "float_mask_as_bool",
]

ATTENTION = "attention"  # registry primitive of dot_product_attention
NEIGHBORHOOD = "neighborhood"  # registry primitive of neighborhood_attention
TENSOR = "tensor_attention"  # registry primitive of tensor_attention


# ---- shared checks ---------------------------------------------------------------------------


def platform_of(x) -> str:
    """The platform (``"cpu"``, ``"gpu"``, ``"tpu"``) a concrete array lives on; for tracers and
    abstract arrays, JAX's default backend."""
    if not isinstance(x, jax.core.Tracer) and hasattr(x, "devices"):
        try:
            return next(iter(x.devices())).platform
        except Exception:  # noqa: BLE001 - deleted or abstract arrays fall through
            pass
    return jax.default_backend()


def describe(x) -> str:
    """``"shape (2, 16, 4, 8) dtype float32"``: how error messages show an array."""
    return f"shape {tuple(x.shape)} dtype {x.dtype}"


def describe_all(named: Mapping[str, Any]) -> str:
    """``"query shape (..) dtype .., key shape (..) dtype .."`` for several named arrays."""
    return ", ".join(f"{name} {describe(x)}" for name, x in named.items())


def _joined(names) -> str:
    """``["query", "key", "value"]`` -> ``"query, key and value"``."""
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check_arrays(named: Mapping[str, Any]) -> None:
    """TypeError naming the first argument that is not an array (no ``shape``/``dtype``)."""
    for name, x in named.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")


def check_floating_same_dtype(named: Mapping[str, Any]) -> None:
    """TypeError unless every named array is floating point and all share one dtype."""
    for name, x in named.items():
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    dtypes = [x.dtype for x in named.values()]
    if any(d != dtypes[0] for d in dtypes):
        raise TypeError(f"{_joined(named)} must share a dtype, got "
                        f"{', '.join(str(d) for d in dtypes)}; cast explicitly")


def check_floating_array(name: str, x) -> None:
    """TypeError unless ``x`` is an array with a floating dtype (e.g. an additive bias)."""
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got {getattr(x, 'dtype', x)}")


def check_common_rank(named: Mapping[str, Any], ranks: Collection[int], expected: str) -> int:
    """The rank all named arrays share, which must be one of ``ranks``; else ValueError saying
    they must all be ``expected`` and showing each array."""
    found = {x.ndim for x in named.values()}
    if len(found) != 1 or not found <= set(ranks):
        raise ValueError(f"{_joined(named)} must all be {expected}, got {describe_all(named)}")
    return found.pop()


def pad_to_rank(name: str, x, rank: int):
    """``x`` with leading size-1 axes up to ``rank`` (broadcasting aligns right); ValueError if
    ``x`` already has more axes."""
    if x.ndim > rank:
        raise ValueError(f"{name} must have rank <= {rank}, got {describe(x)}")
    return x.reshape((1,) * (rank - x.ndim) + tuple(x.shape))


def check_broadcast(label: str, shape, target: Mapping[str, int]) -> None:
    """ValueError unless every axis of ``shape`` is 1 or the ``target`` size of that axis.

    ``target`` maps axis names to sizes in order, e.g. ``dict(B=2, N=4, T=16, S=16)``; ``label``
    starts the message (e.g. ``"bias shape (..) dtype .."``).
    """
    for dim, size, full in zip(target, shape, target.values(), strict=True):
        if size not in (1, full):
            raise ValueError(
                f"{label} does not broadcast to [{', '.join(target)}] = {list(target.values())} "
                f"(dimension {dim})")


# ---- dot_product_attention -------------------------------------------------------------------


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
    # where this call's entries sit in a larger call it is a shard of (dropout only)
    dropout_index: Any = None
    score_mod: Any = None  # fn(score, b, h, q_idx, kv_idx, *score_mod_args) -> score
    score_mod_args: tuple = ()

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


def _check_qkv_shapes(query, key, value) -> None:
    """Batch, [S, K], head_dim and GQA agreement of rank-4 query / key / value."""
    qkv = {"query": query, "key": key, "value": value}
    b, _, n, h = query.shape
    bk, s, k, hk = key.shape
    bv, sv, kv, _ = value.shape
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: {describe_all(qkv)}")
    if s != sv or k != kv:
        raise ValueError(f"key {describe(key)} and value {describe(value)} must agree on [S, K]")
    if h != hk:
        raise ValueError(f"query head_dim {h} != key head_dim {hk} (query {describe(query)}, "
                         f"key {describe(key)})")
    if k == 0 or n % k:
        raise ValueError(
            f"number of query heads N={n} must be a multiple of key/value heads K={k} (GQA/MQA)"
        )


def _bind_bias(bias, bnts: dict[str, int]):
    """A floating bias broadcastable to [B, N, T, S], as a rank-4 array."""
    check_floating_array("bias", bias)
    bias = pad_to_rank("bias", bias, 4)
    check_broadcast(f"bias {describe(bias)}", bias.shape, bnts)
    return bias


def float_mask_as_bool(mask):
    """``mask`` with a concrete float array of only 0 and 1 turned boolean (flax's mask helpers,
    e.g. ``nnx.make_causal_mask``, return float32 and flax reads nonzero as "attend"); any other
    mask is returned unchanged. A float mask with other values (an additive mask) or a traced
    one is refused: it cannot be told apart from a bias."""
    if mask is None or isinstance(mask, masks_lib.Mask) or not hasattr(mask, "dtype"):
        return mask
    if not jnp.issubdtype(mask.dtype, jnp.floating):
        return mask
    if isinstance(mask, jax.core.Tracer):
        raise TypeError(f"a float mask (shape {tuple(mask.shape)}) must be concrete to be read "
                        "as 0/1; pass a boolean mask under jit (flax's make_causal_mask(..., "
                        "dtype=bool)), or an additive mask as bias")
    values = np.unique(np.asarray(mask))
    if not set(values.tolist()) <= {0.0, 1.0}:
        raise TypeError(f"float mask values must be 0 or 1 (got {values[:4].tolist()}...); "
                        "pass additive masks as bias")
    return np.asarray(mask) != 0


def _bind_mask(mask, bnts: dict[str, int]) -> masks_lib.Mask:
    """A Mask, or a boolean array broadcastable to [B, N, T, S] wrapped as ``ArrayMask``; checked
    against the call's lengths, heads and batch."""
    if not isinstance(mask, masks_lib.Mask):
        if not hasattr(mask, "dtype"):
            mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be boolean (True = attend), got dtype {mask.dtype}; "
                            "pass additive masks as bias")
        mask4 = pad_to_rank("mask", mask, 4)
        check_broadcast(f"mask {describe(mask)}", mask4.shape, bnts)
        mask = masks_lib.ArrayMask(mask4)
    mask.check_lengths(bnts["T"], bnts["S"])
    if mask.num_heads not in (None, bnts["N"]):
        raise ValueError(f"mask has {mask.num_heads} heads but query has N={bnts['N']}")
    if mask.batch_size not in (None, bnts["B"]):
        raise ValueError(f"mask has batch size {mask.batch_size} but query has B={bnts['B']}")
    return mask


def _bind_segment_ids(query_segment_ids, kv_segment_ids, b: int, t: int, s: int):
    """``(query_segment_ids, kv_segment_ids)`` checked as int ``[B, T]`` / ``[B, S]``; the kv ids
    default to the query's when ``T == S``."""
    if query_segment_ids is None:
        if kv_segment_ids is not None:
            raise ValueError("kv_segment_ids given without query_segment_ids")
        return None, None
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
    return query_segment_ids, kv_segment_ids


def _length_mask(query_seq_lengths, key_value_seq_lengths, b: int):
    """``jax.nn``'s ``query_seq_lengths`` / ``key_value_seq_lengths`` (int ``[B]``) as a
    :class:`jaxattn.masks.LengthMask`, or None."""
    if query_seq_lengths is None and key_value_seq_lengths is None:
        return None
    for name, lengths in (("query_seq_lengths", query_seq_lengths),
                          ("key_value_seq_lengths", key_value_seq_lengths)):
        if lengths is None:
            continue
        if not hasattr(lengths, "dtype"):
            raise TypeError(f"{name} must be an int array of shape [B] = ({b},), got "
                            f"{type(lengths).__name__}")
        if tuple(lengths.shape) != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array of shape [B] = ({b},), got "
                             f"{describe(lengths)}")
    return masks_lib.LengthMask(kv_lengths=key_value_seq_lengths, q_lengths=query_seq_lengths)


def _window_mask(local_window_size):
    """``jax.nn``'s ``local_window_size`` (``w`` or ``(left, right)``) as a
    :class:`jaxattn.masks.LocalMask`, or None."""
    if local_window_size is None:
        return None
    if isinstance(local_window_size, list):
        local_window_size = tuple(local_window_size)
    return masks_lib.LocalMask(local_window_size)


def _check_scalars(n: int, logits_soft_cap, sinks, dropout_rate, dropout_rng) -> None:
    """Soft-cap, sinks ``[N]`` and dropout arguments."""
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
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    dropout_index=None,
    score_mod=None,
    score_mod_args=(),
) -> tuple[AttentionCall, bool]:
    """Validate arguments and build an :class:`AttentionCall`. Returns ``(call, squeezed)``
    where ``squeezed`` says the inputs were rank 3 (no batch) and outputs must drop the batch.

    Arguments as :func:`jaxattn.dot_product_attention`: ``query [B, T, N, H]``, ``key
    [B, S, K, H]``, ``value [B, S, K, Hv]`` (or all three without ``B``). Raises TypeError /
    ValueError naming the argument and its shape.
    """
    qkv = {"query": query, "key": key, "value": value}
    check_arrays(qkv)
    rank = check_common_rank(qkv, (3, 4),
                             "rank 4 [B, L, heads, head_dim] (or all rank 3)")
    squeezed = rank == 3
    if squeezed:
        query, key, value = query[None], key[None], value[None]
    check_floating_same_dtype({"query": query, "key": key, "value": value})
    _check_qkv_shapes(query, key, value)
    b, t, n, h = query.shape
    s = key.shape[1]
    bnts = dict(B=b, N=n, T=t, S=s)
    if bias is not None:
        bias = _bind_bias(bias, bnts)
    if mask is not None:
        mask = _bind_mask(mask, bnts)
    if is_causal:
        causal = masks_lib.CausalMask()
        mask = causal if mask is None else mask & causal
    for extra in (_length_mask(query_seq_lengths, key_value_seq_lengths, b),
                  _window_mask(local_window_size)):
        if extra is not None:
            mask = extra if mask is None else mask & extra
    query_segment_ids, kv_segment_ids = _bind_segment_ids(query_segment_ids, kv_segment_ids,
                                                          b, t, s)
    if scale is None:
        scale = h**-0.5
    score_mod_args = _check_score_mod(score_mod, score_mod_args)
    if dropout_index is not None:
        _check_dropout_index(dropout_index, dropout_rate, n, t, s)
        if dropout_rng is None and dropout_rate > 0:
            dropout_rng = "from dropout_index"  # its seed is used; the rng is never read
    _check_scalars(n, logits_soft_cap, sinks, dropout_rate, dropout_rng)
    call = AttentionCall(
        query=query, key=key, value=value, bias=bias, mask=mask,
        q_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids,
        scale=float(scale) if not isinstance(scale, jax.core.Tracer) else scale,
        logits_soft_cap=logits_soft_cap, sinks=sinks, dropout_rate=float(dropout_rate),
        dropout_rng=dropout_rng, return_lse=return_lse, platform=platform_of(query),
        dropout_index=dropout_index if dropout_rate > 0 else None,
        score_mod=score_mod, score_mod_args=score_mod_args,
    )
    return call, squeezed


def _check_score_mod(score_mod, score_mod_args) -> tuple:
    """``score_mod`` callable (or None) and its arguments as a tuple of arrays."""
    if score_mod is None:
        if score_mod_args:
            raise ValueError("score_mod_args were given without a score_mod")
        return ()
    if not callable(score_mod):
        raise TypeError(f"score_mod must be callable, got {type(score_mod).__name__}")
    args = tuple(score_mod_args) if isinstance(score_mod_args, list | tuple) else \
        (score_mod_args,)
    for i, a in enumerate(args):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"score_mod_args[{i}] must be an array, got {type(a).__name__}")
    return args


def _check_dropout_index(index, dropout_rate, n: int, t: int, s: int) -> None:
    """A :class:`jaxattn.core.dropout.DropoutIndex` that fits a ``[B, T, N, S]`` call."""
    from jaxattn.core.dropout import DropoutIndex

    if not isinstance(index, DropoutIndex):
        raise TypeError(f"dropout_index must be a DropoutIndex, got {type(index).__name__}")
    if index.num_heads < n:
        raise ValueError(f"dropout_index.num_heads ({index.num_heads}) is smaller than the "
                         f"call's {n} query heads")
    if tuple(jax.numpy.shape(index.seed)) != (2,):
        raise ValueError(f"dropout_index.seed must be uint32 [2], got shape "
                         f"{jax.numpy.shape(index.seed)}")
    for name, want in (("q_positions", t), ("kv_positions", s)):
        pos = getattr(index, name)
        if pos is not None and tuple(jax.numpy.shape(pos)) != (want,):
            raise ValueError(f"dropout_index.{name} must have shape [{want}], got "
                             f"{tuple(jax.numpy.shape(pos))}")


# ---- neighborhood_attention ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NeighborhoodCall:
    """A validated neighborhood-attention call, as backends see it."""

    query: Any  # [B, *spatial, N, H]
    key: Any  # [B, *spatial, K, H]
    value: Any  # [B, *spatial, K, Hv]
    params: na_ref.NeighborhoodParams
    scale: Any
    additional_keys: Any  # [B, S_extra, K, H] or None
    additional_values: Any  # [B, S_extra, K, Hv] or None
    bias: Any  # [N, 2k_1-1, ...] or None
    return_lse: bool
    platform: str

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.query.shape[1:-2])

    @property
    def dtype(self):
        return self.query.dtype


def _check_spatial_qkv(query, key, value) -> None:
    """Same ``[B, *spatial]``, same kv heads, same head_dim and GQA for neighborhood inputs."""
    qkv = {"query": query, "key": key, "value": value}
    b, *spatial, n, h = query.shape
    if tuple(key.shape[:-2]) != (b, *spatial) or tuple(value.shape[:-2]) != (b, *spatial):
        raise ValueError(f"key and value must have the query's [B, *spatial] = {(b, *spatial)}; "
                         f"got {describe_all(qkv)}")
    kh, hk = key.shape[-2:]
    if value.shape[-2] != kh:
        raise ValueError(f"key {describe(key)} and value {describe(value)} must have the same "
                         "heads")
    if hk != h:
        raise ValueError(f"query head_dim {h} != key head_dim {hk}")
    if kh == 0 or n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of key/value heads K={kh}")


def _check_additional_kv(query, value, ak, av) -> None:
    """``additional_keys [B, S_extra, K, H]`` / ``additional_values [B, S_extra, K, Hv]``."""
    b, *_, h = query.shape
    kh = value.shape[-2]
    if ak.ndim != 4 or av.ndim != 4:
        raise ValueError(f"additional keys/values must be [B, S_extra, K, H], got "
                         f"{describe(ak)} and {describe(av)}")
    if ak.dtype != query.dtype or av.dtype != query.dtype:
        raise TypeError(f"additional keys/values must have the query's dtype {query.dtype}, "
                        f"got {ak.dtype} and {av.dtype}")
    if (ak.shape[0], ak.shape[2], ak.shape[3]) != (b, kh, h) or \
            tuple(av.shape) != (*ak.shape[:3], value.shape[-1]):
        raise ValueError(
            f"additional keys/values must be [B, S_extra, K, H] = [{b}, S, {kh}, {h}] and "
            f"[B, S_extra, K, Hv] with Hv={value.shape[-1]}; got {describe(ak)}, {describe(av)}")


def make_neighborhood_call(query, key, value, kernel_size, *, dilation=1, stride=1,
                           is_causal=False, scale=None, additional_keys=None,
                           additional_values=None, bias=None,
                           return_lse=False) -> NeighborhoodCall:
    """Validate the arguments of :func:`jaxattn.neighborhood_attention` (raises ValueError /
    TypeError naming the argument): ``query [B, *spatial, N, H]``, ``key [B, *spatial, K, H]``,
    ``value [B, *spatial, K, Hv]`` with 1, 2 or 3 spatial dims."""
    qkv = {"query": query, "key": key, "value": value}
    check_arrays(qkv)
    check_floating_same_dtype(qkv)
    check_common_rank(qkv, (4, 5, 6), "[B, *spatial, heads, head_dim] with 1, 2 or 3 spatial "
                                      "dims (rank 4, 5 or 6)")
    _check_spatial_qkv(query, key, value)
    n, h = query.shape[-2:]
    params = na_ref.normalize_params(tuple(query.shape[1:-2]), kernel_size, dilation, stride,
                                     is_causal)
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values must be given together")
    if additional_keys is not None:
        _check_additional_kv(query, value, additional_keys, additional_values)
    if bias is not None:
        check_floating_array("bias", bias)
        want = (n, *(2 * k - 1 for k in params.kernel_size))
        if tuple(bias.shape) != want:
            raise ValueError(f"bias must be a relative-position table [N, 2k_1-1, ...] = {want}, "
                             f"got {describe(bias)}")
    if scale is None:
        scale = h**-0.5
    elif not isinstance(scale, jax.core.Tracer):
        scale = float(scale)
    return NeighborhoodCall(query, key, value, params, scale, additional_keys, additional_values,
                            bias, bool(return_lse), platform_of(query))


# ---- tensor_attention ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorAttentionCall:
    """A validated tensor-attention call (:func:`jaxattn.tensor_attention`), as backends see it."""

    query: Any  # [B, T, N, H]
    key1: Any  # [B, S, K, H]
    key2: Any  # [B, S, K, H]
    value1: Any  # [B, S, K, Hv]
    value2: Any  # [B, S, K, Hv]
    scale: Any  # Python float, or a tracer
    is_causal: bool
    polynomial_degree: int | None
    entry_bound: float | None  # declared by the caller (None: unknown)
    return_lse: bool
    platform: str
    block_q: int | None = None
    block_kv: int | None = None

    @property
    def dtype(self):
        return self.query.dtype

    @property
    def traced(self) -> bool:
        """Whether any input is a tracer (under ``jit`` / ``grad`` / ``vmap``)."""
        arrays = (self.query, self.key1, self.key2)
        return any(isinstance(x, jax.core.Tracer) for x in arrays)


def _check_tensor_shapes(named: Mapping[str, Any]) -> None:
    query, key1, key2, value1, value2 = named.values()
    b, _, n, h = query.shape
    if tuple(key1.shape) != tuple(key2.shape):
        raise ValueError(f"key1 and key2 must have one shape [B, S, K, H], got "
                         f"{describe(key1)} and {describe(key2)}")
    if tuple(value1.shape) != tuple(value2.shape):
        raise ValueError(f"value1 and value2 must have one shape [B, S, K, Hv], got "
                         f"{describe(value1)} and {describe(value2)}")
    bk, s, k, hk = key1.shape
    if bk != b or value1.shape[0] != b:
        raise ValueError(f"batch sizes differ: {describe_all(named)}")
    if tuple(value1.shape[1:3]) != (s, k):
        raise ValueError(f"keys {describe(key1)} and values {describe(value1)} must agree on "
                         "[S, K]")
    if hk != h:
        raise ValueError(f"query head_dim {h} != key head_dim {hk} (query {describe(query)}, "
                         f"key1 {describe(key1)})")
    if s == 0:
        raise ValueError(f"tensor attention needs at least one key, got key1 {describe(key1)}")
    if k == 0 or n % k:
        raise ValueError(f"query heads N={n} must be a multiple of key/value heads K={k}")


def make_tensor_call(query, key1, key2, value1, value2, *, scale=None, is_causal=False,
                     polynomial_degree=None, entry_bound=None,
                     return_lse=False) -> TensorAttentionCall:
    """Validate the arguments of :func:`jaxattn.tensor_attention` (ValueError / TypeError naming
    the argument): ``query [B, T, N, H]``, ``key1, key2 [B, S, K, H]``, ``value1, value2
    [B, S, K, Hv]``, ``N % K == 0``; causal needs ``T == S``."""
    named = {"query": query, "key1": key1, "key2": key2, "value1": value1, "value2": value2}
    check_arrays(named)
    check_floating_same_dtype(named)
    check_common_rank(named, (4,), "[batch, seq, heads, head_dim] (rank 4)")
    _check_tensor_shapes(named)
    if is_causal and query.shape[1] != key1.shape[1]:
        raise ValueError(f"is_causal=True needs as many queries as keys, got query "
                         f"{describe(query)} and key1 {describe(key1)}")
    if polynomial_degree is not None and (isinstance(polynomial_degree, bool) or not isinstance(
            polynomial_degree, (int, np.integer)) or polynomial_degree < 0):
        raise ValueError(f"polynomial_degree must be an int >= 0 or None, got "
                         f"{polynomial_degree!r}")
    if entry_bound is not None:
        if isinstance(entry_bound, jax.core.Tracer) or not np.isfinite(float(entry_bound)) or \
                float(entry_bound) <= 0:
            raise ValueError(f"entry_bound must be a positive Python number, got {entry_bound!r}")
        entry_bound = float(entry_bound)
    if scale is None:
        scale = 1.0 / query.shape[-1]
    elif not isinstance(scale, jax.core.Tracer):
        scale = float(scale)
    return TensorAttentionCall(
        query, key1, key2, value1, value2, scale, bool(is_causal),
        None if polynomial_degree is None else int(polynomial_degree), entry_bound,
        bool(return_lse), platform_of(query))
