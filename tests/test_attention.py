"""dot_product_attention: every implementation against the reference and jax.nn."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import (
    F32_ATOL,
    F32_GRAD_ATOL,
    bf16_budget,
    grads,
    max_err,
    rand_inputs,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.extend import core as jex_core

import jaxattn
from jaxattn import masks as M
from jaxattn.core import chunked, dense, merge_partials

IMPLS = ["reference", "xla_chunked"]
T, S = 37, 53


def chunked_small(q, k, v, bias=None, mask=None, **kw):
    """The chunked path with tiny tiles so that every test exercises many tiles and padding."""
    return chunked.chunked_attention(q, k, v, bias, mask, block_q=16, block_kv=16, **kw)


# ---- agreement with jax.nn.dot_product_attention ------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", ["plain", "causal", "bias", "mask", "window"])
def test_matches_jax_nn(impl, heads, case):
    n, k = heads
    q, key, v = rand_inputs(1, t=T, s=S, n=n, k=k)
    r = np.random.default_rng(2)
    kw_ours, kw_jax = {}, {}
    if case == "causal":
        kw_ours = kw_jax = dict(is_causal=True)
    elif case == "bias":
        b = jnp.asarray(r.normal(size=(2, 1, T, S)), jnp.float32)
        kw_ours = kw_jax = dict(bias=b)
    elif case == "mask":
        m = jnp.asarray(r.random((1, n, T, S)) > 0.3)
        kw_ours = kw_jax = dict(mask=m)
    elif case == "window":
        kw_ours = dict(mask=M.LocalMask((5, 2)))
        kw_jax = dict(local_window_size=(5, 2))
    ours = jaxattn.dot_product_attention(q, key, v, implementation=impl, **kw_ours)
    ref = jax.nn.dot_product_attention(q, key, v, **kw_jax)
    chex.assert_shape(ours, (2, T, n, 16))
    chex.assert_trees_all_close(ours, ref, atol=F32_ATOL, rtol=0)


# ---- the chunked path against the reference: every mask kind, features, gradients ----------

SEG = np.sort(np.random.default_rng(3).integers(0, 4, (2, T)), axis=1)
MASK_CASES = {
    "none": None,
    "causal": M.CausalMask(),
    "causal_offset": M.CausalMask(offset=S - T),
    "local": M.LocalMask((7, 3)),
    "chunked": M.ChunkedCausalMask(8),
    "prefix": M.PrefixLMMask(10),
    "per_head": M.MultiHeadMask((M.CausalMask(), M.LocalMask((4, 0)), M.FullMask(),
                                 M.ChunkedCausalMask(5))),
    "array": M.ArrayMask(np.random.default_rng(4).random((T, S)) > 0.5),
    "composed": (M.LocalMask((3, 3)) | M.PrefixLMMask(6)) & ~M.ChunkedCausalMask(16),
    "lengths": M.LengthMask(kv_lengths=np.array([20, 53])),
}


@pytest.mark.parametrize("name", list(MASK_CASES))
def test_chunked_mask_kinds(name):
    q, k, v = rand_inputs(5, t=T, s=S)
    mask = MASK_CASES[name]
    ref = dense.attention_reference(q, k, v, mask=mask)
    out = chunked_small(q, k, v, mask=mask)
    assert max_err(out, ref) < F32_ATOL
    g_ref = grads(lambda q, k, v: dense.attention_reference(q, k, v, mask=mask), (q, k, v),
                  (0, 1, 2))
    g_out = grads(lambda q, k, v: chunked_small(q, k, v, mask=mask), (q, k, v), (0, 1, 2))
    for a, b in zip(g_out, g_ref, strict=True):
        assert max_err(a, b) < F32_GRAD_ATOL


def test_chunked_segment_ids_traced():
    """Segment ids arrive as traced arrays: tiles are skipped at run time, results exact."""
    q, k, v = rand_inputs(6, t=T, s=T)
    seg = jnp.asarray(SEG)

    @jax.jit
    def f(q, k, v, seg):
        return jaxattn.dot_product_attention(q, k, v, is_causal=True, query_segment_ids=seg,
                                             implementation="xla_chunked")

    ref = dense.attention_reference(q, k, v, mask=M.SegmentMask(SEG) & M.CausalMask())
    assert max_err(f(q, k, v, seg), ref) < F32_ATOL
    g = grads(lambda q, k, v: f(q, k, v, seg), (q, k, v), (0, 1, 2))
    g_ref = grads(lambda q, k, v: dense.attention_reference(
        q, k, v, mask=M.SegmentMask(SEG) & M.CausalMask()), (q, k, v), (0, 1, 2))
    for a, b in zip(g, g_ref, strict=True):
        assert max_err(a, b) < F32_GRAD_ATOL


@pytest.mark.parametrize("bias_shape", [(2, 4, T, S), (1, 4, 1, S), (2, 1, T, 1)])
def test_chunked_bias_and_dbias(bias_shape):
    q, k, v = rand_inputs(7, t=T, s=S)
    bias = jnp.asarray(np.random.default_rng(8).normal(size=bias_shape), jnp.float32)
    mask = M.CausalMask(offset=10)
    f_ref = lambda q, k, v, b: dense.attention_reference(q, k, v, b, mask)
    f_chk = lambda q, k, v, b: chunked_small(q, k, v, b, mask)
    assert max_err(f_chk(q, k, v, bias), f_ref(q, k, v, bias)) < F32_ATOL
    for a, b in zip(grads(f_chk, (q, k, v, bias), (0, 1, 2, 3)),
                    grads(f_ref, (q, k, v, bias), (0, 1, 2, 3)), strict=True):
        assert a.shape == b.shape
        assert max_err(a, b) < F32_GRAD_ATOL


def test_chunked_soft_cap_sinks_lse_and_head_dims():
    q, k, v = rand_inputs(9, t=T, s=S, n=6, k=2, h=8, hv=12)
    q = q * 3.0  # large logits so the cap matters
    sinks = jnp.asarray([0.5, -1.0, 2.0, 0.0, 1.0, -3.0], jnp.float32)
    kw = dict(mask=M.LocalMask((6, 0)), logits_soft_cap=5.0, sinks=sinks, scale=0.3)

    def both(fn):
        def loss_fn(q, k, v, s):
            out, lse = fn(q, k, v, **{**kw, "sinks": s}, return_lse=True)
            return out, lse
        return loss_fn

    out_r, lse_r = both(dense.attention_reference)(q, k, v, sinks)
    out_c, lse_c = both(chunked_small)(q, k, v, sinks)
    assert out_c.shape == (2, T, 6, 12)
    assert max_err(out_c, out_r) < F32_ATOL and max_err(lse_c, lse_r) < F32_ATOL

    def scalar(fn):
        def f(q, k, v, s):
            out, lse = fn(q, k, v, s)
            return jnp.sum(out * out) + jnp.sum(jnp.sin(lse))  # exercises the lse cotangent
        return f

    g_r = jax.grad(scalar(both(dense.attention_reference)), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    g_c = jax.grad(scalar(both(chunked_small)), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    for a, b in zip(g_c, g_r, strict=True):
        assert max_err(a, b) < 5 * F32_GRAD_ATOL  # sums of 6 heads x 74 rows of O(1) terms


def test_lse_is_logsumexp_of_logits():
    q, k, v = rand_inputs(10, t=T, s=S)
    _, lse = jaxattn.dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) * 16**-0.5
    logits = jnp.where(jnp.tril(jnp.ones((T, S), bool)), logits, -jnp.inf)
    expect = jnp.transpose(jax.nn.logsumexp(logits, axis=-1), (0, 2, 1))
    assert max_err(lse, expect) < F32_ATOL


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_within_budget(impl):
    q, k, v = rand_inputs(11, t=T, s=S, dtype=jnp.bfloat16)
    mask = M.CausalMask(offset=S - T) & M.LocalMask((20, 0))
    out = jaxattn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    assert out.dtype == jnp.bfloat16
    truth = dense.attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), mask=mask)
    assert max_err(out, truth) <= bf16_budget(q, k, v, mask=mask)
    g = grads(lambda q, k, v: jaxattn.dot_product_attention(q, k, v, mask=mask,
                                                            implementation=impl), (q, k, v), 0)
    g32 = grads(lambda q, k, v: dense.attention_reference(q, k, v, mask=mask),
                tuple(x.astype(jnp.float32) for x in (q, k, v)), 0)
    assert g.dtype == jnp.bfloat16
    # bf16 gradients: relative error a few bf16 ulps (2^-8) of the gradient's scale.
    assert max_err(g, g32) <= 8 * 2.0**-8 * float(jnp.max(jnp.abs(g32)))


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_give_zeros_and_finite_grads(impl):
    q, k, v = rand_inputs(12, t=8, s=8)
    allowed = np.tril(np.ones((8, 8), bool))
    allowed[3] = False  # row 3 sees nothing
    bias = jnp.zeros((1, 1, 8, 8), jnp.float32)
    f = lambda q, k, v, b: jaxattn.dot_product_attention(
        q, k, v, b, mask=allowed, implementation=impl, return_lse=True)
    out, lse = f(q, k, v, bias)
    assert jnp.all(out[:, 3] == 0) and jnp.all(jnp.isneginf(lse[:, 3]))
    assert jnp.all(jnp.isfinite(out))
    g = jax.grad(lambda *a: jnp.sum(f(*a)[0] ** 2), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for x in g:
        assert jnp.all(jnp.isfinite(x))
    assert jnp.all(g[0][:, 3] == 0)


def test_chunked_skips_empty_tiles():
    plan = chunked.plan_tiles(M.CausalMask(), 64, 64, 16, 16)
    assert (len(plan.full), len(plan.partial)) == (6, 4)
    plan = chunked.plan_tiles(M.LocalMask((8, 0)), 256, 256, 32, 32)
    assert plan.num_visited == 8 + 7  # diagonal + one sub-diagonal tile per row but the first
    # Concrete segment ids are known at trace time: two documents -> two diagonal blocks of tiles.
    ids = jnp.asarray(np.repeat([0, 1], 32)[None])
    plan = chunked.plan_tiles(M.SegmentMask(ids), 64, 64, 16, 16)
    assert not plan.dynamic and (len(plan.full), len(plan.partial)) == (8, 0)

    @jax.jit
    def traced(ids):  # traced ids: every tile is scheduled and skipped at run time if empty
        p = chunked.plan_tiles(M.SegmentMask(ids), 64, 64, 16, 16)
        assert p.dynamic and len(p.partial) == 16
        return ids

    traced(ids)


def test_merge_partials_equals_full():
    q, k, v = rand_inputs(13, t=T, s=S)
    full = dense.attention_reference(q, k, v)
    parts = [dense.attention_reference(q, k[:, sl], v[:, sl], return_lse=True)
             for sl in (slice(0, 20), slice(20, S))]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    assert max_err(out, full) < F32_ATOL


def test_dropout_deterministic_and_unbiased():
    q, k, v = rand_inputs(14, t=16, s=16)
    f = functools.partial(jaxattn.dot_product_attention, q, k, v, dropout_rate=0.5)
    a, b = f(dropout_rng=jax.random.key(0)), f(dropout_rng=jax.random.key(0))
    c = f(dropout_rng=jax.random.key(1))
    assert max_err(a, b) == 0.0 and max_err(a, c) > 1e-3
    # Unbiased: over 200 rngs every entry's mean is within 5 standard errors of the
    # no-dropout output (a z-test per entry; an absolute threshold would depend on the spread).
    samples = np.stack([np.asarray(f(dropout_rng=jax.random.key(i))) for i in range(200)])
    z = (samples.mean(0) - np.asarray(jaxattn.dot_product_attention(q, k, v))) / (
        samples.std(0) / np.sqrt(len(samples)))
    assert np.abs(z).max() < 5 and abs(z.mean()) < 0.2


@pytest.mark.parametrize("tiles", [(16, 16), (8, 32)])
def test_chunked_dropout_equals_reference_with_the_same_rng(tiles):
    """The dropout mask is a hash of global (b, n, i, j): any tiling drops the same entries, so
    forward and gradients match the reference exactly (up to float rounding)."""
    q, k, v = rand_inputs(21, t=T, s=S, n=4, k=2)
    kw = dict(dropout_rate=0.3, dropout_rng=jax.random.key(7), is_causal=True)
    impl = jaxattn.Implementation("xla_chunked", *tiles)
    ours = functools.partial(jaxattn.dot_product_attention, implementation=impl, **kw)
    ref = functools.partial(jaxattn.dot_product_attention, implementation="reference", **kw)
    assert max_err(ours(q, k, v), ref(q, k, v)) < F32_ATOL
    assert max_err(ours(q, k, v), jaxattn.dot_product_attention(q, k, v, is_causal=True)) > 0.1
    g, g_ref = grads(ours, (q, k, v), (0, 1, 2)), grads(ref, (q, k, v), (0, 1, 2))
    chex.assert_trees_all_close(g, g_ref, atol=F32_GRAD_ATOL, rtol=0)
    assert jaxattn.explain(q, k, v, **kw).chosen == "xla_chunked"


def test_dropout_keep_mask_statistics():
    from jaxattn.core import dropout as dlib

    seed = dlib.dropout_seed(jax.random.key(3))
    idx = [jnp.arange(d).reshape([-1 if i == j else 1 for j in range(4)])
           for i, d in enumerate((2, 4, 256, 256))]
    keep = np.asarray(dlib.keep_mask(seed, *idx, 0.25, 4))
    n = keep.size
    assert abs(keep.mean() - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)  # ~4 sigma
    for axis in (2, 3):  # neighbours along rows / columns are uncorrelated
        a, b = np.moveaxis(keep, axis, 0)[:-1].ravel(), np.moveaxis(keep, axis, 0)[1:].ravel()
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.02
    # different heads, batches and seeds give different masks
    assert (keep[0, 0] != keep[0, 1]).mean() > 0.3 and (keep[0, 0] != keep[1, 0]).mean() > 0.3
    other = np.asarray(dlib.keep_mask(dlib.dropout_seed(jax.random.key(4)), *idx, 0.25, 4))
    assert (keep != other).mean() > 0.3
    with pytest.raises(ValueError, match="dropout rate"):
        dlib.keep_mask(seed, *idx, 1.0, 4)


def test_rank3_and_jit():
    q, k, v = rand_inputs(15, b=1, t=T, s=S)
    out3 = jax.jit(lambda q, k, v: jaxattn.dot_product_attention(q, k, v, is_causal=True))(
        q[0], k[0], v[0])
    assert out3.shape == (T, 4, 16)
    assert max_err(out3, jaxattn.dot_product_attention(q, k, v, is_causal=True)[0]) < F32_ATOL


# ---- dispatch --------------------------------------------------------------------------------


def test_dispatch_and_explain_on_cpu():
    q, k, v = rand_inputs(16, t=T, s=S)
    e = jaxattn.explain(q, k, v, is_causal=True)
    assert e.chosen == "xla_chunked" and e.verdicts["reference"] is None
    assert "GPU" in e.verdicts["cudnn"]
    with pytest.raises(ValueError, match="cuDNN needs a GPU"):
        jaxattn.dot_product_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="unknown implementation"):
        jaxattn.dot_product_attention(q, k, v, implementation="magic")
    # dropout runs on the chunked path too (position-hash mask shared with the reference)
    assert jaxattn.explain(q, k, v, dropout_rate=0.1,
                           dropout_rng=jax.random.key(0)).chosen == "xla_chunked"
    assert "explain" not in str(jaxattn.explain(q, k, v))  # prints a readable table


def _scan_lengths(fn, *args):
    """Lengths of the ``lax.scan`` loops in ``fn``'s jaxpr (the chunked path's tile schedules)."""
    lengths = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                lengths.append(eqn.params["length"])
            for sub in jex_core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return lengths


def test_implementation_tile_sizes():
    q, k, v = rand_inputs(17, t=T, s=S)
    impl = jaxattn.Implementation("xla_chunked", block_q=16, block_kv=32)
    f = lambda q, k, v: jaxattn.dot_product_attention(q, k, v, implementation=impl)
    ref = jaxattn.dot_product_attention(q, k, v, implementation="reference")
    assert max_err(f(q, k, v), ref) < F32_ATOL
    # T=37 -> 3 query tiles of 16, S=53 -> 2 kv tiles of 32: 6 tiles (the last column partial).
    assert sorted(_scan_lengths(f, q, k, v)) == [3, 3]
    default = lambda q, k, v: jaxattn.dot_product_attention(q, k, v, implementation="xla_chunked")
    assert _scan_lengths(default, q, k, v) == [1]  # one 37 x 53 tile, padded keys: partial
    # Causal with tiles: the schedule follows the tile sizes and still matches the reference.
    causal = jaxattn.dot_product_attention(
        q, k, v, is_causal=True, implementation=jaxattn.Implementation("xla_chunked", 8, 8))
    assert max_err(causal, jaxattn.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation="reference")) < F32_ATOL
    # Gradients through the tiled path.
    g_ours = grads(lambda *a: jaxattn.dot_product_attention(*a, implementation=impl),
                   (q, k, v), (0, 1, 2))
    g_ref = grads(lambda *a: jaxattn.dot_product_attention(*a, implementation="reference"),
                  (q, k, v), (0, 1, 2))
    chex.assert_trees_all_close(g_ours, g_ref, atol=F32_GRAD_ATOL, rtol=0)
    with pytest.raises(ValueError, match="has no tiles"):
        jaxattn.dot_product_attention(
            q, k, v, implementation=jaxattn.Implementation("reference", block_q=16))
    with pytest.raises(ValueError, match="block_kv must be a positive int"):
        jaxattn.Implementation("xla_chunked", block_kv=0)
    with pytest.raises(TypeError, match="implementation must be"):
        jaxattn.dot_product_attention(q, k, v, implementation=3)
    assert hash(impl) == hash(jaxattn.Implementation("xla_chunked", 16, 32))  # jit-static


# ---- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_outputs_satisfy_the_declared_shape_contract(impl):
    """jaxattn.typing's aliases, one binding of B, T, S, N, K, H, Hv over inputs and outputs."""
    from jaxattn import typing as jt

    q, k, v = rand_inputs(18, t=T, s=S, n=4, k=2)
    v = v[..., :12]  # Hv != H
    out, lse = jaxattn.dot_product_attention(q, k, v, is_causal=True, return_lse=True,
                                             implementation=impl)
    jt.check_shapes(query=(q, jt.Query), key=(k, jt.Key), value=(v, jt.Value),
                    out=(out, jt.Output), lse=(lse, jt.LSE))
    with pytest.raises(TypeError, match="lse has shape"):
        jt.check_shapes(query=(q, jt.Query), lse=(lse[:, :-1], jt.LSE))
    with pytest.raises(TypeError, match="key has shape"):
        jt.check_shapes(query=(q, jt.Query), key=(k[..., :8], jt.Key))


def test_bad_inputs_raise_clear_errors():
    q, k, v = rand_inputs(17, t=8, s=8)
    f = jaxattn.dot_product_attention
    cases = [
        (lambda: f(q[0, 0], k, v), ValueError, "rank 4"),
        (lambda: f(q, k[:1], v[:1]), ValueError, "batch sizes differ"),
        (lambda: f(q, k, v[:, :5]), ValueError, "must agree"),
        (lambda: f(q[..., :8], k, v), ValueError, "head_dim"),
        (lambda: f(q[:, :, :3], k, v), ValueError, "multiple of key/value heads"),
        (lambda: f(q, k.astype(jnp.bfloat16), v), TypeError, "share a dtype"),
        (lambda: f(q.astype(jnp.int32), k, v), TypeError, "floating"),
        (lambda: f(q, k, v, mask=np.ones((9, 8), bool)), ValueError, "does not broadcast"),
        (lambda: f(q, k, v, mask=np.ones((8, 8), np.int32)), TypeError, "boolean"),
        (lambda: f(q, k, v, bias=jnp.zeros((3, 1, 8, 8))), ValueError, "bias"),
        (lambda: f(q, k, v, mask=M.MultiHeadMask((M.CausalMask(),) * 3)), ValueError, "heads"),
        (lambda: f(q, k, v, sinks=jnp.zeros(3)), ValueError, "sinks"),
        (lambda: f(q, k, v, logits_soft_cap=-1.0), ValueError, "soft_cap"),
        (lambda: f(q, k, v, dropout_rate=0.1), ValueError, "dropout_rng"),
        (lambda: f(q, k, v, query_segment_ids=jnp.zeros((2, 7), jnp.int32)), ValueError,
         "segment"),
        (lambda: f(q, k[:, :6], v[:, :6], query_segment_ids=jnp.zeros((2, 8), jnp.int32)),
         ValueError, "kv_segment_ids is required"),
        (lambda: M.LocalMask((-2, 0)), ValueError, "non-negative"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


# ---- random mask compositions end to end (hypothesis) -----------------------------------------

from test_masks import MASKS  # noqa: E402  (the same composition strategy)


@settings(max_examples=100, deadline=None)
@given(mask=MASKS, t=st.integers(1, 40), s=st.integers(1, 40))
def test_random_compositions_chunked_vs_reference(mask, t, s):
    q, k, v = rand_inputs(18, b=1, t=t, s=s, n=2, k=1, h=8)
    ref = dense.attention_reference(q, k, v, mask=mask)
    out = chunked.chunked_attention(q, k, v, None, mask, block_q=8, block_kv=8)
    assert max_err(out, ref) < F32_ATOL


@pytest.mark.parametrize("impl", IMPLS)
def test_additive_neg_inf_bias_rows(impl):
    """Additive masks (-inf in the bias) are common; a row masked only by the bias must give
    zeros and finite gradients on every path, including tiles the mask metadata calls full."""
    q, k, v = rand_inputs(19, t=8, s=8)
    bias = jnp.zeros((1, 1, 8, 8), jnp.float32).at[:, :, 3, :].set(-jnp.inf)
    f = lambda q, k, v: jaxattn.dot_product_attention(q, k, v, bias, implementation=impl)
    out = f(q, k, v)
    assert jnp.all(out[:, 3] == 0) and jnp.all(jnp.isfinite(out))
    for g in jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v):
        assert jnp.all(jnp.isfinite(g))
