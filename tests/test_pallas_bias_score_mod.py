"""Additive bias and score_mod in the Pallas flash kernels (interpreter on CPU, 16 x 16 tiles):
forward, dq / dk / dv, dbias (broadcast dims reduced in the dbias kernel) and the gradients of
score_mod_args, all against the reference. T = 24 and S = 40 are unaligned with the tiles, GQA
4:2. One jitted forward+backward program per (bias shape, mask) family."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, F32_GRAD_ATOL, bf16_budget, jit_for_tests, max_err

import jaxattn
from jaxattn import masks as M
from jaxattn import score_mods as S
from jaxattn.ops.registry import Implementation

B, T, SK, N, K, H = 2, 24, 40, 4, 2, 16
PALLAS = Implementation("pallas", 16, 16)
EMPTY_ROWS = (3, 17)  # query rows that see no key in the "full" case


def _qkv(dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, T, N, H))
    k, v = r.normal(size=(B, SK, K, H)), r.normal(size=(B, SK, K, H))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _bias(shape, dtype=jnp.float32, seed=1):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _causal_with_empty_rows():
    allowed = np.tril(np.ones((T, SK), bool), k=SK - T)
    allowed[list(EMPTY_ROWS)] = False
    return M.ArrayMask(allowed)


@functools.cache
def _value_and_grads(impl, mask, score_mod=None, soft_cap=None, with_segments=False,
                     dropout=0.0):
    """Jitted ``(out, lse, grads of (q, k, v, bias, score_mod_args))`` of a fixed random
    projection of out and lse (the lse cotangent exercises the kernels' delta shift)."""
    w_out = jnp.asarray(np.random.default_rng(7).normal(size=(B, T, N, H)), jnp.float32)
    w_lse = jnp.asarray(np.random.default_rng(8).normal(size=(B, T, N)), jnp.float32)
    seg_q = jnp.asarray(np.repeat([0, 1], [10, T - 10])[None].repeat(B, 0))
    seg_kv = jnp.asarray(np.repeat([0, 1], [15, SK - 15])[None].repeat(B, 0))

    def loss(q, k, v, bias, args):
        kw = dict(query_segment_ids=seg_q, kv_segment_ids=seg_kv) if with_segments else {}
        if dropout:  # the position-hash mask every backend shares
            kw.update(dropout_rate=dropout, dropout_rng=jax.random.key(3))
        out, lse = jaxattn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, logits_soft_cap=soft_cap, score_mod=score_mod,
            score_mod_args=args, implementation=impl, return_lse=True, **kw)
        lse_f = jnp.where(jnp.isfinite(lse), lse, 0.0)
        value = jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse_f * w_lse)
        return value, (out, lse)

    return jit_for_tests(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def _check(q, k, v, bias, mask, score_mod=None, args=(), **kw):
    """Pallas equals the reference in out, lse and every gradient (f32); returns both."""
    (_, (out, lse)), g = _value_and_grads(PALLAS, mask, score_mod, **kw)(q, k, v, bias, args)
    (_, (out_r, lse_r)), g_r = _value_and_grads("reference", mask, score_mod, **kw)(
        q, k, v, bias, args)
    np.testing.assert_allclose(out, out_r, atol=F32_ATOL, rtol=0)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_r))
    fin = np.isfinite(np.asarray(lse_r))
    np.testing.assert_allclose(np.asarray(lse)[fin], np.asarray(lse_r)[fin], atol=F32_ATOL)
    names = ["dq", "dk", "dv", "dbias"] + [f"dargs[{i}]" for i in range(len(args))]
    leaves, leaves_r = jax.tree.leaves(g), jax.tree.leaves(g_r)
    assert len(leaves) == len(leaves_r) == len(names) - (bias is None)
    for name, a, b in zip([n for n in names if bias is not None or n != "dbias"], leaves,
                          leaves_r, strict=True):
        assert a.shape == b.shape, name
        # bias / table / slope gradients sum over many entries: scale the f32 atol with them
        scale = max(1.0, float(jnp.abs(b).max()))
        err = max_err(a, b)
        assert err <= F32_GRAD_ATOL * scale, f"{name}: {err}"
    return (out, g), (out_r, g_r)


BIAS_CASES = {  # name: (bias shape as passed, mask, options)
    "full": ((B, N, T, SK), _causal_with_empty_rows(), {}),
    "batch_broadcast": ((1, N, T, SK), M.LocalMask((12, 3)), {}),
    "head_broadcast": ((B, 1, T, SK), None, dict(dropout=0.25)),
    "rows_cols_only": ((T, SK), M.CausalMask(offset=SK - T), {}),
    "key_bias": ((SK,), None, dict(with_segments=True)),
}


@pytest.mark.parametrize("case", list(BIAS_CASES))
def test_bias_matches_reference_with_dbias(case):
    """Bias shapes (full; broadcast over batch, heads, both, and a [S] key bias) with masks,
    dropout and segment ids: out, lse, dq, dk, dv and dbias (reduced to the bias's shape)."""
    shape, mask, options = BIAS_CASES[case]
    q, k, v = _qkv()
    bias = _bias(shape)
    (out, g), _ = _check(q, k, v, bias, mask, **options)
    assert g[3].shape == shape
    if case == "full":  # fully masked rows: exact zeros, no NaN anywhere, no bias gradient
        rows = list(EMPTY_ROWS)
        np.testing.assert_array_equal(np.asarray(out)[:, rows], 0.0)
        np.testing.assert_array_equal(np.asarray(g[3])[:, :, rows], 0.0)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_zero_bias_is_exactly_no_bias():
    """Adding a zero bias changes nothing (exact identity, same kernel tiles)."""
    q, k, v = _qkv(seed=3)
    call = functools.partial(jaxattn.dot_product_attention, q, k, v, is_causal=True,
                             implementation=PALLAS)
    np.testing.assert_array_equal(call(bias=jnp.zeros((T, SK))), call())


SLOPES = jnp.asarray(S.alibi_slopes(N))
T5 = S.t5_relative_bias(num_buckets=8, max_distance=16)
T5_TABLE = jnp.asarray(np.random.default_rng(5).normal(size=(8, N)), jnp.float32)


def test_score_mod_alibi_gradients_of_slopes():
    """ALiBi (a causal mask): out, lse, dq, dk, dv and d slopes equal the reference's."""
    q, k, v = _qkv(seed=4)
    _check(q, k, v, None, M.CausalMask(offset=SK - T), S.alibi, (SLOPES,))


def test_score_mod_relative_table_with_bias_and_soft_cap():
    """A learned T5 relative table on top of a broadcast bias, then the soft-cap (the
    reference's order: bias, score_mod, soft-cap, mask): all gradients incl. the table's."""
    q, k, v = _qkv(seed=6)
    _check(q, k, v, _bias((1, N, 1, SK)), M.LocalMask((16, 16)), T5, (T5_TABLE,),
           soft_cap=3.0)


def test_bf16_bias_and_score_mod():
    """bf16 inputs and bias with ALiBi: within the bf16 budget of the f32 reference, and the
    gradients within 2**-6 of the largest reference gradient (bf16 rounds p and ds before the
    kernel's matmuls, as any bf16 flash backward does)."""
    q, k, v = _qkv(jnp.bfloat16, seed=9)
    bias = _bias((1, N, T, SK), jnp.bfloat16)
    mask = M.CausalMask(offset=SK - T)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, bias)]
    (_, (out, _)), g = _value_and_grads(PALLAS, mask, S.alibi)(q, k, v, bias, (SLOPES,))
    (_, (out_r, _)), g_r = _value_and_grads("reference", mask, S.alibi)(*f32, (SLOPES,))
    assert out.dtype == jnp.bfloat16 and g[3].dtype == jnp.bfloat16
    # the budget's bf16 reference has no score_mod: fold ALiBi into its bias
    distance = jnp.abs(jnp.arange(T)[:, None] - jnp.arange(SK)).astype(jnp.float32)
    alibi = -SLOPES[:, None, None] * distance
    budget = bf16_budget(q, k, v, bias=(bias.astype(jnp.float32) + alibi[None]), mask=mask)
    assert max_err(out, out_r) <= budget
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r), strict=True):
        assert max_err(a, b) <= 2.0**-6 * max(1.0, float(jnp.abs(b).max()))


def test_bad_score_mod_and_bias_get_clear_errors():
    q, k, v = _qkv()
    call = functools.partial(jaxattn.dot_product_attention, q, k, v, implementation=PALLAS)
    with pytest.raises(ValueError, match="keep the scores' shape"):
        call(score_mod=lambda s, b, h, qi, kj: jnp.zeros((3, 3)))
    with pytest.raises(TypeError, match="floating scores"):
        call(score_mod=lambda s, b, h, qi, kj: qi > kj)
    from pallas_kernels import flash

    cfg = flash.FlashConfig(block_q=16, block_kv=16)
    meta = flash.dense_meta(T, SK, 16, 16)
    with pytest.raises(ValueError, match=r"bias must be \[B\|1, N\|1, T\|1, S\|1\]"):
        flash.flash_attention(q, k, v, meta, config=cfg, bias=jnp.zeros((B, 2, T, SK)))


def test_explain_no_longer_refuses_bias_or_score_mod():
    q, k, v = _qkv()
    ex = jaxattn.explain(q, k, v, bias=jnp.zeros((N, T, SK)), score_mod=S.alibi,
                         score_mod_args=(SLOPES,))
    why = ex.verdicts["pallas"]
    assert "interpreter" in why and "bias" not in why and "score_mod" not in why


def test_gpu_refuses_score_mod_args_but_not_bias():
    """On GPU / TPU indexing score_mod_args does not lower: a clear refusal, not a compiler
    error; a bias and an argument-free score function are accepted."""
    import dataclasses

    from jaxattn.ops.backends import pallas as pallas_backend
    from jaxattn.ops.call import make_call

    q, k, v = (jnp.zeros(x.shape[:3] + (64,)) for x in _qkv())
    call, _ = make_call(q, k, v, score_mod=S.alibi, score_mod_args=(SLOPES,))
    assert pallas_backend.supports(call) is None
    why = pallas_backend.supports(dataclasses.replace(call, platform="gpu"))
    assert "score_mod_args" in why and "xla_chunked" in why
    call, _ = make_call(q, k, v, bias=jnp.zeros((T, SK)), score_mod=S.soft_cap(4.0))
    assert pallas_backend.supports(dataclasses.replace(call, platform="gpu")) is None


def _flash_grads(cfg, q, k, v, bias, **kw):
    from pallas_kernels import flash

    meta = flash.dense_meta(T, SK, 16, 16)

    def loss(q, k, v, bias):
        out = flash.flash_attention(q, k, v, meta, config=cfg, bias=bias, **kw)[0]
        return jnp.sum(jnp.sin(out))

    return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)


def test_triton_dbias_partial_sums_equal_the_accumulating_kernel(monkeypatch):
    """Triton has no sequential grid axes, so its dbias kernel writes per-(batch, head) partial
    tiles summed in XLA. Run that variant in the interpreter (lowering switched to interpret)
    and compare with the accumulating variant."""
    from pallas_kernels.flash import FlashConfig, lowering

    q, k, v = _qkv(seed=11)
    bias = _bias((1, 1, T, 1))  # broadcast over batch, heads and keys: every reduction
    want = _flash_grads(FlashConfig(16, 16, scale=0.25), q, k, v, bias)
    monkeypatch.setattr(lowering, "_interpret", lambda cfg: True)
    monkeypatch.setattr(lowering, "_compiler_params", lambda *a, **kw: None)
    got = _flash_grads(FlashConfig(16, 16, scale=0.25, backend="triton"), q, k, v, bias)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, atol=F32_GRAD_ATOL, rtol=0)


@pytest.mark.parametrize("backend,platform", [("triton", "cuda"), ("mosaic_tpu", "tpu")])
def test_bias_and_score_mod_lower_for_devices(backend, platform):
    """A broadcast bias and an argument-free score function lower (forward, dq, dk/dv, dbias)
    for Triton and Mosaic TPU from CPU (lowering rules only; nothing runs on a device)."""
    from pallas_kernels import flash

    q = jnp.zeros((1, 256, 2, 128), jnp.bfloat16)
    k = v = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
    bias = jnp.zeros((1, 2, 1, 256), jnp.bfloat16)
    meta = flash.dense_meta(256, 256, 128, 128)
    cfg = flash.FlashConfig(128, 128, scale=0.1, backend=backend)

    def loss(q, k, v, bias):
        out = flash.flash_attention(q, k, v, meta, config=cfg, bias=bias,
                                    score_mod=S.soft_cap(5.0))[0]
        return jnp.sum(out.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, v, bias).lower(
        lowering_platforms=(platform,)).as_text()
    for name in ("flash_fwd", "flash_dq", "flash_dkv", "flash_dbias"):
        assert name in text
