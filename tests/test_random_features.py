"""Random-feature attention (Fu, Guo, Bai, Mei, NeurIPS 2023): features against a literal loop of
the paper's formula, the two W samplings, closed-form ridge, the NNX shell trained through the
shared loop with W frozen, permutation invariance, error messages, and the experiment's sweep
on a tiny config."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.random_features import experiment as rf_exp
from experiments.random_features.data import RFASource, target_values
from jaxattn.nn.random_features import (
    FrozenWeight,
    RandomFeatureAttention,
    identity_bias,
    rfa_features,
    rfa_predict,
    rfa_reference,
    rfmlp_features,
    ridge_fit,
    ridge_solve,
    sample_rfa_weights,
    sample_rfmlp_weights,
)
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task, train


def _tokens(seed=0, b=3, n=5, d=4):
    """Unit-norm query ``[b, d]`` and keys ``[b, n, d]`` (float32 numpy)."""
    r = np.random.default_rng(seed)
    x0, xs = r.normal(size=(b, d)), r.normal(size=(b, n, d))
    x0 /= np.linalg.norm(x0, axis=-1, keepdims=True)
    xs /= np.linalg.norm(xs, axis=-1, keepdims=True)
    return x0.astype(np.float32), xs.astype(np.float32)


def test_features_and_reference_equal_a_literal_loop_of_the_formula():
    b, n, d, m = 3, 5, 4, 6
    x0, xs = _tokens(0, b, n, d)
    W = np.asarray(sample_rfa_weights(jax.random.key(1), num_heads=m, dim=d, bias="identity",
                                      sigma=0.7), np.float64)
    v = np.random.default_rng(2).normal(size=(m, d + 1))
    want_phi, want_f = np.zeros((b, m * (d + 1))), np.zeros(b)
    for bi in range(b):
        q = np.append(x0[bi], 1.0)  # x~_0 = [x_0; 1]
        for h in range(m):
            for i in range(n):
                k = np.append(xs[bi, i], 1.0)
                e = np.exp(q @ W[h] @ k)
                want_phi[bi, h * (d + 1):(h + 1) * (d + 1)] += e * k / n
                want_f[bi] += e * (v[h] @ k) / n
    phi = rfa_features(x0, xs, W.astype(np.float32))
    assert phi.shape == (b, m * (d + 1)) and phi.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(phi), want_phi, rtol=2e-6)
    v32 = v.astype(np.float32)
    f_ref = rfa_reference(x0, xs, W.astype(np.float32), v32)
    np.testing.assert_allclose(np.asarray(f_ref), want_f, rtol=2e-6)
    for vv in (v32, v32.reshape(-1)):  # per-head or flat values
        np.testing.assert_allclose(np.asarray(rfa_predict(phi, vv)), want_f, rtol=2e-6)


def test_rfmlp_features_equal_relu_of_the_flattened_scaled_input():
    b, n, d, f = 4, 3, 2, 7
    x0, xs = _tokens(3, b, n, d)
    U = np.asarray(sample_rfmlp_weights(jax.random.key(0), in_dim=(n + 1) * d, num_features=f))
    z = np.concatenate([x0, xs.reshape(b, -1)], -1) / np.sqrt(n + 1)
    want = np.maximum(np.concatenate([z, np.ones((b, 1))], -1) @ U, 0.0)
    np.testing.assert_allclose(np.asarray(rfmlp_features(x0, xs, U)), want, rtol=1e-5,
                               atol=1e-6)


def test_samplings_have_mean_zero_and_w0_variance_sigma2_and_differ_by_exactly_w0():
    d, m, sigma = 8, 4000, 0.5
    key = jax.random.key(3)
    zero = np.asarray(sample_rfa_weights(key, num_heads=m, dim=d, bias="zero", sigma=sigma),
                      np.float64)
    biased = np.asarray(sample_rfa_weights(key, num_heads=m, dim=d, bias="identity",
                                           sigma=sigma), np.float64)
    w0 = np.zeros((d + 1, d + 1))
    w0[:d, :d] = np.eye(d)
    np.testing.assert_array_equal(np.asarray(identity_bias(d)), w0)
    se = sigma / np.sqrt(m)  # standard error of each of the 81 entry means
    assert np.abs(zero.mean(0)).max() < 5 * se
    assert np.abs(biased.mean(0) - w0).max() < 5 * se
    assert abs(zero.var(0).mean() / sigma**2 - 1) < 0.02  # 324k draws: se ~ 0.0025
    np.testing.assert_allclose(biased - zero, np.broadcast_to(w0, zero.shape), atol=1e-6)


@pytest.mark.parametrize("n,p", [(40, 12), (12, 40)], ids=["primal", "dual"])
def test_ridge_fit_solves_the_normal_equations_and_zeroes_the_gradient(n, p):
    r = np.random.default_rng(n)
    phi, y, lam = r.normal(size=(n, p)), r.normal(size=(n, 2)), 0.05
    w = np.asarray(ridge_fit(phi.astype(np.float32), y.astype(np.float32), lam), np.float64)
    want = np.linalg.solve(phi.T @ phi / n + lam * np.eye(p), phi.T @ y / n)
    np.testing.assert_allclose(w, want, rtol=1e-4, atol=1e-5)
    grad = -2.0 / n * phi.T @ (y - phi @ w) + 2.0 * lam * w  # of (1/n)||y - Phi w||^2 + lam|w|^2
    assert np.abs(grad).max() < 1e-4 * np.abs(phi.T @ y / n).max()
    grid = np.asarray(ridge_fit(phi.astype(np.float32), y[:, 0].astype(np.float32),
                                jnp.asarray([lam, 10 * lam])))
    assert grid.shape == (2, p)
    np.testing.assert_allclose(grid[0], want[:, 0], rtol=1e-4, atol=1e-5)
    more = np.linalg.solve(phi.T @ phi / n + 10 * lam * np.eye(p), phi.T @ y[:, 0] / n)
    np.testing.assert_allclose(grid[1], more, rtol=1e-4, atol=1e-5)
    primal = ridge_solve(jnp.asarray(phi.T @ phi, jnp.float32), jnp.asarray(phi.T @ y, jnp.float32),
                         n, jnp.asarray([lam]))
    np.testing.assert_allclose(np.asarray(primal[0]), want, rtol=1e-4, atol=1e-5)


def test_nested_prefix_grams_of_the_sweep_equal_direct_ridge():
    r = np.random.default_rng(0)
    phi = jnp.asarray(r.normal(size=(96, 20)), jnp.float32)
    y = r.normal(size=(96, 2)).astype(np.float32)
    grid = (1e-3, 1e-1)
    paths = list(rf_exp._ridge_paths(phi, y, (8, 48, 96), grid))  # dual, then two primal
    assert [n for n, _, _ in paths] == [8, 48, 96]
    for n, lams, w in paths:
        np.testing.assert_allclose(np.asarray(w), np.asarray(ridge_fit(phi[:n], y[:n], lams)),
                                   rtol=2e-4, atol=1e-5)


def test_module_is_rfa_predict_of_its_features_and_w_is_not_a_param():
    d, m = 4, 6
    model = RandomFeatureAttention(d, m, bias="identity", rngs=nnx.Rngs(params=0))
    assert isinstance(model.W, FrozenWeight) and not isinstance(model.W, nnx.Param)
    assert set(nnx.state(model, nnx.Param).keys()) == {"v"}
    x0, xs = _tokens(1, 4, 7, d)
    np.testing.assert_array_equal(np.asarray(model(x0, xs)), np.zeros(4))  # v = 0 at init
    model.v[...] = jnp.asarray(np.random.default_rng(0).normal(size=(m, d + 1)), jnp.float32)
    f = np.asarray(model(x0, xs))
    want = rfa_predict(rfa_features(x0, xs, model.W[...]), model.v[...])
    np.testing.assert_allclose(f, np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(f, np.asarray(rfa_reference(x0, xs, model.W[...], model.v[...])),
                               rtol=1e-5)


def test_permuting_the_keys_leaves_rfa_unchanged_but_not_the_rfmlp():
    d, n = 4, 9
    x0, xs = _tokens(2, 5, n, d)
    perm = np.random.default_rng(0).permutation(n)
    model = RandomFeatureAttention(d, 8, rngs=nnx.Rngs(params=1))
    model.v[...] = jnp.asarray(np.random.default_rng(1).normal(size=(8, d + 1)), jnp.float32)
    np.testing.assert_allclose(np.asarray(model(x0, xs[:, perm])), np.asarray(model(x0, xs)),
                               rtol=1e-6, atol=1e-6)
    U = sample_rfmlp_weights(jax.random.key(0), in_dim=(n + 1) * d, num_features=32)
    a, b = np.asarray(rfmlp_features(x0, xs, U)), np.asarray(rfmlp_features(x0, xs[:, perm], U))
    assert np.abs(a - b).max() > 1e-2  # the comparator is not invariant: the test can fail


def test_training_v_through_the_shared_loop_lowers_the_loss_and_leaves_w_frozen():
    d, n, heads = 4, 6, 16
    src = RFASource(target="T3", split="train", num_examples=256, tokens=n, dim=d)
    initial_w = []

    def make_model(rngs):
        model = RandomFeatureAttention(d, heads, bias="identity", rngs=rngs)
        initial_w.append(np.array(model.W[...]))
        return model

    def loss_fn(model, batch, rngs):
        mse = jnp.mean((model(batch["x0"], batch["xs"]) - batch["y"]) ** 2)
        return mse, {}

    cfg = ExperimentConfig(
        model=None, data=None,
        optim=OptimConfig(learning_rate=3e-3, weight_decay=0.0, schedule="constant"),
        run=RunConfig(steps=30, batch_size=32, log_every=1, progress=False))
    res = train(cfg, Task(make_model=make_model, loss_fn=loss_fn, train_source=src))
    losses = [h["loss"] for h in res.history if h["split"] == "train"]
    assert np.mean(losses[-5:]) < 0.2 * losses[0]
    np.testing.assert_array_equal(np.asarray(res.model.W[...]), initial_w[0])
    assert np.abs(np.asarray(res.model.v[...])).max() > 0


def test_bad_input_names_the_argument_and_the_shapes():
    x0, xs = _tokens(0, 2, 3, 4)
    W = sample_rfa_weights(jax.random.key(0), num_heads=2, dim=4)
    with pytest.raises(ValueError, match=r"agree in B and d.*\(2, 4\).*\(2, 3, 5\)"):
        rfa_features(x0, np.zeros((2, 3, 5), np.float32), W)
    with pytest.raises(ValueError, match=r"x0 must be \[B, d\] and xs \[B, N, d\]"):
        rfa_features(x0[0], xs, W)
    with pytest.raises(ValueError, match=r"W must be \[M, d\+1, d\+1\] = \[M, 5, 5\].*\(2, 4, 4\)"):
        rfa_features(x0, xs, W[:, :4, :4])
    with pytest.raises(ValueError, match=r"v \[M, d\+1\] or \[P\].*\(2, 10\).*\(2, 4\)"):
        rfa_predict(rfa_features(x0, xs, W), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"v must be \[M, d\+1\] = \[2, 5\]"):
        rfa_reference(x0, xs, W, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"U must be \[\(N\+1\)\*d \+ 1, F\] = \[17, F\]"):
        rfmlp_features(x0, xs, np.zeros((16, 3), np.float32))
    with pytest.raises(ValueError, match=r"same n.*\(5, 3\).*\(4,\)"):
        ridge_fit(np.zeros((5, 3), np.float32), np.zeros(4, np.float32), 0.1)
    with pytest.raises(ValueError, match="lam must be > 0"):
        ridge_fit(np.ones((5, 3), np.float32), np.zeros(5, np.float32), jnp.asarray([0.1, 0.0]))
    with pytest.raises(ValueError, match="bias must be one of"):
        sample_rfa_weights(jax.random.key(0), num_heads=2, dim=4, bias="mean")
    with pytest.raises(ValueError, match="sigma must be a finite float >= 0"):
        sample_rfa_weights(jax.random.key(0), num_heads=2, dim=4, sigma=-1.0)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        RandomFeatureAttention(4, 0, rngs=nnx.Rngs(params=0))


def test_targets_match_their_formulas_and_the_source_is_deterministic():
    x0, xs = _tokens(4, 6, 5, 3)
    beta = np.array([0.6, 0.0, 0.8])
    t = np.einsum("bd,bid->bi", x0.astype(np.float64), xs.astype(np.float64))
    np.testing.assert_allclose(target_values("T1", x0, xs, beta),
                               np.mean((np.sqrt(3) * t) ** 3, 1), rtol=1e-5)
    np.testing.assert_allclose(target_values("T2", x0, xs, beta),
                               np.mean((xs.astype(np.float64) @ beta) ** 2, 1), rtol=1e-5)
    np.testing.assert_allclose(target_values("T3", x0, xs, beta), np.mean(np.exp(2 * t), 1),
                               rtol=1e-5)
    a = RFASource(target="T2", split="test", num_examples=5, tokens=4, dim=3, seed=1)
    b = RFASource(target="T2", split="test", num_examples=5, tokens=4, dim=3, seed=1)
    c = RFASource(target="T2", split="train", num_examples=5, tokens=4, dim=3, seed=1)
    assert len(a) == 5 and a[4]["xs"].shape == (4, 3) and a[4]["y"].shape == ()
    np.testing.assert_array_equal(a[2]["xs"], b[2]["xs"])
    assert not np.array_equal(a[2]["xs"], c[2]["xs"])  # splits are disjoint draws
    with pytest.raises(IndexError):
        a[5]


def test_the_sweep_writes_its_table_plot_and_rows(tmp_path):
    cfg = rf_exp.smoke_config()
    cfg = dataclasses.replace(cfg, sweep=dataclasses.replace(
        cfg.sweep, output_dir=str(tmp_path), train_sizes=(16, 96), sigma_check=(1.0,)))
    rows = rf_exp.main(cfg)
    sw = cfg.sweep
    main_rows = len(sw.tokens) * len(sw.seeds) * 3 * 3 * 2  # models x targets x sizes
    assert len(rows) == main_rows + 2 * 3 * 2  # + the sigma check's two RFA models
    # at this toy size the smallest lambdas can make float32 Cholesky fail: they are skipped
    assert all(np.isfinite(r["test_rel_mse"]) and r["failed_lambdas"] < len(sw.lambda_grid)
               for r in rows)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == len(rows)
    md = (tmp_path / "results.md").read_text()
    assert "| 4 | T1 | rfa_zero |" in md and "rfmlp / rfa_biased" in md and "Sigma check" in md
    assert (tmp_path / "random_features.png").stat().st_size > 1000
