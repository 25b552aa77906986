"""Zoology MQAR: generator layout, mixers (causality, Based views, convolutions, sparse
attention) and the harness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.zoology.model import (
    LAYERS,
    MODELS,
    ZoologyModelConfig,
    build_model,
    layer_config,
)
from jaxattn.models import build_mixer
from jaxattn.nn import baseconv, based, capture_aux_losses, sigmoid_lookup
from jaxattn.train.sources.mqar import IGNORE_INDEX, MQARSource, multiquery_ar


def _src(**kw):
    args = dict(vocab_size=128, seq_len=64, num_kv_pairs=4, num_examples=50,
                random_non_queries=False)
    args.update(kw)
    return MQARSource(**args)


def test_mqar_layout_matches_reference_structure():
    v, seq, k = 128, 64, 4
    inputs, labels = multiquery_ar(v, 50, seq, seed=3, num_kv_pairs=k, random_non_queries=False)
    assert inputs.shape == labels.shape == (50, seq)
    for x, y in zip(inputs, labels, strict=True):
        keys, values = x[0:2 * k:2], x[1:2 * k:2]
        assert np.all((keys >= 1) & (keys < v // 2)) and len(set(keys)) == k
        assert np.all((values >= v // 2) & (values < v)) and len(set(values)) == k
        pos = np.nonzero(y != IGNORE_INDEX)[0]
        assert len(pos) == k
        # queries sit at even offsets after the context; the target is the bound value
        assert np.all((pos - 2 * k) % 2 == 0) and np.all(pos >= 2 * k)
        bound = dict(zip(keys.tolist(), values.tolist(), strict=True))
        for p in pos:
            assert y[p] == bound[int(x[p])]
        # filler is token 0 when random_non_queries=False
        rest = np.ones(seq, bool)
        rest[:2 * k] = False
        rest[pos] = False
        assert np.all(x[rest] == 0)


def test_mqar_power_law_favours_short_gaps():
    src = _src(num_examples=400)
    first = [np.nonzero(src[i]["labels"] != IGNORE_INDEX)[0].min() - 8 for i in range(400)]
    gaps = np.array(first) // 2
    # with a = 0.01, p(g) ~ g^-0.99: gap 0 is by far the most frequent first query gap
    assert np.mean(gaps == 0) > 0.3


def test_mqar_random_non_queries_fills_zeros():
    x = _src(random_non_queries=True)[0]["inputs"]
    assert np.count_nonzero(x == 0) < 10


def test_mqar_rejects_bad_arguments():
    with pytest.raises(ValueError, match="exceed"):
        _src(vocab_size=64, seq_len=64)
    with pytest.raises(ValueError, match="even"):
        _src(seq_len=63)
    with pytest.raises(ValueError, match="seq_len"):
        _src(num_kv_pairs=20)


def test_taylor_feature_map_inner_product():
    q, k = jax.random.normal(jax.random.key(0), (2, 5, 8))
    got = jnp.einsum("nf,nf->n", based.taylor_feature_map(q), based.taylor_feature_map(k))
    dot = jnp.sum(q * k, -1)
    want = 1 + dot / jnp.sqrt(8.0) + dot**2 / (2 * 8.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_based_quadratic_equals_linear():
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(kq, (2, 24, 8))
    k = jax.random.normal(kk, (2, 24, 8))
    v = jax.random.normal(kv, (2, 24, 16))
    np.testing.assert_allclose(based.based_quadratic(q, k, v), based.based_linear(q, k, v),
                               rtol=2e-5, atol=2e-5)
    # and the quadratic view is exactly normalised causal Taylor attention, written out:
    i = 10
    w = 1 + (k[:, : i + 1] @ q[:, i, :, None])[..., 0] / jnp.sqrt(8.0)
    w = w + ((k[:, : i + 1] @ q[:, i, :, None])[..., 0]) ** 2 / 16.0
    want = jnp.einsum("bj,bjd->bd", w, v[:, : i + 1]) / jnp.sum(w, -1, keepdims=True)
    np.testing.assert_allclose(based.based_quadratic(q, k, v)[:, i], want, rtol=2e-5)


def test_convolutions_match_direct_sums():
    x = jax.random.normal(jax.random.key(2), (2, 12, 4))
    kern = jax.random.normal(jax.random.key(3), (3, 4))
    bias = jnp.arange(4, dtype=jnp.float32)
    xn = np.asarray(x)
    got = baseconv.causal_short_conv(x, kern, bias)
    want = np.zeros_like(xn) + np.asarray(bias)
    for t in range(12):
        for j in range(3):
            s = t - 2 + j
            if s >= 0:
                want[:, t] += np.asarray(kern)[j] * xn[:, s]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    filt = jax.random.normal(jax.random.key(4), (12, 4))
    got = baseconv.fft_causal_conv(x, filt)
    want = xn.copy()
    for t in range(12):
        for s in range(t + 1):
            want[:, t] += np.asarray(filt)[s] * xn[:, t - s]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _layer(kind, width=16, **kw):
    """One Zoology layer as the 2-layer harness builds it (L = 32)."""
    cfg = ZoologyModelConfig(width=width, seq_len=32, **kw)
    return build_mixer(layer_config(kind, cfg, 2), features=width, num_heads=1, causal=True,
                       rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_mixers_are_causal(name):
    """Every Zoology layer, train and eval mode (the sparse layer's eval selection is the causal
    prefix rule, see jaxattn/nn/sigmoid_lookup.py)."""
    mixer = _layer(name)
    x = jax.random.normal(jax.random.key(5), (2, 32, 16))
    x2 = x.at[:, 20:].set(jax.random.normal(jax.random.key(6), (2, 12, 16)))
    for det in (True, False):
        y = mixer(x, deterministic=det, rngs=nnx.Rngs(dropout=0))
        y2 = mixer(x2, deterministic=det, rngs=nnx.Rngs(dropout=0))
        np.testing.assert_allclose(y[:, :20], y2[:, :20], rtol=1e-5, atol=1e-5)
        assert not np.allclose(y[:, 20:], y2[:, 20:])


def _sparse_train_and_eval(causal):
    mixer = sigmoid_lookup.SigmoidLookupAttention(16, causal=causal, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(7), (2, 36, 16))
    fwd = lambda m, x, det: m(x, deterministic=det, rngs=nnx.Rngs(dropout=0))
    dense, aux = capture_aux_losses(fwd, mixer, x, False)
    assert list(aux) == ["budget"] and aux["budget"].shape == ()
    sparse, none = capture_aux_losses(fwd, mixer, x, True)
    assert none == {}
    s = jax.nn.sigmoid(mixer.gate(x))[..., 0]
    return mixer, x, dense, sparse, np.asarray(s)


def test_sparse_global_eval_attends_only_at_top_k_queries():
    """The reference's rule (non-causal pattern): the k = ceil(sqrt(L)) largest gates of the
    whole sequence attend (bidirectionally here), the rest pass x through."""
    _, x, dense, sparse, s = _sparse_train_and_eval(causal=False)
    top = np.argsort(-s, axis=-1)[:, :6]  # k = ceil(sqrt(36)) = 6
    sel = np.zeros((2, 36), bool)
    np.put_along_axis(sel, top, True, axis=-1)
    np.testing.assert_allclose(np.asarray(sparse)[sel], np.asarray(dense)[sel], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sparse)[~sel], np.asarray(x)[~sel])


def test_sparse_prefix_eval_selects_top_k_of_each_prefix():
    """Causal pattern: position t attends iff s_t is among the 6 largest of s_0..s_t."""
    _, x, dense, sparse, s = _sparse_train_and_eval(causal=True)
    sel = np.array([[np.sum(row[: t + 1] > row[t]) < 6 for t in range(36)] for row in s])
    assert sel[:, :6].all() and not sel.all()
    np.testing.assert_allclose(np.asarray(sparse)[sel], np.asarray(dense)[sel], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sparse)[~sel], np.asarray(x)[~sel])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_build_and_are_causal(name):
    cfg = ZoologyModelConfig(name=name, width=16, vocab_size=64, seq_len=32)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(8), (2, 32), 0, 64)
    h = model(tokens, deterministic=True)
    assert h.shape == (2, 32, 16)
    assert model.logits(h).shape == (2, 32, 64)
    h2 = model(tokens.at[:, 25:].set(3), deterministic=True)
    np.testing.assert_allclose(h[:, :25], h2[:, :25], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        model(tokens[0])


def test_attn_init_std_reaches_qkv_kernels():
    """The quick preset's attention init (q/k/v std 0.1) reaches the kernels; the output
    projection keeps the reference's 0.02 / sqrt(2 n_layers)."""
    m = _layer("attention", width=64, attn_init_std=0.1)
    assert 0.08 < float(jnp.std(m.query_kernel[...])) < 0.12
    assert 0.08 < float(jnp.std(m.key_kernel[...])) < 0.12
    assert float(jnp.std(m.out_kernel[...])) < 0.015
    assert float(jnp.std(_layer("attention", width=64).query_kernel[...])) < 0.03


@pytest.mark.parametrize("name", ["attention", "baseconv"])
def test_state_norm_is_the_reference_identity_state_mixer(name):
    """``state_norm`` (the default) is the reference TransformerBlock with an identity state
    mixer: ``x += mixer(LN1 x); x += LN2(x)`` per block, then the final LN; without it the
    ``LN2`` term is absent. Both models share every other parameter."""
    kw = dict(name=name, width=16, vocab_size=64, seq_len=32)
    with_norm = build_model(ZoologyModelConfig(**kw), rngs=nnx.Rngs(0))
    plain = build_model(ZoologyModelConfig(**kw, state_norm=False), rngs=nnx.Rngs(0))
    assert len(with_norm.mlp_norms) == 2 and not plain.mlp_norms
    # train the LN2 parameters away from (1, 0) so the check sees them
    for i, norm in enumerate(with_norm.mlp_norms):
        norm.scale[...] = 1.0 + 0.1 * jax.random.normal(jax.random.key(i), (16,))
        norm.bias[...] = 0.1 * jax.random.normal(jax.random.key(10 + i), (16,))
    tokens = jax.random.randint(jax.random.key(3), (2, 32), 0, 64)
    x = plain.embed(tokens)
    if plain.pos is not None:
        x = x + plain.pos(jnp.arange(32))[None]
    for norm, mixer, norm2 in zip(plain.norms, plain.mixers, with_norm.mlp_norms, strict=True):
        x = x + mixer(norm(x), deterministic=True)
        x = x + norm2(x)
    np.testing.assert_allclose(with_norm(tokens, deterministic=True), plain.final_norm(x),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(plain(tokens, deterministic=True), plain.final_norm(x), atol=1e-3)
