"""BAM in miniature: seed, branch on three offline domains, mix into BTX / BAM MoEs.

Claim tested (Zhang et al., "BAM! Just Like That: Simple and Efficient Parameter Upcycling for
Mixture of Experts", NeurIPS 2024): upcycling the specialists' *attention* into soft-routed
attention experts (BAM) beats averaging it (BTX, FFN experts only): 590M seed, average perplexity
over 4 domains BTX 10.72 vs BAM Expert-KV 9.70 (data-matched); Shared-KV 10.32; top-1 / top-2
attention routing gives no gain over BTX.

Three phases, all through :func:`jaxattn.train.train` on :class:`ParallelLM` (parallel blocks):
1. *seed*: a dense char LM trained on an equal mix of three domains (stdlib code, stdlib
   docstring prose, generated arithmetic);
2. *branch*: three copies continue on one domain each (learning rate = 50% of the seed's, as the
   paper);
3. *mix*: the seed + the 3 specialists (E = 4) upcycled (:func:`upcycle`) into BTX (FFN experts
   top-1, attention averaged), BAM soft Expert-KV, BAM soft Shared-KV and BAM top-1 attention,
   each trained the same steps on the same equal mix. Metric: per-domain validation bits/char.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.bam.data import DOMAINS, MixedSource, domain_source
from jaxattn.models import MixerConfig
from jaxattn.models.parallel_lm import ParallelLM, ParallelLMConfig, upcycle
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task, train
from jaxattn.train.metrics import format_table

NAME = "bam"
DESCRIPTION = "BAM vs BTX upcycling: seed, branch on 3 domains, mix (Zhang et al., 2024)"
HERE = pathlib.Path(__file__).parent

# variant -> upcycle(...) arguments
VARIANTS: dict[str, dict[str, Any]] = {
    "btx": dict(attention="average"),
    "bam_expert_kv": dict(attention="expert_kv"),
    "bam_shared_kv": dict(attention="shared_kv"),
    "bam_top1_attn": dict(attention="expert_kv", attention_top_k=1),
}


@dataclasses.dataclass(frozen=True)
class BAMDataConfig:
    seq_len: int = 128
    domain_bytes: int = 600_000  # per domain (prose has ~450 kB in total)
    test_fraction: float = 0.05
    eval_windows: int = 128  # validation windows per domain


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    seed_steps: int = 1500
    branch_steps: int = 1000
    mix_steps: int = 1000
    branch_lr_fraction: float = 0.5  # the paper: continued pretraining at 50% of the peak lr
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0,)  # seeds of the mix phase (router init and data order)
    output_dir: str = str(HERE / "results")


def lm(width: int = 96, heads: int = 4, layers: int = 2, max_length: int = 128
       ) -> ParallelLMConfig:
    return ParallelLMConfig(vocab_size=256, width=width, max_length=max_length,
                            num_heads=heads, mixers=(MixerConfig("attention"),) * layers,
                            mlp_ratio=4)


def default_config() -> ExperimentConfig:
    """The spec's miniature: D = 96, 4 heads, 2 parallel blocks, context 128, batch 32;
    1500 seed / 1000 branch / 1000 mix steps."""
    return ExperimentConfig(
        model=lm(), data=BAMDataConfig(),
        optim=OptimConfig(weight_decay_mask="all",  # as the committed results
                          learning_rate=2e-3, weight_decay=0.1, warmup_steps=100,
                          schedule="cosine", end_lr_fraction=0.1),
        run=RunConfig(steps=1500, batch_size=32, log_every=100, progress=False),
        sweep=SweepConfig(),
    )


def quick_config() -> ExperimentConfig:
    """The 2-core CPU preset (all phases and variants under 5 minutes): D = 64, context 64,
    400 seed / 200 branch / 200 mix steps (the spec: D = 96, context 128, 1500 / 1000 / 1000)."""
    cfg = default_config()
    return dataclasses.replace(
        cfg, model=lm(width=64, max_length=64),
        data=dataclasses.replace(cfg.data, seq_len=64, eval_windows=128),
        optim=dataclasses.replace(cfg.optim, warmup_steps=40),
        run=dataclasses.replace(cfg.run, steps=400, log_every=50),
        sweep=dataclasses.replace(cfg.sweep, seed_steps=400, branch_steps=200, mix_steps=200))


def smoke_config() -> ExperimentConfig:
    cfg = quick_config()
    return dataclasses.replace(
        cfg, model=lm(width=16, heads=2, layers=1, max_length=16),
        data=dataclasses.replace(cfg.data, seq_len=16, domain_bytes=20_000, eval_windows=4),
        run=dataclasses.replace(cfg.run, steps=2, batch_size=8, log_every=1),
        sweep=dataclasses.replace(cfg.sweep, seed_steps=2, branch_steps=2, mix_steps=2,
                                  variants=("btx", "bam_expert_kv")))


# ---- data, tasks ------------------------------------------------------------------------------
def _source(cfg: ExperimentConfig, domain: str, split: str):
    d = cfg.data
    return domain_source(domain, seq_len=d.seq_len, split=split, max_bytes=d.domain_bytes,
                         test_fraction=d.test_fraction)


def train_source(cfg: ExperimentConfig, domain: str | None = None):
    """One domain's train windows, or (``None``) an equal mix of the three."""
    if domain is not None:
        return _source(cfg, domain, "train")
    return MixedSource([_source(cfg, name, "train") for name in DOMAINS])


def _loss_fn(model, batch, rngs):
    logits = model.logits(model(batch["inputs"], deterministic=False, rngs=rngs))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    return ce, {"ce": ce, "bits_per_char": ce / math.log(2.0)}


def build_task(cfg: ExperimentConfig, *, init: nnx.Module | None = None,
               domain: str | None = None) -> Task:
    """Char-LM task on ``domain`` (``None``: the equal mix). ``init``: start from this model's
    parameters (a copy; the loop's ``make_model`` builds the module from its state) instead of a
    fresh ``ParallelLM(cfg.model)`` - how branching and mixing start from trained weights."""
    if init is None:
        make = lambda rngs: ParallelLM(cfg.model, rngs=rngs)
    else:
        graphdef, state = nnx.split(init)
        make = lambda rngs: nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    return Task(make_model=make, loss_fn=_loss_fn, train_source=train_source(cfg, domain))


# ---- evaluation -------------------------------------------------------------------------------
def eval_windows(cfg: ExperimentConfig) -> dict[str, np.ndarray]:
    """``{domain: int32 [n, seq_len + 1]}`` fixed validation windows (the test split)."""
    out = {}
    for name in DOMAINS:
        src = _source(cfg, name, "test")
        n = min(cfg.data.eval_windows, len(src))
        out[name] = np.stack([np.concatenate([src[i]["inputs"], src[i]["targets"][-1:]])
                              for i in range(n)])
    return out


def bits_per_char(model: nnx.Module, windows: dict[str, np.ndarray], batch: int = 64
                  ) -> dict[str, float]:
    """Validation bits/char per domain and their average (``"avg"``)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def ce_sum(state, tokens):
        m = nnx.merge(graphdef, state)
        logits = m.logits(m(tokens[:, :-1], deterministic=True))
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).sum()

    out = {}
    for name, toks in windows.items():
        total = sum(float(ce_sum(state, jnp.asarray(toks[i:i + batch])))
                    for i in range(0, len(toks), batch))
        out[name] = total / (toks.shape[0] * (toks.shape[1] - 1)) / math.log(2.0)
    out["avg"] = float(np.mean([out[n] for n in windows]))
    return out


# ---- the three phases -------------------------------------------------------------------------
def _phase(cfg: ExperimentConfig, steps: int, lr: float, seed: int) -> ExperimentConfig:
    return dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, learning_rate=lr,
                                       warmup_steps=min(cfg.optim.warmup_steps, steps // 4)),
        run=dataclasses.replace(cfg.run, steps=steps, seed=seed))


def main(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    sw: SweepConfig = cfg.sweep
    out = pathlib.Path(sw.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    windows = eval_windows(cfg)
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[tuple[int, float]]] = {}

    def record(phase, model, seconds, seed=None, steps=0):
        bpc = bits_per_char(model, windows)
        rows.append(dict(model=phase, seed=seed, steps=steps,
                         **{k: round(v, 4) for k, v in bpc.items()}, seconds=round(seconds, 1)))
        print(json.dumps(rows[-1]), flush=True)

    def run(phase_cfg, task, name):
        trace: list[tuple[int, float]] = []
        log = lambda step, m: trace.append((step, float(m["bits_per_char"]))) \
            if step % 5 == 0 else None
        res = train(phase_cfg, task, callbacks=(log,), desc=name)
        curves[name] = trace
        return res

    lr = cfg.optim.learning_rate
    seed_cfg = _phase(cfg, sw.seed_steps, lr, 0)
    seed = run(seed_cfg, build_task(seed_cfg), "seed")
    record("seed (dense, mixed data)", seed.model, seed.seconds, steps=sw.seed_steps)

    branch_cfg = _phase(cfg, sw.branch_steps, lr * sw.branch_lr_fraction, 0)
    experts = [seed.model]
    for domain in DOMAINS:
        res = run(branch_cfg, build_task(branch_cfg, init=seed.model, domain=domain),
                  f"branch_{domain}")
        experts.append(res.model)
        record(f"{domain} specialist (dense)", res.model, res.seconds, steps=sw.branch_steps)

    mix_cfg = _phase(cfg, sw.mix_steps, lr * sw.branch_lr_fraction, 0)
    for name in sw.variants:
        for s in sw.seeds:
            moe = upcycle(experts, rngs=nnx.Rngs(params=1000 + s), **VARIANTS[name])
            pcfg = dataclasses.replace(mix_cfg, run=dataclasses.replace(mix_cfg.run, seed=s))
            res = run(pcfg, build_task(pcfg, init=moe), f"{name} seed={s}")
            record(name, res.model, res.seconds, seed=s, steps=sw.mix_steps)
    total = time.time() - t0
    summary = _summary(rows, sw)
    table = format_table(summary)
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "curves": curves, "seconds": total,
         "config": {"width": cfg.model.width, "layers": len(cfg.model.mixers),
                    "heads": cfg.model.num_heads, "seq_len": cfg.data.seq_len,
                    "batch": cfg.run.batch_size, "seed_steps": sw.seed_steps,
                    "branch_steps": sw.branch_steps, "mix_steps": sw.mix_steps,
                    "mix_seeds": list(sw.seeds)}}, indent=1))
    (out / "results.md").write_text(
        f"{table}\n\nvalidation bits/char ({cfg.data.eval_windows} windows of "
        f"{cfg.data.seq_len} per domain); D={cfg.model.width}, {len(cfg.model.mixers)} parallel "
        f"blocks, batch {cfg.run.batch_size}; steps seed/branch/mix = {sw.seed_steps}/"
        f"{sw.branch_steps}/{sw.mix_steps}; mix seeds {list(sw.seeds)}; total wall time "
        f"{total:.0f} s\n")
    _plot(summary, curves, sw, out)
    print(table)
    print(f"total wall time: {total:.0f} s; results in {out}")
    return rows


def _summary(rows, sw: SweepConfig) -> list[dict[str, Any]]:
    """One row per model: mean (and std over mix seeds) of each domain's bits/char."""
    out = []
    for name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == name]
        row: dict[str, Any] = {"model": name}
        for k in (*DOMAINS, "avg"):
            v = np.array([r[k] for r in rs])
            row[k] = f"{v.mean():.4f}" + (f" ± {v.std():.4f}" if len(v) > 1 else "")
        row["train s"] = f"{np.mean([r['seconds'] for r in rs]):.0f}"
        out.append(row)
    return out


def _plot(summary, curves, sw: SweepConfig, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    mixes = [r for r in summary if r["model"] in VARIANTS]
    x = np.arange(len(DOMAINS) + 1)
    width = 0.8 / max(len(mixes), 1)
    for i, r in enumerate(mixes):
        vals = [float(r[k].split()[0]) for k in (*DOMAINS, "avg")]
        axes[0].bar(x + i * width, vals, width, label=r["model"])
    axes[0].set_xticks(x + width * (len(mixes) - 1) / 2, [*DOMAINS, "avg"])
    lo = min((float(r[k].split()[0]) for r in mixes for k in (*DOMAINS, "avg")), default=0)
    axes[0].set_ylim(bottom=max(0.0, lo - 0.2))
    axes[0].set(ylabel="validation bits/char", title="mixed models (lower is better)")
    axes[0].legend(fontsize=8)
    for name, trace in curves.items():
        if name.split(" ")[0] in VARIANTS and name.endswith(f"seed={sw.seeds[0]}") and trace:
            steps, vals = zip(*trace, strict=True)
            k = 4  # moving average over 4 logged points (20 steps)
            sm = np.convolve(vals, np.ones(k) / k, mode="valid") if len(vals) > k else vals
            axes[1].plot(steps[len(steps) - len(sm):], sm, label=name.split(" ")[0])
    axes[1].set(xlabel="mix step", ylabel="train bits/char (moving avg)",
                title="mix phase training curves")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bam.png", dpi=110)
    plt.close(fig)
