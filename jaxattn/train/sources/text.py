"""Character-level (byte-level) language-modelling source over a directory of text files.

The default corpus is the Python standard library's own source code (``*.py`` under
``sysconfig.get_paths()["stdlib"]``), which ships with every Python, so the source needs no
download. Files are read in sorted order, joined with newlines and truncated to ``max_bytes``;
the first ``1 - test_fraction`` of the bytes is the train split and the rest the test split, so
the splits never overlap. Tokens are bytes (vocabulary 256).
"""

from __future__ import annotations

import pathlib
import sysconfig

import numpy as np

from jaxattn.train.sources._common import checked_index

__all__ = ["CharTextSource", "default_corpus_dir", "load_corpus"]

VOCAB_SIZE = 256


def default_corpus_dir() -> pathlib.Path:
    """The directory of the running Python's standard library."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def load_corpus(directory: str | pathlib.Path | None = None, *, pattern: str | None = None,
                max_bytes: int = 4_000_000) -> np.ndarray:
    """Bytes of the files matching ``pattern`` under ``directory`` (sorted), as uint8 ``[n]``.

    ``directory=None`` uses the standard library with ``pattern="*.py"`` (top level only, which
    keeps loading fast); for a user directory the default pattern is ``**/*.txt``.
    """
    if directory is None:
        root, pattern = default_corpus_dir(), pattern or "*.py"
    else:
        root, pattern = pathlib.Path(directory), pattern or "**/*.txt"
    if not root.is_dir():
        raise ValueError(f"text corpus directory {str(root)!r} does not exist")
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise ValueError(f"no files match {pattern!r} under {str(root)!r}")
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes() + b"\n"
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)


class CharTextSource:
    """Random-access windows: ``src[i] -> {"inputs": int32 [L], "targets": int32 [L]}`` with
    ``targets`` the inputs shifted by one byte. Window starts are deterministic in
    ``(seed, index)``; train and test windows come from disjoint byte ranges."""

    vocab_size = VOCAB_SIZE

    def __init__(self, *, seq_len: int, split: str = "train", directory: str | None = None,
                 pattern: str | None = None, num_examples: int | None = None, seed: int = 0,
                 test_fraction: float = 0.05, max_bytes: int = 4_000_000,
                 corpus: np.ndarray | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
        data = load_corpus(directory, pattern=pattern, max_bytes=max_bytes) if corpus is None \
            else np.asarray(corpus, np.uint8)
        cut = int(len(data) * (1.0 - test_fraction))
        if split == "train":
            self.data = data[:cut]
        elif split == "test":
            self.data = data[cut:]
        else:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if len(self.data) < seq_len + 2:
            raise ValueError(f"the {split} split has {len(self.data)} bytes, fewer than "
                             f"seq_len + 2 = {seq_len + 2}")
        self.seq_len, self.split, self.seed = seq_len, split, seed
        self._starts = len(self.data) - seq_len - 1
        self.num_examples = num_examples or max(len(self.data) // seq_len, 1)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = checked_index(index, self.num_examples)
        split_id = 0 if self.split == "train" else 1
        start = int(np.random.default_rng([self.seed, split_id, index]).integers(
            0, self._starts + 1))
        window = self.data[start:start + self.seq_len + 1].astype(np.int32)
        return {"inputs": window[:-1], "targets": window[1:]}
