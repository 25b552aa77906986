"""Optimizer construction: optax AdamW, warmup + cosine/linear/constant schedule, global-norm
gradient clipping. Gradient accumulation is done inside the train step (see ``loop.py``), so a
step always means one optimizer update."""

from __future__ import annotations

import optax

from jaxattn.train.config import OptimConfig

__all__ = ["make_optimizer", "make_schedule"]


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


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) with optional clipping, following ``cfg``."""
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
        )
    )
    return optax.chain(*parts)
