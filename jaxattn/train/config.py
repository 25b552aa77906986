"""Small frozen configuration dataclasses for the shared training loop, and typed
``key=value`` command-line overrides.

An experiment config is a tree of frozen dataclasses (``ExperimentConfig`` holds ``model``,
``data``, ``optim``, ``mesh`` (:class:`jaxattn.parallel.MeshConfig`, re-exported here), ``run``
and experiment-specific sections). ``apply_overrides``
walks dotted keys (``optim.learning_rate=3e-3``, ``sweep.widths=32,64``) and parses each value
with the field's annotated type, so a typo or a wrong type fails loudly before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Iterable
from typing import Any

from jaxattn.parallel.logical import MeshConfig  # the one mesh config; re-exported here

__all__ = [
    "ExperimentConfig",
    "MeshConfig",
    "OptimConfig",
    "RunConfig",
    "apply_overrides",
    "RESUME_CHECKED_FIELDS",
    "config_differences",
    "config_to_dict",
    "json_config",
]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine (or constant/linear) decay, global-norm clipping
    (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", 2019)."""

    learning_rate: float = 1e-3
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    end_lr_fraction: float = 0.0  # final lr = learning_rate * end_lr_fraction
    grad_clip_norm: float | None = 1.0
    accumulate_steps: int = 1  # micro-batches per step (the global batch is split)
    aux_loss_weight: float = 1.0  # times the sum of the aux losses sown (jaxattn.nn.mixer)
    # "matrices" (default): decay only ndim >= 2 parameters whose path names contain none of
    # embed/norm/scale/bias (jaxattn.train.optim.decay_mask); "all": decay every parameter (the
    # committed experiments with weight decay were trained so and pin it in their configs).
    weight_decay_mask: str = "matrices"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Steps, batch, evaluation, logging, checkpointing and precision of one training run."""

    steps: int = 1000
    batch_size: int = 64  # global batch (split over the data axis and over processes)
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batch_size: int = 256
    eval_examples: int = 0  # 0: the whole eval source
    early_stop_metric: str = ""  # e.g. "accuracy": stop when eval metric > early_stop_above
    early_stop_above: float = 1.0
    log_every: int = 50
    log_dir: str = ""  # "" = no files (JSONL + TensorBoard written when set)
    checkpoint_dir: str = ""  # "" = no checkpoints
    save_every: int = 0  # 0: only at the end (when checkpoint_dir is set)
    keep: int = 3
    async_save: bool = True
    precision: str = "f32"  # "f32" | "bf16" (bf16 compute, f32 params and optimizer state)
    progress: bool = True
    prefetch: int = 2  # batches read ahead by a background thread (0: synchronous)
    # resume from a checkpoint whose stored config differs in a refused field
    # (RESUME_CHECKED_FIELDS: model, data, optim, run.steps/batch_size/seed)
    allow_config_change: bool = False


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: ``model``/``data`` are experiment-defined frozen dataclasses."""

    model: Any
    data: Any
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()
    sweep: Any = None  # experiment-specific sweep section (a frozen dataclass) or None


# ---- overrides --------------------------------------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _strip_brackets(text: str) -> str:
    """Drop one pair of outer brackets if they enclose the whole text: ``"(a,b)"`` -> ``"a,b"``
    but ``"(a,b),(c,d)"`` is left alone."""
    text = text.strip()
    if len(text) < 2 or text[0] + text[-1] not in ("()", "[]"):
        return text
    depth = 0
    for i, ch in enumerate(text):
        depth += ch in "(["
        depth -= ch in ")]"
        if depth == 0 and i < len(text) - 1:
            return text  # the first bracket closes before the end
    return text[1:-1]


def _parse(text: str, tp: Any, key: str) -> Any:
    """Parse ``text`` as type ``tp`` (int, float, str, bool, Optional/Union, tuple[...])."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return text
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _parse(text, arg, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"override {key}={text!r}: no type in {tp} accepts it ({errors})")
    if origin is tuple:
        args = typing.get_args(tp)
        body = _strip_brackets(text)
        if args and len(args) == 2 and args[1] is Ellipsis:
            if not body.strip():
                return ()
            return tuple(_parse(p, args[0], key) for p in _split_top(body))
        parts = _split_top(body) if body.strip() else []
        if len(parts) != len(args):
            raise ValueError(f"override {key}={text!r}: expected {len(args)} items for {tp}")
        return tuple(_parse(p, a, key) for p, a in zip(parts, args, strict=True))
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"override {key}={text!r}: expected a boolean (true/false)")
    if tp is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"override {key}={text!r}: expected an int") from None
    if tp is float:
        try:
            return float(text.strip())
        except ValueError:
            raise ValueError(f"override {key}={text!r}: expected a float") from None
    if tp is str:
        return text.strip()
    raise TypeError(f"override {key}: fields of type {tp} cannot be set from the command line")


def _split_top(body: str) -> list[str]:
    """Split on commas that are not inside brackets: ``"(a,b),(c,d)"`` -> two items."""
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip() != ""]


def _set_path(cfg: Any, path: list[str], text: str, key: str) -> Any:
    if not dataclasses.is_dataclass(cfg):
        raise ValueError(f"override {key}: {'.'.join(path)} does not name a config field")
    names = [f.name for f in dataclasses.fields(cfg)]
    head = path[0]
    if head not in names:
        raise ValueError(f"override {key}: unknown field {head!r}; valid fields: {names}")
    current = getattr(cfg, head)
    if len(path) > 1:
        return dataclasses.replace(cfg, **{head: _set_path(current, path[1:], text, key)})
    hints = typing.get_type_hints(type(cfg))
    return dataclasses.replace(cfg, **{head: _parse(text, hints[head], key)})


def apply_overrides(cfg: Any, overrides: Iterable[str]) -> Any:
    """Return ``cfg`` with each ``"a.b.c=value"`` applied, parsed by the field's annotated type.

    Tuples are written comma-separated (``sweep.widths=32,64``); ``none`` sets an Optional
    field to None. Raises ValueError for unknown keys, malformed items or unparsable values.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"override {item!r} has an empty key")
        cfg = _set_path(cfg, key.split("."), text, key)
    return cfg


def config_to_dict(cfg: Any) -> Any:
    """A JSON-friendly nested dict of a dataclass config (for logs and checkpoints)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [config_to_dict(x) for x in cfg]
    return cfg


# ---- resume check -----------------------------------------------------------------------------
# Dotted config prefixes that must match between a checkpoint and the run resuming from it:
# the model and data sections, the whole optimizer section (learning rate, schedule, warmup,
# decay, clipping, accumulation, ... all change the trajectory) and the run's length (the
# schedule is built over it), batch size and seed. Everything else (mesh, logging, eval,
# progress, prefetch, checkpoint paths, keep/save_every, precision, sweep) may change freely.
RESUME_CHECKED_FIELDS = ("model", "data", "optim", "run.steps", "run.batch_size", "run.seed")


def json_config(cfg: Any) -> Any:
    """``config_to_dict(cfg)`` made JSON-plain (tuples -> lists, other objects -> their
    ``repr`` without memory addresses, so a function compares by name), as stored with each
    checkpoint."""
    return json.loads(json.dumps(config_to_dict(cfg),
                                 default=lambda o: re.sub(r" at 0x[0-9a-fA-F]+", "", repr(o))))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: tree}
    return {prefix: tree}


def config_differences(stored: Any, current: Any,
                       fields: Iterable[str] = RESUME_CHECKED_FIELDS
                       ) -> list[tuple[str, Any, Any]]:
    """``(dotted field, stored value, current value)`` for every field under ``fields`` that
    differs between two :func:`json_config` dicts. A field absent from ``stored`` (added to the
    code after the checkpoint was written) is not compared; one removed since is reported."""
    fields = tuple(fields)
    old, new = _flatten(stored), _flatten(current)

    def checked(key):
        return any(key == f or key.startswith(f + ".") for f in fields)

    diffs = []
    for key in sorted(set(old) | set(new)):
        if not checked(key) or key not in old:
            continue
        if key not in new or old[key] != new[key]:
            diffs.append((key, old[key], new.get(key, "<absent>")))
    return diffs
