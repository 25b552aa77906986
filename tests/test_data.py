"""Data sources and grain pipelines: determinism, disjoint splits, process sharding, padding;
the text, digits and tfds sources."""

import numpy as np
import pytest

from jaxattn.train.data import Prefetcher, eval_batches, train_dataset
from jaxattn.train.sources import CharTextSource, DigitsSource, MQARSource, TfdsSource


def _mqar(split="train", seed=0, n=300):
    return MQARSource(vocab_size=128, seq_len=32, num_kv_pairs=4, num_examples=n, seed=seed,
                      split=split)


def _key(ex):
    return ex["inputs"].tobytes() + ex["labels"].tobytes()


def test_mqar_deterministic_per_seed_and_index():
    a, b = _mqar(), _mqar()
    for i in (0, 7, 299):
        np.testing.assert_array_equal(a[i]["inputs"], b[i]["inputs"])
        np.testing.assert_array_equal(a[i]["labels"], b[i]["labels"])
    assert _key(a[0]) != _key(a[1])
    assert _key(_mqar(seed=1)[0]) != _key(a[0])
    with pytest.raises(IndexError):
        a[300]


def test_mqar_train_and_test_are_disjoint():
    train = {_key(_mqar("train")[i]) for i in range(300)}
    test = {_key(_mqar("test")[i]) for i in range(300)}
    assert len(train) == 300 and len(test) == 300
    assert not train & test
    with pytest.raises(ValueError, match="seed"):
        _mqar(seed=2**31)


def test_train_dataset_is_random_access_and_deterministic():
    ds = train_dataset(_mqar(n=40), global_batch_size=8, seed=3)
    again = train_dataset(_mqar(n=40), global_batch_size=8, seed=3)
    for step in (0, 4, 9, 123):
        np.testing.assert_array_equal(ds[step]["inputs"], again[step]["inputs"])
    assert ds[0]["inputs"].shape == (8, 32)
    # one epoch (5 batches) visits every example once
    epoch = np.concatenate([ds[s]["inputs"] for s in range(5)])
    assert len({r.tobytes() for r in epoch}) == 40
    other = train_dataset(_mqar(n=40), global_batch_size=8, seed=4)
    assert not np.array_equal(other[0]["inputs"], ds[0]["inputs"])


def test_processes_get_disjoint_shards():
    src = _mqar(n=40)
    shards = [train_dataset(src, global_batch_size=8, seed=0, process_index=i, process_count=2)
              for i in range(2)]
    seen = [{r.tobytes() for s in range(5) for r in sh[s]["inputs"][:4]} for sh in shards]
    assert shards[0][0]["inputs"].shape == (4, 32)
    assert not seen[0] & seen[1]
    with pytest.raises(ValueError, match="divisible"):
        train_dataset(src, global_batch_size=7, seed=0, process_index=0, process_count=2)


def test_eval_batches_pad_the_last_batch():
    src = _mqar("test", n=10)
    got = list(eval_batches(src, global_batch_size=4))
    assert [v for _, v in got] == [4, 4, 2]
    assert all(b["inputs"].shape == (4, 32) for b, _ in got)
    np.testing.assert_array_equal(got[2][0]["inputs"][0], src[8]["inputs"])
    assert [v for _, v in eval_batches(src, global_batch_size=4, max_examples=5)] == [4, 1]


def test_char_text_source_default_corpus_is_the_stdlib():
    src = CharTextSource(seq_len=64, max_bytes=200_000)
    ex = src[5]
    assert ex["inputs"].shape == ex["targets"].shape == (64,)
    np.testing.assert_array_equal(ex["inputs"][1:], ex["targets"][:-1])
    np.testing.assert_array_equal(CharTextSource(seq_len=64, max_bytes=200_000)[5]["inputs"],
                                  ex["inputs"])
    text = bytes(ex["inputs"].astype(np.uint8)).decode("utf-8", "replace")
    assert text.isprintable() or "\n" in text


def test_char_text_source_directory_and_disjoint_splits(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 500)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b" * 500)
    train = CharTextSource(seq_len=16, directory=str(tmp_path), test_fraction=0.4)
    test = CharTextSource(seq_len=16, directory=str(tmp_path), split="test", test_fraction=0.4)
    assert set(np.unique(np.concatenate([train[i]["inputs"] for i in range(len(train))]))) \
        <= {ord("a"), ord("b"), ord("\n")}
    # the test split is the tail of the corpus: only b's (and the newline) there
    assert set(np.unique(test[0]["inputs"])) <= {ord("b"), ord("\n")}
    with pytest.raises(ValueError, match="no files"):
        CharTextSource(seq_len=16, directory=str(tmp_path), pattern="*.md")


def test_digits_source_split_is_disjoint_and_complete():
    train, test = DigitsSource("train"), DigitsSource("test")
    assert len(train) + len(test) == 1797
    assert not set(train.indices) & set(test.indices)
    ex = train[0]
    assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.float32
    assert 0.0 <= ex["image"].min() and ex["image"].max() <= 1.0
    assert ex["label"].dtype == np.int32


def test_tfds_source_through_grain_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")

    def to_float(ex):
        return {"image": ex["image"].astype(np.float32) / 255.0,
                "label": np.int32(ex["label"])}

    with tfds.testing.mock_data(num_examples=24):
        src = TfdsSource("mnist", "train", transform=to_float)
        assert len(src) == 24
        ds = train_dataset(src, global_batch_size=8, seed=0)
        batch = ds[2]
        assert batch["image"].shape == (8, 28, 28, 1) and batch["image"].dtype == np.float32
        np.testing.assert_array_equal(ds[2]["label"], batch["label"])


# ---- background prefetch ---------------------------------------------------------------------


class _Indexed:
    """``ds[i] -> {"i": [i]}``; raises at ``fail_at``."""

    def __init__(self, fail_at=None):
        self.fail_at, self.reads = fail_at, []

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyError(f"bad record {i}")
        self.reads.append(i)
        return {"i": np.array([i])}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_yields_the_dataset_in_order(depth):
    ds = _Indexed()
    pf = Prefetcher(ds, 5, 12, depth=depth)
    try:
        got = [int(pf.get(s)["i"][0]) for s in range(5, 12)]
    finally:
        pf.close()
    assert got == list(range(5, 12)) and sorted(ds.reads) == list(range(5, 12))
    assert pf.wait_seconds >= 0.0
    with pytest.raises(ValueError, match="expected step 12, got 3"):
        pf.get(3)


def test_prefetcher_raises_at_the_failing_step_and_close_stops_early():
    pf = Prefetcher(_Indexed(fail_at=2), 0, 10, depth=2)
    assert int(pf.get(0)["i"][0]) == 0 and int(pf.get(1)["i"][0]) == 1
    with pytest.raises(KeyError, match="bad record 2"):
        pf.get(2)
    pf.close()
    ds = _Indexed()
    pf = Prefetcher(ds, 0, 10**9, depth=2)  # an endless run closed after one step
    pf.get(0)
    pf.close()
    assert not pf._thread.is_alive() and len(ds.reads) <= 5
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(ds, 0, 1, depth=-1)
