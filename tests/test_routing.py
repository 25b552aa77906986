"""Routing Transformer (Roy et al., 2021): balanced assignment, routing attention against a
literal NumPy loop over clusters, the one-centroid identity, causality, the EMA k-means rule,
the commitment loss, errors, and the centroid update inside the shared training loop."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxattn
from jaxattn.models.layers import MixerConfig
from jaxattn.models.lm import DecoderLM, LMConfig
from jaxattn.nn import capture_aux_losses, routing
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task, train

B, L, N, H, C, W = 2, 32, 2, 8, 4, 8


def _normed(seed, shape=(B, L, N, H)):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    return routing.scale_free_layer_norm(x)


def _centroids(seed=9, c=C):
    return routing.scale_free_layer_norm(jax.random.normal(jax.random.key(seed), (N, c, H)))


def test_balanced_assignment_matches_numpy_top_k():
    scores = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 40)))
    idx = np.asarray(routing.balanced_assignment(jnp.asarray(scores), 7))
    assert idx.shape == (3, 5, 7) and idx.dtype == np.int32
    expected = np.sort(np.argsort(-scores, axis=-1)[..., :7], axis=-1)
    np.testing.assert_array_equal(idx, expected)


def _numpy_routing(q, k, v, mu, window, causal, exact_mean=False):
    """The paper's routing attention written as a loop over batch, head and cluster."""
    q, k, v, mu = (np.asarray(a, np.float64) for a in (q, k, v, mu))
    b_, l_, n_, h_ = q.shape
    out = np.zeros(v.shape)
    for b in range(b_):
        for n in range(n_):
            total, count = np.zeros((l_, v.shape[-1])), np.zeros(l_)
            for c in range(mu.shape[1]):
                qi = np.sort(np.argsort(-(q[b, :, n] @ mu[n, c]), kind="stable")[:window])
                ki = qi if causal else \
                    np.sort(np.argsort(-(k[b, :, n] @ mu[n, c]), kind="stable")[:window])
                logits = q[b, qi, n] @ k[b, ki, n].T / np.sqrt(h_)
                if causal:
                    logits = np.where(np.tril(np.ones((window, window), bool)), logits, -np.inf)
                p = np.exp(logits - logits.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                total[qi] += p @ v[b, ki, n]
                count[qi] += 1
            denom = np.maximum(count, 1) if exact_mean else count + 0.01
            out[b, :, n] = total / denom[:, None]
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_routing_attention_matches_numpy_loop(causal):
    q, k, v, mu = _normed(1), _normed(2), _normed(3), _centroids()
    k = q if causal else k
    got = routing.routing_attention(q, k, v, mu, window=W, is_causal=causal)
    want = _numpy_routing(q, k, v, mu, W, causal)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    # not every position is covered and some are covered twice: the scatter rule is exercised
    q_idx, _ = routing.cluster_membership(q, k, mu, window=W, is_causal=causal)
    counts = np.stack([np.bincount(np.asarray(q_idx[0, 0]).ravel(), minlength=L)])
    assert counts.min() == 0 and counts.max() >= 2
    exact = routing.routing_attention(q, k, v, mu, window=W, is_causal=causal, exact_mean=True)
    np.testing.assert_allclose(np.asarray(exact), _numpy_routing(q, k, v, mu, W, causal, True),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_one_centroid_full_window_is_full_attention(causal):
    q, k, v = _normed(4), _normed(5), _normed(6)
    mu = _centroids(c=1)
    got = routing.routing_attention(q, k, v, mu, window=L, is_causal=causal, exact_mean=True)
    want = jaxattn.dot_product_attention(q, k, v, is_causal=causal)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_causal_routing_never_reads_the_future():
    """Slot-causal attention with shared q/k indices: the values and keys of later positions
    never reach earlier outputs. (Membership is decided over the whole sequence, as in the code,
    so with w < L later *queries* can move earlier positions between clusters: that is the
    documented departure; with w = L membership is fixed and every input is checked.)"""
    q, v, mu, t = _normed(7), _normed(8), _centroids(), L // 2
    f = lambda q, k, v, w: routing.routing_attention(q, k, v, mu, window=w, is_causal=True)
    v2 = v.at[:, t + 1:].set(_normed(10)[:, t + 1:])
    k2 = q.at[:, t + 1:].set(_normed(11)[:, t + 1:])  # logits keys (indices stay q's)
    y, y2 = f(q, q, v, W), f(q, k2, v2, W)
    np.testing.assert_allclose(np.asarray(y[:, : t + 1]), np.asarray(y2[:, : t + 1]), atol=1e-6)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])
    q2 = q.at[:, t + 1:].set(_normed(12)[:, t + 1:])
    y, y2 = f(q, q, v, L), f(q2, q2, v2, L)
    np.testing.assert_allclose(np.asarray(y[:, : t + 1]), np.asarray(y2[:, : t + 1]), atol=1e-6)
    assert not np.allclose(y[:, t + 1:], y2[:, t + 1:])


def test_kmeans_ema_update_matches_numpy_rule():
    x = np.asarray(_normed(13, (B, L, N, H)), np.float64)
    mu = np.asarray(_centroids(), np.float64)
    count = np.asarray(jax.random.uniform(jax.random.key(14), (N, C), minval=0.5, maxval=2.0))
    total = mu * count[..., None]
    valid = np.ones((B, L), bool)
    valid[1, 20:] = False  # padding is excluded
    lam, eps = 0.999, 1e-5
    new_count, new_total = np.zeros((N, C)), np.zeros((N, C, H))
    for n in range(N):
        n_c, s_c = np.zeros(C), np.zeros((C, H))
        for b in range(B):
            for i in range(L):
                if valid[b, i]:
                    c = int(np.argmax(mu[n] @ x[b, i, n]))
                    n_c[c] += 1
                    s_c[c] += x[b, i, n]
        cnt = lam * count[n] + (1 - lam) * n_c
        new_total[n] = lam * total[n] + (1 - lam) * s_c
        new_count[n] = (cnt + eps) / (cnt.sum() + C * eps) * cnt.sum()
    got_mu, got_count, got_total = routing.kmeans_ema_update(
        jnp.asarray(x, jnp.float32), jnp.asarray(mu, jnp.float32),
        jnp.asarray(count, jnp.float32), jnp.asarray(total, jnp.float32), decay=lam, eps=eps,
        valid=jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(got_count), new_count, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got_total), new_total, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_mu), new_total / new_count[..., None], rtol=1e-5,
                               atol=1e-6)


def test_commitment_loss_value():
    x = np.asarray(_normed(15), np.float64)
    mu = np.asarray(_centroids(), np.float64)
    sq = []
    for b in range(B):
        for i in range(L):
            for n in range(N):
                c = int(np.argmax(mu[n] @ x[b, i, n]))
                sq.append(np.sum((x[b, i, n] - mu[n, c]) ** 2))
    got = routing.commitment_loss(jnp.asarray(x, jnp.float32), jnp.asarray(mu, jnp.float32))
    np.testing.assert_allclose(float(got), np.mean(sq), rtol=1e-5)
    g = jax.grad(lambda m: routing.commitment_loss(jnp.asarray(x, jnp.float32), m))(
        jnp.asarray(mu, jnp.float32))
    assert float(jnp.max(jnp.abs(g))) == 0.0  # the centroids get no gradient (sg)


def test_bad_inputs_name_the_argument_and_shapes():
    q, mu = _normed(16), _centroids()
    with pytest.raises(ValueError, match=r"window must be an int in \[1, L=32\]"):
        routing.routing_attention(q, q, q, mu, window=33, is_causal=True)
    with pytest.raises(ValueError, match=r"centroids must be \[N=2, C, H=8\].*\(2, 4, 7\)"):
        routing.routing_attention(q, q, q, mu[..., :7], window=4, is_causal=True)
    with pytest.raises(ValueError, match=r"q, k, v must be \[B, L, N, H\].*k \(2, 31, 2, 8\)"):
        routing.routing_attention(q, q[:, :31], q, mu, window=4, is_causal=True)
    with pytest.raises(ValueError, match=r"scores must be \[\.\.\., C, L\]"):
        routing.balanced_assignment(jnp.zeros((5,)), 2)
    with pytest.raises(ValueError, match="routing_heads=5"):
        routing.RoutingAttention(16, 2, routing_heads=5, rngs=nnx.Rngs(0))


def test_block_local_mask():
    m = np.asarray(routing.BlockLocalMask(block=4, flange=2, causal=True).to_array(12, 12))
    qi, ki = np.arange(12)[:, None], np.arange(12)[None]
    np.testing.assert_array_equal(m, (ki <= qi) & (ki >= (qi // 4) * 4 - 2))
    m = np.asarray(routing.BlockLocalMask(block=4, flange=2, causal=False).to_array(12, 12))
    np.testing.assert_array_equal(m, (ki >= (qi // 4) * 4 - 2) & (ki < (qi // 4) * 4 + 6))


class _Tokens:
    def __len__(self):
        return 64

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return {"tokens": rng.integers(0, 32, size=48).astype(np.int32)}


def _lm_task():
    cfg = LMConfig(vocab_size=32, width=16, max_length=48, num_heads=2,
                   mixers=(MixerConfig("routing", (("num_clusters", 4), ("window", 8),
                                                   ("block", 8), ("flange", 8))),))

    def loss_fn(model, batch, rngs):
        h = model(batch["tokens"][:, :-1], deterministic=False, rngs=rngs)
        ce = optax.softmax_cross_entropy_with_integer_labels(model.logits(h),
                                                             batch["tokens"][:, 1:])
        return jnp.mean(ce), {}

    return Task(make_model=lambda rngs: DecoderLM(cfg, rngs=rngs), loss_fn=loss_fn,
                train_source=_Tokens())


def test_centroids_change_in_the_train_step_and_not_in_eval():
    task = _lm_task()
    # the suite's 8 simulated devices, data-parallel (the default mesh)
    cfg = ExperimentConfig(model=None, data=None,
                           optim=OptimConfig(learning_rate=1e-3, aux_loss_weight=1.0),
                           run=RunConfig(steps=2, batch_size=8, log_every=1, progress=False))
    before = task.make_model(nnx.Rngs(params=0, dropout=1)).mixers[0]
    res = train(cfg, task)
    after = res.model.mixers[0]
    assert "aux_loss" in res.train_metrics  # the commitment loss was sown and added
    mu0, mu1 = np.asarray(before.centroids[...]), np.asarray(after.centroids[...])
    assert not np.allclose(mu0, mu1), "the train step did not update the centroids"
    np.testing.assert_allclose(np.asarray(after.ema_count[...]).sum(-1),
                               np.asarray(before.ema_count[...]).sum(-1) * 0.999 ** 2
                               + 8 * 47 * (1 - 0.999 ** 2), rtol=1e-5)
    tokens = jnp.asarray(_Tokens()[0]["tokens"][None, :-1])
    nnx.jit(lambda m, t: m(t, deterministic=True))(res.model, tokens)
    res.model(tokens)  # deterministic=None: evaluation too
    np.testing.assert_array_equal(np.asarray(after.centroids[...]), mu1)
    model = dataclasses.replace(task).make_model(nnx.Rngs(params=0, dropout=1))
    train_call = lambda m, t: capture_aux_losses(lambda m, t: m(t, deterministic=False), m, t)
    nnx.jit(train_call)(model, tokens)
    assert not np.allclose(np.asarray(model.mixers[0].centroids[...]), mu0)


def test_centroid_write_under_a_foreign_transform_raises_unless_disabled():
    x = jax.random.normal(jax.random.key(17), (B, L, 16))
    train_call = lambda m, x: capture_aux_losses(lambda m, x: m(x, deterministic=False), m, x)
    mixer = routing.RoutingAttention(16, 2, routing_heads=1, num_clusters=C, window=W,
                                     block=8, flange=8, rngs=nnx.Rngs(0))
    mu0 = np.asarray(mixer.centroids[...])
    # jax.vjp of a closure over an already-built module: the state write cannot happen there,
    # and it must fail loudly (flax refuses the sown aux loss first; the mixer's own check
    # names update_centroids=False), never drop the update silently
    from flax.errors import TraceContextError

    with pytest.raises((RuntimeError, TraceContextError)):
        jax.vjp(lambda x: mixer(x, deterministic=False), x)
    fixed = routing.RoutingAttention(16, 2, routing_heads=1, num_clusters=C, window=W,
                                     block=8, flange=8, update_centroids=False,
                                     rngs=nnx.Rngs(0))
    assert "commitment" in str(train_call(fixed, x)[1])  # still sown, centroids kept
    np.testing.assert_array_equal(np.asarray(fixed.centroids[...]), mu0)
    train_call(mixer, x)  # eager: written
    assert not np.allclose(np.asarray(mixer.centroids[...]), mu0)


def test_token_shift_adds_the_previous_token_embedding():
    """``LMConfig.token_shift`` (used by experiments/routing): the first layer's input at t is
    ``embed[x_t] + pos[t] + prev_embed[x_(t-1)]``, nothing added at t = 0; off by default."""
    cfg = LMConfig(vocab_size=11, width=8, max_length=6, num_heads=2, token_shift=True)
    model = DecoderLM(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.array([[3, 1, 4, 1, 5, 9], [2, 6, 5, 3, 5, 8]], jnp.int32)
    e = np.asarray(model.embed.embedding[...])
    p = np.asarray(model.pos.embedding[...])
    e_prev = np.asarray(model.prev_embed.embedding[...])
    t = np.asarray(tokens)
    expected = e[t] + p[None, :6]
    expected[:, 1:] += e_prev[t[:, :-1]]
    np.testing.assert_allclose(np.asarray(model.embed_inputs(tokens)), expected, rtol=1e-6,
                               atol=1e-7)
    # a change of token 2 moves positions 2 and 3 of the input, no other
    changed = np.asarray(model.embed_inputs(tokens.at[:, 2].set(7))) != expected
    assert np.array_equal(np.any(changed, axis=(0, 2)), [False, False, True, True, False, False])
    plain = DecoderLM(dataclasses.replace(cfg, token_shift=False), rngs=nnx.Rngs(0))
    assert plain.prev_embed is None
    np.testing.assert_allclose(np.asarray(plain.embed_inputs(tokens)),
                               np.asarray(plain.embed.embedding[...])[t]
                               + np.asarray(plain.pos.embedding[...])[None, :6], rtol=1e-6)


def test_routing_experiment_main_writes_per_seed_and_mean_rows(tmp_path):
    """experiments/routing main() on its smoke config, two variants x two seeds (2 steps each):
    one row per (variant, seed), a mean row per variant, the table and both plots."""
    import json

    from experiments.routing import experiment as exp

    cfg = exp.smoke_config()
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(
        cfg.sweep, variants=("local", "routing"), seeds=(0, 1), output_dir=str(tmp_path)))
    rows = exp.main(cfg)
    assert [(r["variant"], r["seed"]) for r in rows] == [
        ("local", 0), ("routing", 0), ("local", 1), ("routing", 1),
        ("local", "mean"), ("routing", "mean")]
    routing_rows = [r for r in rows[:4] if r["variant"] == "routing"]
    assert rows[-1]["far_recall"] == pytest.approx(
        np.mean([r["far_recall"] for r in routing_rows]), abs=1e-4)
    assert "coclustering" in rows[-1] and "coclustering" not in rows[-2]
    assert 0.0 <= rows[-1]["parity_split"] <= 1.0 and "parity_split" not in rows[-2]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == rows and saved["chance_recall"] == 1.0 / cfg.data.num_values
    assert (tmp_path / "results.md").exists()
    assert (tmp_path / "recall_training.png").exists()
    assert (tmp_path / "routing_training.png").exists()


def test_parity_split_measures_key_value_separation():
    """experiments/routing's cluster statistic: clusters of only even (key) or only odd (value)
    positions give 1, clusters mixing both equally give 0, and a half-and-half mix of the two
    kinds of cluster gives 0.5."""
    from experiments.routing.experiment import parity_split

    pos = np.arange(8)
    only_keys, only_values = pos % 2 == 0, pos % 2 == 1
    mixed = np.isin(pos, [0, 1, 2, 3])
    member = np.stack([only_keys, only_values])[None, None]  # [1, 1, 2, 8]
    assert float(parity_split(jnp.asarray(member))[0]) == 1.0
    member = np.stack([mixed, ~mixed])[None, None]
    assert float(parity_split(jnp.asarray(member))[0]) == 0.0
    member = np.stack([only_keys, mixed])[None, None]
    assert float(parity_split(jnp.asarray(member))[0]) == 0.5
