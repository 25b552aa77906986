"""The in-context regression experiment (He et al., ICML 2025): the model against a literal NumPy
evaluation of the paper's formula, the query's exclusion from its own keys, the data, the
closed-form baselines, the circuit readout and the pattern acceptance test."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.icl_regression import analysis
from experiments.icl_regression.model import (
    ICLModel,
    ICLModelConfig,
    circuits,
    sample_prompts,
    set_circuit_params,
)

D = 4  # x dimension in the formula tests (tokens have D + 1 entries)


def _model(heads, attention="softmax", dim=D, train_length=7):
    return ICLModel(ICLModelConfig(heads=heads, attention=attention), dim=dim,
                    train_length=train_length, rngs=nnx.Rngs(0))


@nnx.jit
def _predict(model, context, query):
    return model(context, query)


def _run(model, context, query) -> np.ndarray:
    return np.asarray(_predict(model, jnp.asarray(context), jnp.asarray(query)), np.float64)


def _linear_prompts(rng, batch, length, dim=5, noise_var=0.1):
    """The training distribution drawn with NumPy (independent of :func:`sample_prompts`)."""
    x = rng.standard_normal((batch, length + 1, dim))
    beta = rng.standard_normal((batch, dim)) / math.sqrt(dim)
    y = np.einsum("bld,bd->bl", x, beta) + math.sqrt(noise_var) * rng.standard_normal(
        (batch, length + 1))
    context = np.concatenate([x[:, :length], y[:, :length, None]], axis=-1)
    query = np.concatenate([x[:, length], np.zeros((batch, 1))], axis=-1)
    return context.astype(np.float32), query.astype(np.float32), y[:, length]


def _random_matrices(rng, heads, dim=D, scale=0.7):
    n = dim + 1
    q, k, v = (scale * rng.standard_normal((heads, n, n)) for _ in range(3))
    return q, k, v, scale * rng.standard_normal((heads, n))


def _prompts(rng, batch, length, dim=D):
    x = rng.standard_normal((batch, length, dim))
    y = rng.standard_normal((batch, length))
    context = np.concatenate([x, y[..., None]], axis=-1).astype(np.float32)
    query = np.concatenate([rng.standard_normal((batch, dim)), np.zeros((batch, 1))],
                           axis=-1).astype(np.float32)
    return context, query


def _formula(q, k, v, o, context, query, attention="softmax", train_length=7):
    """Literal sum_h O^h V^h Z softmax(Z^T K^hT Q^h z_q / sqrt(d+1)) per prompt (float64);
    the linear variants replace softmax(s) by s / L_train or s / L."""
    out = []
    for zt, zq in zip(np.asarray(context, np.float64), np.asarray(query, np.float64),
                      strict=True):
        z = zt.T  # [d+1, L]: columns are the tokens
        total = 0.0
        for h in range(len(q)):
            s = z.T @ k[h].T @ q[h] @ zq / math.sqrt(len(zq))
            if attention == "softmax":
                a = np.exp(s - s.max())
                a = a / a.sum()
            else:
                a = s / (train_length if attention == "linear" else z.shape[1])
            total += o[h] @ v[h] @ z @ a
        out.append(total)
    return np.asarray(out)


@pytest.mark.parametrize("heads", [1, 3])
def test_softmax_model_is_the_papers_formula(heads):
    rng = np.random.default_rng(heads)
    mats = _random_matrices(rng, heads)
    model = _model(heads)
    set_circuit_params(model, *mats)
    context, query = _prompts(rng, 5, 9)
    got = _run(model, context, query)
    np.testing.assert_allclose(got, _formula(*mats, context, query), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("attention", ["linear", "linear_mean"])
def test_linear_attention_baselines_are_their_formulas(attention):
    rng = np.random.default_rng(7)
    mats = _random_matrices(rng, 2)
    model = _model(2, attention, train_length=7)
    set_circuit_params(model, *mats)
    context, query = _prompts(rng, 4, 11)  # L = 11 != L_train = 7 tells the two apart
    got = _run(model, context, query)
    want = _formula(*mats, context, query, attention, train_length=7)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_query_is_not_its_own_key_and_context_order_is_irrelevant():
    rng = np.random.default_rng(3)
    mats = _random_matrices(rng, 2)
    model = _model(2)
    set_circuit_params(model, *mats)
    context, query = _prompts(rng, 4, 6)
    got = _run(model, context, query)
    # the formula with the query appended to its own keys is a different function ...
    with_self = np.concatenate([context, query[:, None]], axis=1)
    assert np.abs(_formula(*mats, with_self, query) - got).min() > 1e-3
    # ... and the model reproduces it only when the query token is handed over as a key
    np.testing.assert_allclose(_run(model, with_self, query), _formula(*mats, with_self, query),
                               rtol=2e-5, atol=2e-5)
    perm = rng.permutation(context.shape[1])
    np.testing.assert_allclose(_run(model, context[:, perm], query), got, rtol=1e-5, atol=1e-6)


def test_default_init_is_pytorch_linear_uniform():
    heads = 3
    att = _model(heads).attention
    bound = 1 / math.sqrt(D + 1)
    for kernel in (att.query_kernel, att.key_kernel, att.value_kernel):
        w = np.abs(np.asarray(kernel[...]))
        assert w.max() <= bound and w.max() > 0.8 * bound
    w = np.abs(np.asarray(att.out_kernel[...]))
    assert w.max() <= 1 / math.sqrt((D + 1) * heads) and w.max() > 0.7 / math.sqrt(15)


def test_circuits_are_the_papers_kq_and_ov():
    rng = np.random.default_rng(5)
    q, k, v, o = _random_matrices(rng, 3)
    model = _model(3)
    set_circuit_params(model, q, k, v, o)
    kq, ov = circuits(model)
    for h in range(3):
        np.testing.assert_allclose(kq[h], q[h].T @ k[h], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ov[h], (o[h] @ v[h]).T, rtol=1e-5, atol=1e-5)
    # KQ is the bilinear form of the layer's own projections: z_q^T KQ^h z = <q^h, k^h(z)>
    context, query = _prompts(rng, 1, 2)
    att = model.attention
    qh = np.asarray(att.project_query(jnp.asarray(query[:, None])))[0, 0]  # [H, d+1]
    kh = np.einsum("i,ihe->he", context[0, 0], np.asarray(att.key_kernel[...]))
    np.testing.assert_allclose(np.einsum("i,hij,j->h", query[0], kq, context[0, 0]),
                               np.sum(qh * kh, axis=-1), rtol=1e-4, atol=1e-5)


def test_prompts_follow_the_linear_model():
    context, query, target = (np.asarray(a, np.float64) for a in sample_prompts(
        jax.random.key(0), 400, dim=5, length=200, noise_var=0.1))
    assert context.shape == (400, 200, 6) and query.shape == (400, 6) and target.shape == (400,)
    assert np.all(query[:, -1] == 0)
    x, y = context[..., :5], context[..., 5]
    # E y^2 = E|beta|^2 + sigma^2 = 1.1 for beta ~ N(0, I/d) (std of this mean ~0.03)
    assert abs(np.mean(y ** 2) - 1.1) < 0.12
    # least squares on each prompt leaves the noise: residual variance sigma^2 (L - d) / L
    beta = np.stack([np.linalg.lstsq(x[b], y[b], rcond=None)[0] for b in range(400)])
    resid = y - np.einsum("bld,bd->bl", x, beta)
    assert abs(np.mean(resid ** 2) - 0.1 * 195 / 200) < 0.004
    # the query's target follows the same prompt's beta
    assert abs(np.mean((target - np.einsum("bd,bd->b", query[:, :5], beta)) ** 2) - 0.1) < 0.025


def _gd_prediction(context, query, eta, debias):
    """One explicit gradient step (jax.grad) from w = 0 on the in-context squared loss."""
    x, y, xq = context[..., :-1], context[..., -1], query[..., :-1]
    if debias:
        x = x - x.mean(axis=1, keepdims=True)

    def loss(w):
        return 0.5 * jnp.mean((y - jnp.einsum("bld,bd->bl", x, w)) ** 2, axis=1).sum()

    w = -eta * jax.grad(loss)(jnp.zeros(xq.shape, jnp.float32))
    return np.einsum("bd,bd->b", np.asarray(w, np.float64), np.asarray(xq, np.float64))


@pytest.mark.parametrize("debias", [False, True])
def test_one_step_gd_features_are_a_gradient_step(debias):
    rng = np.random.default_rng(11)
    context, query = _prompts(rng, 6, 8)
    feat = analysis.debiased_gd_feature if debias else analysis.gd_feature
    want = _gd_prediction(jnp.asarray(context), jnp.asarray(query), 0.7, debias)
    np.testing.assert_allclose(0.7 * feat(context, query), want, rtol=1e-5, atol=1e-6)


def test_fitted_gd_step_is_the_closed_form_and_optimal():
    context, query, target = _linear_prompts(np.random.default_rng(2), 32768, 40)
    a = analysis.gd_feature(context, query)
    eta = analysis.fit_step(a, target)
    closed = analysis.optimal_gd_step(5, 40, 0.1)
    assert abs(eta / closed - 1) < 0.03

    def mse(e):
        return np.mean((e * a - target) ** 2)

    assert mse(eta) < min(mse(0.95 * eta), mse(1.05 * eta))
    # at the optimal step MSE = E y^2 - eta* = 1.1 - eta*
    assert abs(mse(closed) - (1.1 - closed)) < 0.015


def test_ridge_is_a_regularised_least_squares_solve():
    rng = np.random.default_rng(4)
    context, query = (a.astype(np.float64) for a in _prompts(rng, 3, 12))
    got = analysis.ridge_predict(context, query, 0.5)
    for b in range(3):
        x, y = context[b, :, :-1], context[b, :, -1]
        aug_x = np.concatenate([x, math.sqrt(0.5) * np.eye(D)])
        beta = np.linalg.lstsq(aug_x, np.concatenate([y, np.zeros(D)]), rcond=None)[0]
        np.testing.assert_allclose(got[b], beta @ query[b, :-1], rtol=1e-10)


def _planted(omegas, mus, dim=D, kq_noise=None, ov_noise=None):
    """A model whose circuits are KQ^h = omega_h diag(1_d, 0) (+ kq_noise[h]) and
    OV^h = mu_h e_{d+1} (+ ov_noise[h]): planted as Q^h = I, K^h = KQ^h, V^h = I, O^h = OV^hT."""
    heads, n = len(omegas), dim + 1
    kq = np.stack([w * np.diag([1.0] * dim + [0.0]) for w in omegas])
    ov = np.zeros((heads, n))
    ov[:, -1] = mus
    if kq_noise is not None:
        kq = kq + kq_noise
    if ov_noise is not None:
        ov = ov + ov_noise
    eye = np.broadcast_to(np.eye(n), (heads, n, n))
    model = _model(heads, dim=dim)
    set_circuit_params(model, eye, kq, eye, ov)
    return model


def test_pattern_check_recognises_the_planted_pattern_and_each_defect():
    ideal = ([0.37, -0.37, 0.01, -0.02], [2.9, -2.9, 0.02, -0.01])
    stats = analysis.pattern_stats(*circuits(_planted(*ideal)))
    np.testing.assert_allclose(stats["omega"], ideal[0], atol=1e-6)
    np.testing.assert_allclose(stats["mu"], ideal[1], atol=1e-6)
    check = analysis.check_pattern(stats)
    assert check["ok"] and sorted(check["active"]) == [0, 1]

    def failed(model):
        c = analysis.check_pattern(analysis.pattern_stats(*circuits(model)))
        assert not c["ok"]
        return {k for k in ("opposite_signs", "diagonal_homogeneous", "last_entry_only",
                            "zero_sum") if not c[k]}

    assert failed(_planted([0.37, 0.37, 0.01, -0.02], ideal[1])) == {"opposite_signs"}
    off = np.zeros((4, D + 1, D + 1))
    off[0, 0, 1] = 0.2  # an off-diagonal entry of an active head
    assert failed(_planted(*ideal, kq_noise=off)) == {"diagonal_homogeneous"}
    inhomogeneous = np.zeros((4, D + 1, D + 1))
    inhomogeneous[1, 2, 2] = -0.3
    assert failed(_planted(*ideal, kq_noise=inhomogeneous)) == {"diagonal_homogeneous"}
    ycol = np.zeros((4, D + 1, D + 1))
    ycol[1, 0, D] = 0.2  # attention to the keys' y
    assert failed(_planted(*ideal, kq_noise=ycol)) == {"diagonal_homogeneous"}
    ovx = np.zeros((4, D + 1))
    ovx[2, 0] = 1.0  # a dummy head reading x
    assert failed(_planted(*ideal, ov_noise=ovx)) == {"last_entry_only"}
    assert failed(_planted(ideal[0], [2.9, -2.5, 0.02, -0.01])) == {"zero_sum"}
    assert "opposite_signs" in failed(_planted([0.37], [2.9]))


def test_planted_pattern_computes_debiased_gd():
    """The paper's mechanism: with small omega the two opposite heads' mean terms cancel and the
    model is debiased one-step GD with step sum_h mu_h omega_h / sqrt(d+1)."""
    dim, omega, eta = 5, 0.01, 0.86
    mu = eta * math.sqrt(dim + 1) / (2 * omega)
    model = _planted([omega, -omega], [mu, -mu], dim=dim)
    context, query, _ = _linear_prompts(np.random.default_rng(3), 512, 40, dim)
    got = _run(model, context, query)
    want = eta * analysis.debiased_gd_feature(context, query)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2
    assert abs(analysis.pattern_stats(*circuits(model))["eta_eff"] - eta) < 1e-5
