"""Vectorised MQAR: ``mqar_batch`` / ``MQARSource.get_batch`` give the per-example generator's
examples bit for bit, and the emulated ``default_rng([seed, index])`` lanes match NumPy."""

import numpy as np
import pytest

from jaxattn.train.data import eval_batches, has_batch_entry, train_dataset
from jaxattn.train.sources._lanes import Lanes
from jaxattn.train.sources.mqar import MQARSource, mqar_batch, mqar_example

# (V, L, K) of the quick preset (its grid and extra points) and of the paper's sweep
_SHAPES = [(256, 32, 4), (256, 64, 4), (256, 32, 2), (256, 64, 2), (256, 128, 8),
           (8192, 64, 4), (8192, 128, 8), (8192, 256, 16)]
_SEEDS = [0, 1, 12345, 2**31 - 1, 2**31, 2**31 + 7]  # train and test seed ranges


def _indices(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed % 1000)
    return np.concatenate([[0, 1, 2], rng.integers(0, 100_000, 29), [2**32 - 1]])


class _PerExample:
    """The source without its batch entry: the loop falls back to ``src[i]``."""

    def __init__(self, src):
        self.src = src

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        return self.src[i]


@pytest.mark.parametrize("random_non_queries", [False, True])
@pytest.mark.parametrize("shape", _SHAPES, ids=lambda s: f"V{s[0]}-L{s[1]}-K{s[2]}")
def test_batch_equals_per_example_generator(shape, random_non_queries):
    v, seq, k = shape
    for seed in _SEEDS:
        idx = _indices(seed)
        inputs, labels = mqar_batch(seed, idx, vocab_size=v, seq_len=seq, num_kv_pairs=k,
                                    random_non_queries=random_non_queries)
        assert inputs.shape == labels.shape == (len(idx), seq)
        assert inputs.dtype == labels.dtype == np.int32
        for row, i in enumerate(idx):
            want = mqar_example(np.random.default_rng([seed, int(i)]), vocab_size=v,
                                seq_len=seq, num_kv_pairs=k,
                                random_non_queries=random_non_queries)
            np.testing.assert_array_equal(inputs[row], want[0], err_msg=f"seed {seed} i {i}")
            np.testing.assert_array_equal(labels[row], want[1], err_msg=f"seed {seed} i {i}")


def test_batch_equals_per_example_with_passes_and_power():
    idx = np.arange(40)
    got = mqar_batch(5, idx, vocab_size=300, seq_len=96, num_kv_pairs=6, num_passes=2,
                     power_a=0.3)
    for row, i in enumerate(idx):
        want = mqar_example(np.random.default_rng([5, int(i)]), vocab_size=300, seq_len=96,
                            num_kv_pairs=6, num_passes=2, power_a=0.3)
        np.testing.assert_array_equal(got[0][row], want[0])
        np.testing.assert_array_equal(got[1][row], want[1])


def test_source_get_batch_equals_getitem_and_checks_indices():
    src = MQARSource(vocab_size=128, seq_len=32, num_kv_pairs=4, num_examples=50, seed=3,
                     split="test")
    assert has_batch_entry(src) and not has_batch_entry(_PerExample(src))
    idx = np.array([49, 0, 7, 7, 13])
    batch = src.get_batch(idx)
    for row, i in enumerate(idx):
        np.testing.assert_array_equal(batch["inputs"][row], src[int(i)]["inputs"])
        np.testing.assert_array_equal(batch["labels"][row], src[int(i)]["labels"])
    with pytest.raises(IndexError):
        src.get_batch(np.array([0, 50]))
    with pytest.raises(IndexError):
        src.get_batch(np.array([-1]))


@pytest.mark.parametrize("process_count", [1, 2])
def test_pipelines_with_batch_entry_equal_per_example(process_count):
    src = MQARSource(vocab_size=128, seq_len=32, num_kv_pairs=2, num_examples=200)
    for pi in range(process_count):
        kw = dict(global_batch_size=16, process_index=pi, process_count=process_count)
        fast = train_dataset(src, seed=3, **kw)
        slow = train_dataset(_PerExample(src), seed=3, **kw)
        for step in (0, 1, 12, 13, 40):  # across an epoch boundary (200 / 16 per process)
            for key in ("inputs", "labels"):
                np.testing.assert_array_equal(fast[step][key], slow[step][key])
        got = list(eval_batches(src, max_examples=30, **kw))
        want = list(eval_batches(_PerExample(src), max_examples=30, **kw))
        assert [n for _, n in got] == [n for _, n in want]
        for (a, _), (b, _) in zip(got, want, strict=True):
            np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_lanes_match_numpy_generator():
    idx = np.array([0, 1, 5, 2**32 - 1, 123456])
    for seed in (0, 2**31 + 5):
        lanes = Lanes(seed, idx, draws=4)
        raw = lanes.raw(20)  # past the first block: extends it
        d1 = lanes.doubles(np.array([3, 0, 1, 2, 3]))
        u = lanes.bounded(126)
        b = lanes.bounded(np.array([0, 1, 2, 3, 4]))
        d2 = lanes.doubles(np.full(5, 2))
        w = lanes.bounded_many(99, 13)
        for row, i in enumerate(idx):
            gen = np.random.default_rng([seed, int(i)])
            np.testing.assert_array_equal(
                raw[row], np.random.default_rng([seed, int(i)]).bit_generator.random_raw(20))
            n1 = [3, 0, 1, 2, 3][row]
            np.testing.assert_array_equal(gen.random(n1), d1[row, :n1])
            assert gen.integers(0, 127) == u[row]
            assert gen.integers(0, row + 1) == b[row]
            np.testing.assert_array_equal(gen.random(2), d2[row])
            np.testing.assert_array_equal(gen.integers(0, 100, size=13), w[row])


def test_lanes_reject_out_of_range_seeds():
    with pytest.raises(ValueError, match="2\\^32"):
        Lanes(2**32, np.array([0]))
    with pytest.raises(ValueError, match="2\\^32"):
        Lanes(0, np.array([-1]))


@pytest.mark.parametrize("shape", [(30000, 2048, 299), (30000, 2048, 300)],
                         ids=["floyd", "tail-shuffle-fallback"])
def test_batch_equals_per_example_for_large_vocabularies(shape):
    """Past 10000 keys NumPy's ``choice`` switches algorithm once K > keys // 50; the batch
    path falls back to per-example calls there and is emulated just below it."""
    v, seq, k = shape
    idx = np.arange(3)
    got = mqar_batch(3, idx, vocab_size=v, seq_len=seq, num_kv_pairs=k)
    for row, i in enumerate(idx):
        want = mqar_example(np.random.default_rng([3, int(i)]), vocab_size=v, seq_len=seq,
                            num_kv_pairs=k)
        np.testing.assert_array_equal(got[0][row], want[0])
        np.testing.assert_array_equal(got[1][row], want[1])
