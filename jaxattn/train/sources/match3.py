"""Match3 (Sanford, Hsu & Telgarsky, "Representational Strengths and Limitations of
Transformers", NeurIPS 2023): ``y_i = 1`` iff some ``j, k`` (any positions, ``i`` and ``j = k``
included) have ``x_i + x_j + x_k = 0 (mod M)``.

A pairwise condition on the *other* tokens for every token: hard for one layer of standard
attention of small size, one trilinear form for tensor attention. With ``n = 8`` and ``M = 64``
about 43% of the labels are positive.

Random access without a generator per example: token ``p`` of example ``i`` is the splitmix64
hash of ``(seed, split, i, p)`` modulo ``M``, so ``src[i]`` costs a few array operations, any
example can be produced alone and identically on every process, and the train and test splits
never share an example.
"""

from __future__ import annotations

import numpy as np

from jaxattn.train.sources._common import checked_index

__all__ = ["Match3Source", "match3_labels"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SPLITS = {"train": 1, "test": 2}


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def match3_labels(tokens: np.ndarray, modulus: int) -> np.ndarray:
    """``tokens int [..., n] -> labels int32 [..., n]``: 1 where ``x_i + x_j + x_k = 0 mod M``
    for some ``j, k``."""
    x = np.asarray(tokens, np.int64)
    sums = x[..., :, None, None] + x[..., None, :, None] + x[..., None, None, :]
    return (sums % modulus == 0).any(axis=(-2, -1)).astype(np.int32)


class Match3Source:
    """Random-access Match3 source: ``src[i] -> {"tokens" int32 [n], "labels" int32 [n]}``.

    Args:
      length: ``n`` tokens per example.
      modulus: ``M`` (tokens are ``0 .. M-1``).
      num_examples: size of the split (training with fresh samples every step: at least
        ``steps * batch``).
      seed, split: ``"train"`` or ``"test"``; deterministic in ``(seed, split, index)``.
    """

    def __init__(self, *, length: int, modulus: int, num_examples: int, seed: int = 0,
                 split: str = "train"):
        if length < 1 or modulus < 2 or num_examples < 1:
            raise ValueError(f"need length >= 1, modulus >= 2, num_examples >= 1; got "
                             f"{length}, {modulus}, {num_examples}")
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.length, self.modulus, self.num_examples = length, modulus, num_examples
        with np.errstate(over="ignore"):
            self._key = _splitmix64(np.uint64(seed) * np.uint64(4) + np.uint64(_SPLITS[split]))

    def __len__(self) -> int:
        return self.num_examples

    def tokens(self, index: int) -> np.ndarray:
        """The ``n`` tokens of example ``index`` (int32)."""
        index = checked_index(index, self.num_examples)
        counter = np.uint64(index) * np.uint64(self.length) + np.arange(self.length,
                                                                         dtype=np.uint64)
        with np.errstate(over="ignore"):
            bits = _splitmix64(counter ^ self._key)
        return (bits % np.uint64(self.modulus)).astype(np.int32)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        x = self.tokens(index)
        return {"tokens": x, "labels": match3_labels(x, self.modulus)}
