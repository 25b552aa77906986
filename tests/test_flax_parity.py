"""jaxattn.nn.MultiHeadAttention against flax.nnx.MultiHeadAttention (issue 12, item 2): the
constructor's signature, from_flax / to_flax, forward, decode steps, gradients (f32, bf16) and
flax's deterministic / nnx.view rules.

flax's layer promotes dtypes implicitly, so its calls run under
``jax.numpy_dtype_promotion("standard")`` (the suite runs strict)."""

import contextlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, F32_GRAD_ATOL, max_err
from flax import nnx

from jaxattn.nn import MultiHeadAttention
from jaxattn.nn.flax_interop import PARAMETER_NAMES, REFUSED_FLAX_OPTIONS

flax_promotion = lambda: jax.numpy_dtype_promotion("standard")  # noqa: E731

# Defaults that differ on purpose: jaxattn's attention_fn is jaxattn.dot_product_attention
# (flax's own dot_product_attention passed here is replaced by it).
DELIBERATELY_DIFFERENT_DEFAULTS = {"attention_fn"}
# A value other than flax's default for every option jaxattn refuses.
NON_DEFAULT = {"precision": "highest", "qkv_promote_dtype": lambda xs, dtype=None: xs,
               "out_promote_dtype": lambda xs, dtype=None: xs,
               "ln_promote_dtype": lambda xs, dtype=None: xs,
               "qkv_dot_general": jax.lax.dot_general, "out_dot_general": jax.lax.dot_general,
               "qkv_dot_general_cls": object, "out_dot_general_cls": object}


def _get(obj, path):
    for name in path.split("."):
        obj = getattr(obj, name, None)
    return obj


def _randomize(flax_layer, seed=0):
    """Random values for every parameter of a flax layer (its biases start at 0 and its norm
    scales at 1, which would hide a bias or a scale that is not copied)."""
    rng = np.random.default_rng(seed)
    for _, path in PARAMETER_NAMES:
        var = _get(flax_layer, path)
        if var is not None:
            var[...] = jnp.asarray(rng.normal(0.0, 0.5, size=var.shape), var[...].dtype)


def _flat(state):
    """``{"query.kernel": array}`` of an nnx State (parameters or their gradients)."""
    return {".".join(map(str, path)): np.asarray(v[...] if isinstance(v, nnx.Variable) else v)
            for path, v in nnx.to_flat_state(state)}


# ---- constructor ------------------------------------------------------------------------------
def test_constructor_takes_every_flax_argument_with_its_position_and_default():
    theirs = inspect.signature(nnx.MultiHeadAttention.__init__).parameters
    ours = inspect.signature(MultiHeadAttention.__init__).parameters
    positional = lambda ps: [n for n, p in ps.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional(ours) == positional(theirs)
    key = jax.random.key(0)
    for name, p in theirs.items():
        assert name in ours, name
        q = ours[name]
        assert q.kind == p.kind, name
        if name in DELIBERATELY_DIFFERENT_DEFAULTS:
            continue
        if name in ("kernel_init", "bias_init"):  # initializers: the same numbers
            np.testing.assert_array_equal(q.default(key, (4, 3, 2), jnp.float32),
                                          p.default(key, (4, 3, 2), jnp.float32))
        else:
            assert q.default is p.default or q.default == p.default, name
    extras = [n for n in ours if n not in theirs]
    assert all(ours[n].kind is ours[n].KEYWORD_ONLY for n in extras), extras
    assert set(REFUSED_FLAX_OPTIONS) <= set(theirs)


def test_options_jaxattn_cannot_honour_raise_naming_them():
    for name in REFUSED_FLAX_OPTIONS:
        with pytest.raises(NotImplementedError, match=name):
            MultiHeadAttention(2, 8, rngs=nnx.Rngs(0), **{name: NON_DEFAULT[name]})
    with pytest.raises(ValueError, match="broadcast_dropout=False"):
        MultiHeadAttention(2, 8, dropout_rate=0.1, rngs=nnx.Rngs(0))  # flax's default True
    MultiHeadAttention(2, 8, broadcast_dropout=True, rngs=nnx.Rngs(0))  # no dropout: fine
    m = MultiHeadAttention(2, 8, attention_fn=nnx.dot_product_attention, rngs=nnx.Rngs(0))
    assert m.attention_fn is MultiHeadAttention(2, 8, rngs=nnx.Rngs(0)).attention_fn


def test_metadata_options_reach_the_parameters():
    m = MultiHeadAttention(2, 8, normalize_qk=True, kernel_metadata={"tag": "k"},
                           bias_metadata={"tag": "b"}, out_kernel_metadata={"tag": "ok"},
                           query_ln_scale_metadata={"tag": "qs"}, rngs=nnx.Rngs(0))
    tag = lambda v: v.get_metadata().get("tag")
    assert [tag(m.query_kernel), tag(m.value_kernel), tag(m.out_kernel)] == ["k", "k", "ok"]
    assert [tag(m.key_bias), tag(m.out_bias)] == ["b", "b"]  # out_bias_metadata falls back
    assert [tag(m.query_ln.scale), tag(m.key_ln.scale)] == ["qs", None]
    assert m.query_kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")


# ---- forward, round trip, gradients -----------------------------------------------------------
B, T, S = 2, 5, 7
CONFIGS = {  # name: (positional args, keyword args, cross attention, mask kind)
    "self_bool_causal": ((4, 16), {}, False, "bool"),
    "cross_float_mask": ((4, 16, 32, 8, None, 12), {}, True, "float"),
    "gqa_qk_norm": ((4, 16, 32, 8, 2), dict(normalize_qk=True), False, "float"),
    "no_bias_cross": ((4, 16, 32, 8, None, 12), dict(use_bias=False), True, "bool"),
    "dropout_deterministic": ((4, 16), dict(dropout_rate=0.3, broadcast_dropout=False,
                                            deterministic=True), False, None),
}


def _inputs(args, cross, mask_kind, dtype=jnp.float32):
    """``x [B, T, D]``, ``context [B, S, D_kv]`` or None, a mask of ``mask_kind`` and the
    output cotangent ``w [B, T, D_out]`` for gradients."""
    d = args[1]
    d_kv = args[5] if len(args) > 5 and args[5] is not None else d
    d_out = args[3] if len(args) > 3 and args[3] is not None else d
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(B, T, d)), dtype)
    s = S if cross else T
    ctx = jnp.asarray(rng.normal(size=(B, S, d_kv)), dtype) if cross else None
    w = jnp.asarray(rng.normal(size=(B, T, d_out)), jnp.float32)
    if mask_kind is None:
        return x, ctx, None, w
    if cross:  # padding: the first key of every row stays visible (no fully masked row)
        keep_q, keep_k = np.ones((B, T)), (rng.random((B, s)) > 0.4).astype(np.float32)
        keep_k[:, 0] = 1.0
        mask = nnx.make_attention_mask(jnp.asarray(keep_q), jnp.asarray(keep_k))
    else:
        mask = nnx.make_causal_mask(jnp.ones((B, T)))
    return x, ctx, (mask if mask_kind == "float" else mask > 0), w


def _loss(layer, x, ctx, mask, w):
    return jnp.sum(layer(x, ctx, mask=mask, deterministic=True).astype(jnp.float32) * w)


def _value_and_grads(layer, x, ctx, mask, w, *, flax_layer: bool):
    """(output, {param name: grad}, (dx, dctx)); parameter names as flax's (``query.kernel``)."""
    with flax_promotion() if flax_layer else contextlib.nullcontext():
        out = layer(x, ctx, mask=mask, deterministic=True)
        argnums = (0, 1, 2) if ctx is not None else (0, 1)
        grads = nnx.grad(_loss, argnums=argnums)(layer, x, ctx, mask, w)
    params = _flat(grads[0])
    if not flax_layer:
        params = {b: params[a] for a, b in PARAMETER_NAMES if a in params}
    return out, params, grads[1:]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_from_flax_matches_flax_forward_gradients_and_round_trips_exactly(name):
    args, kw, cross, mask_kind = CONFIGS[name]
    theirs = nnx.MultiHeadAttention(*args, **kw, decode=False, rngs=nnx.Rngs(1))
    _randomize(theirs)
    ours = MultiHeadAttention.from_flax(theirs)
    assert (ours.dropout_rate, ours.deterministic) == (theirs.dropout_rate, theirs.deterministic)
    x, ctx, mask, w = _inputs(args, cross, mask_kind)
    y1, g1, d1 = _value_and_grads(theirs, x, ctx, mask, w, flax_layer=True)
    y2, g2, d2 = _value_and_grads(ours, x, ctx, mask, w, flax_layer=False)
    assert max_err(y2, y1) < F32_ATOL
    assert sorted(g2) == sorted(g1)
    for path in g1:
        assert max_err(g2[path], g1[path]) < F32_GRAD_ATOL, path
    if "key.bias" in g2 and not kw.get("normalize_qk"):  # softmax is invariant to q . b_k
        # added to a whole row (a QK norm between the bias and the logits breaks this)
        assert np.max(np.abs(g2["key.bias"])) < F32_GRAD_ATOL
    for a, b in zip(d2, d1, strict=True):
        assert max_err(a, b) < F32_GRAD_ATOL
    back = ours.to_flax()  # round trip: every parameter bit for bit, and flax's output
    assert _flat(nnx.state(back, nnx.Param)).keys() == _flat(nnx.state(theirs, nnx.Param)).keys()
    for _, path in PARAMETER_NAMES:
        if _get(theirs, path) is not None:
            np.testing.assert_array_equal(_get(back, path)[...], _get(theirs, path)[...])
            assert _get(back, path)[...].dtype == _get(theirs, path)[...].dtype
    again = MultiHeadAttention.from_flax(back)
    for ours_path, _ in PARAMETER_NAMES:
        if _get(ours, ours_path) is not None:
            np.testing.assert_array_equal(_get(again, ours_path)[...], _get(ours, ours_path)[...])
    with flax_promotion():
        np.testing.assert_array_equal(back(x, ctx, mask=mask, deterministic=True), y1)


def test_bf16_matches_flax_within_twice_flax_own_bf16_error():
    """bf16 compute (``dtype=bfloat16``, f32 parameters): the error of jaxattn's bf16 layer
    against the f32 layer is at most twice flax's own bf16 error (architecture.md principle 6),
    for the output and for every gradient (relative to the gradient's largest entry)."""
    # GQA without QK norm: nnx.LayerNorm on bf16 activations needs implicit promotion (its
    # statistics promote bf16 with f32), which this suite's strict mode refuses.
    args, _, cross, mask_kind = CONFIGS["gqa_qk_norm"]
    f32 = nnx.MultiHeadAttention(*args, decode=False, rngs=nnx.Rngs(1))
    _randomize(f32)
    theirs = nnx.MultiHeadAttention(*args, dtype=jnp.bfloat16, decode=False, rngs=nnx.Rngs(1))
    for _, path in PARAMETER_NAMES:
        if _get(f32, path) is not None:
            _get(theirs, path)[...] = _get(f32, path)[...]
    ours = MultiHeadAttention.from_flax(theirs)
    assert ours.dtype == jnp.bfloat16 and ours.query_kernel[...].dtype == jnp.float32
    x, ctx, mask, w = _inputs(args, cross, mask_kind, dtype=jnp.bfloat16)
    truth = _value_and_grads(f32, x.astype(jnp.float32), ctx, mask, w, flax_layer=True)
    flax_bf16 = _value_and_grads(theirs, x, ctx, mask, w, flax_layer=True)
    ours_bf16 = _value_and_grads(ours, x, ctx, mask, w, flax_layer=False)
    assert ours_bf16[0].dtype == flax_bf16[0].dtype == jnp.bfloat16

    def errors(got):
        rel = lambda a, b: max_err(a, b) / float(np.max(np.abs(np.asarray(b, np.float32))))
        # key.bias is left out: its exact gradient is 0 (adding q . b_k to every logit of a row
        # leaves the softmax unchanged), so only rounding noise is left to compare.
        return [rel(got[0], truth[0])] \
            + [rel(got[1][p], truth[1][p]) for p in truth[1] if p != "key.bias"] \
            + [rel(a, b) for a, b in zip(got[2], truth[2], strict=True)]

    ours_err, flax_err = np.array(errors(ours_bf16)), np.array(errors(flax_bf16))
    assert ours_err.max() <= 2 * flax_err.max(), (ours_err, flax_err)


# ---- decoding ---------------------------------------------------------------------------------
def test_decode_steps_match_flax_and_the_cache_converts():
    """flax's decode API on both (``decode=True``, ``init_cache(input_shape, dtype)``, one token
    per call): every step equal, equal to the full causal pass; a half-filled flax cache
    converted by from_flax continues identically."""
    length = 6
    theirs = nnx.MultiHeadAttention(4, 16, 16, 16, 2, decode=True, normalize_qk=True,
                                    rngs=nnx.Rngs(1))
    _randomize(theirs)
    ours = MultiHeadAttention.from_flax(theirs, is_causal=True)  # jaxattn decodes causal layers
    assert ours.decode is True
    x = jax.random.normal(jax.random.key(3), (B, length, 16))
    for layer in (theirs, ours):
        layer.init_cache((B, length, 16), jnp.float32)
    with flax_promotion():
        full = theirs(x, decode=False, is_causal=True)
        flax_steps = [theirs(x[:, i:i + 1]) for i in range(3)]
    our_steps = [ours(x[:, i:i + 1]) for i in range(3)]
    for a, b in zip(our_steps, flax_steps, strict=True):
        assert max_err(a, b) < F32_ATOL
    resumed = MultiHeadAttention.from_flax(theirs, is_causal=True)  # flax cache at index 3
    assert int(resumed.cache_index[...]) == 3
    with flax_promotion():
        flax_steps += [theirs(x[:, i:i + 1]) for i in range(3, length)]
    for i in range(3, length):
        a, b = ours(x[:, i:i + 1]), resumed(x[:, i:i + 1])
        assert max_err(a, flax_steps[i]) < F32_ATOL and max_err(b, flax_steps[i]) < F32_ATOL
    assert max_err(jnp.concatenate(flax_steps, axis=1), full) < F32_ATOL


# ---- deterministic rules, views, rngs ---------------------------------------------------------
def _pair(**kw):
    theirs = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0, dropout=1), **kw)
    return theirs, MultiHeadAttention.from_flax(theirs, rngs=nnx.Rngs(0, dropout=1))


def _call(layer, *args, **kw):
    with flax_promotion():
        return layer(*args, **kw)


def test_deterministic_rules_views_and_rngs_follow_flax():
    x = jax.random.normal(jax.random.key(0), (1, 5, 8))
    theirs, ours = _pair(dropout_rate=0.5, broadcast_dropout=False)
    exact = _call(theirs, x, deterministic=True)
    assert max_err(ours(x, deterministic=True), exact) < F32_ATOL
    for layer in (theirs, ours):
        with pytest.raises(ValueError, match="deterministic"):  # dropout and no flag anywhere
            _call(layer, x)
        assert max_err(_call(layer, x, deterministic=False),
                       _call(layer, x, deterministic=False)) > 1e-3
        ev, tr = nnx.view(layer, deterministic=True), nnx.view(layer, deterministic=False)
        np.testing.assert_array_equal(_call(ev, x), _call(ev, x))
        assert max_err(_call(ev, x), exact) < F32_ATOL
        assert max_err(_call(tr, x), _call(tr, x)) > 1e-3
        assert max_err(_call(tr, x, deterministic=True), exact) < F32_ATOL  # the call wins
        layer.set_view(deterministic=True)
        assert max_err(_call(layer, x), exact) < F32_ATOL
    _, no_dropout = _pair()
    no_dropout(x)  # without dropout, deterministic may stay None (as flax)
    theirs, ours = _pair(dropout_rate=0.5, broadcast_dropout=False, keep_rngs=False)
    assert ours.rngs is None and theirs.rngs is None
    for layer in (theirs, ours):
        with pytest.raises(ValueError, match="rngs"):
            _call(layer, x, deterministic=False)
        for rngs in (nnx.Rngs(dropout=2), nnx.Rngs(dropout=2).dropout):  # Rngs or a stream
            assert max_err(_call(layer, x, deterministic=False, rngs=rngs), exact) > 1e-3


# ---- what cannot be converted -----------------------------------------------------------------
def test_conversions_refuse_what_the_other_side_cannot_do():
    custom = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0),
                                    attention_fn=lambda q, k, v, **kw: v)
    with pytest.raises(ValueError, match="attention_fn"):
        MultiHeadAttention.from_flax(custom)
    for kw, name in ((dict(precision="highest"), "precision"),
                     (dict(dropout_rate=0.1), "broadcast_dropout")):
        with pytest.raises(ValueError, match=name):
            MultiHeadAttention.from_flax(
                nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0), **kw))
    with pytest.raises(TypeError, match="flax.nnx.MultiHeadAttention"):
        MultiHeadAttention.from_flax(MultiHeadAttention(2, 8, rngs=nnx.Rngs(0)))
    extras = dict(rope_theta=10_000.0, use_sinks=True, logits_soft_cap=5.0, is_causal=True,
                  normalize_qk="rms", attention_fn=lambda q, k, v, bias=None, **kw: v)
    for name, value in extras.items():
        with pytest.raises(ValueError, match=name):
            MultiHeadAttention(2, 8, rngs=nnx.Rngs(0), **{name: value}).to_flax()
    with pytest.raises(ValueError, match="rope_theta.*use_sinks"):  # every feature named
        MultiHeadAttention(2, 8, rope_theta=1e4, use_sinks=True, rngs=nnx.Rngs(0)).to_flax()
    fine = MultiHeadAttention(2, 8, implementation="xla_chunked", rngs=nnx.Rngs(0)).to_flax()
    assert isinstance(fine, nnx.MultiHeadAttention)  # a backend choice, not a feature


def test_call_takes_every_flax_call_argument_with_flax_kind_and_default():
    """``__call__``: each of flax's parameters exists here with the same kind and default (ours
    adds jaxattn's extras after them)."""
    theirs = inspect.signature(nnx.MultiHeadAttention.__call__).parameters
    ours = inspect.signature(MultiHeadAttention.__call__).parameters
    for name, p in theirs.items():
        assert name in ours, name
        assert ours[name].kind == p.kind, name
        assert ours[name].default == p.default, name
