"""dot_product_attention: what is not per-backend conformance.

The cases every backend must pass (masks, bias, soft-cap, sinks, segments, dropout, bf16, LSE,
jit, agreement with jax.nn, random mask compositions) live in ``tests/conformance/attention.py``
and run per backend from ``tests/test_backend_*.py``. Here: the chunked path's tile planning and
tile sizes, dispatch, argument validation, and the core helpers (``merge_partials``, the dropout
hash) on their own.
"""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_testing import F32_ATOL, F32_GRAD_ATOL, grads, jit_for_tests, max_err, rand_inputs
from jax.extend import core as jex_core

import jaxattn
from jaxattn import masks as M
from jaxattn.core import chunked, dense, merge_partials

T, S = 37, 53


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
    """Out AND lse of the merge equal attention over all keys, also with a part that sees no key
    (lse -inf everywhere) and rows that see no key in any part. The conformance suite merges
    each backend's partials the same way (``test_partials_merge_to_the_whole``).

    Catches: jaxattn/core/softmax.py ``merge_partials`` returning ``lse = safe_log(total)``
    instead of ``m + safe_log(total)`` (output still right), or taking ``jnp.max`` instead of
    ``safe_max`` over the parts (NaN on rows that are empty in every part)."""
    q, k, v = rand_inputs(13, t=T, s=S)
    allowed = np.tril(np.ones((T, S), bool))
    allowed[3] = False
    ref = jit_for_tests(functools.partial(dense.attention_reference, return_lse=True))
    full, full_lse = ref(q, k, v, mask=allowed)
    parts = [ref(q, k[:, sl], v[:, sl], mask=allowed[:, sl])
             for sl in (slice(0, 20), slice(20, S))]
    empty = ref(q, k, v, mask=np.zeros((T, S), bool))
    assert bool(np.all(np.isneginf(empty[1])))
    parts.append(empty)
    out, lse = jit_for_tests(merge_partials)([p[0] for p in parts], [p[1] for p in parts])
    assert max_err(out, full) < F32_ATOL
    finite = np.isfinite(np.asarray(full_lse))
    assert not finite.all() and np.array_equal(finite, np.isfinite(np.asarray(lse)))
    assert max_err(np.where(finite, lse, 0.0), np.where(finite, full_lse, 0.0)) < F32_ATOL


@pytest.mark.parametrize("tiles", [(8, 32)])
def test_chunked_dropout_equals_reference_with_the_same_rng(tiles):
    """The dropout mask is a hash of global (b, n, i, j): any tiling drops the same entries, so
    forward and gradients match the reference exactly (up to float rounding). 16 x 16 tiles:
    ``tests/test_backend_xla_chunked.py::TestXlaChunked::test_dropout_matches_spec``."""
    q, k, v = rand_inputs(21, t=T, s=S, n=4, k=2)
    kw = dict(dropout_rate=0.3, dropout_rng=jax.random.key(7), is_causal=True)
    impl = jaxattn.Implementation("xla_chunked", *tiles)
    ours = functools.partial(jaxattn.dot_product_attention, implementation=impl, **kw)
    ref = functools.partial(jaxattn.dot_product_attention, implementation="reference", **kw)
    plain = functools.partial(jaxattn.dot_product_attention, is_causal=True)
    out, out_ref, out_plain = jit_for_tests(lambda *a: (ours(*a), ref(*a), plain(*a)))(q, k, v)
    assert max_err(out, out_ref) < F32_ATOL
    assert max_err(out, out_plain) > 0.1
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
    # different heads, batches and seeds give different masks: EVERY two (batch, head) rows
    # (a row stride of N - 1 would give (b, N-1) and (b+1, 0) the same mask)
    rows = keep.reshape(-1, keep.shape[2] * keep.shape[3])
    for i, j in itertools.combinations(range(len(rows)), 2):
        assert (rows[i] != rows[j]).mean() > 0.3, f"(batch, head) rows {i} and {j} collide"
    other = np.asarray(dlib.keep_mask(dlib.dropout_seed(jax.random.key(4)), *idx, 0.25, 4))
    assert (keep != other).mean() > 0.3
    with pytest.raises(ValueError, match="dropout rate"):
        dlib.keep_mask(seed, *idx, 1.0, 4)


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
    assert max_err(jit_for_tests(f)(q, k, v), ref) < F32_ATOL
    # T=37 -> 3 query tiles of 16, S=53 -> 2 kv tiles of 32: 6 tiles (the last column partial).
    assert sorted(_scan_lengths(f, q, k, v)) == [3, 3]
    default = lambda q, k, v: jaxattn.dot_product_attention(q, k, v, implementation="xla_chunked")
    assert _scan_lengths(default, q, k, v) == [1]  # one 37 x 53 tile, padded keys: partial
    # Causal with tiles: the schedule follows the tile sizes and still matches the reference.
    causal = functools.partial(jaxattn.dot_product_attention, is_causal=True)
    out_8, out_ref = jit_for_tests(lambda *a: (
        causal(*a, implementation=jaxattn.Implementation("xla_chunked", 8, 8)),
        causal(*a, implementation="reference")))(q, k, v)
    assert max_err(out_8, out_ref) < F32_ATOL
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
