"""MoH (Jin et al., 2024): the code's gate scaling, the balance loss, exact identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.nn import MultiHeadAttention, capture_aux_losses
from jaxattn.nn.moh import MoHAttention, moh_balance_loss, moh_gates, query_norm_gates

D, N = 16, 4


def _x(seed=0, b=2, length=12):
    return jax.random.normal(jax.random.key(seed), (b, length, D))


def test_uniform_router_with_every_head_active_gives_exact_ones():
    z = jnp.zeros((3, 5))
    g = moh_gates(z[:, :2], z[:, :4], z[:, :2], top_k=4)
    np.testing.assert_array_equal(np.asarray(g), np.ones((3, 6), np.float32))


def test_gate_scaling_matches_the_official_code():
    r = np.random.default_rng(0)
    s_l, r_l, a_l = (jnp.asarray(r.normal(size=(7, n)), jnp.float32) for n in (3, 5, 2))
    g = np.asarray(moh_gates(s_l, r_l, a_l, top_k=2))
    sm = lambda v: np.exp(v) / np.exp(v).sum(-1, keepdims=True)
    a = 2 * sm(np.asarray(a_l))
    p = sm(np.asarray(r_l))
    top = np.argsort(-p, -1)[:, :2]
    m = np.zeros_like(p)
    np.put_along_axis(m, top, 1.0, -1)
    want_r = a[:, 1:] * 2 * p * m / (p * m).sum(-1, keepdims=True)
    want_s = a[:, :1] * 3 * sm(np.asarray(s_l))
    np.testing.assert_allclose(g, np.concatenate([want_s, want_r], -1), rtol=1e-6, atol=1e-6)
    assert np.all((g[:, 3:] > 0).sum(-1) == 2) and np.all(g[:, 3:][m == 0] == 0)
    # special cases: h_s = 1 -> the shared gate is a_1 * 1; shared-only -> h * softmax
    one = np.asarray(moh_gates(s_l[:, :1], r_l, a_l, top_k=2))
    np.testing.assert_allclose(one[:, 0], a[:, 0], rtol=1e-6)
    only = np.asarray(moh_gates(s_l, r_l[:, :0], None, top_k=0))
    np.testing.assert_allclose(only, 3 * sm(np.asarray(s_l)), rtol=1e-6)


def test_balance_loss_is_top_k_at_perfect_balance_and_matches_its_formula():
    e, k = 6, 2
    t = np.arange(e)
    circulant = -np.mod(t[None, :] - t[:, None], e).astype(np.float32)  # token t prefers head t
    np.testing.assert_allclose(float(moh_balance_loss(jnp.asarray(circulant), top_k=k)), k,
                               rtol=1e-6)
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(40, e)), jnp.float32)
    p = np.asarray(jax.nn.softmax(logits, -1))
    m = np.zeros_like(p)
    np.put_along_axis(m, np.argsort(-p, -1)[:, :k], 1.0, -1)
    want = e * e * np.mean(p.mean(0) * m.mean(0))
    np.testing.assert_allclose(float(moh_balance_loss(logits, top_k=k)), want, rtol=1e-5)
    valid = jnp.arange(40) < 25  # padding excluded == the loss of the valid tokens alone
    np.testing.assert_allclose(float(moh_balance_loss(logits, top_k=k, valid=valid)),
                               float(moh_balance_loss(logits[:25], top_k=k)), rtol=1e-6)


def _zero_routers(moh):
    for layer in (moh.shared_router, moh.routed_router, moh.stage_router):
        if layer is not None:
            layer.kernel[...] = jnp.zeros_like(layer.kernel[...])


@pytest.mark.parametrize("causal", [False, True])
def test_uniform_router_every_head_active_equals_mha_exactly(causal):
    moh = MoHAttention(D, N, shared_heads=2, top_k=2, causal=causal, rngs=nnx.Rngs(0))
    _zero_routers(moh)
    mha = MultiHeadAttention(N, D, is_causal=causal, rngs=nnx.Rngs(1))
    nnx.update(mha, nnx.state(moh.attn))
    x = _x(1)
    np.testing.assert_array_equal(np.asarray(moh(x, deterministic=True)), np.asarray(mha(x)))


def test_unselected_heads_contribute_exactly_zero():
    moh = MoHAttention(D, N, shared_heads=2, top_k=1, rngs=nnx.Rngs(2))
    x = _x(2)
    g = np.asarray(moh.gates(x))  # [B, L, N]
    head = 3
    off, on = g[..., head] == 0, g[..., head] > 0
    assert off.any() and on.any()
    y = np.asarray(moh(x, deterministic=True))
    vk = moh.attn.value_kernel
    vk[...] = vk[...].at[:, head].multiply(100.0)  # only head 3's values change
    y2 = np.asarray(moh(x, deterministic=True))
    np.testing.assert_array_equal(y2[off], y[off])
    assert not np.allclose(y2[on], y[on])


def test_balance_loss_is_sown_in_training_only():
    moh = MoHAttention(D, N, shared_heads=1, top_k=2, balance_weight=0.5, rngs=nnx.Rngs(3))
    x = _x(3)
    _, aux = capture_aux_losses(lambda m, x: m(x, deterministic=False), moh, x)
    logits = moh.routed_router(x).reshape(-1, 3)
    np.testing.assert_allclose(float(aux["balance"]),
                               0.5 * float(moh_balance_loss(logits, top_k=2)), rtol=1e-6)
    _, none = capture_aux_losses(lambda m, x: m(x, deterministic=True), moh, x)
    assert none == {}


def test_query_norm_router_is_binary_forward_with_straight_through_gradients():
    q = jax.random.normal(jax.random.key(4), (2, 5, 6, 8))
    g = query_norm_gates(q, 3)
    assert set(np.unique(np.asarray(g)).tolist()) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.asarray(g.sum(-1)), np.full((2, 5), 3.0))
    w = jax.random.normal(jax.random.key(5), g.shape)
    grad = jax.grad(lambda q: jnp.sum(query_norm_gates(q, 3) * w))(q)
    assert float(jnp.max(jnp.abs(grad))) > 0  # the softmax score carries the gradient
    moh = MoHAttention(D, N, shared_heads=2, top_k=1, router="query_norm", rngs=nnx.Rngs(6))
    gates = np.asarray(moh.gates(_x(4)))
    np.testing.assert_array_equal(gates[..., :2], 1.0)
    np.testing.assert_array_equal(gates[..., 2:].sum(-1), 1.0)
    assert moh.routed_router is None  # parameter-free


def test_random_router_keeps_k_random_heads_per_token():
    moh = MoHAttention(D, 8, shared_heads=2, top_k=3, router="random", rngs=nnx.Rngs(7))
    g = np.asarray(moh.gates(_x(5, length=40), rngs=nnx.Rngs(dropout=1)))
    np.testing.assert_array_equal(g[..., :2], 1.0)
    np.testing.assert_array_equal(g[..., 2:].sum(-1), 3.0)
    usage = g[..., 2:].reshape(-1, 6).mean(0)  # 80 tokens: every routed head gets used
    assert np.all(usage > 0.2) and np.all(usage < 0.8)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="top_k"):
        MoHAttention(D, N, shared_heads=2, top_k=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="shared_heads"):
        MoHAttention(D, N, shared_heads=5, top_k=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="stage_logits"):
        moh_gates(jnp.zeros((2, 2)), jnp.zeros((2, 2)), None, top_k=1)
    with pytest.raises(ValueError, match=r"\[T, E\]"):
        moh_balance_loss(jnp.zeros((2, 3, 4)), top_k=1)
