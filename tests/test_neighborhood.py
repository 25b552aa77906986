"""The NA reference against the spec: truth tables, window rules, an independent brute force, and
argument validation (jaxattn.core.neighborhood, jaxattn.ops.neighborhood)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.core import neighborhood as na
from jaxattn.ops.neighborhood import explain_neighborhood, neighborhood_attention
from jaxattn.ops.neighborhood_planner import plan_axis, plan_speedup

# The spec's truth tables, literally (rows = queries, columns = keys).
TABLES = {
    # (L, k, d, s, causal): table
    (8, 4, 1, 1, True): """
        1....... 11...... 111..... 1111.... .1111... ..1111.. ...1111. ....1111""",
    (8, 4, 1, 4, True): """
        1....... 11...... 111..... 1111.... ....1... ....11.. ....111. ....1111""",
    (9, 3, 1, 2, False): """
        111...... 111...... ..111.... ..111.... ....111.. ....111.. ......111 ......111
        ......111""",
    (9, 3, 2, 1, False): """
        1.1.1.... .1.1.1... 1.1.1.... .1.1.1... ..1.1.1.. ...1.1.1. ....1.1.1 ...1.1.1.
        ....1.1.1""",
}


@pytest.mark.parametrize("cfg", list(TABLES))
def test_truth_tables(cfg):
    length, k, d, s, causal = cfg
    want = np.array([[ch == "1" for ch in row] for row in TABLES[cfg].split()])
    np.testing.assert_array_equal(na.neighborhood_mask_1d(length, k, d, s, causal), want)


def test_spec_examples():
    assert list(na.window_bounds_1d(9, 5)[2]) == [0, 0, 0, 1, 2, 3, 4, 4, 4]
    # blocked attention: the last partial block is shifted back, not shortened
    assert list(na.window_bounds_1d(10, 4, 1, 4)[2]) == [0, 0, 0, 0, 4, 4, 4, 4, 6, 6]
    # sliding-tile attention as a GNA corner case: tile-aligned starts 0,0,4,...,36,36
    starts = na.window_bounds_1d(48, 12, 1, 4)[2]
    assert list(starts[::4]) == [0, 0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 36]
    # dilation group lengths for L=10, d=3 are [4, 3, 3]
    g, c, _, _ = na.window_bounds_1d(10, 3, 3)
    assert [int((g == i).sum()) for i in range(3)] == [4, 3, 3]


def _flex_mask_1d(length, k, d, s, causal):
    """NATTEN's Flex mask_mod form, written independently from the reference (per key/query)."""
    wl, wr = k // 2, k // 2 + k % 2 - 1
    out = np.zeros((length, length), bool)
    for qx in range(length):
        for kx in range(length):
            if qx % d != kx % d:
                continue
            g, qc, kc = qx % d, qx // d, kx // d
            lg = len(range(g, length, d))
            if causal:
                leader = min(qc // s * s + s - 1, lg - 1)
                ok = max(leader - k + 1, 0) <= kc <= qc
            else:
                leader = min(qc // s * s + s // 2, lg - 1)
                center = min(max(leader, wl), lg - 1 - wr)
                ok = center - wl <= kc <= center + wr
            out[qx, kx] = ok
    return out


def test_reference_matches_flex_form_exhaustively():
    for length in range(2, 15):
        for k in range(2, length + 1):
            for d in range(1, length // k + 1):
                for s in range(1, k + 1):
                    for causal in (False, True):
                        got = na.neighborhood_mask_1d(length, k, d, s, causal)
                        want = _flex_mask_1d(length, k, d, s, causal)
                        assert (got == want).all(), (length, k, d, s, causal)
                        if not causal:  # windows shift, never shrink: exactly k keys
                            assert (got.sum(1) == k).all()
                        assert got[np.arange(length), np.arange(length)].all()  # sees itself


def test_mask_is_kronecker_of_axes():
    m = na.neighborhood_mask((5, 6), (2, 3), (2, 1), (1, 3), (True, False))
    a = na.neighborhood_mask_1d(5, 2, 2, 1, True)
    b = na.neighborhood_mask_1d(6, 3, 1, 3, False)
    for (qi, qj, ki, kj) in itertools.product(range(5), range(6), range(5), range(6)):
        assert m[qi * 6 + qj, ki * 6 + kj] == (a[qi, ki] and b[qj, kj])


def _brute_force(q, k, v, kernel, dilation, stride, causal, table=None, scale=None):
    """Loop over queries in NumPy (f64) using the Flex form masks and explicit RPB indices."""
    b, *spatial, n, h = q.shape
    kh = k.shape[-2]
    scale = h**-0.5 if scale is None else scale
    masks = [_flex_mask_1d(spatial[i], kernel[i], dilation[i], stride[i], causal[i])
             for i in range(len(spatial))]
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for bi in range(b):
        for qpos in itertools.product(*map(range, spatial)):
            keys = [kp for kp in itertools.product(*map(range, spatial))
                    if all(masks[i][qpos[i], kp[i]] for i in range(len(spatial)))]
            for hn in range(n):
                kv = hn // (n // kh)
                logits = np.array([q[(bi, *qpos, hn)] @ k[(bi, *kp, kv)] for kp in keys]) * scale
                if table is not None:
                    logits += np.array([table[(hn, *(
                        kp[i] // dilation[i] - qpos[i] // dilation[i] + kernel[i] - 1
                        for i in range(len(spatial))))] for kp in keys])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                vals = [v[(bi, *kp, kv)] for kp in keys]
                out[(bi, *qpos, hn)] = sum(pi * vi for pi, vi in zip(p, vals, strict=True))
    return out


@pytest.mark.parametrize("spatial,kernel,dilation,stride,causal", [
    ((11,), (4,), (2,), (3,), (False,)),
    ((5, 6), (2, 3), (2, 1), (2, 3), (True, False)),
    ((3, 4, 5), (2, 2, 3), (1, 2, 1), (1, 1, 3), (False, True, False)),
])
def test_reference_vs_brute_force(spatial, kernel, dilation, stride, causal):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(1, *spatial, 2, 4))
    k = rng.normal(size=(1, *spatial, 1, 4))
    v = rng.normal(size=(1, *spatial, 1, 3))
    table = rng.normal(size=(2, *(2 * x - 1 for x in kernel)))
    want = _brute_force(q, k, v, kernel, dilation, stride, causal, table)
    f = lambda x: jnp.asarray(x, jnp.float32)
    # jitted: one compilation instead of one per op
    got = jax.jit(lambda q, k, v, table: na.neighborhood_attention_reference(
        q, k, v, kernel, dilation=dilation, stride=stride, is_causal=causal, bias=table))(
        f(q), f(k), f(v), f(table))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_additional_kv_is_an_unmasked_softmax_join():
    rng = np.random.default_rng(1)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    q, k, v = f(1, 7, 2, 4), f(1, 7, 2, 4), f(1, 7, 2, 4)
    ak, av = f(1, 3, 2, 4), f(1, 3, 2, 4)
    got = jax.jit(lambda q, k, v, ak, av: na.neighborhood_attention_reference(
        q, k, v, 3, is_causal=True, additional_keys=ak, additional_values=av))(q, k, v, ak, av)
    # query 0 (causal) sees key 0 plus all 3 extra keys
    keys = jnp.concatenate([k[:, :1], ak], 1)[0, :, 0]
    vals = jnp.concatenate([v[:, :1], av], 1)[0, :, 0]
    p = jnp.exp(keys @ q[0, 0, 0] * 0.5)
    np.testing.assert_allclose(got[0, 0, 0], (p / p.sum()) @ vals, rtol=1e-5, atol=1e-6)


# ---- validation --------------------------------------------------------------------------------


def _qkv(shape, kv_heads=None, dtype=jnp.float32):
    q = jnp.zeros(shape, dtype)
    kshape = shape[:-2] + ((kv_heads or shape[-2]), shape[-1])
    return q, jnp.zeros(kshape, dtype), jnp.zeros(kshape, dtype)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=5, dilation=2), "kernel_size \\* dilation"),
    (dict(kernel_size=(3, 9)), "kernel_size \\* dilation"),
    (dict(kernel_size=1), "kernel_size must be >= 2"),
    (dict(kernel_size=3, stride=4), "1 <= stride <= kernel_size"),
    (dict(kernel_size=3, stride=0), "1 <= stride <= kernel_size"),
    (dict(kernel_size=3, dilation=0), "dilation must be >= 1"),
    (dict(kernel_size=(3, 3, 3)), "3 entries but the input has 2"),
])
def test_validation_window_args(kwargs, match):
    q, k, v = _qkv((1, 8, 7, 2, 4))
    with pytest.raises(ValueError, match=match):
        neighborhood_attention(q, k, v, **kwargs)


def test_validation_types_and_shapes():
    q, k, v = _qkv((1, 8, 7, 2, 4))
    with pytest.raises(TypeError, match="kernel_size"):
        neighborhood_attention(q, k, v, 3.0)
    with pytest.raises(TypeError, match="is_causal"):
        neighborhood_attention(q, k, v, 3, is_causal=1)
    with pytest.raises(ValueError, match="rank 4, 5 or 6"):
        neighborhood_attention(q[0, 0], k[0, 0], v[0, 0], 3)
    with pytest.raises(ValueError, match="rank 4, 5 or 6"):
        neighborhood_attention(q, k[:, 0], v, 3)
    with pytest.raises(ValueError, match="B, \\*spatial"):
        neighborhood_attention(q, k[:, :7], v[:, :7], 3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        neighborhood_attention(*_qkv((1, 8, 7, 3, 4), kv_heads=2), 3)
    with pytest.raises(ValueError, match="head_dim"):
        neighborhood_attention(q, k[..., :3], v, 3)
    with pytest.raises(TypeError, match="share a dtype"):
        neighborhood_attention(q, k.astype(jnp.bfloat16), v, 3)
    with pytest.raises(TypeError, match="floating"):
        neighborhood_attention(q.astype(jnp.int32), k, v, 3)
    with pytest.raises(ValueError, match="relative-position table"):
        neighborhood_attention(q, k, v, 3, bias=jnp.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match="together"):
        neighborhood_attention(q, k, v, 3, additional_keys=jnp.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match="S_extra"):
        neighborhood_attention(q, k, v, 3, additional_keys=jnp.zeros((1, 2, 1, 4)),
                               additional_values=jnp.zeros((1, 2, 1, 4)))
    with pytest.raises(ValueError, match="unknown implementation"):
        neighborhood_attention(q, k, v, 3, implementation="nope")


def test_gqa_equals_repeated_kv():
    rng = np.random.default_rng(2)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    q, k, v = f(2, 6, 5, 4, 8), f(2, 6, 5, 2, 8), f(2, 6, 5, 2, 8)
    attend = jax.jit(lambda q, k, v: neighborhood_attention(q, k, v, 3, implementation="reference"))
    got = attend(q, k, v)
    rep = lambda x: jnp.repeat(x, 2, axis=-2)
    want = attend(q, rep(k), rep(v))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_dispatch_defaults_to_xla_on_cpu():
    q, k, v = _qkv((1, 8, 2, 4))
    ex = explain_neighborhood(q, k, v, 3)
    assert ex.chosen == "xla", str(ex)


# ---- planner -------------------------------------------------------------------------------


def test_planner_gna_claims():
    # FLUX-4K GNA (window 80, stride 16) with 16x16 / 16x8 tiles is perfectly block-sparse at the
    # spec's 10.2x FLOP bound; the same window at stride 1 is not.
    gna = plan_speedup((256, 256), 80, stride=16, q_tile=(16, 16), kv_tile=(16, 8))
    assert gna.perfectly_block_sparse and abs(gna.ideal_speedup - 10.24) < 1e-6
    na_plan = plan_speedup((256, 256), 80, q_tile=(16, 16), kv_tile=(16, 8))
    assert not na_plan.perfectly_block_sparse and na_plan.ideal_speedup < gna.ideal_speedup
    # 1-D w=2048, s=256 with 256/128 tiles is fully block-sparse; s=128 is not
    assert plan_speedup((32768,), 2048, stride=256, q_tile=256, kv_tile=128).perfectly_block_sparse
    assert not plan_speedup((32768,), 2048, stride=128, q_tile=256,
                            kv_tile=128).perfectly_block_sparse


def test_planner_counts_match_dense_mask():
    for spatial, k, d, s, c, tq, tkv in [((13, 11), (3, 4), (2, 1), (2, 4), (True, False), 4, 3),
                                         ((20,), 5, 1, 5, False, 5, 5)]:
        plan = plan_speedup(spatial, k, dilation=d, stride=s, is_causal=c, q_tile=tq,
                            kv_tile=tkv)
        # brute force on the permuted (dilation-grouped) token order, 1-D tiles per axis
        nd = len(spatial)
        ks, ds, ss = (na.normalize_params(spatial, k, d, s, c).__dict__[f] for f in
                      ("kernel_size", "dilation", "stride"))
        cs = c if isinstance(c, tuple) else (c,) * nd
        visited = full = 1
        for i in range(nd):
            m = na.neighborhood_mask_1d(spatial[i], ks[i], ds[i], ss[i], cs[i])
            v_i = f_i = 0
            for g in range(ds[i]):
                sub = m[g::ds[i], g::ds[i]]
                for a in range(0, sub.shape[0], tq):
                    for b in range(0, sub.shape[1], tkv):
                        blk = sub[a:a + tq, b:b + tkv]
                        v_i += bool(blk.any())
                        f_i += bool(blk.all())
            visited, full = visited * v_i, full * f_i
        assert (plan.visited_tiles, plan.full_tiles) == (visited, full)
        mask = na.neighborhood_mask(spatial, k, d, s, c)
        assert abs(plan.attended_fraction - mask.mean()) < 1e-12


def test_plan_axis_halo_covers_every_window():
    for length, k, d, s, c, t in [(13, 4, 2, 1, False, 3), (50, 7, 3, 7, True, 4),
                                  (31, 9, 1, 3, False, 8)]:
        a = plan_axis(length, k, d, s, c, t)
        for g in range(d):
            for tile in range(a.num_tiles):
                sl = slice(tile * t, (tile + 1) * t)
                valid = a.q_valid[g, sl]
                if valid.any():
                    assert a.offsets[g, tile] <= a.q_start[g, sl][valid].min()
                    assert a.offsets[g, tile] + a.halo >= a.q_end[g, sl][valid].max()
