"""Interoperability of :class:`jaxattn.nn.MultiHeadAttention` with ``flax.nnx.MultiHeadAttention``.

* :data:`REFUSED_FLAX_OPTIONS`: the constructor arguments of flax's layer that jaxattn accepts
  with flax's name, position and default but cannot honour; :func:`refuse_flax_options` raises
  ``NotImplementedError`` naming each one set to another value.
* :func:`from_flax` / :func:`to_flax`: parameter conversion both ways (kernels, biases, QK-norm
  scales, GQA heads, dtype / param_dtype, dropout rate, deterministic and decode flags, a KV
  cache when there is one). The parameter layouts are the same: flax's
  ``query.kernel [D, N, H]`` is jaxattn's ``query_kernel``, ``out.kernel [N, H, D_out]`` is
  ``out_kernel``, ``query_ln.scale [H]`` is ``query_ln.scale``; :data:`PARAMETER_NAMES` lists
  every pair.

This module imports :mod:`jaxattn.nn.attention` only inside the functions (that module imports
this one).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import attention as flax_attention

__all__ = ["PARAMETER_NAMES", "REFUSED_FLAX_OPTIONS", "flax_promote_dtype", "from_flax",
           "jaxattn_attention_fn", "refuse_flax_options", "set_param_metadata", "to_flax"]

try:  # flax's default for the *_promote_dtype options (flax releases without them: None)
    from flax.nnx.nn.dtypes import promote_dtype as flax_promote_dtype
except ImportError:  # pragma: no cover - depends on the installed flax
    flax_promote_dtype = None

# Why each option cannot be honoured (its default is accepted and means jaxattn's behaviour).
REFUSED_FLAX_OPTIONS: dict[str, str] = {
    "precision": "jaxattn computes the projections in the compute dtype and the logits and "
                 "softmax in float32; there is no per-layer dot precision",
    "qkv_promote_dtype": "jaxattn casts inputs and parameters to the compute dtype (`dtype`, "
                         "else the input's); a custom promotion function is not supported",
    "out_promote_dtype": "see qkv_promote_dtype",
    "ln_promote_dtype": "see qkv_promote_dtype",
    "qkv_dot_general": "the projections are einsums (deprecated in flax too)",
    "out_dot_general": "the projections are einsums (deprecated in flax too)",
    "qkv_dot_general_cls": "the projections are einsums (deprecated in flax too)",
    "out_dot_general_cls": "the projections are einsums (deprecated in flax too)",
}
_REFUSED_DEFAULTS: dict[str, Any] = {
    "precision": None, "qkv_promote_dtype": flax_promote_dtype,
    "out_promote_dtype": flax_promote_dtype, "ln_promote_dtype": flax_promote_dtype,
    "qkv_dot_general": None, "out_dot_general": None, "qkv_dot_general_cls": None,
    "out_dot_general_cls": None,
}

BROADCAST_DROPOUT_REFUSAL = (
    "broadcast_dropout=True with dropout_rate > 0 shares one dropout mask over batch and heads, "
    "which jaxattn cannot do (its dropout keeps each (batch, head, query, key) entry "
    "independently); pass broadcast_dropout=False")

# (jaxattn attribute path, flax attribute path) of every parameter that can exist.
PARAMETER_NAMES: tuple[tuple[str, str], ...] = (
    ("query_kernel", "query.kernel"), ("key_kernel", "key.kernel"),
    ("value_kernel", "value.kernel"), ("out_kernel", "out.kernel"),
    ("query_bias", "query.bias"), ("key_bias", "key.bias"), ("value_bias", "value.bias"),
    ("out_bias", "out.bias"), ("query_ln.scale", "query_ln.scale"),
    ("key_ln.scale", "key_ln.scale"),
)


def refuse_flax_options(**options: Any) -> None:
    """Raise ``NotImplementedError`` naming every option of :data:`REFUSED_FLAX_OPTIONS` in
    ``options`` that is not flax's default (the defaults are accepted)."""
    bad = [name for name, value in options.items() if value is not _REFUSED_DEFAULTS[name]]
    if bad:
        reasons = "; ".join(f"{name}={options[name]!r}: {REFUSED_FLAX_OPTIONS[name]}"
                            for name in bad)
        raise NotImplementedError(f"jaxattn.nn.MultiHeadAttention does not support {reasons}")


def jaxattn_attention_fn(attention_fn: Callable) -> Callable:
    """``attention_fn`` as the jaxattn layer calls it: flax's own ``dot_product_attention`` (the
    flax layer's default) becomes :func:`jaxattn.dot_product_attention`, the same function of
    q, k, v and mask (except that a fully masked row gives zeros instead of the mean of v)."""
    from jaxattn.ops.attention import dot_product_attention

    return dot_product_attention if attention_fn is flax_attention.dot_product_attention \
        else attention_fn


def set_param_metadata(param: nnx.Variable, metadata: Mapping[str, Any]) -> nnx.Variable:
    """Add flax's ``*_metadata`` entries to ``param`` (an ``out_sharding`` entry there replaces
    the logical axis names); returns ``param``."""
    if metadata:
        param.set_metadata(**dict(metadata))
    return param


def _get(obj, path: str):
    """``obj.a.b`` for ``path = "a.b"``; None when any attribute on the way is missing / None."""
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _copy_parameters(source, target, pairs) -> None:
    """Copy every parameter ``source.<a>`` into ``target.<b>`` for ``(a, b)`` in ``pairs``;
    raise ``ValueError`` naming a parameter present on one side only or of another shape."""
    for src_name, dst_name in pairs:
        src, dst = _get(source, src_name), _get(target, dst_name)
        if src is None and dst is None:
            continue
        if src is None or dst is None:
            raise ValueError(f"parameter {src_name} -> {dst_name}: present on one side only")
        if src.shape != dst.shape:
            raise ValueError(f"parameter {src_name} shape {tuple(src.shape)} does not fit "
                             f"{dst_name} shape {tuple(dst.shape)}")
        dst[...] = src[...]


def _copy_cache(source, target, features: int) -> None:
    """Give ``target`` the KV cache of ``source`` when it has one: ``target.init_cache((B,
    max_length, features), dtype)`` (flax's form, which both layers take), then the keys,
    values ``[B, max_length, K, H]`` and the index are copied. jaxattn's cache also marks which
    slots hold real tokens (``cached_key_mask [B, max_length]``): the first ``index`` ones."""
    key = getattr(source, "cached_key", None)
    if key is None:
        return
    index = source.cache_index[...]
    if key.ndim != 4 or jnp.ndim(index) != 0:
        raise ValueError(f"cannot convert a KV cache of shape {tuple(key.shape)} with index "
                         f"shape {tuple(jnp.shape(index))}: both layers must have a cache [batch, "
                         "max_length, kv_heads, head_dim] with one (scalar) index")
    batch, max_length = key.shape[:2]
    written = jnp.broadcast_to(jnp.arange(max_length) < index, (batch, max_length))
    source_mask = getattr(source, "cached_key_mask", None)
    if source_mask is not None and not bool(jnp.all(source_mask[...] == written)):
        raise ValueError("cannot convert a KV cache holding padding tokens (cached_key_mask "
                         "marks some written slots invisible): flax's cache has no such mask")
    target.init_cache((batch, max_length, features), key.dtype)
    target.cached_key[...] = key[...]
    target.cached_value[...] = source.cached_value[...]
    target.cache_index[...] = index
    if getattr(target, "cached_key_mask", None) is not None:
        target.cached_key_mask[...] = written


def from_flax(module: nnx.MultiHeadAttention, *, rngs: nnx.Rngs | None = None, cls=None,
              **options: Any):
    """A :class:`jaxattn.nn.MultiHeadAttention` with the configuration and parameters of
    ``module`` (a ``flax.nnx.MultiHeadAttention``).

    Args:
      module: the flax layer; its query / key / value kernels ``[D, N or K, H]``, out kernel
        ``[N, H, D_out]``, biases and QK-norm scales are copied (values and dtypes), as are its
        dtype, param_dtype, dropout rate, deterministic and decode flags and its KV cache.
      rngs: initialises the (overwritten) parameters and is the new layer's dropout stream;
        default ``nnx.Rngs(0)``. Dropout masks differ from flax's whatever the key (another
        random generator).
      cls: the class to build (default :class:`jaxattn.nn.MultiHeadAttention`).
      **options: jaxattn's keyword-only extras (``is_causal``, ``rope_theta``,
        ``implementation``, ...).

    Raises ``ValueError`` naming what cannot be converted: an ``attention_fn`` other than
    flax's default (or jaxattn's), ``broadcast_dropout=True`` with dropout, and the options of
    :data:`REFUSED_FLAX_OPTIONS` set to non-defaults.
    """
    from jaxattn.nn.attention import MultiHeadAttention
    from jaxattn.ops.attention import dot_product_attention

    if not isinstance(module, nnx.MultiHeadAttention):
        raise TypeError(f"from_flax needs a flax.nnx.MultiHeadAttention, got {type(module)}")
    cls = MultiHeadAttention if cls is None else cls
    problems = []
    if module.attention_fn not in (flax_attention.dot_product_attention, dot_product_attention):
        problems.append(f"attention_fn={module.attention_fn!r} (only flax's default "
                        "dot_product_attention or jaxattn.dot_product_attention convert)")
    if module.dropout_rate > 0 and module.broadcast_dropout:
        problems.append(BROADCAST_DROPOUT_REFUSAL)
    for name in REFUSED_FLAX_OPTIONS:
        value = getattr(module, name, _REFUSED_DEFAULTS[name])
        if value is not _REFUSED_DEFAULTS[name]:
            problems.append(f"{name}={value!r}: {REFUSED_FLAX_OPTIONS[name]}")
    if problems:
        raise ValueError("cannot convert this flax.nnx.MultiHeadAttention: "
                         + "; ".join(problems))
    layer = cls(
        module.num_heads, module.in_features, module.qkv_features, module.out_features,
        getattr(module, "num_kv_heads", module.num_heads), module.in_kv_features,
        dtype=module.dtype, param_dtype=module.param_dtype,
        broadcast_dropout=module.broadcast_dropout, dropout_rate=module.dropout_rate,
        deterministic=module.deterministic, use_bias=module.use_bias, decode=module.decode,
        normalize_qk=bool(module.normalize_qk),
        keep_rngs=module.dropout_rate == 0 or module.rngs is not None,
        rngs=nnx.Rngs(0) if rngs is None else rngs, **options)
    _copy_parameters(module, layer, [(b, a) for a, b in PARAMETER_NAMES])
    _copy_cache(module, layer, module.in_features)
    return layer


def to_flax(layer, *, rngs: nnx.Rngs | None = None) -> nnx.MultiHeadAttention:
    """A ``flax.nnx.MultiHeadAttention`` with the configuration and parameters of ``layer`` (a
    :class:`jaxattn.nn.MultiHeadAttention`), using flax's default ``attention_fn``.

    Args:
      layer: the jaxattn layer (kernels ``[D, N or K, H]`` / ``[N, H, D_out]``, biases, QK-norm
        scales, KV cache, dtype / param_dtype, dropout, deterministic and decode flags).
      rngs: initialises the (overwritten) parameters and is the flax layer's dropout stream;
        default ``nnx.Rngs(0)``.

    Raises ``ValueError`` naming every jaxattn-only feature in use (RoPE, sinks, soft-cap, a
    layer mask, a layer built causal, RMS QK-norm, a custom ``attention_fn`` /
    ``decode_attention_fn``, GQA on a flax without ``num_kv_heads``). ``implementation`` is a
    choice of backend, not of result, and is dropped.
    """
    from jaxattn.nn.attention import MultiHeadAttention
    from jaxattn.ops.attention import dot_product_attention

    default_decode_fn = inspect.signature(MultiHeadAttention.__init__).parameters[
        "decode_attention_fn"].default
    flax_takes_kv_heads = "num_kv_heads" in inspect.signature(
        nnx.MultiHeadAttention.__init__).parameters
    features = {
        "rope_theta": layer.rope_theta is not None,
        "use_sinks": layer.sinks is not None,
        "logits_soft_cap": layer.logits_soft_cap is not None,
        "mask (a layer default mask; pass it to each flax call)": layer.mask is not None,
        "is_causal=True (flax takes is_causal per call)": layer.is_causal,
        "normalize_qk='rms' (flax's QK norm is LayerNorm)": layer.normalize_qk == "rms",
        "attention_fn (not jaxattn.dot_product_attention)":
            layer.attention_fn is not dot_product_attention,
        "decode_attention_fn (not the default)":
            layer.decode_attention_fn not in (default_decode_fn, dot_product_attention),
        "num_kv_heads (this flax has no grouped-query attention)":
            not flax_takes_kv_heads and layer.num_kv_heads != layer.num_heads,
    }
    used = [name for name, in_use in features.items() if in_use]
    if used:
        raise ValueError("cannot convert to flax.nnx.MultiHeadAttention, no flax equivalent "
                         "for: " + ", ".join(used))
    kv_heads = dict(num_kv_heads=layer.num_kv_heads) if flax_takes_kv_heads else {}
    module = nnx.MultiHeadAttention(
        layer.num_heads, layer.in_features, layer.qkv_features, layer.out_features,
        in_kv_features=layer.in_kv_features, dtype=layer.dtype, param_dtype=layer.param_dtype,
        broadcast_dropout=layer.broadcast_dropout, dropout_rate=layer.dropout_rate,
        deterministic=layer.deterministic, use_bias=layer.use_bias, decode=layer.decode,
        normalize_qk=bool(layer.normalize_qk), keep_rngs=layer.keep_rngs,
        rngs=nnx.Rngs(0) if rngs is None else rngs, **kv_heads)
    _copy_parameters(layer, module, PARAMETER_NAMES)
    _copy_cache(layer, module, layer.in_features)
    return module
