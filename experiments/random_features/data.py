"""Synthetic permutation-invariant regression of Fu, Guo, Bai, Mei (NeurIPS 2023): a query ``x_0``
and ``N`` keys ``x_1..x_N`` i.i.d. uniform on the unit sphere of ``R^d``, and targets of the form
``(1/N) sum_i F(x_0, x_i)`` (the three of the spec's smallest CPU experiment).

NumPy only. A split is drawn in one call from a generator seeded by ``(seed, split)``; the
random-access :class:`RFASource` (``len``, ``[i] -> dict of numpy arrays``) serves it to the
shared training loop.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxattn.train.sources._common import checked_index

__all__ = ["SPLITS", "TARGETS", "RFADataConfig", "RFASource", "draw_split", "sphere",
           "target_values", "unit_vector"]

SPLITS = {"train": 1, "val": 2, "test": 3}  # generator stream of each split (0 draws beta)

# name -> description (the formulas are in target_values)
TARGETS = {
    "T1": "(1/N) sum_i (sqrt(d) <x0, xi>)^3",
    "T2": "(1/N) sum_i <beta, xi>^2",
    "T3": "(1/N) sum_i exp(2 <x0, xi>)",
}


def sphere(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 vectors uniform on the unit sphere: ``shape[-1]`` is the dimension."""
    g = rng.standard_normal(shape)
    return (g / np.linalg.norm(g, axis=-1, keepdims=True)).astype(np.float32)


def unit_vector(seed: int, dim: int) -> np.ndarray:
    """The fixed direction ``beta`` of target T2 (one per data seed)."""
    return sphere(np.random.default_rng([seed, 0]), (dim,))


def draw_split(seed: int, split: str, n: int, tokens: int, dim: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(x0 [n, d], xs [n, N, d])`` float32 of one split (disjoint generator streams)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS[split]])
    return sphere(rng, (n, dim)), sphere(rng, (n, tokens, dim))


def target_values(name: str, x0: np.ndarray, xs: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Target ``name`` of :data:`TARGETS` at ``x0 [n, d]``, ``xs [n, N, d]`` -> float32 ``[n]``.

    T1 is scaled by ``d^{3/2}`` so that each term is O(1) (``sqrt(d) <x0, xi>`` has unit
    variance); closed-form ridge is linear in ``y``, so no scaling changes its relative error.
    """
    d = x0.shape[-1]
    x0, xs = x0.astype(np.float64), xs.astype(np.float64)
    if name == "T1":
        terms = (np.sqrt(d) * np.einsum("nd,nid->ni", x0, xs)) ** 3
    elif name == "T2":
        terms = np.einsum("d,nid->ni", beta.astype(np.float64), xs) ** 2
    elif name == "T3":
        terms = np.exp(2.0 * np.einsum("nd,nid->ni", x0, xs))
    else:
        raise ValueError(f"unknown target {name!r}; known: {sorted(TARGETS)}")
    return terms.mean(axis=1).astype(np.float32)


class RFASource:
    """``src[i] -> {"x0": float32 [d], "xs": float32 [N, d], "y": float32 []}`` of one split."""

    def __init__(self, *, target: str, split: str, num_examples: int, tokens: int, dim: int,
                 seed: int = 0):
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        self.x0, self.xs = draw_split(seed, split, num_examples, tokens, dim)
        self.y = target_values(target, self.x0, self.xs, unit_vector(seed, dim))
        self.target, self.split = target, split

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        i = checked_index(index, len(self.y))
        return {"x0": self.x0[i], "xs": self.xs[i], "y": self.y[i]}

    def __repr__(self) -> str:
        return (f"RFASource({self.target}, {self.split}, n={len(self)}, N={self.xs.shape[1]}, "
                f"d={self.xs.shape[2]})")


@dataclasses.dataclass(frozen=True)
class RFADataConfig:
    """Data of one gradient-training run (:func:`experiments.random_features.experiment.
    build_task`): ``target`` on ``tokens`` keys of dimension ``dim``."""

    target: str = "T1"
    dim: int = 8
    tokens: int = 16
    train_examples: int = 8192
    test_examples: int = 4096
    seed: int = 0

    def sources(self) -> tuple[RFASource, RFASource]:
        """``(train, test)`` sources."""
        kw = dict(target=self.target, tokens=self.tokens, dim=self.dim, seed=self.seed)
        return (RFASource(split="train", num_examples=self.train_examples, **kw),
                RFASource(split="test", num_examples=self.test_examples, **kw))
