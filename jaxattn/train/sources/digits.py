"""scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes; ships inside the
package, no download) as a random-access source with a fixed, disjoint train/test split."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["DigitsDataConfig", "DigitsSource"]


class DigitsSource:
    """``src[i] -> {"image": float32 [8, 8, 1] in [0, 1], "label": int32 []}``.

    The split is a permutation drawn with ``split_seed`` (the same for both splits, so they are
    complementary): the last ``test_fraction`` of it is the test split.
    """

    num_classes = 10

    def __init__(self, split: str = "train", *, test_fraction: float = 0.2, split_seed: int = 0):
        from sklearn.datasets import load_digits  # optional dependency ([train] extra)

        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        bunch = load_digits()
        images = (bunch.images / 16.0).astype(np.float32)[..., None]  # [n, 8, 8, 1]
        labels = bunch.target.astype(np.int32)
        order = np.random.default_rng(split_seed).permutation(len(labels))
        n_test = int(round(len(labels) * test_fraction))
        idx = order[len(labels) - n_test:] if split == "test" else order[:len(labels) - n_test]
        self.indices = np.sort(idx)  # indices into the original dataset (for disjointness)
        self.images, self.labels, self.split = images[self.indices], labels[self.indices], split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        return {"image": self.images[index], "label": self.labels[index]}


@dataclasses.dataclass(frozen=True)
class DigitsDataConfig:
    """The digits split an experiment trains and tests on."""

    test_fraction: float = 0.2
    split_seed: int = 0

    def sources(self) -> tuple[DigitsSource, DigitsSource]:
        """``(train, test)`` sources of this split."""
        kw = dict(test_fraction=self.test_fraction, split_seed=self.split_seed)
        return DigitsSource("train", **kw), DigitsSource("test", **kw)
