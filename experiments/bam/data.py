"""The three offline domains of the BAM miniature, as byte corpora for ``CharTextSource``.

* ``code``: raw Python source of the standard library's top-level modules with an even index in
  sorted order;
* ``prose``: English docstrings (``ast.get_docstring`` of modules, classes and functions) of the
  modules with an odd index, ASCII only, doctest lines dropped - so no text is shared with
  ``code``;
* ``math``: generated arithmetic expressions with their answers (``"(37+8)*2=90"``, one per
  line; integers, ``+ - *``, optional brackets), deterministic in the seed.
"""

from __future__ import annotations

import ast
import functools

import numpy as np

from jaxattn.train.sources._common import checked_index
from jaxattn.train.sources.text import CharTextSource, default_corpus_dir

__all__ = ["DOMAINS", "MixedSource", "arithmetic_corpus", "code_corpus", "domain_corpus",
           "prose_corpus"]

DOMAINS = ("code", "prose", "math")


def _stdlib_files():
    return sorted(p for p in default_corpus_dir().glob("*.py") if p.is_file())


def code_corpus(max_bytes: int) -> np.ndarray:
    """uint8 bytes of the even-indexed stdlib modules' source, truncated to ``max_bytes``."""
    chunks, total = [], 0
    for f in _stdlib_files()[0::2]:
        data = f.read_bytes() + b"\n"
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)


def prose_corpus(max_bytes: int) -> np.ndarray:
    """uint8 bytes of the odd-indexed stdlib modules' docstrings (ASCII, >= 40 characters,
    doctest lines removed), separated by blank lines."""
    docs, total = [], 0
    for f in _stdlib_files()[1::2]:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef |
                              ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40 or not doc.isascii():
                continue
            lines = [ln for ln in doc.splitlines()
                     if not ln.lstrip().startswith((">>>", "..."))]
            docs.append("\n".join(lines).strip() + "\n\n")
            total += len(docs[-1])
        if total >= max_bytes:
            break
    return np.frombuffer("".join(docs).encode("ascii")[:max_bytes], np.uint8)


def _expression(rng: np.random.Generator, depth: int = 0) -> str:
    if depth >= 2 or rng.random() < 0.35:
        return str(int(rng.integers(0, 100)))
    left, right = _expression(rng, depth + 1), _expression(rng, depth + 1)
    op = "+-*"[int(rng.integers(0, 3))]
    text = f"{left}{op}{right}"
    return f"({text})" if depth and rng.random() < 0.5 else text


def arithmetic_corpus(max_bytes: int, seed: int = 0) -> np.ndarray:
    """uint8 bytes of lines ``expression=value`` (Python's integer arithmetic)."""
    rng = np.random.default_rng(seed)
    lines, total = [], 0
    while total < max_bytes:
        expr = _expression(rng)
        line = f"{expr}={eval(expr, {'__builtins__': {}})}\n"  # noqa: S307 - digits and + - * ( )
        lines.append(line)
        total += len(line)
    return np.frombuffer("".join(lines).encode("ascii")[:max_bytes], np.uint8)


@functools.cache
def domain_corpus(name: str, max_bytes: int) -> np.ndarray:
    """The corpus of domain ``name`` (one of :data:`DOMAINS`), cached per process."""
    if name == "code":
        return code_corpus(max_bytes)
    if name == "prose":
        return prose_corpus(max_bytes)
    if name == "math":
        return arithmetic_corpus(max_bytes)
    raise ValueError(f"unknown domain {name!r}; domains: {DOMAINS}")


def domain_source(name: str, *, seq_len: int, split: str, max_bytes: int,
                  test_fraction: float = 0.05, seed: int = 0) -> CharTextSource:
    return CharTextSource(seq_len=seq_len, split=split, corpus=domain_corpus(name, max_bytes),
                          test_fraction=test_fraction, seed=seed)


class MixedSource:
    """Equal parts of several sources: record ``i`` is record ``i // k`` of source ``i % k``."""

    def __init__(self, sources):
        if not sources:
            raise ValueError("MixedSource needs at least one source")
        self.sources = list(sources)
        self.num_examples = len(self.sources) * min(len(s) for s in self.sources)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int):
        index = checked_index(index, self.num_examples)
        k = len(self.sources)
        return self.sources[index % k][index // k]
