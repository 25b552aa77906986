"""Mask algebra: each mask against its defining formula, composition, block metadata, pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxattn import masks as M

T, S = 13, 17
QI, KI = np.arange(T)[:, None], np.arange(S)[None, :]


@pytest.mark.parametrize(
    "mask, expected",
    [
        (M.FullMask(), np.ones((T, S), bool)),
        (M.CausalMask(), KI <= QI),
        (M.CausalMask(offset=S - T), KI <= QI + S - T),
        (M.LocalMask((3, 2)), (KI >= QI - 3) & (KI <= QI + 2)),
        (M.LocalMask((4, 0)), (KI >= QI - 4) & (KI <= QI)),
        (M.LocalMask((None, 1)), KI <= QI + 1),
        (M.ChunkedCausalMask(4), (KI <= QI) & (KI // 4 == QI // 4)),
        (M.PrefixLMMask(5), (KI <= QI) | (KI < 5)),
        (~M.CausalMask(), ~(KI <= QI)),
        (M.CausalMask() | M.LocalMask((0, 3)), (KI <= QI) | ((KI >= QI) & (KI <= QI + 3))),
    ],
)
def test_mask_matches_formula(mask, expected):
    np.testing.assert_array_equal(mask.to_array(T, S), expected)


def test_segment_mask():
    q = np.array([[0, 0, 1, 1, 2], [5, 5, 5, 6, 6]])
    kv = np.array([[0, 1, 1, 2], [6, 6, 5, 5]])
    m = M.SegmentMask(q, kv).to_array(5, 4)
    assert m.shape == (2, 1, 5, 4)
    np.testing.assert_array_equal(m[:, 0], q[:, :, None] == kv[:, None, :])
    with pytest.raises(ValueError, match="do not match"):
        M.SegmentMask(q, kv).to_array(5, 5)


def test_length_mask():
    m = M.LengthMask(kv_lengths=np.array([2, 4]), q_lengths=np.array([3, 1])).to_array(3, 4)
    expect = np.zeros((2, 1, 3, 4), bool)
    expect[0, 0, :3, :2] = True
    expect[1, 0, :1, :4] = True
    np.testing.assert_array_equal(m, expect)


def test_prefix_lm_per_example():
    m = M.PrefixLMMask(np.array([0, 3])).to_array(4, 4)
    np.testing.assert_array_equal(m[0, 0], np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(m[1, 0, 0], [True, True, True, False])


def test_modality_mutual_mask_aki():
    # [text(0) x2 | image(1) x3 | question text(0) x2 | answer text(0) x2], answer_start = 7
    ids = np.array([0, 0, 1, 1, 1, 0, 0, 0, 0])
    m = M.ModalityMutualMask(ids, answer_start=7).to_array(9, 9)
    causal = np.tril(np.ones((9, 9), bool))
    img, question, answer = slice(2, 5), slice(5, 7), slice(7, 9)
    assert m[img, question].all()  # image tokens see the later question
    assert not m[img, answer].any()  # ...but never the answer (no label leak)
    assert not (m & ~causal)[answer].any()  # answer rows are plain causal
    assert (m >= causal).all()  # never hides what causal shows
    # The released AKI code: only image rows look forward.
    m2 = M.ModalityMutualMask(ids, answer_start=7, forward_modality=1).to_array(9, 9)
    np.testing.assert_array_equal(m2[:2], causal[:2])
    assert m2[img, question].all()


def test_multi_head_mask():
    mh = M.MultiHeadMask((M.CausalMask(), M.LocalMask((1, 1)), M.FullMask()))
    a = mh.to_array(T, S)
    assert a.shape == (3, T, S) and mh.num_heads == 3
    np.testing.assert_array_equal(a[1], M.LocalMask((1, 1)).to_array(T, S))


def test_array_mask_and_bad_inputs():
    arr = np.random.default_rng(0).random((T, S)) > 0.5
    np.testing.assert_array_equal(M.ArrayMask(arr).to_array(T, S), arr)
    with pytest.raises(TypeError, match="boolean"):
        M.ArrayMask(arr.astype(np.int32))
    with pytest.raises(ValueError, match="does not broadcast"):
        M.ArrayMask(arr).to_array(T + 1, S)
    with pytest.raises(ValueError, match="non-negative"):
        M.LocalMask((-1, 2))
    with pytest.raises(ValueError, match="positive"):
        M.ChunkedCausalMask(0)


def test_masks_are_hashable_and_equal_by_value():
    assert M.CausalMask() == M.CausalMask() and hash(M.CausalMask()) == hash(M.CausalMask())
    assert M.LocalMask((2, 2)) != M.LocalMask((2, 3))
    a = np.eye(4, dtype=bool)
    assert M.ArrayMask(a) == M.ArrayMask(a.copy())


def test_mask_pytree_through_jit():
    seg = jnp.array([[0, 0, 1, 1]])
    mask = M.SegmentMask(seg) & M.CausalMask()

    @jax.jit
    def f(m):
        assert not m.is_static  # traced ids
        return m.to_array(4, 4)

    np.testing.assert_array_equal(f(mask), mask.to_array(4, 4))


def _check_block_info(mask, t, s, bq, bk):
    info = mask.block_info(t, s, bq, bk)
    dense = np.asarray(mask.to_array(t, s))
    dense = dense.reshape((1,) * (4 - dense.ndim) + dense.shape)
    nq, nk = info.grid
    padded = np.zeros(dense.shape[:2] + (nq * bq, nk * bk), bool)
    padded[..., :t, :s] = dense
    for b in range(info.kind.shape[0]):
        for n in range(info.kind.shape[1]):
            for i in range(nq):
                for j in range(nk):
                    tile = padded[b, n, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
                    rows = tile[: max(0, min(bq, t - i * bq))]
                    kind = info.kind[b, n, i, j]
                    if not rows.any():
                        assert kind == M.EMPTY
                    elif rows.all() and (j + 1) * bk <= s:
                        assert kind == M.FULL
                    else:
                        assert kind == M.PARTIAL
                        blk = info.partial_blocks[info.partial_index[b, n, i, j]]
                        np.testing.assert_array_equal(blk[: rows.shape[0]], rows)
    assert info.num_visited == int((info.kind != M.EMPTY).sum())
    return info


def test_block_info_causal_counts():
    info = _check_block_info(M.CausalMask(), 64, 64, 16, 16)
    assert (info.num_empty, info.num_partial, info.num_full) == (6, 4, 6)
    assert info.partial_blocks.shape[0] == 1  # the four diagonal tiles are deduplicated


def test_block_info_unaligned_and_per_head():
    _check_block_info(M.LocalMask((5, 3)), 37, 53, 8, 16)
    _check_block_info(M.MultiHeadMask((M.CausalMask(), M.LocalMask((2, 0)))), 20, 20, 8, 8)
    _check_block_info(M.FullMask(), 10, 21, 4, 8)  # last kv tile is padded -> PARTIAL


def test_block_info_refuses_traced_masks():
    @jax.jit
    def f(ids):
        M.SegmentMask(ids).block_info(4, 4, 2, 2)

    with pytest.raises(ValueError, match="traced"):
        f(jnp.zeros((1, 4), jnp.int32))


# ---- random compositions (hypothesis): metadata must agree with the dense mask -------------

_LEAVES = st.one_of(
    st.builds(M.CausalMask, offset=st.integers(-6, 6)),
    st.builds(
        M.LocalMask,
        window=st.tuples(st.one_of(st.none(), st.integers(0, 9)),
                         st.one_of(st.none(), st.integers(0, 9))),
        offset=st.integers(-4, 4),
    ),
    st.builds(M.ChunkedCausalMask, chunk_size=st.integers(1, 9)),
    st.builds(M.PrefixLMMask, prefix_len=st.integers(0, 12)),
    st.builds(M.SinkMask, num_sinks=st.integers(0, 6)),
    st.just(M.FullMask()),
)
MASKS = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.builds(lambda a, b: a & b, inner, inner),
        st.builds(lambda a, b: a | b, inner, inner),
        st.builds(lambda a: ~a, inner),
    ),
    max_leaves=4,
)


@settings(max_examples=200, deadline=None)
@given(mask=MASKS, t=st.integers(1, 24), s=st.integers(1, 24),
       bq=st.sampled_from([1, 4, 8]), bk=st.sampled_from([1, 4, 8]))
def test_random_compositions_block_info(mask, t, s, bq, bk):
    _check_block_info(mask, t, s, bq, bk)


# ---- composites: one CompositeMask base; &, |, ~ results pickle, hash and flatten by value ---


def _composites():
    seg = np.array([[0, 0, 1, 1, 1, 2]], np.int32)  # int32: jnp.asarray keeps it (no x64)
    return [
        M.CausalMask() & M.LocalMask((2, 0)),
        M.CausalMask() | M.PrefixLMMask(2),
        ~M.SegmentMask(seg),
        ~(M.SegmentMask(seg) & M.CausalMask()) | M.FullMask(),
        M.MultiHeadMask((M.CausalMask(), M.SegmentMask(seg))),
    ]


def test_composites_share_the_composite_base():
    a, b, c = M.CausalMask(), M.LocalMask((1, 1)), M.FullMask()
    for m, cls, children in [(a & b, M.AndMask, (a, b)), (a | b, M.OrMask, (a, b)),
                             (~a, M.NotMask, (a,)), (M.MultiHeadMask((a, b, c)), M.MultiHeadMask,
                                                     (a, b, c))]:
        assert type(m) is cls and isinstance(m, M.CompositeMask)
        assert m.children() == children
    assert not isinstance(a | b, M.AndMask) and (a | b) != (a & b)
    assert not isinstance(a, M.CompositeMask)


@pytest.mark.parametrize("mask", _composites())
def test_composite_pickle_hash_and_pytree_by_value(mask):
    import pickle

    again = pickle.loads(pickle.dumps(mask))
    assert again == mask and hash(again) == hash(mask)
    np.testing.assert_array_equal(again.to_array(6, 6), mask.to_array(6, 6))
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    assert len(leaves) == len(mask._arrays())  # leaves are exactly the children's arrays
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt == mask and jax.tree_util.tree_structure(again) == treedef


@pytest.mark.parametrize("mask", _composites())
def test_composite_static_form(mask):
    as_jax = jax.tree_util.tree_map(jnp.asarray, mask)
    static = as_jax.static()
    assert static == mask and all(isinstance(a, np.ndarray) for a in static._arrays())
    has_arrays = bool(mask._arrays())

    @jax.jit
    def f(m):
        assert (m.static() is None) == has_arrays and m.is_static == (not has_arrays)
        return m.to_array(6, 6)

    np.testing.assert_array_equal(f(as_jax), mask.to_array(6, 6))


def test_sink_mask_composes_with_a_causal_window():
    from jaxattn.masks import EMPTY, CausalMask, LocalMask, SinkMask

    m = (LocalMask((2, 0)) | SinkMask(3)) & CausalMask()
    a = np.asarray(m.to_array(10, 10))  # [T, S]: no batch or head dependence
    q, k = np.arange(10)[:, None], np.arange(10)[None, :]
    np.testing.assert_array_equal(a, ((q - k <= 2) | (k < 3)) & (k <= q))
    info = m.block_info(10, 10, 2, 2)  # structure survives: some tiles empty, some full
    assert (np.asarray(info.kind) == EMPTY).any()
    with pytest.raises(ValueError, match="num_sinks"):
        SinkMask(-1)


def test_length_mask_accepts_a_scalar_length():
    from jaxattn.masks import LengthMask

    a = np.asarray(LengthMask(kv_lengths=5).to_array(4, 8))  # batch-independent: [T, S]
    assert a.shape == (4, 8) and LengthMask(kv_lengths=5).batch_size is None
    np.testing.assert_array_equal(a, np.broadcast_to(np.arange(8) < 5, (4, 8)))
    per_row = np.asarray(LengthMask(kv_lengths=np.array([5, 5])).to_array(4, 8))  # [B,1,T,S]
    np.testing.assert_array_equal(per_row[1, 0], a)


def test_segment_ids_from_lengths_and_cu_seqlens():
    import jax
    import jax.numpy as jnp

    from jaxattn.masks import segment_ids_from_cu_seqlens, segment_ids_from_lengths

    ids = segment_ids_from_lengths(np.array([[2, 0, 3], [4, 1, 1]]), 7)
    np.testing.assert_array_equal(ids, [[0, 0, 2, 2, 2, -1, -1], [0, 0, 0, 0, 1, 2, -1]])
    traced = jax.jit(lambda n: segment_ids_from_lengths(n, 7))(jnp.array([[2, 0, 3], [4, 1, 1]]))
    np.testing.assert_array_equal(traced, ids)
    np.testing.assert_array_equal(segment_ids_from_cu_seqlens(np.array([0, 3, 5])),
                                  [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(segment_ids_from_cu_seqlens(np.array([0, 3, 5]), 7),
                                  [0, 0, 0, 1, 1, -1, -1])
    with pytest.raises(ValueError, match="total_length"):
        segment_ids_from_lengths(np.array([3, 5]), 7)
    with pytest.raises(TypeError, match="integer"):
        segment_ids_from_lengths(np.array([1.0, 2.0]), 7)
