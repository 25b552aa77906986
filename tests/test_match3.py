"""The Match3 source: labels are the definition (brute force), examples are deterministic and
random-access, splits are disjoint, and tokens are uniform."""

import itertools

import numpy as np
import pytest

from jaxattn.train.sources.match3 import Match3Source, match3_labels


def brute_force(x, m):
    return [int(any((x[i] + x[j] + x[k]) % m == 0
                    for j, k in itertools.product(range(len(x)), repeat=2)))
            for i in range(len(x))]


def test_labels_are_the_definition():
    src = Match3Source(length=6, modulus=11, num_examples=200)
    for i in range(200):
        item = src[i]
        assert item["labels"].tolist() == brute_force(item["tokens"].tolist(), 11)
    assert match3_labels(np.array([1, 2, 3]), 6).tolist() == [1, 1, 1]  # 1+2+3, 2+2+2, 3+1+2
    assert match3_labels(np.array([1, 1]), 5).tolist() == [0, 0]


def test_deterministic_random_access_and_disjoint_splits():
    a = Match3Source(length=8, modulus=64, num_examples=1000, seed=3)
    b = Match3Source(length=8, modulus=64, num_examples=1000, seed=3)
    assert np.array_equal(a[17]["tokens"], b[17]["tokens"])
    assert not np.array_equal(a[17]["tokens"], a[18]["tokens"])
    test = Match3Source(length=8, modulus=64, num_examples=1000, seed=3, split="test")
    other = Match3Source(length=8, modulus=64, num_examples=1000, seed=4)
    train_set = {a[i]["tokens"].tobytes() for i in range(1000)}
    assert not train_set & {test[i]["tokens"].tobytes() for i in range(1000)}
    assert not train_set & {other[i]["tokens"].tobytes() for i in range(1000)}
    with pytest.raises(IndexError):
        a[1000]
    with pytest.raises(ValueError, match="split"):
        Match3Source(length=8, modulus=64, num_examples=10, split="val")


def test_tokens_uniform_and_positive_rate_of_the_spec():
    src = Match3Source(length=8, modulus=64, num_examples=4000)
    tokens = np.stack([src[i]["tokens"] for i in range(4000)])
    counts = np.bincount(tokens.ravel(), minlength=64)
    expected = tokens.size / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 120  # 63 degrees of freedom: p ~ 3e-5 above 120
    rate = match3_labels(tokens, 64).mean()
    assert 0.41 < rate < 0.45  # the spec: about 43% positive at n = 8, M = 64
