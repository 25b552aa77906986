"""Metrics and user experience: a progress bar (step/s, loss), JSONL + TensorBoard event files,
a final summary table, and matplotlib line plots for experiment results.

TensorBoard events are written with ``tensorboardX`` (a small pure-Python package, no
TensorFlow); if it is not installed only the JSONL file is written.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MetricsWriter", "ProgressBar", "best_seconds", "format_table", "peak_bytes",
           "plot_lines"]


def _scalar(value: Any) -> float:
    return float(value)


class MetricsWriter:
    """Append ``{"step", "split", **metrics}`` lines to ``<log_dir>/metrics.jsonl`` and the same
    scalars to TensorBoard event files under ``<log_dir>/tb``."""

    def __init__(self, log_dir: str | pathlib.Path | None, *, tensorboard: bool = True):
        self.log_dir = pathlib.Path(log_dir) if log_dir else None
        self._jsonl = None
        self._tb = None
        if self.log_dir is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.log_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                print("metrics: tensorboardX not installed; writing JSONL only", file=sys.stderr)
            else:
                self._tb = SummaryWriter(str(self.log_dir / "tb"))

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        if self.log_dir is None:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        record = {"step": int(step), "split": split, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", v, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ProgressBar:
    """tqdm bar (steps, step/s) with the latest loss; silent when ``enabled`` is False."""

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True, desc: str = ""):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step",
                             dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, **postfix: float) -> None:
        if self._bar is None:
            return
        self._bar.update(n)
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (dicts); ``columns`` defaults to the first row's keys."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def plot_lines(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
               path: str | pathlib.Path, *, xlabel: str, ylabel: str, logx: bool = False,
               ylim: tuple[float, float] | None = None, title: str = "") -> pathlib.Path:
    """One subplot per panel, one line per series: ``panels[panel][series] = (xs, ys)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        for label, (xs, ys) in series.items():
            ax.plot(list(xs), list(ys), marker="o", label=label)
        if logx:
            ax.set_xscale("log", base=2)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def best_seconds(fn, *args, repeats: int = 3) -> float:
    """Best wall time in seconds of ``repeats`` calls ``fn(*args)`` after one warm-up call (the
    compile), each synchronised with ``jax.block_until_ready``: the timing every benchmark and
    experiment cost table uses."""
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def peak_bytes(compiled) -> int:
    """Temporaries + outputs of a compiled program (``jax.jit(f).lower(...).compile()``), as
    XLA's memory analysis reports them."""
    m = compiled.memory_analysis()
    return int(m.temp_size_in_bytes + m.output_size_in_bytes)
