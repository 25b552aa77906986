"""Real datasets a user has prepared with TensorFlow Datasets, read through
``tfds.data_source`` (ArrayRecord, random access, no TensorFlow needed) and fed to grain."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["TfdsSource"]


class TfdsSource:
    """``TfdsSource(name, split, data_dir=None, transform=None)``: random access over a prepared
    tfds dataset; ``transform(example) -> example`` runs per item (e.g. dtype casts).

    The dataset must already be prepared in ``data_dir`` (``tfds build`` or
    ``tfds.builder(name).download_and_prepare(file_format="array_record")``); nothing is
    downloaded here.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | None = None,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        import tensorflow_datasets as tfds  # optional dependency ([train] extra)

        self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.source[int(index)]
        return self.transform(example) if self.transform is not None else example
