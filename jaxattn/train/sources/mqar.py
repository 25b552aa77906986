"""Multi-Query Associative Recall (MQAR), the synthetic recall task of Zoology (Arora,
Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language Models", 2023).

NumPy only. The layout is that of the reference generator (HazyResearch/zoology,
``zoology/data/multiquery_ar.py``): ``K`` key-value pairs (keys from ``[1, V/2)``, values from
``[V/2, V)``) followed by the keys queried again at power-law distributed gaps; the target at a
query position is the value bound to that key, every other target is ``-100`` (ignored).

Difference from the reference: the reference draws a whole split from one seed; here every
example is drawn from its own generator seeded by ``(split seed, index)``, so any example can be
produced alone (a random-access source) and identically on every process.

:func:`mqar_example` is the specification (one example from one ``np.random.Generator``);
:func:`mqar_batch` / :meth:`MQARSource.get_batch` draw a whole batch with array operations and
give the same examples bit for bit (each example's generator emulated in lock-step by
``_lanes.Lanes``; ~8x faster at 128 x 64, K = 4).
"""

from __future__ import annotations

import numpy as np

from jaxattn.train.sources._common import checked_index
from jaxattn.train.sources._lanes import Lanes

__all__ = ["IGNORE_INDEX", "MQARSource", "mqar_batch", "mqar_example", "multiquery_ar",
           "split_seed"]

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


def _choice_distinct(lanes: Lanes, pop_size: int, size: int) -> np.ndarray:
    """``rng.choice(pop_size, size, replace=False)`` per lane (``int64 [B, size]``), as
    ``Generator.choice`` draws it for a small population: Floyd's algorithm, then a
    Fisher-Yates shuffle of the chosen positions."""
    b = lanes.size
    chosen = np.empty((b, size), dtype=np.int64)
    for t, j in enumerate(range(pop_size - size, pop_size)):
        val = lanes.bounded(j)
        seen = (chosen[:, :t] == val[:, None]).any(axis=1)
        chosen[:, t] = np.where(seen, j, val)
    rows = np.arange(b)
    for i in reversed(range(1, size)):
        j = lanes.bounded(i)
        a, c = chosen[:, i].copy(), chosen[rows, j]
        chosen[:, i], chosen[rows, j] = c, a
    return chosen


def _choice_weighted_distinct(lanes: Lanes, p: np.ndarray, size: int) -> np.ndarray:
    """``rng.choice(len(p), size, replace=False, p=p)`` per lane (``int64 [B, size]``), as
    ``Generator.choice`` draws it: rounds of ``size - found`` uniforms against the cdf of the
    not-yet-found entries, keeping each round's first occurrences in draw order."""
    b = lanes.size
    found = np.zeros((b, size), dtype=np.int64)
    n_found = np.zeros(b, dtype=np.int64)
    weights = np.broadcast_to(p, (b, p.shape[0])).copy()
    first = True
    while (n_found < size).any():
        need = size - n_found
        x = lanes.doubles(need)  # [B, max need]
        if not first:  # zero the found entries, as the reference does from round 2 on
            cols = np.arange(size)[None, :] < n_found[:, None]
            weights[np.nonzero(cols)[0], found[cols]] = 0.0
        first = False
        cdf = np.cumsum(weights, axis=1)
        with np.errstate(invalid="ignore"):  # finished lanes may have no weight left
            cdf /= cdf[:, -1:]
        new = (cdf[:, None, :] <= x[:, :, None]).sum(-1)  # searchsorted(side="right")
        m = x.shape[1]
        valid = np.arange(m)[None, :] < need[:, None]
        earlier = np.tril(np.ones((m, m), dtype=bool), -1)
        repeat = ((new[:, :, None] == new[:, None, :]) & earlier[None] & valid[:, None, :]).any(-1)
        keep = valid & ~repeat
        slot = n_found[:, None] + np.cumsum(keep, axis=1) - 1
        rows = np.broadcast_to(np.arange(b)[:, None], keep.shape)
        found[rows[keep], slot[keep]] = new[keep]
        n_found = n_found + keep.sum(axis=1)
    return found


def mqar_batch(
    seed: int,
    indices: np.ndarray,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    num_passes: int = 1,
    random_non_queries: bool = True,
    gap_p: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Many MQAR examples at once: ``(inputs int32 [B, L], labels int32 [B, L])`` for
    ``indices`` (``int [B]``), row ``b`` equal to ``mqar_example(np.random.default_rng([seed,
    indices[b]]), ...)`` bit for bit. Each example's generator is emulated by
    :class:`~jaxattn.train.sources._lanes.Lanes`, so the Python loops run over the ``K`` pairs
    and the choice rounds, never over examples."""
    v, seq, k = vocab_size, seq_len, num_kv_pairs
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if v - v // 2 > 10_000 and k > (v // 2 - 1) // 50:
        # Generator.choice switches to a tail shuffle here; not emulated: one call per example
        rows = [mqar_example(np.random.default_rng([seed, int(i)]), vocab_size=v,
                             seq_len=seq, num_kv_pairs=k, power_a=power_a,
                             num_passes=num_passes, random_non_queries=random_non_queries,
                             gap_p=gap_p) for i in indices]
        return (np.stack([r[0] for r in rows]).reshape(-1, seq),
                np.stack([r[1] for r in rows]).reshape(-1, seq))
    b, context = indices.shape[0], 2 * k * num_passes
    space = (seq - context) // 2
    p = _gap_probabilities(space, power_a) if gap_p is None else gap_p
    lanes = Lanes(seed, indices, draws=4 * k + seq // 2 + 8)
    keys = 1 + _choice_distinct(lanes, v // 2 - 1, k)  # np.arange(1, v // 2)[idx]
    values = v // 2 + _choice_distinct(lanes, v - v // 2, k)  # np.arange(v // 2, v)[idx]
    kvs = np.empty((b, 2 * k), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values
    kvs = np.tile(kvs, (1, num_passes))
    gaps = _choice_weighted_distinct(lanes, p, k)  # [B, K]
    rows = np.arange(b)[:, None]
    queries = np.zeros((b, seq - context + 1), dtype=np.int64)
    queries[rows, 2 * gaps] = keys
    example = np.concatenate([kvs, queries], axis=1)  # [B, L + 1]
    labels = np.full((b, seq + 1), IGNORE_INDEX, dtype=np.int64)
    labels[rows, context + 2 * gaps + 1] = values
    inputs, labels = example[:, :-1], labels[:, 1:]
    if random_non_queries:
        inputs = np.where(inputs == 0, lanes.bounded_many(v - 1, seq), inputs)
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
    chunks = [src.get_batch(np.arange(i, min(i + 4096, num_examples)))
              for i in range(0, num_examples, 4096)]  # bounded temporaries
    return (np.concatenate([c["inputs"] for c in chunks]),
            np.concatenate([c["labels"] for c in chunks]))


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

    def get_batch(self, indices) -> dict[str, np.ndarray]:
        """``{"inputs", "labels"}`` (int32 ``[n, L]``) for ``indices`` (int ``[n]``), row ``j``
        equal to ``self[indices[j]]`` bit for bit, generated in one vectorised call
        (:func:`mqar_batch`)."""
        indices = np.asarray(indices).reshape(-1)
        for i in (indices.min(), indices.max()) if indices.size else ():
            checked_index(i, self.num_examples)
        inputs, labels = mqar_batch(
            self.seed, indices, vocab_size=self.vocab_size, seq_len=self.seq_len,
            num_kv_pairs=self.num_kv_pairs, power_a=self.power_a, num_passes=self.num_passes,
            random_non_queries=self.random_non_queries, gap_p=self._p,
        )
        return {"inputs": inputs, "labels": labels}

    def __repr__(self) -> str:
        return (f"MQARSource(V={self.vocab_size}, L={self.seq_len}, K={self.num_kv_pairs}, "
                f"n={self.num_examples}, split={self.split})")
