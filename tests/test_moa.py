"""MoA (Fu et al., 2024): the code's elastic rule, the per-head mask's block metadata, the
backends against the einsum reference, exact identities, the influence and the search."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxattn
from jaxattn import masks
from jaxattn.models import MixerConfig
from jaxattn.models.lm import DecoderLM, LMConfig
from jaxattn.nn import MultiHeadAttention, moa
from tests.attention_testing import (
    F32_ATOL,
    F32_GRAD_ATOL,
    bf16_budget,
    grads,
    max_err,
    rand_inputs,
)

RULE = dict(span_block=8, min_span=16, sink_size=8)  # the code's 64/128/64, scaled by 1/8
T = 96
# heads: sink + short window, sink only + window from alpha, a span covering N, a window only
ALPHA = np.array([-40.0, 20.0, 0.0, 30.0])
BETA = np.array([0.5, 0.0, 1.0, 0.125])


def _code_rule(alpha, beta, n, span_block=64, min_span=128, sink_size=64):
    """``moa_config_to_cache_config`` of thu-nics/MoA, written out with Python scalars."""
    out = []
    for a, b in zip(alpha, beta, strict=True):
        size = int(a + n * b)
        size = min(math.ceil(max(size, min_span) / span_block) * span_block, n)
        out.append((size, min(size, sink_size)))
    return out


def test_elastic_spans_follow_the_official_rounding():
    r = np.random.default_rng(0)
    alpha = r.uniform(-3000, 3000, size=40)
    beta = r.uniform(0, 1, size=40)
    for n in (100, 1000, 4097, 12288):
        span, sink, window = moa.elastic_spans(alpha, beta, n)
        want = _code_rule(alpha, beta, n)
        np.testing.assert_array_equal(span, [s for s, _ in want])
        np.testing.assert_array_equal(sink, [k for _, k in want])
        np.testing.assert_array_equal(window, span - sink)
        assert np.all(span <= n) and np.all(span >= min(128, n))


def test_mask_is_the_rule_and_its_block_metadata_is_per_head():
    mask = moa.elastic_mask(ALPHA, BETA, T, **RULE)
    _, sink, window = moa.elastic_spans(ALPHA, BETA, T, **RULE)
    assert mask.num_heads == 4
    arr = np.asarray(mask.to_array(T, T))  # [H, T, T]
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    for h in range(4):
        want = (j <= i) & ((j < sink[h]) | (i - j < window[h]))
        np.testing.assert_array_equal(arr[h], want)
    np.testing.assert_array_equal(arr[2], np.tril(np.ones((T, T), bool)))  # span covers N
    bq = 16
    info = mask.block_info(T, T, bq, bq)
    tiles = arr.reshape(4, T // bq, bq, T // bq, bq).any(axis=(2, 4))
    np.testing.assert_array_equal(info.kind[0] != masks.EMPTY, tiles)  # per head
    dense = masks.CausalMask().block_info(T, T, bq, bq).num_visited
    assert info.num_visited < 4 * dense  # the sparse heads skip tiles
    assert (info.kind[0, 2] != masks.EMPTY).sum() == dense  # the covering head does not
    assert not np.array_equal(info.kind[0, 0], info.kind[0, 3])  # heads differ


@pytest.fixture(scope="module")
def qkv():
    return rand_inputs(seed=1, b=1, t=T, s=T, n=4, k=2, h=8)


@pytest.mark.parametrize("impl", ["xla_chunked", "pallas"])
def test_backends_match_the_reference_f32_bf16_and_gradients(qkv, impl):
    q, k, v = qkv
    ref = lambda q, k, v: moa.moa_attention_reference(q, k, v, ALPHA, BETA, **RULE)
    fast = lambda q, k, v: moa.moa_attention(q, k, v, ALPHA, BETA, implementation=impl, **RULE)
    assert max_err(fast(q, k, v), ref(q, k, v)) < F32_ATOL
    grouped = moa.moa_attention(q, k, v, ALPHA, BETA, implementation=impl, group_heads=True,
                                **RULE)
    assert max_err(grouped, ref(q, k, v)) < F32_ATOL
    lo = [x.astype(jnp.bfloat16) for x in qkv]
    mask = moa.elastic_mask(ALPHA, BETA, T, **RULE)
    out = fast(*lo)
    assert out.dtype == jnp.bfloat16
    assert max_err(out, ref(q, k, v)) <= bf16_budget(*lo, mask=mask)
    if impl == "xla_chunked":  # one backward compile is enough for the CPU budget
        for g_fast, g_ref in zip(grads(fast, qkv, (0, 1, 2)), grads(ref, qkv, (0, 1, 2)),
                                 strict=True):
            assert max_err(g_fast, g_ref) < F32_GRAD_ATOL


def test_plan_covering_n_is_dense_causal_attention_exactly(qkv):
    q, k, v = qkv
    cover = moa.elastic_mask([0.0] * 4, [1.0] * 4, T, **RULE)
    assert all(isinstance(m, masks.CausalMask) for m in cover.masks)
    for impl in ("xla", "xla_chunked"):
        got = moa.moa_attention(q, k, v, [0.0] * 4, [1.0] * 4, implementation=impl, **RULE)
        want = jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # alpha large enough, with the code's default rounding, at N = 96 < min_span: also dense
    got = moa.moa_attention(q, k, v, [5.0] * 4, [0.0] * 4, implementation="xla")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(
        jaxattn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")))


def test_default_mixer_equals_causal_mha_exactly_and_plans_change_it():
    d, heads = 16, 4
    mix = moa.MoAAttention(d, heads, rngs=nnx.Rngs(0))
    mha = MultiHeadAttention(heads, d, is_causal=True, rngs=nnx.Rngs(1))
    nnx.update(mha, nnx.state(mix.attn))
    x = jax.random.normal(jax.random.key(2), (2, 40, d))
    np.testing.assert_array_equal(np.asarray(mix(x)), np.asarray(mha(x)))
    sparse = moa.MoAAttention(d, heads, alphas=ALPHA, betas=BETA, rngs=nnx.Rngs(0), **RULE)
    y = np.asarray(sparse(x))
    assert not np.allclose(y, np.asarray(mha(x)), atol=1e-4)
    np.testing.assert_array_equal(y[:, :16], np.asarray(mha(x))[:, :16])  # rows < min span


def test_fully_masked_rows_give_zeros():
    mix = moa.MoAAttention(8, 2, alphas=[0.0, 0.0], betas=[0.25, 1.0], use_bias=False,
                           rngs=nnx.Rngs(0), **RULE)
    x = jax.random.normal(jax.random.key(3), (1, 32, 8))
    rows = np.ones((32, 32), bool)
    rows[5] = False
    y = np.asarray(mix(x, mask=rows))
    np.testing.assert_array_equal(y[0, 5], 0.0)
    assert np.all(np.isfinite(y)) and np.abs(y[0, 6]).max() > 0


def _influence_numpy(a, g, eps):
    e = np.empty_like(a)
    for idx in np.ndindex(a.shape[:-1]):
        row_a, row_g = a[idx], g[idx]
        e[idx] = -row_a * (row_g - np.dot(row_a, row_g)) / (1 - row_a + eps)
    e[..., 0, :] = -a[..., 0, :] * g[..., 0, :]
    return e


def test_attention_influence_is_the_exact_loss_change_of_a_linear_loss():
    r = np.random.default_rng(4)
    t = 6
    logits = np.where(np.tril(np.ones((t, t), bool)), r.normal(size=(2, 3, t, t)), -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a = (a / a.sum(-1, keepdims=True)).astype(np.float32)
    w = r.normal(size=a.shape).astype(np.float32)  # L(A) = sum W * A, so G = W
    e = np.asarray(moa.attention_influence(jnp.asarray(a), jnp.asarray(w)))
    eps = float(np.finfo(np.float32).eps)
    np.testing.assert_allclose(e, _influence_numpy(a, w, eps), rtol=1e-5, atol=1e-6)
    for b, h, i, j in [(0, 0, 3, 1), (1, 2, 5, 5), (0, 1, 4, 0)]:  # rows i > 0
        row = a[b, h, i].astype(np.float64).copy()
        before = np.dot(w[b, h, i], row)
        row[j] = 0.0
        after = np.dot(w[b, h, i], row / row.sum())
        np.testing.assert_allclose(e[b, h, i, j], after - before, rtol=1e-4, atol=1e-6)


def test_profile_influence_predicts_the_loss_change_of_masking_an_entry():
    length, vocab = 24, 16
    cfg = LMConfig(vocab_size=vocab, width=16, max_length=length, num_heads=2,
                   mixers=(MixerConfig("moa"),) * 2)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(5), (3, length), 0, vocab)

    def loss_fn(model, batch):
        logits = model.logits(model(batch))
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                               batch[:, 1:]).mean()

    base = float(loss_fn(model, toks))
    influence = moa.profile_influence(model, loss_fn, [toks], batch_size=3, length=length)
    assert len(influence) == 2 and influence[0].shape == (2, length, length)
    assert all(m.probe is None for m in moa.moa_layers(model))  # profiling switched off
    np.testing.assert_array_equal(np.triu(influence[1], 1), 0.0)  # causal
    layer, head = 1, 0
    e = influence[layer][head]
    i, j = np.unravel_index(np.argmax(np.abs(np.tril(e, -1)[1:])), e[1:].shape)
    i += 1
    drop = np.broadcast_to(np.tril(np.ones((length, length), bool)), (2, length, length)).copy()
    drop[head, i, j] = False
    mix = moa.moa_layers(model)[layer]
    mix.plan_mask = lambda n: masks.ArrayMask(drop)
    change = float(loss_fn(model, toks)) - base
    np.testing.assert_allclose(change, e[i, j], rtol=0.2)  # first order


def test_plan_costs_density_and_the_search():
    r = np.random.default_rng(6)
    n = 64
    e = np.abs(r.normal(size=(3, n, n))) * np.tril(np.ones((n, n)))
    alphas, betas = moa.candidate_grid([-16, 0, 16, 32], [0.0, 0.25, 0.5, 1.0], lengths=[32, n])
    assert np.all(alphas + betas * 32 > 0) and np.all(alphas + betas * n <= n)
    costs = moa.plan_costs(e, alphas, betas, n, **RULE)
    _, sink, window = moa.elastic_spans(alphas, betas, n, **RULE)
    for c in (0, len(alphas) - 1):
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        dropped = (j <= i) & ~((j < sink[c]) | (i - j < window[c]))
        np.testing.assert_allclose(costs[:, c], (e * dropped).sum(axis=(1, 2)))
    assert np.all(costs[:, np.argmax(alphas + betas * n)] == 0)  # S = N drops nothing
    dens_kv = moa.plan_density(alphas, betas, n, **RULE)
    np.testing.assert_allclose(dens_kv, moa.elastic_spans(alphas, betas, n, **RULE)[0] / n)
    dens_c = moa.plan_density(alphas, betas, n, density="causal", **RULE)
    assert np.all(dens_c <= 1.0) and np.all(dens_c >= dens_kv - 1e-12)
    # two lengths, a brute force over every plan of 3 heads
    lens = [32, n]
    all_costs = np.stack([moa.plan_costs(e, alphas, betas, m, **RULE) for m in lens])
    dens = np.stack([moa.plan_density(alphas, betas, m, **RULE) for m in lens])
    budget = 0.6
    choice = moa.search_plan(all_costs, dens, budget)
    scale = np.abs(all_costs).reshape(2, -1).max(1)
    obj = lambda ch: sum(all_costs[m, np.arange(3), ch].sum() / scale[m] for m in range(2))
    ok = lambda ch: np.all(dens[:, list(ch)].mean(1) <= budget + 1e-9)
    best = min((ch for ch in itertools.product(range(len(alphas)), repeat=3) if ok(ch)),
               key=obj)
    assert ok(choice)
    np.testing.assert_allclose(obj(choice), obj(np.array(best)), rtol=1e-9)
    lag = moa.search_plan(all_costs, dens, budget, method="lagrangian")
    assert ok(lag) and obj(lag) >= obj(choice) - 1e-9


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="alpha and beta"):
        moa.elastic_mask([0.0, 1.0], [1.0], 64)
    with pytest.raises(ValueError, match="length"):
        moa.elastic_spans([0.0], [1.0], 0)
    q, k, v = rand_inputs(b=1, t=8, s=8, n=2, k=2, h=4)
    with pytest.raises(ValueError, match="plan has 3 heads"):
        moa.moa_attention(q, k, v, [0.0] * 3, [1.0] * 3)
    with pytest.raises(ValueError, match="T = 8 must equal S"):
        moa.moa_attention(q, k[:, :6], v[:, :6], [0.0] * 2, [1.0] * 2)
    with pytest.raises(ValueError, match="probs and grad"):
        moa.attention_influence(jnp.zeros((1, 2, 3, 3)), jnp.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="4 heads"):
        moa.MoAAttention(8, 4, alphas=[0.0], betas=[1.0], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="budget"):
        moa.search_plan(np.zeros((1, 2, 2)), np.array([[0.5, 1.0]]), 0.1)
    with pytest.raises(ValueError, match="context"):
        moa.MoAAttention(8, 2, rngs=nnx.Rngs(0))(jnp.zeros((1, 4, 8)),
                                                 context=jnp.zeros((1, 4, 8)))
    with pytest.raises(ValueError, match="'self' pattern"):
        jaxattn.nn.make_mixer("moa", features=8, num_heads=2, causal=False, rngs=nnx.Rngs(0))
