"""jaxattn.nn.MultiHeadAttention: flax compatibility, GQA, RoPE, QK-norm, decoding, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, max_err
from flax import nnx

import jaxattn
from jaxattn import masks as M
from jaxattn.nn import MultiHeadAttention


def test_matches_flax_multihead_attention():
    """Same constructor arguments and parameters as flax.nnx.MultiHeadAttention -> same output."""
    kw = dict(num_heads=4, in_features=16, qkv_features=32, out_features=8, decode=False)
    ours = MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
    theirs = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(1))
    theirs.query.kernel[...] = ours.query_kernel[...]
    theirs.key.kernel[...] = ours.key_kernel[...]
    theirs.value.kernel[...] = ours.value_kernel[...]
    theirs.out.kernel[...] = ours.out_kernel[...]
    for name in ("query", "key", "value"):
        getattr(theirs, name).bias[...] = jax.random.normal(jax.random.key(3), (4, 8))
        getattr(ours, f"{name}_bias")[...] = getattr(theirs, name).bias[...]
    x = jax.random.normal(jax.random.key(2), (2, 11, 16))
    causal = np.tril(np.ones((11, 11), bool))[None, None]
    with jax.numpy_dtype_promotion("standard"):  # flax's own layer promotes implicitly
        expect = theirs(x, mask=causal, deterministic=True)
    assert max_err(ours(x, mask=M.CausalMask()), expect) < F32_ATOL


def test_flax_positional_arguments_build_the_same_gqa_layer():
    """``(num_heads, in_features, qkv_features, out_features, num_kv_heads)`` positionally, as
    flax reads them: the same parameter shapes and, with parameters copied, the same output."""
    ours = MultiHeadAttention(4, 16, 32, 8, 2, rngs=nnx.Rngs(0))
    theirs = nnx.MultiHeadAttention(4, 16, 32, 8, 2, decode=False, rngs=nnx.Rngs(1))
    for name in ("query", "key", "value", "out"):
        flax_kernel = getattr(theirs, name).kernel
        assert getattr(ours, f"{name}_kernel").shape == flax_kernel.shape, name
        flax_kernel[...] = getattr(ours, f"{name}_kernel")[...]
    x = jax.random.normal(jax.random.key(2), (2, 7, 16))
    with jax.numpy_dtype_promotion("standard"):  # flax's own layer promotes implicitly
        expect = theirs(x, deterministic=True)
    assert max_err(ours(x), expect) < F32_ATOL


def test_gqa_cross_attention_shapes_and_param_names():
    m = MultiHeadAttention(8, 24, qkv_features=32, in_kv_features=12, num_kv_heads=2,
                           rngs=nnx.Rngs(0))
    y = m(jnp.ones((3, 5, 24)), jnp.ones((3, 7, 12)))
    assert y.shape == (3, 5, 24)
    assert m.key_kernel.shape == (12, 2, 4)
    assert m.query_kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
    assert m.key_kernel.get_metadata()["out_sharding"] == ("embed", "kv_heads", "head_dim")


@pytest.mark.parametrize("impl", ["reference", "xla_chunked"])
def test_decode_step_by_step_equals_full_causal(impl):
    m = MultiHeadAttention(4, 32, num_kv_heads=2, rope_theta=10_000.0, normalize_qk=True,
                           is_causal=True, use_sinks=True, logits_soft_cap=20.0,
                           implementation=impl, rngs=nnx.Rngs(0))
    m.sinks[...] = jnp.linspace(-1.0, 1.0, 4)
    x = jax.random.normal(jax.random.key(1), (2, 10, 32))
    full = m(x)
    m.init_cache(2, 16)
    step = nnx.jit(lambda m, xt: m(xt, decode=True))
    chunks = [step(m, x[:, :3])] + [step(m, x[:, i:i + 1]) for i in range(3, 10)]
    assert int(m.cache_index[...]) == 10
    assert max_err(jnp.concatenate(chunks, axis=1), full) < F32_ATOL


def test_causal_layer_never_sees_the_future():
    m = MultiHeadAttention(2, 8, is_causal=True, rope_theta=100.0, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (1, 9, 8))
    x2 = x.at[:, 6:].set(0.0)
    assert max_err(m(x)[:, :6], m(x2)[:, :6]) == 0.0
    assert max_err(m(x)[:, 6:], m(x2)[:, 6:]) > 1e-3


def test_injectable_attention_fn_and_training_grads():
    seen = {}

    def spy(q, k, v, bias=None, **kw):
        seen.update(kw, shape=q.shape)
        return jaxattn.dot_product_attention(q, k, v, bias, **kw)

    m = MultiHeadAttention(4, 16, attention_fn=spy, mask=M.LocalMask((2, 0)), rngs=nnx.Rngs(0))
    seg = jnp.array([[0, 0, 1, 1, 1, 2]])
    y = m(jnp.ones((1, 6, 16)), query_segment_ids=seg)
    assert seen["shape"] == (1, 6, 4, 4) and seen["mask"] == M.LocalMask((2, 0))
    assert seen["query_segment_ids"] is seg and y.shape == (1, 6, 16)

    def loss(m, x):
        return jnp.mean(m(x) ** 2)

    g = nnx.grad(loss)(m, jnp.ones((1, 6, 16)))
    assert all(jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g))


def test_dropout_uses_rngs_and_deterministic_flag():
    m = MultiHeadAttention(2, 8, dropout_rate=0.5, broadcast_dropout=False,
                           rngs=nnx.Rngs(0, dropout=1))
    x = jax.random.normal(jax.random.key(5), (1, 6, 8))
    assert max_err(m(x, deterministic=True), m(x, deterministic=True)) == 0.0
    train = lambda: m(x, deterministic=False)
    assert max_err(train(), train()) > 0.0  # fresh dropout keys each call


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        MultiHeadAttention(4, 16, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(3, 16, rngs=nnx.Rngs(0))
    m = MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="init_cache"):
        m(jnp.ones((1, 2, 8)), decode=True)
    m2 = MultiHeadAttention(2, 8, is_causal=True, rngs=nnx.Rngs(0))
    m2.init_cache(1, 4)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        m2(jnp.ones((1, 5, 8)), decode=True)


def test_decode_past_the_cache_end_raises_eagerly_and_poisons_under_jit():
    x = jax.random.normal(jax.random.key(6), (1, 4, 8))
    m = MultiHeadAttention(2, 8, is_causal=True, rngs=nnx.Rngs(0))
    m.init_cache(1, 4)
    m(x[:, :3], decode=True)
    with pytest.raises(ValueError, match="runs past the KV cache length 4"):
        m(x[:, :2], decode=True)  # 3 + 2 > 4, position known eagerly
    m.init_cache(1, 4)
    step = nnx.jit(lambda m, xt: m(xt, decode=True))
    outs = [step(m, x[:, i:i + 1]) for i in range(4)]  # fills the cache exactly: all finite
    assert all(bool(jnp.all(jnp.isfinite(o))) for o in outs)
    past = [step(m, x[:, :1]) for _ in range(2)]  # traced position: NaN, not a clamped write
    assert all(bool(jnp.all(jnp.isnan(o))) for o in past)
    with pytest.raises(ValueError, match=r"\[B, T, 8\]"):
        m(jnp.ones((1, 2, 9)))


def test_flax_call_options_is_causal_sow_weights_and_init_cache_shape():
    """flax.nnx.MultiHeadAttention's call options: ``is_causal=`` per call, ``sow_weights=``
    storing the probabilities [B, N, T, S] as nnx.Intermediate, and ``init_cache(input_shape,
    dtype)``."""
    layer = MultiHeadAttention(4, 16, num_kv_heads=2, rngs=nnx.Rngs(0))
    causal = MultiHeadAttention(4, 16, num_kv_heads=2, is_causal=True, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 16)), jnp.float32)
    np.testing.assert_array_equal(layer(x, is_causal=True), causal(x))
    assert max_err(layer(x), causal(x)) > 1e-3  # the per-call flag does something
    y = layer(x, is_causal=True, sow_weights=True)
    weights = nnx.pop(layer, nnx.Intermediate)["attention_weights"]
    (w,) = jax.tree.leaves(weights)
    assert w.shape == (2, 4, 7, 7)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.triu(np.asarray(w[0, 0]), 1), 0.0)  # causal
    _, _, v = layer._project_qkv(x, None, None)
    out = jnp.einsum("bnts,bskh->btnkh", w, v)  # kv head k serves query heads 2k, 2k + 1
    out = jnp.stack([out[:, :, n, n // 2] for n in range(4)], axis=2)
    np.testing.assert_allclose(layer._output(out), y, atol=1e-5)
    layer.init_cache((2, 12, 16), jnp.float32)
    assert layer.cached_key.shape == (2, 12, 2, 4)
    with pytest.raises(TypeError, match="max_length"):
        layer.init_cache(2)


def test_normalize_qk_is_flax_layer_norm_and_rms_on_request():
    """``normalize_qk=True`` normalises each head's q and k like flax (LayerNorm, scale only):
    zero mean, unit variance over head_dim; ``"rms"`` keeps the mean (RMSNorm)."""
    x = jnp.asarray(np.random.default_rng(1).normal(1.0, 2.0, size=(1, 5, 16)), jnp.float32)
    flaxlike = MultiHeadAttention(2, 16, normalize_qk=True, rngs=nnx.Rngs(0))
    assert isinstance(flaxlike.query_ln, nnx.LayerNorm) and flaxlike.query_ln.bias is None
    q = flaxlike.project_query(x)
    np.testing.assert_allclose(q.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(q.var(-1), 1.0, atol=1e-3)
    rms = MultiHeadAttention(2, 16, normalize_qk="rms", rngs=nnx.Rngs(0))
    assert isinstance(rms.key_ln, nnx.RMSNorm)
    np.testing.assert_allclose((rms.project_query(x) ** 2).mean(-1), 1.0, atol=1e-3)
    with pytest.raises(ValueError, match="normalize_qk must be"):
        MultiHeadAttention(2, 16, normalize_qk="batch", rngs=nnx.Rngs(0))


def test_nnx_view_switches_dropout_and_decode():
    """``nnx.view(model, deterministic=True)`` turns attention dropout off (two eval calls are
    equal and equal the dropout-free layer); ``decode=True`` allocates the cache."""
    if not hasattr(nnx, "view"):
        pytest.skip("nnx.view needs a newer flax")
    m = MultiHeadAttention(2, 8, dropout_rate=0.5, broadcast_dropout=False,
                           rngs=nnx.Rngs(0, dropout=1))
    x = jax.random.normal(jax.random.key(0), (1, 5, 8))
    tr = nnx.view(m, deterministic=False)
    assert max_err(tr(x), tr(x)) > 0.0  # training view: dropout on
    ev = nnx.view(m, deterministic=True)
    np.testing.assert_array_equal(ev(x), ev(x))
    np.testing.assert_array_equal(ev(x), m(x, deterministic=True))
    dec = nnx.view(MultiHeadAttention(2, 8, is_causal=True, rngs=nnx.Rngs(0)), decode=True,
                   batch_size=1, max_length=6)
    assert dec.decode and dec.cached_key.shape == (1, 6, 2, 4)


def test_flax_float_masks_are_read_as_boolean():
    m = MultiHeadAttention(2, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    float_mask = nnx.make_causal_mask(jnp.ones((2, 5)))  # float32 [B, 1, T, T] of 0 / 1
    assert float_mask.dtype == jnp.float32
    np.testing.assert_array_equal(m(x, mask=float_mask), m(x, is_causal=True))
    with pytest.raises(TypeError, match="values must be 0 or 1"):
        m(x, mask=jnp.where(float_mask > 0, 0.0, -1e9))  # an additive mask: refused
    with pytest.raises(TypeError, match="must be concrete"):
        jax.jit(lambda mk: m(x, mask=mk))(float_mask)


def test_dot_product_attention_is_a_flax_attention_fn():
    """``nnx.MultiHeadAttention(attention_fn=jaxattn.dot_product_attention)`` equals flax's own
    layer (float causal mask, sown weights); dropout needs broadcast_dropout=False."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    mask = nnx.make_causal_mask(jnp.ones((2, 6)))  # float32, as flax builds it
    build = lambda **kw: nnx.MultiHeadAttention(4, 16, 16, decode=False, rngs=nnx.Rngs(0), **kw)
    theirs, ours = build(), build(attention_fn=jaxattn.dot_product_attention)
    a = theirs(x, mask=mask, deterministic=True, sow_weights=True)
    b = ours(x, mask=mask, deterministic=True, sow_weights=True)
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    wa, wb = (jax.tree.leaves(nnx.pop(m, nnx.Intermediate)) for m in (theirs, ours))
    np.testing.assert_allclose(wb[0], wa[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="broadcast_dropout=False"):
        build(dropout_rate=0.3, attention_fn=jaxattn.dot_product_attention)(
            x, deterministic=False, rngs=nnx.Rngs(1))
    drop = build(dropout_rate=0.3, broadcast_dropout=False,
                 attention_fn=jaxattn.dot_product_attention)
    assert max_err(drop(x, deterministic=False, rngs=nnx.Rngs(1)),
                   drop(x, deterministic=True)) > 1e-3
    with pytest.raises(ValueError, match="precision"):
        jaxattn.dot_product_attention(x[..., None], x[..., None], x[..., None],
                                      precision="highest")


@pytest.mark.parametrize("kind", [True, "rms"])
def test_qk_norm_runs_in_bf16_under_strict_promotion(kind):
    """The QK norm's f32 scale meets bf16 activations: computed promoted, returned as bf16, and
    close to the f32 layer (bf16 rounding of the inputs and outputs only)."""
    layer = MultiHeadAttention(4, 16, is_causal=True, normalize_qk=kind, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    with jax.numpy_dtype_promotion("strict"):
        low = layer(x.astype(jnp.bfloat16))
    assert low.dtype == jnp.bfloat16
    assert max_err(low.astype(jnp.float32), layer(x)) < 0.05


@pytest.mark.parametrize("kind", ["Explicit", "Auto"])
def test_flax_out_sharding_and_qkv_sharding_place_the_activations(kind):
    """flax's per-call ``out_sharding=`` / ``qkv_sharding=``: same values as without them, the
    output placed as asked (PartitionSpec of the set mesh, or NamedSharding)."""
    axis_type = getattr(jax.sharding.AxisType, kind)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(axis_type,))
    layer = MultiHeadAttention(4, 16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    expect = layer(x)
    spec = jax.sharding.PartitionSpec("data")
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
        y = jax.jit(lambda x: layer(x, out_sharding=spec, qkv_sharding=spec))(xs)
        z = layer(xs, out_sharding=jax.sharding.NamedSharding(mesh, spec))
    for out in (y, z):
        assert out.sharding.spec[:1] == ("data",)
        assert max_err(np.asarray(out), expect) < F32_ATOL
    with pytest.raises(ValueError, match="no mesh is set"):
        layer(x, out_sharding=spec)
    with pytest.raises(TypeError, match="out_sharding must be"):
        layer(x, out_sharding="data")
