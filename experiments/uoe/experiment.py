"""Union of Experts on a char LM: selective multi-head attention vs dense MHA vs MoH.

Claim tested (Yang et al., "Union of Experts: Adapting Hierarchical Routing to Equivalently
Decomposed Transformer", 2025): routing tokens to attention experts (SMHA: each token picks its
top-k heads, each head attends only among its tokens) keeps or improves quality at a fraction
of the cost (language modelling: -2.38 perplexity vs the best MoE baseline at 76% of its FLOPs;
LRA +0.68% over full attention and MoEs at 50% of the best MoE's FLOPs).

Model (the spec's smallest CPU experiment, scaled down in ``quick_config``): a pre-norm
``DecoderLM`` on the standard library's source bytes, 8 heads, every attention variant with
RoPE (theta 1e4) plus the backbone's learned positions, MLP ratio 4. Variants at 4 active heads
of 8 per token: SMHA with gate weighting (paper intent), SMHA as the code (the gate only picks
indices and gets no gradient), SMHA with random heads (control), MoH routed-only top-4
(mixer ``"moh"``), and dense MHA. Metrics:
validation bits/char, the attention cost ``sum_e n_e^2 d_h`` of the learned selection relative
to dense (``E L^2 d_h``), and wall time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from jaxattn.models import DecoderLM, LMConfig, MixerConfig
from jaxattn.nn.uoe import SelectiveMultiHeadAttention, attention_cost
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task, train
from jaxattn.train.metrics import format_table
from jaxattn.train.sources.text import CharTextSource

NAME = "uoe"
DESCRIPTION = "Union of Experts SMHA vs dense / MoH on a stdlib char LM (Yang et al., 2025)"
HERE = pathlib.Path(__file__).parent
HEADS, ACTIVE = 8, 4
ROPE = ("rope_theta", 10_000.0)

# variant -> (mixer config, short description)
VARIANTS: dict[str, tuple[MixerConfig, str]] = {
    "dense": (MixerConfig("attention", (ROPE,)), "multi-head attention, 8/8 heads"),
    "smha_gate": (MixerConfig("smha", (("top_k", ACTIVE), ("gate_weighting", True),
                                       ("gate_scale", float(ACTIVE)), ROPE)),
                  "SMHA top-4/8, outputs x gate (paper intent), compact RoPE"),
    "smha_code": (MixerConfig("smha", (("top_k", ACTIVE), ROPE)),
                  "SMHA top-4/8 as the code: gate only selects (no gradient)"),
    "moh": (MixerConfig("moh", (("shared_heads", 0), ("top_k", ACTIVE), ROPE)),
            "MoH routed-only top-4/8 (code's gate scaling + balance loss)"),
    "smha_random": (MixerConfig("smha", (("top_k", ACTIVE), ("router", "random"), ROPE)),
                    "control: SMHA with 4 heads per token drawn at random"),
    "smha_gate_origrope": (MixerConfig("smha", (("top_k", ACTIVE), ("gate_weighting", True),
                                                ("gate_scale", float(ACTIVE)),
                                                ("rope_positions", "original"), ROPE)),
                           "SMHA with gate weighting, RoPE at original positions"),
}


@dataclasses.dataclass(frozen=True)
class TextDataConfig:
    seq_len: int = 128
    max_bytes: int = 2_000_000
    test_fraction: float = 0.05
    eval_windows: int = 256

    def sources(self, seed: int = 0) -> tuple[CharTextSource, CharTextSource]:
        kw = dict(seq_len=self.seq_len, max_bytes=self.max_bytes,
                  test_fraction=self.test_fraction)
        return (CharTextSource(split="train", seed=seed, **kw),
                CharTextSource(split="test", num_examples=self.eval_windows, seed=1234, **kw))


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0, 1, 2)
    output_dir: str = str(HERE / "results")


def lm(variant: str, *, layers: int = 4, width: int = 128, seq_len: int = 128) -> LMConfig:
    mixer, _ = VARIANTS[variant]
    return LMConfig(vocab_size=256, width=width, max_length=seq_len, num_heads=HEADS,
                    mixers=(mixer,) * layers, mlp_ratio=4)


def default_config() -> ExperimentConfig:
    """The spec: 4 layers, D = 128, 8 heads, context 128, 2000 steps, 3 seeds."""
    return ExperimentConfig(
        model=lm("dense"), data=TextDataConfig(),
        optim=OptimConfig(weight_decay_mask="all",  # as the committed results
                          learning_rate=2e-3, weight_decay=0.1, warmup_steps=100,
                          schedule="cosine", end_lr_fraction=0.1),
        run=RunConfig(steps=2000, batch_size=32, eval_batch_size=64, log_every=100,
                      progress=False),
        sweep=SweepConfig())


def quick_config() -> ExperimentConfig:
    """The 2-core CPU preset (under 5 minutes): 2 layers, D = 64 (8 heads of 8), context 64,
    200 steps of batch 32, 2 seeds, 5 variants (no original-position RoPE ablation)."""
    cfg = default_config()
    return dataclasses.replace(
        cfg, model=lm("dense", layers=2, width=64, seq_len=64),
        data=dataclasses.replace(cfg.data, seq_len=64, eval_windows=256),
        optim=dataclasses.replace(cfg.optim, warmup_steps=30),
        run=dataclasses.replace(cfg.run, steps=200, log_every=25),
        sweep=dataclasses.replace(cfg.sweep, seeds=(0, 1),
                                  variants=("dense", "smha_gate", "smha_code", "smha_random",
                                            "moh")))


def smoke_config() -> ExperimentConfig:
    cfg = quick_config()
    return dataclasses.replace(
        cfg, model=lm("smha_gate", layers=1, width=16, seq_len=16),
        data=dataclasses.replace(cfg.data, seq_len=16, max_bytes=50_000, eval_windows=8),
        run=dataclasses.replace(cfg.run, steps=2, batch_size=8, eval_batch_size=8,
                                log_every=1),
        sweep=dataclasses.replace(cfg.sweep, seeds=(0,), variants=("dense", "smha_gate")))


def _variant_model(cfg: ExperimentConfig, variant: str) -> LMConfig:
    m = cfg.model
    return lm(variant, layers=len(m.mixers), width=m.width, seq_len=m.max_length)


def build_task(cfg: ExperimentConfig) -> Task:
    """Next-byte prediction on stdlib source; eval = bits/char on held-out windows."""
    train_src, test_src = cfg.data.sources(cfg.run.seed)

    def loss_fn(model, batch, rngs):
        logits = model.logits(model(batch["inputs"], deterministic=False, rngs=rngs))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
        return ce, {"ce": ce, "bits_per_char": ce / math.log(2.0)}

    def eval_fn(model, batch):
        logits = model.logits(model(batch["inputs"], deterministic=True))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return {"bits_per_char": ce.mean(-1) / math.log(2.0)}

    return Task(make_model=lambda rngs: DecoderLM(cfg.model, rngs=rngs), loss_fn=loss_fn,
                train_source=train_src, eval_source=test_src, eval_fn=eval_fn)


def selection_stats(model: DecoderLM, tokens: np.ndarray) -> dict[str, Any] | None:
    """Attention cost ``sum_e n_e^2 d_h`` relative to dense, per layer, and each head's share of
    tokens (SMHA models only; ``None`` otherwise)."""
    if not isinstance(model.mixers[0], SelectiveMultiHeadAttention):
        return None
    tokens = jnp.asarray(tokens)
    x = model.embed(tokens)
    if model.pos is not None:
        x = x + model.pos(jnp.arange(tokens.shape[1]))[None].astype(x.dtype)
    ratios, shares = [], []
    for i, (norm, mixer) in enumerate(zip(model.norms, model.mixers, strict=True)):
        h = norm(x)
        kept, _ = mixer.selection(h)
        length = tokens.shape[1]
        dense = mixer.num_heads * length * length * mixer.head_dim
        ratios.append(float(jnp.mean(attention_cost(kept, mixer.head_dim)) / dense))
        shares.append(np.asarray(jnp.mean(kept, axis=(0, 1))).round(3).tolist())
        x = x + mixer(h, deterministic=True)
        if model.mlps:
            x = x + model.mlps[i](model.mlp_norms[i](x))
    return {"cost_ratio_per_layer": ratios, "cost_ratio": float(np.mean(ratios)),
            "head_share_per_layer": shares}


def main(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    sw: SweepConfig = cfg.sweep
    out = pathlib.Path(sw.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, curves, stats, t0 = [], {}, {}, time.time()
    _, test_src = cfg.data.sources()
    probe = np.stack([test_src[i]["inputs"] for i in range(min(64, len(test_src)))])
    for name in sw.variants:
        for seed in sw.seeds:
            pcfg = dataclasses.replace(cfg, model=_variant_model(cfg, name),
                                       run=dataclasses.replace(cfg.run, seed=seed))
            trace: list[tuple[int, float]] = []
            res = train(pcfg, build_task(pcfg), callbacks=(_recorder(trace, cfg.run.log_every),),
                        desc=f"{name} seed={seed}")
            st = selection_stats(res.model, probe)
            row = dict(variant=name, seed=seed,
                       eval_bits_per_char=round(res.eval_metrics["bits_per_char"], 4),
                       attention_cost=_cost(name, st), seconds=round(res.seconds, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if seed == sw.seeds[0]:
                curves[name] = trace
                if st is not None:
                    stats[name] = st
    summary = _summary(rows, sw.variants)
    table = format_table(summary)
    total = time.time() - t0
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "train_curves": curves, "selection": stats, "seconds": total}, indent=1))
    m = cfg.model
    (out / "results.md").write_text(
        f"{table}\n\n{len(m.mixers)} layers, D = {m.width}, {HEADS} heads, context "
        f"{cfg.data.seq_len}, {cfg.run.steps} steps of batch {cfg.run.batch_size}, "
        f"{len(sw.seeds)} seeds; eval on {cfg.data.eval_windows} held-out windows; total wall "
        f"time {total:.0f} s\n")
    _plot(curves, rows, sw.variants, out)
    print(table)
    print(f"total wall time: {total:.0f} s; results in {out}")
    return rows


def _recorder(trace: list[tuple[int, float]], every: int):
    """A train-loop callback appending ``(step, mean train bits/char of the last `every`
    steps)`` to ``trace``."""
    window: list[float] = []

    def record(step, metrics):
        window.append(float(metrics["bits_per_char"]))
        if step % max(every, 1) == 0:
            trace.append((step, float(np.mean(window))))
            window.clear()

    return record


def _cost(name: str, st: dict[str, Any] | None) -> float:
    """Attention cost relative to dense: measured for SMHA; MoH computes every head densely
    (1.0 as run; its query-sparse ideal is ACTIVE / HEADS with all keys); dense 1.0."""
    if st is not None:
        return round(st["cost_ratio"], 4)
    return 1.0


def _summary(rows, variants):
    out = []
    for name in variants:
        rs = [r for r in rows if r["variant"] == name]
        if not rs:
            continue
        bpc = np.array([r["eval_bits_per_char"] for r in rs])
        cost = np.array([r["attention_cost"] for r in rs])
        active = HEADS if name == "dense" else ACTIVE
        out.append({"variant": name, "active heads": f"{active}/{HEADS}",
                    "eval bits/char mean": f"{bpc.mean():.4f}", "std": f"{bpc.std():.4f}",
                    "attn cost vs dense": f"{cost.mean():.3f}",
                    "s/run": f"{np.mean([r['seconds'] for r in rs]):.0f}",
                    "seeds": len(rs), "what": VARIANTS[name][1]})
    return out


def _plot(curves, rows, variants, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, trace in curves.items():
        if trace:
            steps, values = zip(*trace, strict=True)
            axes[0].plot(steps, values, label=name)
    axes[0].set(xlabel="step", ylabel="train bits/char (seed 0)", title="training curves")
    axes[0].legend(fontsize=8)
    for name in variants:
        rs = [r for r in rows if r["variant"] == name]
        if rs:
            axes[1].scatter([r["attention_cost"] for r in rs],
                            [r["eval_bits_per_char"] for r in rs], label=name)
    axes[1].set(xlabel="attention cost relative to dense (sum_e n_e^2 d_h; MoH as run = 1)",
                ylabel="eval bits/char", title="quality vs attention cost (every seed)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "uoe.png", dpi=110)
    plt.close(fig)
