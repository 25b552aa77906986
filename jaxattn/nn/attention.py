"""Multi-head attention layer (Flax NNX): MHA / GQA / MQA with RoPE, QK-norm, sinks, soft-cap,
structured masks, a pluggable ``attention_fn`` and KV-cache decoding.

The module owns parameters and calls a pure attention function (by default
:func:`jaxattn.dot_product_attention`); it adds no attention math of its own.
Parameters carry logical sharding names (``embed``, ``heads``, ``kv_heads``, ``head_dim``) for
:mod:`jaxattn.parallel` rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from jaxattn import masks as masks_lib
from jaxattn.nn import flax_interop, kv_cache
from jaxattn.nn import mixer as mixer_lib
from jaxattn.nn.params import logical_param
from jaxattn.nn.rope import apply_rope
from jaxattn.ops.attention import attention_weights, dot_product_attention
from jaxattn.ops.call import float_mask_as_bool
from jaxattn.ops.decode import decode_attention
from jaxattn.ops.explicit_axes import explicit_mesh_of, explicit_spec, in_auto_axes
from jaxattn.parallel import mesh_axes
from jaxattn.parallel.logical import constrain

__all__ = ["MultiHeadAttention"]

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()

class MultiHeadAttention(nnx.Module):
    """Multi-head attention (Vaswani et al., 2017) with grouped-query heads (Ainslie et al., 2023).

    The constructor takes every argument of ``flax.nnx.MultiHeadAttention`` with flax's name,
    position and default (positional ``num_heads, in_features, qkv_features, out_features,
    num_kv_heads, in_kv_features``, then keyword-only ``dtype, param_dtype, broadcast_dropout,
    dropout_rate, deterministic, precision, kernel_init, out_kernel_init, bias_init,
    out_bias_init, use_bias, attention_fn, decode, normalize_qk, qkv_promote_dtype,
    out_promote_dtype, ln_promote_dtype, qkv_dot_general, out_dot_general, qkv_dot_general_cls,
    out_dot_general_cls, rngs, keep_rngs`` and the six ``*_metadata`` mappings), with these
    differences:

    * ``precision``, the ``*_promote_dtype`` and ``*_dot_general*`` options raise
      ``NotImplementedError`` when set to anything but flax's default
      (:data:`jaxattn.nn.flax_interop.REFUSED_FLAX_OPTIONS` says why for each).
    * ``broadcast_dropout=True`` (flax's default) with ``dropout_rate > 0`` raises: jaxattn's
      dropout keeps each (batch, head, query, key) entry independently, i.e. flax's
      ``broadcast_dropout=False``, which is what to pass.
    * ``attention_fn`` defaults to :func:`jaxattn.dot_product_attention` (flax's own
      ``dot_product_attention`` is replaced by it); with ``dtype=None`` the computation runs in
      the input's dtype (parameters cast to it) where flax promotes inputs and parameters.
    * The ``*_metadata`` mappings are added to the parameters' metadata (an ``out_sharding``
      entry replaces the logical axis names).

    As in flax, with ``dropout_rate > 0`` ``deterministic`` must be given (constructor, call,
    or ``nnx.view`` / ``set_view``), else the call raises; ``keep_rngs=False`` stores no
    dropout stream (pass ``rngs`` to each call). :meth:`from_flax` / :meth:`to_flax` convert
    parameters both ways. jaxattn's extras are keyword-only:

    Args:
      num_kv_heads: key/value heads ``K`` (``num_heads % K == 0``); default ``num_heads``
        (flax's fifth positional argument, as there).
      normalize_qk: ``True`` / ``"layer"``: flax's QK norm (``LayerNorm`` per head, scale only,
        same parameter layout); ``"rms"``: ``RMSNorm`` instead.
      rope_theta: apply rotary embeddings to q and k with this base (None: no RoPE).
      is_causal: causal self-attention (also required for decoding).
      mask: a default :class:`jaxattn.masks.Mask` ANDed with the call's mask.
      logits_soft_cap: soft-cap for the logits.
      use_sinks: learn one sink logit per head (initialised to 0).
      implementation: passed to ``attention_fn`` (e.g. ``"xla_chunked"``).
      decode_attention_fn: used instead of ``attention_fn`` for KV-cache decoding steps (a
        context-parallel ``attention_fn`` cannot take one-token steps). Default
        :func:`jaxattn.decode_attention`, whose tile loop reads only the live part of the cache
        under ``jit``. It gets ``mask``, ``is_causal`` and ``key_value_seq_lengths [B]`` (the
        live cache length per sequence), never ``implementation``: to decode with a backend,
        pass e.g. ``functools.partial(jaxattn.dot_product_attention, implementation=...)``.

    Activations are constrained to logical axes (``batch, length, heads, kv_heads, head_dim,
    embed``); this is a no-op unless a :func:`jaxattn.parallel.axis_rules` context is active.

    Call: ``inputs_q [B, T, in_features]`` (``inputs_k``/``inputs_v`` ``[B, S, in_kv_features]``
    for cross-attention) -> ``[B, T, out_features]``. It is also a token mixer
    (:mod:`jaxattn.nn.mixer`): ``layer(x, context=c, mask=m, deterministic=d)``.
    """

    patterns = frozenset({"self", "causal_self", "cross", "causal_cross"})

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        broadcast_dropout: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool | None = None,
        precision: Any = None,
        kernel_init: Callable = default_kernel_init,
        out_kernel_init: Callable | None = None,
        bias_init: Callable = default_bias_init,
        out_bias_init: Callable | None = None,
        use_bias: bool = True,
        attention_fn: Callable = dot_product_attention,
        decode: bool | None = None,
        normalize_qk: bool | str = False,
        qkv_promote_dtype: Callable = flax_interop.flax_promote_dtype,
        out_promote_dtype: Callable = flax_interop.flax_promote_dtype,
        ln_promote_dtype: Callable = flax_interop.flax_promote_dtype,
        qkv_dot_general: Any = None,
        out_dot_general: Any = None,
        qkv_dot_general_cls: Any = None,
        out_dot_general_cls: Any = None,
        rngs: nnx.Rngs,
        keep_rngs: bool = True,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        out_kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        out_bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        query_ln_scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        key_ln_scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        rope_theta: float | None = None,
        is_causal: bool = False,
        mask: masks_lib.Mask | None = None,
        logits_soft_cap: float | None = None,
        use_sinks: bool = False,
        implementation: str | None = None,
        decode_attention_fn: Callable = decode_attention,
    ):
        flax_interop.refuse_flax_options(
            precision=precision, qkv_promote_dtype=qkv_promote_dtype,
            out_promote_dtype=out_promote_dtype, ln_promote_dtype=ln_promote_dtype,
            qkv_dot_general=qkv_dot_general, out_dot_general=out_dot_general,
            qkv_dot_general_cls=qkv_dot_general_cls, out_dot_general_cls=out_dot_general_cls)
        if dropout_rate > 0 and broadcast_dropout:
            raise ValueError(flax_interop.BROADCAST_DROPOUT_REFUSAL)
        attention_fn = flax_interop.jaxattn_attention_fn(attention_fn)
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        in_kv_features = in_features if in_kv_features is None else in_kv_features
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if qkv_features % num_heads:
            raise ValueError(
                f"qkv_features={qkv_features} must be divisible by num_heads={num_heads}"
            )
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}"
            )
        head_dim = qkv_features // num_heads
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.in_features, self.out_features = in_features, out_features
        self.qkv_features, self.in_kv_features = qkv_features, in_kv_features
        self.dtype, self.param_dtype = dtype, param_dtype
        self.dropout_rate, self.deterministic = dropout_rate, deterministic
        self.broadcast_dropout, self.precision, self.keep_rngs = (broadcast_dropout, precision,
                                                                  keep_rngs)
        self.use_bias, self.attention_fn, self.decode = use_bias, attention_fn, decode
        self.normalize_qk, self.rope_theta, self.is_causal = normalize_qk, rope_theta, is_causal
        self.mask, self.logits_soft_cap, self.implementation = mask, logits_soft_cap, implementation
        self.decode_attention_fn = decode_attention_fn

        out_kernel_init = out_kernel_init or kernel_init
        out_bias_init = out_bias_init or bias_init
        n, k, h = num_heads, num_kv_heads, head_dim
        self.query_kernel = logical_param(rngs, kernel_init, (in_features, n, h), param_dtype,
                                          ("embed", "heads", "head_dim"))
        self.key_kernel = logical_param(rngs, kernel_init, (in_kv_features, k, h), param_dtype,
                                        ("embed", "kv_heads", "head_dim"))
        self.value_kernel = logical_param(rngs, kernel_init, (in_kv_features, k, h),
                                          param_dtype, ("embed", "kv_heads", "head_dim"))
        self.out_kernel = logical_param(rngs, out_kernel_init, (n, h, out_features), param_dtype,
                                        ("heads", "head_dim", "embed"))
        if use_bias:
            self.query_bias = logical_param(rngs, bias_init, (n, h), param_dtype,
                                            ("heads", "head_dim"))
            self.key_bias = logical_param(rngs, bias_init, (k, h), param_dtype,
                                          ("kv_heads", "head_dim"))
            self.value_bias = logical_param(rngs, bias_init, (k, h), param_dtype,
                                            ("kv_heads", "head_dim"))
            self.out_bias = logical_param(rngs, out_bias_init, (out_features,), param_dtype,
                                          ("embed",))
        if normalize_qk:
            self.query_ln, self.key_ln = (_qk_norm(normalize_qk, h, dtype, param_dtype, rngs)
                                          for _ in range(2))
        self.sinks = (
            logical_param(rngs, nnx.initializers.zeros_init(), (n,), param_dtype, ("heads",))
            if use_sinks else None
        )
        for name, metadata in (("query_kernel", kernel_metadata), ("key_kernel", kernel_metadata),
                               ("value_kernel", kernel_metadata),
                               ("out_kernel", out_kernel_metadata or kernel_metadata),
                               ("query_bias", bias_metadata), ("key_bias", bias_metadata),
                               ("value_bias", bias_metadata),
                               ("out_bias", out_bias_metadata or bias_metadata)):
            if use_bias or not name.endswith("_bias"):
                flax_interop.set_param_metadata(getattr(self, name), metadata)
        if normalize_qk:
            flax_interop.set_param_metadata(self.query_ln.scale, query_ln_scale_metadata)
            flax_interop.set_param_metadata(self.key_ln.scale, key_ln_scale_metadata)
        self.rngs = rngs.fork() if keep_rngs and dropout_rate > 0 else None
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)

    @classmethod
    def from_flax(cls, module: nnx.MultiHeadAttention, *, rngs: nnx.Rngs | None = None,
                  **options) -> MultiHeadAttention:
        """This layer with the configuration and parameters of a ``flax.nnx.MultiHeadAttention``
        (kernels ``[D, N or K, H]`` / ``[N, H, D_out]``, biases, QK-norm scales, cache, dtypes,
        dropout and decode flags); ``options`` are jaxattn's keyword-only extras. See
        :func:`jaxattn.nn.flax_interop.from_flax` for what cannot be converted."""
        return flax_interop.from_flax(module, rngs=rngs, cls=cls, **options)

    def to_flax(self, *, rngs: nnx.Rngs | None = None) -> nnx.MultiHeadAttention:
        """A ``flax.nnx.MultiHeadAttention`` with this layer's configuration and parameters;
        raises naming any jaxattn-only feature in use (see
        :func:`jaxattn.nn.flax_interop.to_flax`)."""
        return flax_interop.to_flax(self, rngs=rngs)

    # ---- helpers ------------------------------------------------------------------------------
    def _compute_dtype(self, x):
        """``dtype`` if given, else the activation's (parameters are cast to it)."""
        return x.dtype if self.dtype is None else self.dtype

    def _project(self, x, kernel, bias):
        dtype = self._compute_dtype(x)
        y = _contract("bld,dnh->blnh", x.astype(dtype), kernel[...].astype(dtype))
        if bias is not None:
            y = y + bias[...].astype(dtype)
        return y

    def init_cache(self, batch_size, max_length: int | None = None, dtype: Any = None) -> None:
        """Allocate the KV cache ``[batch_size, max_length, K, H]`` for autoregressive decoding,
        its key mask ``cached_key_mask [batch_size, max_length]`` (True = a real token) and the
        cache index (a scalar 0: every sequence at one position; it becomes int ``[B]`` once a
        decode call passes ``lengths``, or with ``layer.cache_index.set_value(index [B])``).

        Also takes flax's form ``init_cache(input_shape, dtype)`` with ``input_shape = (B,
        max_length, features)`` (or any ``(..., max_length, features)`` whose leading axes
        multiply to the batch)."""
        if isinstance(batch_size, tuple | list):  # flax.nnx.MultiHeadAttention's signature
            shape, dtype = tuple(batch_size), max_length if dtype is None else dtype
            if len(shape) < 2:
                raise ValueError(f"input_shape must be (batch, max_length, features), got {shape}")
            batch_size, max_length = math.prod(shape[:-2]) if len(shape) > 2 else 1, shape[-2]
        elif max_length is None:
            raise TypeError("init_cache needs max_length (or flax's input_shape tuple)")
        dtype = dtype or self.dtype or self.param_dtype
        shape = (batch_size, max_length, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        # True where a cached key is a real token (False: not written yet, or padding)
        self.cached_key_mask = nnx.Cache(jnp.zeros(shape[:2], bool))
        self.cache_index = nnx.Cache(jnp.array(0, dtype=jnp.int32))

    def set_view(self, deterministic: bool | None = None, decode: bool | None = None,
                 batch_size: int | tuple | None = None, max_length: int | None = None):
        """``nnx.view`` / ``set_view`` hook, as flax's: ``deterministic`` switches attention
        dropout off (True) or on; ``decode`` switches KV-cache decoding, allocating the cache
        from ``batch_size`` and ``max_length`` when there is none."""
        if deterministic is not None:
            self.deterministic = deterministic
        if decode is not None:
            self.decode = decode
            if decode and self.cached_key is None:
                if batch_size is None or max_length is None:
                    raise TypeError("batch_size and max_length are needed to allocate the cache")
                batch = math.prod(batch_size) if isinstance(batch_size, tuple | list) \
                    else batch_size
                self.init_cache(batch, max_length)

    # ---- forward ------------------------------------------------------------------------------
    def __call__(
        self,
        inputs_q,
        inputs_k=None,
        inputs_v=None,
        *,
        context=None,
        mask: masks_lib.Mask | Any = None,
        bias=None,
        positions=None,
        query_segment_ids=None,
        kv_segment_ids=None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | None = None,
        decode: bool | None = None,
        head_weights=None,
        is_causal: bool = False,
        sow_weights: bool = False,
        lengths=None,
        token_mask=None,
        out_sharding=None,
        qkv_sharding=None,
    ):
        """``inputs_q [B, T, D]`` -> ``[B, T, out_features]``.

        ``inputs_k`` defaults to ``inputs_q`` and ``inputs_v`` to ``inputs_k``; ``context
        [B, S, in_kv_features]`` (the token-mixer protocol's name) is the same as
        ``inputs_k=inputs_v=context``. ``positions [B, T]`` feed RoPE (default ``arange``; in
        decoding, the cache index onward). ``mask``, ``bias`` and segment ids are passed to
        ``attention_fn``. ``head_weights [B, T, N]`` scales each head's output per token before
        the output projection (mixtures of heads, e.g. MoH); ``None`` = every head weight 1.
        ``is_causal=True`` adds the causal mask for this call (as flax's ``is_causal``; a layer
        built causal stays causal). ``sow_weights=True`` stores the attention probabilities
        ``[B, N, T, S]`` (before dropout) as ``nnx.Intermediate`` ``attention_weights``, as
        flax does (computed densely from the same q, k, mask and bias: O(T S) memory).

        With ``decode=True`` the step's keys/values are appended to the cache at the cache
        index. A step that would run past ``max_length`` raises when the index is concrete;
        under ``jit`` (traced index) its output, and every later step's, is NaN (per sequence
        when the index is per sequence).

        Ragged batches (decode only). ``lengths`` int ``[B]`` (``0 <= lengths[b] <= T``): only the
        first ``lengths[b]`` tokens of sequence ``b`` are real (a right-padded prompt block of
        different lengths, or a step where finished sequences send 0 tokens); they are written
        at that sequence's own cache index, which advances by ``lengths[b]``, so the cache index
        becomes int ``[B]`` (a scalar index, shared by every sequence, stays scalar until a call
        passes ``lengths``). ``token_mask`` bool ``[B, T]``: ``False`` marks padding tokens (e.g.
        a left-padded prompt); they take their cache slot but stay invisible to every later
        query. Padded query rows output the output bias (attention output zero). RoPE positions
        default to each sequence's cache position, so a sequence's outputs equal the causal
        forward of that sequence alone (left padding: up to RoPE's shift invariance).

        ``out_sharding`` / ``qkv_sharding`` (flax's names): a ``PartitionSpec`` (of the current
        mesh, ``jax.set_mesh``) or ``NamedSharding`` for the output ``[B, T, out_features]`` and
        for the projected ``q, k, v [B, T|S, N|K, H]``; Explicit axes are resharded, Auto ones
        constrained.
        """
        if context is not None:
            if inputs_k is not None or inputs_v is not None:
                raise ValueError("pass either context= or inputs_k/inputs_v, not both")
            inputs_k = context
        if inputs_q.ndim != 3 or inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"inputs_q must be [B, T, {self.in_features}], got shape {inputs_q.shape}"
            )
        self_attention = inputs_k is None
        q, k, v = self._project_qkv(inputs_q, inputs_k, inputs_v)
        if qkv_sharding is not None:
            q, k, v = (_place_as(x, qkv_sharding, "qkv_sharding") for x in (q, k, v))
        decode = self.decode if decode is None else decode
        if not decode and (lengths is not None or token_mask is not None):
            raise ValueError("lengths= and token_mask= describe a decode step (decode=True); "
                             "outside decoding pass a mask (e.g. jaxattn.masks.LengthMask)")
        if decode:
            lengths, token_mask = kv_cache.check_step_padding(q.shape[0], q.shape[1], lengths,
                                                      token_mask)
        offset = self._check_decode_step(q.shape[1], lengths) if decode else None
        if self.rope_theta is not None:
            q, k = self._rope(q, k, positions, offset, self_attention)
        mask = self._layer_and_call_mask(mask)
        is_causal = self.is_causal or bool(is_causal)
        if decode:
            if mask is not None:
                raise ValueError("decoding supports only the causal mask (got an extra mask)")
            real = kv_cache.real_tokens(q.shape[1], lengths, token_mask)
            k, v, key_mask = self._append_to_cache(k, v, offset, lengths, token_mask)
            mask, is_causal = kv_cache.decode_mask(offset, key_mask, real), False
        kwargs = self._attention_kwargs(mask, is_causal, query_segment_ids, kv_segment_ids,
                                        deterministic, rngs)
        if decode:  # the decode function bounds its work by the live cache length
            kwargs.pop("implementation", None)
            kwargs["key_value_seq_lengths"] = jnp.broadcast_to(self.cache_index[...],
                                                               (q.shape[0],))
        attention_fn = self.decode_attention_fn if decode else self.attention_fn
        out = attention_fn(q, k, v, bias, **kwargs)  # [B, T, N, H]
        if sow_weights:
            self._sow_weights(q, k, bias, kwargs)
        y = self._output(out, head_weights)
        if decode and any(isinstance(a, jax.core.Tracer) for a in (offset, lengths)):
            # Under jit the cache position is traced: a step past the cache end cannot raise,
            # and dynamic_update_slice would clamp the write. Poison the output with NaN instead
            # of returning a silently wrong answer (this and every later step; per sequence).
            end = offset + (q.shape[1] if lengths is None else lengths)
            y = jnp.where(jnp.reshape(end > self.cached_key.shape[1], (-1, 1, 1)), jnp.nan, y)
        if out_sharding is not None:
            return _place_as(y, out_sharding, "out_sharding")
        return constrain(y, ("batch", "length", "embed"))

    def _sow_weights(self, q, k, bias, kwargs) -> None:
        """Sow ``attention_weights [B, N, T, S]``: the probabilities ``attention_fn`` used
        (mask, causality, segment ids, soft-cap and sinks of ``kwargs``; before dropout)."""
        names = ("mask", "is_causal", "query_segment_ids", "kv_segment_ids", "logits_soft_cap",
                 "sinks")
        probs = attention_weights(q, k, bias, **{n: kwargs[n] for n in names if n in kwargs})
        self.sow(nnx.Intermediate, "attention_weights", probs.astype(q.dtype))

    # ---- the steps of a forward pass ----------------------------------------------------------
    def project_query(self, inputs_q):
        """``inputs_q [B, T, D]`` -> queries ``[B, T, N, H]`` as attention sees them before RoPE
        (projected, QK-normalised when asked, constrained to logical axes)."""
        inputs_q = constrain(inputs_q, ("batch", "length", "embed"))
        q = self._project(inputs_q, self.query_kernel, self.query_bias if self.use_bias else None)
        if self.normalize_qk:
            q = _apply_qk_norm(self.query_ln, q)
        return constrain(q, ("batch", "length", "heads", "head_dim"))

    def _project_qkv(self, inputs_q, inputs_k, inputs_v):
        """``[B, T, D]`` (and ``[B, S, D_kv]``) -> ``q [B, T, N, H]``, ``k, v [B, S, K, H]``,
        QK-normalised when asked, activations constrained to logical axes."""
        q = self.project_query(inputs_q)
        inputs_k = constrain(inputs_q, ("batch", "length", "embed")) if inputs_k is None \
            else inputs_k
        inputs_v = inputs_k if inputs_v is None else inputs_v
        k = self._project(inputs_k, self.key_kernel, self.key_bias if self.use_bias else None)
        v = self._project(inputs_v, self.value_kernel,
                          self.value_bias if self.use_bias else None)
        if self.normalize_qk:
            k = _apply_qk_norm(self.key_ln, k)
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        return q, k, v

    def _check_decode_step(self, t: int, lengths=None):
        """The cache index of a ``t``-token decode step: a scalar, or int ``[B]`` when the index
        is per sequence or ``lengths [B]`` (each sequence's new tokens) is given. Raises when
        the step cannot fit and the index (and ``lengths``) are concrete."""
        if self.cached_key is None:
            raise ValueError("decode=True needs init_cache(batch_size, max_length) first")
        if not self.is_causal:
            raise ValueError("KV-cache decoding needs is_causal=True")
        offset = self.cache_index[...]
        batch, max_len = self.cached_key.shape[:2]
        if t > max_len:
            raise ValueError(f"decode step of {t} tokens exceeds the KV cache length {max_len}")
        if lengths is not None:
            offset = jnp.broadcast_to(offset, (batch,))
        if any(isinstance(a, jax.core.Tracer) for a in (offset, lengths)):
            return offset  # checked at run time: the output is poisoned with NaN
        if offset.ndim == 0:
            if int(offset) + t > max_len:
                raise ValueError(
                    f"decode step of {t} tokens at cache position {int(offset)} runs past the "
                    f"KV cache length {max_len}; init_cache with a larger max_length")
            return offset
        end = np.asarray(offset) + (t if lengths is None else np.asarray(lengths))
        over = np.flatnonzero(end > max_len)
        if over.size:
            raise ValueError(
                f"decode step of {t} tokens: sequence(s) {over.tolist()} at cache positions "
                f"{np.asarray(offset)[over].tolist()} would end at {end[over].tolist()}, past "
                f"the KV cache length {max_len}; init_cache with a larger max_length")
        return offset

    def _rope(self, q, k, positions, offset, self_attention: bool):
        """Rotary embeddings: queries at ``positions`` (default ``offset + arange(T)``, per
        sequence when ``offset`` is ``[B]``), keys at the same positions for self-attention,
        else at ``arange(S)``."""
        b, t = q.shape[:2]
        if positions is None:
            start = 0 if offset is None else jnp.reshape(offset, (-1, 1))  # [1 or B, 1]
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        kv_pos = positions if self_attention else jnp.broadcast_to(
            jnp.arange(k.shape[1], dtype=jnp.int32), k.shape[:2])
        return apply_rope(q, positions, self.rope_theta), apply_rope(k, kv_pos, self.rope_theta)

    def _layer_and_call_mask(self, mask):
        """The layer's default mask AND the call's mask (either may be None). A float 0/1 mask
        (flax's ``nnx.make_causal_mask`` / ``make_attention_mask``) is read as boolean, as flax
        reads it; other float masks are refused (an additive mask belongs in ``bias``)."""
        mask = float_mask_as_bool(mask)
        call_mask = masks_lib.as_mask(mask)
        if call_mask is None:
            return self.mask
        return call_mask if self.mask is None else self.mask & call_mask

    def _append_to_cache(self, k, v, offset, lengths=None, token_mask=None):
        """Write the step's ``k, v [B, T, K, H]`` at ``offset`` (scalar or ``[B]``) and advance
        the index by ``T`` (or ``lengths [B]``: only those tokens are written); ``token_mask
        [B, T]`` marks which written keys may ever be attended. Returns the whole cache ``k, v
        [B, S_max, K, H]`` and its key mask ``[B, S_max]`` (True = a real token)."""
        t = k.shape[1]
        caches = (self.cached_key, self.cached_value, self.cached_key_mask)
        real_key = jnp.ones(k.shape[:2], bool) if token_mask is None else token_mask
        updates = (k.astype(self.cached_key.dtype), v.astype(self.cached_value.dtype), real_key)
        caches_now = kv_cache.sharded_like(k, [c[...] for c in caches])
        updates = kv_cache.sharded_like(k, updates)
        if jnp.ndim(offset) == 0:  # every sequence at one position: one contiguous write
            new = [jax.lax.dynamic_update_slice(c, u, (0, offset) + (0,) * (u.ndim - 2))
                   for c, u in zip(caches_now, updates, strict=True)]
        else:  # each sequence at its own position; slots past the cache end are dropped
            batch, max_len = self.cached_key.shape[:2]
            slots = offset[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T]
            if lengths is not None:  # tokens past a sequence's length are not written
                slots = jnp.where(jnp.arange(t) < lengths[:, None], slots, max_len)
            new = kv_cache.scatter_rows(caches_now, updates, slots, like=k)
        for c, value in zip(caches, new, strict=True):
            c.set_value(value)  # (may change the cache's sharding type: not an in-place write)
        self.cache_index.set_value(offset + (t if lengths is None else lengths))
        k_all, v_all, key_mask = new
        return k_all.astype(k.dtype), v_all.astype(v.dtype), key_mask

    def _attention_kwargs(self, mask, is_causal, query_segment_ids, kv_segment_ids,
                          deterministic, rngs) -> dict[str, Any]:
        """Keyword arguments of ``attention_fn``: only those this layer uses are passed, so any
        function with ``jaxattn.dot_product_attention``'s signature subset works."""
        kwargs: dict[str, Any] = dict(mask=mask, is_causal=is_causal)
        if query_segment_ids is not None:
            kwargs.update(query_segment_ids=query_segment_ids, kv_segment_ids=kv_segment_ids)
        if self.logits_soft_cap is not None:
            kwargs["logits_soft_cap"] = self.logits_soft_cap
        if self.sinks is not None:
            kwargs["sinks"] = self.sinks[...]
        if self.implementation is not None:
            kwargs["implementation"] = self.implementation
        deterministic = self.deterministic if deterministic is None else deterministic
        if self.dropout_rate > 0 and deterministic is None:  # flax's rule
            raise ValueError(
                f"dropout_rate={self.dropout_rate} needs deterministic=True/False, given to the "
                "call, the constructor, or nnx.view / set_view (got None in all of them)")
        if self.dropout_rate > 0 and not deterministic:
            source = rngs if rngs is not None else self.rngs
            if source is None:
                raise ValueError("dropout needs rngs: pass rngs= to the call (the layer keeps "
                                 "none when built with keep_rngs=False)")
            key = source() if isinstance(source, nnx.RngStream) else source.dropout()
            kwargs.update(dropout_rate=self.dropout_rate, dropout_rng=key)
        return kwargs

    def _output(self, out, head_weights=None):
        """``[B, T, N, H]`` (times ``head_weights [B, T, N]``) -> ``[B, T, out_features]``."""
        if head_weights is not None:
            if head_weights.shape != out.shape[:3]:
                raise ValueError(f"head_weights must be [B, T, N] = {out.shape[:3]}, got shape "
                                 f"{head_weights.shape}")
            out = out * head_weights[..., None].astype(out.dtype)
        out = constrain(out, ("batch", "length", "heads", "head_dim"))
        dtype = self._compute_dtype(out)
        y = _contract("btnh,nho->bto", out.astype(dtype), self.out_kernel[...].astype(dtype))
        if self.use_bias:
            y = y + self.out_bias[...].astype(dtype)
        return y


def _qk_norm(kind, head_dim: int, dtype, param_dtype, rngs) -> nnx.Module:
    """The per-head query / key norm: ``True`` or ``"layer"`` is flax's (``LayerNorm`` with a
    scale and no bias, ViT-22B's QK norm), ``"rms"`` an ``RMSNorm``."""
    if kind is True or kind == "layer":
        return nnx.LayerNorm(head_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)
    if kind == "rms":
        return nnx.RMSNorm(head_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"normalize_qk must be False, True, 'layer' or 'rms', got {kind!r}")


def _place_as(x, sharding, name: str):
    """``x`` placed as ``sharding`` (a ``NamedSharding``, or a ``PartitionSpec`` of the mesh set
    with ``jax.set_mesh``) on a mesh of any axis kind (:func:`jaxattn.parallel.mesh_axes.
    place_like`)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        mesh, spec = sharding.mesh, sharding.spec
    elif isinstance(sharding, PartitionSpec):
        mesh, spec = jax.sharding.get_abstract_mesh(), sharding
        if mesh is None or not mesh.axis_names:
            raise ValueError(f"{name}={sharding} is a PartitionSpec but no mesh is set; use "
                             "jax.set_mesh(mesh) or pass a NamedSharding")
    else:
        raise TypeError(f"{name} must be a PartitionSpec or NamedSharding, got {sharding!r}")
    if len(spec) > x.ndim:
        raise ValueError(f"{name}={spec} has more entries than the array's rank ({x.shape})")
    return mesh_axes.place_like(x, spec, mesh)


def _apply_qk_norm(norm: nnx.Module, x):
    """``norm(x)`` in ``x``'s dtype. A norm without its own ``dtype`` computes in the promotion of
    ``x`` and its f32 scale (flax's rule; under strict promotion bf16 with f32 has none), so
    ``x`` is promoted explicitly first and the result cast back."""
    if norm.dtype is not None:
        return norm(x)
    with jax.numpy_dtype_promotion("standard"):  # the promotion flax's layer itself would use
        wide = jnp.promote_types(x.dtype, norm.param_dtype)
    return norm(x.astype(wide)).astype(x.dtype)


def _contract(subscripts: str, x, w):
    """``jnp.einsum(subscripts, x, w)``; when ``x`` or ``w`` carries Explicit mesh axes in its
    type, computed on Auto axes and returned sharded like ``x`` over batch and length (the
    contraction over a sharded heads / embed axis has no unambiguous sharding otherwise)."""
    mesh = explicit_mesh_of(x, w)
    if mesh is None:
        return jnp.einsum(subscripts, x, w)
    rank = len(subscripts.split("->")[1])
    spec = PartitionSpec(*explicit_spec(x)[:2], *(None,) * (rank - 2))
    return in_auto_axes(jnp.einsum, mesh, spec, subscripts, x, w)


def _make_attention(*, features, num_heads, causal, rngs, num_kv_heads: int | None = None,
                    init_std: float | None = None, out_init_std: float | None = None,
                    use_bias: bool = True, dropout_rate: float = 0.0,
                    rope_theta: float | None = None, normalize_qk: bool = False,
                    logits_soft_cap: float | None = None, use_sinks: bool = False,
                    implementation: str | None = None):
    """``"attention"`` mixer: :class:`MultiHeadAttention` with config-friendly options
    (``init_std`` / ``out_init_std``: N(0, std) kernels instead of LeCun-normal)."""
    kernel_init = default_kernel_init if init_std is None else nnx.initializers.normal(init_std)
    out_init = None if out_init_std is None else nnx.initializers.normal(out_init_std)
    return MultiHeadAttention(
        num_heads, features, num_kv_heads=num_kv_heads, is_causal=causal,
        kernel_init=kernel_init, out_kernel_init=out_init, use_bias=use_bias,
        dropout_rate=dropout_rate, broadcast_dropout=False, rope_theta=rope_theta,
        normalize_qk=normalize_qk,
        logits_soft_cap=logits_soft_cap, use_sinks=use_sinks, implementation=implementation,
        rngs=rngs)


mixer_lib.register_mixer(
    "attention", _make_attention, patterns=MultiHeadAttention.patterns,
    paper="Attention Is All You Need (2017); GQA (2023)")
