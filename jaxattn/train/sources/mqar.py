"""Multi-Query Associative Recall (MQAR), the synthetic recall task of Zoology (Arora,
Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language Models", 2023).

NumPy only. The layout is that of the reference generator (HazyResearch/zoology,
``zoology/data/multiquery_ar.py``): ``K`` key-value pairs (keys from ``[1, V/2)``, values from
``[V/2, V)``) followed by the keys queried again at power-law distributed gaps; the target at a
query position is the value bound to that key, every other target is ``-100`` (ignored).

Difference from the reference: the reference draws a whole split from one seed; here every
example is drawn from its own generator seeded by ``(split seed, index)``, so any example can be
produced alone (a random-access source) and identically on every process.
"""

from __future__ import annotations

import numpy as np

from jaxattn.train.sources._common import checked_index

__all__ = ["IGNORE_INDEX", "MQARSource", "mqar_example", "multiquery_ar", "split_seed"]

IGNORE_INDEX = -100
_HALF = 2**31


def split_seed(seed: int, split: str) -> int:
    """Train seeds lie in ``[0, 2^31)`` and test seeds in ``[2^31, 2^32)``, as in the reference,
    so the two splits never share a generator."""
    if not 0 <= seed < _HALF:
        raise ValueError(f"seed must lie in [0, 2^31), got {seed}")
    if split == "train":
        return seed
    if split == "test":
        return seed + _HALF
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _check(vocab_size: int, seq_len: int, num_kv_pairs: int, num_passes: int) -> None:
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size ({vocab_size}) must exceed seq_len ({seq_len})")
    if num_kv_pairs < 1 or num_passes < 1:
        raise ValueError("num_kv_pairs and num_passes must be >= 1")
    if 2 * num_kv_pairs * num_passes + 2 * num_kv_pairs > seq_len:
        raise ValueError(
            f"2*K*num_passes + 2*K = {2 * num_kv_pairs * (num_passes + 1)} exceeds "
            f"seq_len={seq_len}"
        )
    if num_kv_pairs > vocab_size // 2 - 1:
        raise ValueError(f"num_kv_pairs={num_kv_pairs} exceeds the {vocab_size // 2 - 1} keys")


def _gap_probabilities(space: int, power_a: float) -> np.ndarray:
    g = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * g ** (power_a - 1)
    return p / p.sum()


def mqar_example(
    rng: np.random.Generator,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    num_passes: int = 1,
    random_non_queries: bool = True,
    gap_p: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One MQAR example: ``(inputs int32 [L], labels int32 [L])``; labels are ``-100`` except
    at the ``K`` query positions, where they hold the value bound to the queried key."""
    v, seq, k = vocab_size, seq_len, num_kv_pairs
    context = 2 * k * num_passes
    keys = rng.choice(np.arange(1, v // 2), size=k, replace=False)
    values = rng.choice(np.arange(v // 2, v), size=k, replace=False)
    kvs = np.empty(2 * k, dtype=np.int64)
    kvs[0::2], kvs[1::2] = keys, values
    kvs = np.tile(kvs, num_passes)
    space = (seq - context) // 2
    p = _gap_probabilities(space, power_a) if gap_p is None else gap_p
    gaps = rng.choice(space, size=k, replace=False, p=p)
    queries = np.zeros(seq - context + 1, dtype=np.int64)
    queries[2 * gaps] = keys
    example = np.concatenate([kvs, queries])  # [L + 1]
    labels = np.full(seq + 1, IGNORE_INDEX, dtype=np.int64)
    labels[context + 2 * gaps + 1] = values
    inputs, labels = example[:-1], labels[1:]
    if random_non_queries:
        zeros = inputs == 0
        inputs = np.where(zeros, rng.integers(0, v, size=inputs.shape), inputs)
    return inputs.astype(np.int32), labels.astype(np.int32)


def multiquery_ar(
    vocab_size: int,
    num_examples: int,
    seq_len: int,
    seed: int,
    *,
    power_a: float = 0.01,
    num_kv_pairs: int = 8,
    num_passes: int = 1,
    random_non_queries: bool = True,
    split: str = "train",
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split: ``(inputs int32 [N, L], labels int32 [N, L])`` (example ``i`` equals
    ``MQARSource(...)[i]`` with the same arguments)."""
    src = MQARSource(
        vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs,
        num_examples=num_examples, seed=seed, split=split, power_a=power_a,
        num_passes=num_passes, random_non_queries=random_non_queries,
    )
    items = [src[i] for i in range(num_examples)]
    return (np.stack([x["inputs"] for x in items]), np.stack([x["labels"] for x in items]))


class MQARSource:
    """Random-access MQAR source for grain: ``src[i] -> {"inputs", "labels"}`` (int32 ``[L]``).

    Deterministic in ``(seed, split, index)``; the train and test splits use disjoint seed
    ranges (see :func:`split_seed`).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        seq_len: int,
        num_kv_pairs: int,
        num_examples: int,
        seed: int = 0,
        split: str = "train",
        power_a: float = 0.01,
        num_passes: int = 1,
        random_non_queries: bool = True,
    ):
        _check(vocab_size, seq_len, num_kv_pairs, num_passes)
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        self.vocab_size, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
        self.num_examples, self.power_a, self.num_passes = num_examples, power_a, num_passes
        self.random_non_queries, self.split = random_non_queries, split
        self.seed = split_seed(seed, split)
        space = (seq_len - 2 * num_kv_pairs * num_passes) // 2
        self._p = _gap_probabilities(space, power_a)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = checked_index(index, self.num_examples)
        rng = np.random.default_rng([self.seed, index])
        inputs, labels = mqar_example(
            rng, vocab_size=self.vocab_size, seq_len=self.seq_len,
            num_kv_pairs=self.num_kv_pairs, power_a=self.power_a, num_passes=self.num_passes,
            random_non_queries=self.random_non_queries, gap_p=self._p,
        )
        return {"inputs": inputs, "labels": labels}

    def __repr__(self) -> str:
        return (f"MQARSource(V={self.vocab_size}, L={self.seq_len}, K={self.num_kv_pairs}, "
                f"n={self.num_examples}, split={self.split})")
