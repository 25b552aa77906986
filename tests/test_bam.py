"""BAM (Zhang et al., NeurIPS 2024): soft-routed attention experts, top-1 FFN experts, router
losses, upcycling of parallel-block dense models, exact identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxattn import dot_product_attention
from jaxattn.models import MixerConfig
from jaxattn.models.parallel_lm import ParallelLM, ParallelLMConfig, upcycle
from jaxattn.nn import MultiHeadAttention, capture_aux_losses, make_mixer
from jaxattn.nn.bam import (
    BAMAttention,
    MoEFeedForward,
    bam_attention,
    bam_attention_reference,
    load_balance_loss,
    moe_ffn,
    router_gates,
    router_z_loss,
)
from tests.attention_testing import F32_ATOL, F32_GRAD_ATOL, max_err

D, N, E, T = 16, 4, 3, 10


def _x(seed=0, b=2, length=T):
    return jax.random.normal(jax.random.key(seed), (b, length, D))


def _parents(causal=True, kv_heads=None, n=E):
    mhas = [MultiHeadAttention(N, D, num_kv_heads=kv_heads, is_causal=causal,
                               rngs=nnx.Rngs(10 + i)) for i in range(n)]
    for i, m in enumerate(mhas):  # non-zero biases so that every parameter matters
        for name in ("query_bias", "key_bias", "value_bias", "out_bias"):
            b = getattr(m, name)
            b[...] = 0.1 * jax.random.normal(jax.random.key(100 + i), b.shape)
    return mhas


def _args(m: BAMAttention, gates):
    return ([m.q_kernel[...], m.k_kernel[...], m.v_kernel[...], m.o_kernel[...], gates],
            dict(q_bias=m.q_bias[...], k_bias=m.k_bias[...], v_bias=m.v_bias[...],
                 o_bias=m.o_bias[...], causal=m.causal))


def _force_router(router, expert):
    """A router whose softmax is exactly one-hot at ``expert`` (exp(-1e4) == 0 in f32)."""
    router.kernel[...] = jnp.zeros_like(router.kernel[...])
    router.bias[...] = 1e4 * jax.nn.one_hot(expert, router.bias.shape[0])


@pytest.mark.parametrize("shared_kv", [False, True])
def test_one_hot_router_equals_the_chosen_parent_exactly(shared_kv):
    # Shared-KV equals a parent exactly when the parents' K/V agree; two parents because the
    # average of two equal floats is exact ((a + a) / 2 == a), of three it need not be.
    parents = _parents(n=2 if shared_kv else E)
    if shared_kv:
        for p in parents[1:]:
            for name in ("key_kernel", "value_kernel", "key_bias", "value_bias"):
                getattr(p, name)[...] = getattr(parents[0], name)[...]
    bam = BAMAttention.from_dense(parents, shared_kv=shared_kv, router_bias=True,
                                  rngs=nnx.Rngs(0))
    x = _x(1)
    for e in range(len(parents)):
        _force_router(bam.router, e)
        np.testing.assert_array_equal(np.asarray(bam.gates(x)[..., e]), 1.0)
        np.testing.assert_array_equal(np.asarray(bam(x)), np.asarray(parents[e](x)))


def test_one_expert_is_multi_head_attention_exactly():
    bam = make_mixer("bam_attention", features=D, num_heads=N, causal=True, experts=1,
                     rngs=nnx.Rngs(2))
    mha = MultiHeadAttention(N, D, is_causal=True, rngs=nnx.Rngs(3))
    for mine, theirs in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
        getattr(mha, f"{theirs}_kernel")[...] = getattr(bam, f"{mine}_kernel")[0]
        getattr(mha, f"{theirs}_bias")[...] = getattr(bam, f"{mine}_bias")[0]
    x = _x(2)
    np.testing.assert_array_equal(np.asarray(bam(x)), np.asarray(mha(x)))
    # and MHA is jaxattn.dot_product_attention on its projections
    q, k, v = mha._project_qkv(x, None, None)
    heads = dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_array_equal(np.asarray(mha._output(heads)), np.asarray(mha(x)))


@pytest.mark.parametrize("shared_kv,kv_heads", [(False, 2), (True, 2)])
def test_paths_match_the_reference_f32_bf16_masks_and_gradients(shared_kv, kv_heads):
    bam = BAMAttention(D, N, experts=E, shared_kv=shared_kv, num_kv_heads=kv_heads,
                       causal=True, rngs=nnx.Rngs(4))
    x = _x(4)
    g = jax.nn.softmax(jax.random.normal(jax.random.key(5), (2, T, E)), -1)
    mask = np.tril(np.ones((T, T), bool)) & (np.arange(T)[None] % 3 != 1)
    mask[4] = False  # a fully masked query row
    args, kw = _args(bam, g)
    ref = bam_attention_reference(x, *args, mask=mask, **kw)
    for fused in (False, True):
        out = bam_attention(x, *args, mask=mask, fused=fused, **kw)
        assert max_err(out, ref) < F32_ATOL
        # the fully masked row's attention output is zero: only the gated output biases remain
        np.testing.assert_allclose(np.asarray(out[:, 4]),
                                   np.asarray(jnp.einsum("be,eo->bo", g[:, 4], kw["o_bias"])),
                                   atol=1e-6)
        low = bam_attention(x.astype(jnp.bfloat16), *args, mask=mask, fused=fused, **kw)
        assert low.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(low)))
        # bf16 end to end (projections, attention, mixture): a few bf16 ulps of O(1) outputs
        assert max_err(low, ref) < 8 * 2.0**-8 * float(jnp.max(jnp.abs(ref)))
    w = jax.random.normal(jax.random.key(6), ref.shape)

    def grad_of(fn):
        loss = lambda x, qk, g: jnp.sum(fn(x, qk, g) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, args[0], g)

    def with_args(fused):
        def fn(x, qk, g):
            a = [qk, *args[1:4], g]
            if fused is None:
                return bam_attention_reference(x, *a, mask=mask, **kw)
            return bam_attention(x, *a, mask=mask, fused=fused, **kw)
        return fn

    want = grad_of(with_args(None))
    for fused in (False, True):
        for got, ref_g in zip(grad_of(with_args(fused)), want, strict=True):
            assert max_err(got, ref_g) < F32_GRAD_ATOL


def test_cross_attention_with_a_context_matches_the_reference():
    bam = BAMAttention(D, N, experts=2, rngs=nnx.Rngs(7))
    x, c = _x(7), _x(8, length=6)
    g = bam.gates(x)
    args, kw = _args(bam, g)
    ref = bam_attention_reference(x, *args, context=c, **kw)
    assert max_err(bam(x, context=c), ref) < F32_ATOL
    assert max_err(bam_attention(x, *args, context=c, fused=True, **kw), ref) < F32_ATOL


def test_shared_kv_upcycling_averages_kv_and_keeps_q_o_per_parent():
    parents = _parents(kv_heads=2)
    bam = BAMAttention.from_dense(parents, shared_kv=True, rngs=nnx.Rngs(0))
    assert bam.k_kernel.shape == (1, D, 2, D // N) and bam.q_kernel.shape == (E, D, N, D // N)
    mean = np.mean([np.asarray(p.key_kernel[...]) for p in parents], axis=0)
    np.testing.assert_allclose(np.asarray(bam.k_kernel[0]), mean, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(bam.o_kernel[1]), np.asarray(parents[1].out_kernel))


def test_router_gates_soft_and_top1():
    logits = jax.random.normal(jax.random.key(9), (7, E))
    p = np.asarray(jax.nn.softmax(logits, -1))
    np.testing.assert_allclose(np.asarray(router_gates(logits)), p, rtol=1e-6)
    top1 = np.asarray(router_gates(logits, 1))
    np.testing.assert_array_equal((top1 > 0).sum(-1), 1)
    np.testing.assert_allclose(top1.max(-1), p.max(-1), rtol=1e-6)  # gate = chosen prob
    np.testing.assert_array_equal(top1.argmax(-1), p.argmax(-1))


def test_top1_attention_sows_router_losses_and_drops_other_experts_exactly():
    bam = make_mixer("bam_attention", features=D, num_heads=N, causal=True, experts=E, top_k=1,
                     balance_weight=0.5, z_weight=0.25, rngs=nnx.Rngs(10))
    x = _x(10)
    _, aux = capture_aux_losses(lambda m, x: m(x, deterministic=False), bam, x)
    logits = bam.router_logits(x).reshape(-1, E)
    np.testing.assert_allclose(float(aux["balance"]), 0.5 * float(load_balance_loss(logits)),
                               rtol=1e-6)
    np.testing.assert_allclose(float(aux["router_z"]), 0.25 * float(router_z_loss(logits)),
                               rtol=1e-6)
    assert capture_aux_losses(lambda m, x: m(x, deterministic=True), bam, x)[1] == {}
    g = np.asarray(bam.gates(x))
    e = 2
    off, on = g[..., e] == 0, g[..., e] > 0
    assert off.any() and on.any()
    y = np.asarray(bam(x, deterministic=True))
    bam.v_kernel[...] = bam.v_kernel[...].at[e].multiply(100.0)  # only expert 2's values change
    y2 = np.asarray(bam(x, deterministic=True))
    np.testing.assert_array_equal(y2[off], y[off])
    assert not np.allclose(y2[on], y[on])


def test_load_balance_and_z_loss_formulas():
    t = np.arange(E)
    circulant = -10.0 * np.mod(t[None, :] - t[:, None], E).astype(np.float32)
    # each expert gets 1/E of the tokens and (by symmetry) P_i = 1/E: L = E * E * (1/E^2) = 1
    np.testing.assert_allclose(float(load_balance_loss(jnp.asarray(circulant))), 1.0, rtol=1e-6)
    collapsed = np.zeros((6, E), np.float32)
    collapsed[:, 0] = 10.0  # every token to expert 0: L -> E * P_0 ~ E
    assert float(load_balance_loss(jnp.asarray(collapsed))) > 0.9 * E
    logits = np.random.default_rng(0).normal(size=(20, E)).astype(np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    f = np.eye(E)[p.argmax(-1)].mean(0)
    np.testing.assert_allclose(float(load_balance_loss(jnp.asarray(logits))),
                               E * np.sum(f * p.mean(0)), rtol=1e-5)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits))), np.mean(lse ** 2),
                               rtol=1e-5)


def _lm_cfg(**kw):
    return ParallelLMConfig(vocab_size=32, width=D, max_length=16, num_heads=N,
                            mixers=(MixerConfig("attention"),) * 2, mlp_ratio=2, **kw)


def _branched(n=E):
    """``n`` dense LMs branched from one seed: non-expert params equal, experts perturbed."""
    seed = ParallelLM(_lm_cfg(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(seed)
    out = []
    for i in range(n):
        m = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
        for layer in (*m.mixers, *m.ffns):
            leaves = nnx.state(layer, nnx.Param)
            noise = jax.tree.map(lambda a, i=i: a + 0.05 * jax.random.normal(
                jax.random.key(i + 1), a.shape), leaves)
            nnx.update(layer, noise)
        out.append(m)
    return out


def test_upcycled_model_with_one_hot_routers_equals_the_chosen_parent_exactly():
    # the parents share their non-expert parameters (branched from one seed); with two parents
    # their average is exactly those parameters ((a + a) / 2 == a; with three it may round)
    parents = _branched(2)
    tokens = jax.random.randint(jax.random.key(11), (2, 12), 0, 32)
    moe = upcycle(parents, attention="expert_kv", rngs=nnx.Rngs(1), router_bias=True)
    for e in range(2):
        for layer in (*moe.mixers, *moe.ffns):
            _force_router(layer.router, e)
        np.testing.assert_array_equal(np.asarray(moe(tokens, deterministic=True)),
                                      np.asarray(parents[e](tokens)))
    # BTX: the attention is the parents' average, FFN experts the parents' MLPs
    parents = _branched(3)
    btx = upcycle(parents, attention="average", rngs=nnx.Rngs(1))
    assert isinstance(btx.mixers[0], MultiHeadAttention)
    want = np.mean([np.asarray(p.mixers[0].query_kernel[...]) for p in parents], axis=0)
    np.testing.assert_allclose(np.asarray(btx.mixers[0].query_kernel[...]), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(btx.ffns[1].fc2_kernel[2]),
                                  np.asarray(parents[2].ffns[1].fc2.kernel[...]))
    np.testing.assert_allclose(np.asarray(btx.embed.embedding[...]),
                               np.asarray(parents[0].embed.embedding[...]), rtol=1e-6)


def test_moe_ffn_one_hot_equals_the_parent_mlp_and_sows_losses():
    parents = [p.ffns[0] for p in _branched(2)]
    moe = MoEFeedForward.from_dense(parents, router_bias=True, rngs=nnx.Rngs(0))
    x = _x(12)
    _force_router(moe.router, 1)
    np.testing.assert_array_equal(np.asarray(moe(x, deterministic=True)), np.asarray(parents[1](x)))
    _, aux = capture_aux_losses(lambda m, x: m(x, deterministic=False), moe, x)
    assert set(aux) == {"balance", "router_z"}
    with pytest.raises(ValueError, match="gates must be"):
        moe_ffn(x, moe.fc1_kernel[...], moe.fc1_bias[...], moe.fc2_kernel[...],
                moe.fc2_bias[...], jnp.ones((2, T, 3)))


def test_bad_arguments_raise():
    bam = BAMAttention(D, N, experts=2, rngs=nnx.Rngs(0))
    args, kw = _args(bam, jnp.ones((2, T, 3)))
    with pytest.raises(ValueError, match=r"gates must be \[B, T, E\]"):
        bam_attention(_x(), *args, **kw)
    with pytest.raises(ValueError, match="x's features"):
        bam_attention(jnp.zeros((2, T, 8)), *args[:4], jnp.ones((2, T, 2)), **kw)
    with pytest.raises(ValueError, match="k_kernel and v_kernel"):
        bam_attention(_x(), args[0], args[1][:, :, :3], *args[2:4], jnp.ones((2, T, 2)))
    with pytest.raises(ValueError, match="top_k"):
        BAMAttention(D, N, experts=2, top_k=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must be"):
        bam(jnp.zeros((2, T, 8)))
    with pytest.raises(ValueError, match="attention must be"):
        upcycle(_branched(1), attention="nope", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dense parents"):
        upcycle([upcycle(_branched(1), rngs=nnx.Rngs(0))], rngs=nnx.Rngs(0))
