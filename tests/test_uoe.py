"""Union of Experts (Yang et al., 2025): SMHA's gather path against its masked reference, exact
identities with MHA and the dense MLP, the code's padding rule, gate weighting, UoME experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn.models import MLP
from jaxattn.nn import MultiHeadAttention
from jaxattn.nn.uoe import (
    SelectiveMultiHeadAttention,
    SMHAParams,
    UoMEMLP,
    attention_cost,
    capacity_truncate,
    padded_selection,
    smha_gather,
    smha_reference,
    smha_route,
    uome_mlp,
)

B, L, D, E = 2, 12, 16, 4
H = D // E


def _x(seed=0, length=L):
    return jax.random.normal(jax.random.key(seed), (B, length, D))


def _params(seed=1):
    ks = jax.random.split(jax.random.key(seed), 8)
    n = lambda k, s, scale=0.3: scale * jax.random.normal(k, s)
    return SMHAParams(n(ks[0], (D, E, H)), n(ks[1], (D, E, H)), n(ks[2], (D, E, H)),
                      n(ks[3], (E, H, D)), n(ks[4], (E, H)), n(ks[5], (E, H)), n(ks[6], (E, H)),
                      n(ks[7], (E, D)))


def _kept(seed=2, p=0.5):
    k = jax.random.bernoulli(jax.random.key(seed), p, (B, L, E))
    return k.at[:, :, 3].set(False)  # head 3 is empty


def _mixer(causal=False, **kw):
    return SelectiveMultiHeadAttention(D, E, causal=causal, rngs=nnx.Rngs(0), **kw)


def _mha_like(smha, causal):
    """A MultiHeadAttention holding the SMHA's expert weights (head e = expert e)."""
    mha = MultiHeadAttention(E, D, is_causal=causal, rope_theta=10_000.0, rngs=nnx.Rngs(1))
    for name in ("query_kernel", "key_kernel", "value_kernel", "out_kernel", "query_bias",
                 "key_bias", "value_bias"):
        getattr(mha, name)[...] = getattr(smha, name)[...]
    bo = jax.random.normal(jax.random.key(9), (D,))
    mha.out_bias[...] = bo
    smha.out_bias[...] = jnp.zeros((E, D)).at[0].set(bo)  # sum of per-head biases = MHA's
    return mha


@pytest.mark.parametrize("causal", [False, True])
def test_every_head_keeping_every_token_equals_mha(causal):
    smha = _mixer(causal, top_k=E)
    mha = _mha_like(smha, causal)
    x = _x(3)
    kept, w = smha.selection(x)
    assert bool(jnp.all(kept)) and w is None
    # f32 rounding: the head sum is a scatter-add of per-head projections here and one einsum
    # contraction over (head, head_dim) in MultiHeadAttention.
    np.testing.assert_allclose(np.asarray(smha(x)), np.asarray(mha(x)), rtol=1e-5, atol=1e-5)
    # gate weighting with every head kept = MHA with per-token head weights (MoH's form)
    gw = _mixer(causal, top_k=E, gate_weighting=True)
    nnx.update(gw, nnx.state(smha))
    _, gates = gw.selection(x)
    # the per-head output bias sits in head 0 (weighted by g_0), MHA's bias is unweighted
    want = mha(x, head_weights=gates) + (gates[..., :1] - 1.0) * mha.out_bias[...]
    np.testing.assert_allclose(np.asarray(gw(x)), np.asarray(want), rtol=1e-5, atol=1e-5)


_gather = jax.jit(smha_gather, static_argnames=("is_causal", "capacity", "rope_positions"))
_reference = jax.jit(smha_reference, static_argnames=("is_causal", "rope_positions"))


@pytest.mark.parametrize("causal,rope_positions", [(True, "compact"), (False, "original")])
def test_gather_path_matches_reference_f32_bf16_and_gradients(causal, rope_positions):
    x, p, kept = _x(4), _params(), _kept()
    w = jax.random.uniform(jax.random.key(5), (B, L, E))
    cap = 5  # below the largest per-head count: the latest tokens are dropped
    assert int(jnp.max(jnp.sum(kept, 1))) > cap
    truncated = capacity_truncate(kept, cap)
    kw = dict(is_causal=causal, rope_positions=rope_positions)
    want = _reference(x, truncated, w, p, **kw)
    got = _gather(x, kept, w, p, capacity=cap, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    # bf16: at most about twice the error of the f32 reference evaluated in bf16
    pb = SMHAParams(*(a.astype(jnp.bfloat16) for a in p))
    xb = x.astype(jnp.bfloat16)
    ref_b = _reference(xb, truncated, w, pb, **kw).astype(jnp.float32)
    got_b = _gather(xb, kept, w, pb, capacity=cap, **kw).astype(jnp.float32)
    assert got_b.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(got_b)))
    err_ref, err_got = float(jnp.max(jnp.abs(ref_b - want))), float(
        jnp.max(jnp.abs(got_b - want)))
    assert err_got <= 2 * err_ref + 1e-2, (err_got, err_ref)
    # gradients with respect to x and every parameter
    cot = jax.random.normal(jax.random.key(6), want.shape)
    g_ref = jax.grad(lambda x, p: jnp.sum(_reference(x, truncated, w, p, **kw) * cot),
                     argnums=(0, 1))(x, p)
    g_got = jax.grad(lambda x, p: jnp.sum(_gather(x, kept, w, p, capacity=cap, **kw) * cot),
                     argnums=(0, 1))(x, p)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref), strict=True):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    # the empty head 3 gets no gradient and contributes nothing
    assert float(jnp.max(jnp.abs(g_got[1].wo[3]))) == 0.0
    assert float(jnp.max(jnp.abs(g_got[1].wo[0]))) > 0.0


def test_empty_selection_outputs_exact_zeros():
    x, p = _x(7), _params()
    none = jnp.zeros((B, L, E), bool)
    y = _gather(x, none, None, p, capacity=L, is_causal=True, rope_positions="compact")
    np.testing.assert_array_equal(np.asarray(y), 0.0)
    np.testing.assert_array_equal(np.asarray(smha_reference(x, none, None, p, is_causal=True)),
                                  0.0)


def test_compact_rope_positions_are_the_rank_inside_the_head():
    x, p = _x(8), _params()
    kept = _kept(3)
    compact = _reference(x, kept, None, p, is_causal=True, rope_positions="compact")
    original = _reference(x, kept, None, p, is_causal=True, rope_positions="original")
    assert not np.allclose(np.asarray(compact), np.asarray(original))
    # a head keeping a suffix of tokens: compact RoPE = original RoPE shifted, which attention
    # does not see (relative positions) -> equal outputs
    suffix = jnp.zeros((B, L, E), bool).at[:, 4:, :].set(True)
    a = _reference(x, suffix, None, p, is_causal=True, rope_positions="compact")
    b = _reference(x, suffix, None, p, is_causal=True, rope_positions="original")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_routing_and_the_codes_padding_rule():
    logits = jax.random.normal(jax.random.key(10), (B, L, E))
    routed, probs, gates = smha_route(logits, 2)
    np.testing.assert_array_equal(np.asarray(routed.sum(-1)), 2)
    np.testing.assert_allclose(np.asarray(gates.sum(-1)), 1.0, rtol=1e-5)
    assert bool(jnp.all((gates > 0) == routed))
    kept = np.asarray(padded_selection(routed, probs))
    r, pr = np.asarray(routed), np.asarray(probs)
    for b in range(B):
        n_max = r[b].sum(0).max()
        np.testing.assert_array_equal(kept[b].sum(0), n_max)  # every head padded to n_max
        assert np.all(kept[b][r[b]])  # routed tokens are always kept
        for e in range(E):
            pad = kept[b, :, e] & ~r[b, :, e]
            left = ~kept[b, :, e]
            if pad.any() and left.any():  # padding = the unrouted tokens of highest prob
                assert pr[b, pad, e].min() >= pr[b, left, e].max()
    # padding is not causal: routing the last token to head 1 raises n_max from 2 to 3, so
    # head 0 (one routed token) pads one more, earlier token (position 2)
    rt = jnp.zeros((1, 4, 2), bool).at[0, 0, 0].set(True).at[0, 1:3, 1].set(True)
    pb = jnp.full((1, 4, 2), 0.5)
    before = padded_selection(rt, pb)
    after = padded_selection(rt.at[0, 3, 1].set(True), pb)
    assert not bool(before[0, 2, 0]) and bool(after[0, 2, 0])


def test_padded_tokens_get_the_heads_output_in_code_mode_and_nothing_with_gate_weighting():
    x = _x(11)
    code = _mixer(False, top_k=1)  # few tokens per head -> padding
    routed, probs, _ = smha_route(code.gate(x), 1)
    kept, _ = code.selection(x)
    padded = np.asarray(kept & ~routed)
    head = int(np.argmax(padded.sum((0, 1))))
    assert padded[..., head].any()

    def change_head(m):
        y = np.asarray(m(x))
        vk = m.value_kernel
        old = vk[...]
        vk[...] = old.at[:, head].multiply(50.0)
        y2 = np.asarray(m(x))
        vk[...] = old
        return y, y2

    r = np.asarray(routed[..., head])
    y, y2 = change_head(code)
    assert not np.allclose(y[padded[..., head]], y2[padded[..., head]])  # code: padded get it
    np.testing.assert_array_equal(y[~kept[..., head]], y2[~kept[..., head]])
    gw = _mixer(False, top_k=1, gate_weighting=True)
    nnx.update(gw, nnx.state(code))
    y, y2 = change_head(gw)
    np.testing.assert_array_equal(y[~r], y2[~r])  # gate weighting: only routed tokens see it
    assert not np.allclose(y[r], y2[r])
    exact = _mixer(False, top_k=1, gate_weighting=True, selection="exact")
    nnx.update(exact, nnx.state(code))
    np.testing.assert_array_equal(np.asarray(gw(x)), np.asarray(exact(x)))


def test_routed_causal_selection_never_sees_the_future_and_padding_does():
    x, t = _x(19, length=16), 7
    x2 = x.at[:, t + 1:].set(_x(20, length=16)[:, t + 1:])
    exact = _mixer(True, top_k=1, gate_weighting=False)  # "exact" is the causal default
    padded = _mixer(True, top_k=1, selection="padded")  # the code's rule, asked for explicitly
    nnx.update(padded, nnx.state(exact))
    for det in (True, False):
        y, y2 = exact(x, deterministic=det), exact(x2, deterministic=det)
        np.testing.assert_allclose(np.asarray(y[:, :t + 1]), np.asarray(y2[:, :t + 1]),
                                   rtol=1e-6, atol=1e-6)
        assert not np.allclose(np.asarray(y[:, t + 1:]), np.asarray(y2[:, t + 1:]))
    p, p2 = np.asarray(padded(x)), np.asarray(padded(x2))
    assert not np.allclose(p[:, :t + 1], p2[:, :t + 1])  # the future changed the padding


def test_random_router_keeps_k_random_heads_per_token():
    m = _mixer(True, top_k=2, router="random")
    x = _x(21, length=40)
    kept, w = m.selection(x, nnx.Rngs(dropout=1))
    assert w is None
    np.testing.assert_array_equal(np.asarray(kept.sum(-1)), 2)
    usage = np.asarray(kept.mean((0, 1)))  # 80 tokens: every head gets used
    assert np.all(usage > 0.25) and np.all(usage < 0.75)
    other, _ = m.selection(x, nnx.Rngs(dropout=2))
    assert not np.array_equal(np.asarray(kept), np.asarray(other))
    np.testing.assert_array_equal(np.asarray(m.selection(x)[0]), np.asarray(m.selection(x)[0]))


def test_gate_gets_gradients_only_with_gate_weighting():
    x = _x(12)
    for weighting, want_grad in ((False, False), (True, True)):
        m = _mixer(True, gate_weighting=weighting)
        g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(m)
        assert (float(jnp.max(jnp.abs(g.gate.kernel[...]))) > 0) == want_grad
        assert float(jnp.max(jnp.abs(g.query_kernel[...]))) > 0


def test_capacity_rules_and_attention_cost():
    m = _mixer(True, capacity_factor=1.0)  # ceil(1.0 * 12 * 2 / 4) = 6 slots
    assert m.slots(L) == 6 and _mixer(capacity=20).slots(L) == L and _mixer().slots(L) == L
    kept = _kept(13, p=0.8)
    t = np.asarray(capacity_truncate(kept, 3))
    k = np.asarray(kept)
    assert np.all(t.sum(1) == np.minimum(k.sum(1), 3)) and np.all(k[t])
    for b in range(B):  # the earliest tokens are the ones kept
        for e in range(E):
            kept_pos = np.flatnonzero(k[b, :, e])[:3]
            np.testing.assert_array_equal(np.flatnonzero(t[b, :, e]), kept_pos)
    full = jnp.ones((B, L, E), bool)
    np.testing.assert_allclose(np.asarray(attention_cost(full, H)), E * L * L * H)
    np.testing.assert_allclose(np.asarray(attention_cost(kept, H)),
                               (k.sum(1).astype(np.float64) ** 2).sum(-1) * H)


def test_uome_every_expert_every_token_equals_the_dense_mlp():
    mlp = MLP(D, 2, rngs=nnx.Rngs(14))  # hidden 32 = 4 experts x 8
    uome = UoMEMLP(D, 2 * D, num_experts=4, top_k=4, token_fraction=1.0,
                   approximate_gelu=True, rngs=nnx.Rngs(15))
    w1 = mlp.fc1.kernel[...].reshape(D, 4, 8).transpose(1, 0, 2)
    uome.w1[...], uome.b1[...] = w1, mlp.fc1.bias[...].reshape(4, 8)
    uome.w2[...] = mlp.fc2.kernel[...].reshape(4, 8, D)
    uome.b2[...] = jnp.zeros((4, D)).at[2].set(mlp.fc2.bias[...])
    x = _x(16)
    kept, _ = uome.selection(x)
    assert bool(jnp.all(kept))
    # f32 rounding: the expert sum runs over an explicit expert axis, not inside one matmul
    np.testing.assert_allclose(np.asarray(uome(x)), np.asarray(mlp(x)), rtol=1e-5, atol=1e-5)


def test_uome_expert_choice_takes_half_the_tokens_routed_first():
    uome = UoMEMLP(D, 32, num_experts=4, rngs=nnx.Rngs(17))
    x = _x(18)
    kept, w = uome.selection(x)
    assert w is None
    np.testing.assert_array_equal(np.asarray(kept.sum(1)), L // 2)
    routed, probs, _ = smha_route(uome.gate(x), 2)
    k, r, p = (np.asarray(a) for a in (kept, routed, probs))
    for b in range(B):
        for e in range(4):
            if r[b, :, e].sum() >= L // 2:
                assert np.all(r[b, k[b, :, e], e])  # full expert: only routed tokens
            else:
                assert np.all(k[b, r[b, :, e], e])  # all routed tokens, then padding
    y = uome(x)
    y_ref = uome_mlp(x, kept, None, uome.w1[...], uome.b1[...], uome.w2[...], uome.b2[...])
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    gw = UoMEMLP(D, 32, num_experts=4, gate_weighting=True, rngs=nnx.Rngs(17))
    _, weights = gw.selection(x)
    gkept, _ = gw.selection(x)
    assert bool(jnp.all((weights > 0) == (routed & gkept)))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="top_k"):
        _mixer(top_k=5)
    with pytest.raises(ValueError, match="selection"):
        _mixer(selection="topn")
    with pytest.raises(ValueError, match="divisible"):
        SelectiveMultiHeadAttention(15, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="capacity"):
        _mixer(capacity=4, capacity_factor=1.0)
    with pytest.raises(ValueError, match="router"):
        _mixer(router="random", gate_weighting=True)
    with pytest.raises(ValueError, match="rope_positions"):
        _mixer(rope_positions="absolute")
    with pytest.raises(ValueError, match=r"kept must be \[B, L, E\]"):
        smha_reference(_x(), jnp.ones((B, L, 3), bool), None, _params(), is_causal=True)
    with pytest.raises(ValueError, match="capacity must be in"):
        smha_gather(_x(), _kept(), None, _params(), is_causal=True, capacity=0)
    with pytest.raises(ValueError, match="supports self-mixing only"):
        _mixer()(_x(), context=_x())
    with pytest.raises(ValueError, match="token_fraction"):
        UoMEMLP(D, 32, token_fraction=0.0, rngs=nnx.Rngs(0))
