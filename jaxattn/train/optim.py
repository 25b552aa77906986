"""Optimizer construction: optax AdamW, warmup + cosine/linear/constant schedule, global-norm
gradient clipping, and the weight-decay mask. Gradient accumulation is done inside the train
step (see ``loop.py``), so a step always means one optimizer update. ``train(...,
optimizer=...)`` takes any other ``optax.GradientTransformation`` instead."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxattn.train.config import OptimConfig

__all__ = ["WEIGHT_DECAY_MASKS", "decay_mask", "make_optimizer", "make_schedule"]

WEIGHT_DECAY_MASKS = ("all", "matrices")
_NO_DECAY_NAMES = ("embed", "norm", "scale", "bias")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate per step: linear warmup over ``warmup_steps`` then the chosen decay to
    ``learning_rate * end_lr_fraction`` at ``total_steps``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    # A short run (e.g. a 2-step smoke test) keeps the config's warmup but clips it to the run.
    warmup_steps = min(cfg.warmup_steps, total_steps)
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction
    decay_steps = max(total_steps - warmup_steps, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_fraction)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; use cosine, linear or constant")
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def decay_mask(params: Any, kind: str = "matrices") -> Any:
    """The weight-decay mask of ``params`` (a tree like ``params`` with bool leaves; True:
    decayed), for ``OptimConfig.weight_decay_mask``:

    * ``"all"``: every parameter is decayed (optax's default, and this loop's default).
    * ``"matrices"``: a parameter is decayed iff it has ``ndim >= 2`` *and* no component of its
      path (module and attribute names, lower-cased) contains ``"embed"``, ``"norm"``,
      ``"scale"`` or ``"bias"``. This skips biases and norm scales/biases (1-D), embedding
      tables (``nnx.Embed``'s ``embedding``, position tables named ``*embed*``) and any
      matrix under a module whose name contains one of those words.
    """
    if kind not in WEIGHT_DECAY_MASKS:
        raise ValueError(f"weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, got {kind!r}")

    def one(path, x):
        if kind == "all":
            return True
        names = [_key_name(k).lower() for k in path]
        return bool(jax.numpy.ndim(x) >= 2
                    and not any(w in n for n in names for w in _NO_DECAY_NAMES))

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, masked by ``cfg.weight_decay_mask``: see
    :func:`decay_mask`) with optional clipping, following ``cfg``."""
    if cfg.weight_decay_mask not in WEIGHT_DECAY_MASKS:
        raise ValueError(f"weight_decay_mask must be one of {WEIGHT_DECAY_MASKS}, got "
                         f"{cfg.weight_decay_mask!r}")
    if cfg.accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {cfg.accumulate_steps}")
    parts = []
    if cfg.grad_clip_norm is not None:
        if cfg.grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be > 0 or None, got {cfg.grad_clip_norm}")
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(
        optax.adamw(
            make_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=None if cfg.weight_decay_mask == "all"
            else (lambda params: decay_mask(params, cfg.weight_decay_mask)),
        )
    )
    return optax.chain(*parts)
