"""MoA (Fu et al., 2024) in miniature: profile a tiny causal LM's attention influence, search
heterogeneous per-head elastic spans under a density budget, and compare the plan with a
uniform sink + sliding-window plan of the same density at twice the profiled length.

Task (filler + multi-query associative recall): a sequence of local n-gram filler
(``x_t = perm[x_{t-2}]`` for a fixed permutation of the ``F`` filler tokens with probability
``1 - noise``, else random: a local head at offset 2 predicts it), a prompt of ``num_pairs``
(key, value) pairs at a random offset past the attention sink, then ``num_queries`` copies of
prompt pairs at random positions: at a copied key, the next token is the prompt's value (a
recall, measured by accuracy); everywhere else the next token is filler (measured by the LM
loss). Any prefix of a sequence is a valid, shorter sequence, so one trained model is profiled
at ``profile_lengths`` and validated at ``validate_length``.

Pipeline: train a dense causal LM (``DecoderLM`` with the ``"moa"`` mixer at its default
dense plan) through ``jaxattn.train.train``; profile ``E`` (:func:`jaxattn.nn.moa
.profile_influence`) on calibration sequences whose targets are the dense model's own greedy
predictions (the paper's model-generated answers) on the body tokens; cost every candidate
``(alpha, beta)`` per head at each profiled length; solve the MILP (density budget at every
profiled length, KV density as in the code); evaluate dense / MoA / uniform plans at every
length.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxattn.models.layers import MixerConfig
from jaxattn.models.lm import DecoderLM, LMConfig
from jaxattn.nn import moa
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task, train
from jaxattn.train.metrics import format_table

NAME = "moa"
DESCRIPTION = ("MoA: profiled heterogeneous elastic spans vs a uniform sink + window plan at "
               "2x the profiled length (Fu et al., 2024)")
HERE = pathlib.Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class RecallFillerConfig:
    length: int = 128  # training length (the longest; shorter sequences are prefixes)
    num_pairs: int = 4  # prompt (key, value) pairs
    prompt_offset: tuple[int, int] = (8, 16)  # first prompt position, drawn in this range
    num_keys: int = 16
    num_values: int = 16
    filler_vocab: int = 16
    noise: float = 0.1
    num_queries: int = 20  # copies of prompt pairs after the prompt
    train_examples: int = 100_000
    calibration_examples: int = 64
    test_examples: int = 256

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + self.filler_vocab


@dataclasses.dataclass(frozen=True)
class MoAModelConfig:
    width: int = 64
    num_heads: int = 4
    layers: int = 2
    mlp_ratio: int = 0
    attn_init_std: float = 0.1  # N(0, 0.1) q/k/v/o kernels (Zoology's fix for the plateau)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    profile_lengths: tuple[int, ...] = (32, 64)
    validate_length: int = 128
    eval_lengths: tuple[int, ...] = (32, 64, 128)
    density: float = 0.5
    alphas: tuple[float, ...] = (-32.0, -16.0, 0.0, 16.0, 32.0)  # the spec's 5 x 5 grid
    betas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    # the code's rounding (64 / 128 / 64) scaled to these lengths by 1/16
    span_block: int = 4
    min_span: int = 8
    sink_size: int = 4
    profile_batch: int = 16
    model_generated_targets: bool = True
    recall_weight: float = 1.0  # training loss: mean CE + recall_weight * recall CE
    seeds: tuple[int, ...] = (0,)
    output_dir: str = str(HERE / "results")


# ---- data ---------------------------------------------------------------------------------------
class RecallFillerSource:
    """``src[i]`` -> ``tokens [L]``, ``recall [L]`` (bool: the next token is a recalled value),
    ``body [L]`` (bool: position is after the prompt). Example ``i`` depends on
    ``(seed, split, i)`` only."""

    SPLITS = {"train": 0, "calibration": 1, "test": 2}

    def __init__(self, cfg: RecallFillerConfig, *, seed: int = 0, split: str = "train"):
        if cfg.prompt_offset[1] + 2 * cfg.num_pairs + 2 * cfg.num_queries + 4 > cfg.length:
            raise ValueError(f"length {cfg.length} cannot hold {cfg.num_pairs} pairs and "
                             f"{cfg.num_queries} queries")
        if cfg.num_pairs > min(cfg.num_keys, cfg.num_values):
            raise ValueError("num_pairs must not exceed num_keys or num_values")
        self.cfg, self.seed, self.split = cfg, seed, self.SPLITS[split]
        self.n = {"train": cfg.train_examples, "calibration": cfg.calibration_examples,
                  "test": cfg.test_examples}[split]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        c = self.cfg
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range [0, {self.n})")
        rng = np.random.default_rng([self.seed, self.split, index])
        filler0 = c.num_keys + c.num_values
        perm = np.random.default_rng(12345).permutation(c.filler_vocab)  # fixed per task
        body = np.empty(c.length, np.int64)
        body[:2] = rng.integers(0, c.filler_vocab, size=2)
        noise = rng.random(c.length) < c.noise
        rand = rng.integers(0, c.filler_vocab, size=c.length)
        for t in range(2, c.length):
            body[t] = rand[t] if noise[t] else perm[body[t - 2]]
        tokens = (filler0 + body).astype(np.int32)
        # the prompt: (key, value) pairs at a random offset, past the attention sink
        keys = rng.choice(c.num_keys, size=c.num_pairs, replace=False)
        values = c.num_keys + rng.choice(c.num_values, size=c.num_pairs, replace=False)
        start = int(rng.integers(c.prompt_offset[0], c.prompt_offset[1] + 1))
        end = start + 2 * c.num_pairs
        tokens[start:end:2], tokens[start + 1:end:2] = keys, values
        # queries: non-overlapping (key, value) slots after the prompt, spread over the rest
        slots = rng.choice(np.arange(end + 1, c.length - 1, 2), size=c.num_queries,
                           replace=False)
        recall = np.zeros(c.length, bool)
        for s in slots:
            p = rng.integers(0, c.num_pairs)
            tokens[s], tokens[s + 1] = keys[p], values[p]
            recall[s] = True  # predicting tokens[s + 1] from position s is a recall
        is_body = np.arange(c.length) >= end
        return {"tokens": tokens, "recall": recall, "body": is_body}


# ---- configs ------------------------------------------------------------------------------------
def default_config() -> ExperimentConfig:
    """The spec's model size (4 layers, 4 heads, D = 128, here without MLPs) on length-128
    sequences; profile at 32 and 64, validate at 128; 3 seeds."""
    return ExperimentConfig(
        model=MoAModelConfig(width=128, layers=4), data=RecallFillerConfig(),
        optim=OptimConfig(weight_decay_mask="all",  # as the committed results
                          learning_rate=2e-3, weight_decay=0.1, warmup_steps=100,
                          schedule="cosine", grad_clip_norm=1.0),
        run=RunConfig(steps=3000, batch_size=32, eval_every=0, log_every=100,
                      progress=False),
        sweep=SearchConfig(seeds=(0, 1, 2)))


def quick_config() -> ExperimentConfig:
    """CPU preset (under 5 minutes on 2 cores): 2 layers of D = 64, 4 heads, no MLP, 3000 steps
    of batch 32 at L = 128, lr 3e-3 (50 warmup steps); one seed."""
    cfg = default_config()
    return dataclasses.replace(
        cfg, model=MoAModelConfig(), run=dataclasses.replace(cfg.run, steps=3000),
        optim=dataclasses.replace(cfg.optim, learning_rate=3e-3, warmup_steps=50),
        sweep=SearchConfig())


def smoke_config() -> ExperimentConfig:
    """Tiny config for tests: 2 steps at L = 64, profile at 32, validate at 64."""
    cfg = quick_config()
    return dataclasses.replace(
        cfg, model=MoAModelConfig(width=16, num_heads=2, layers=1, mlp_ratio=0),
        data=dataclasses.replace(cfg.data, length=64, num_pairs=4, num_queries=4,
                                 prompt_offset=(4, 8),
                                 train_examples=64, calibration_examples=4, test_examples=8),
        run=dataclasses.replace(cfg.run, steps=2, batch_size=8, eval_batch_size=8),
        sweep=dataclasses.replace(cfg.sweep, profile_lengths=(32,), validate_length=64,
                                  eval_lengths=(32, 64), alphas=(0.0, 16.0),
                                  betas=(0.0, 1.0), profile_batch=4,
                                  output_dir=str(HERE / "results" / "smoke")))


# ---- task ---------------------------------------------------------------------------------------
def lm_config(cfg: ExperimentConfig) -> LMConfig:
    m, d, s = cfg.model, cfg.data, cfg.sweep
    rule = (("span_block", s.span_block), ("min_span", s.min_span), ("sink_size", s.sink_size),
            ("init_std", m.attn_init_std))
    return LMConfig(vocab_size=d.vocab_size, width=m.width, max_length=d.length,
                    num_heads=m.num_heads, mixers=(MixerConfig("moa", rule),) * m.layers,
                    mlp_ratio=m.mlp_ratio)


def _next_token_ce(model, tokens):
    logits = model.logits(model(tokens, deterministic=True))[:, :-1]
    return logits, optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])


def build_task(cfg: ExperimentConfig) -> Task:
    """Dense causal LM: next-token cross-entropy on every position plus the mean
    cross-entropy of the recall positions (``recall_weight`` times; the recall targets are
    only 1/16 of the body tokens, this speeds up learning to recall)."""
    lm = lm_config(cfg)

    def loss_fn(model, batch, rngs):
        logits = model.logits(model(batch["tokens"], deterministic=False, rngs=rngs))[:, :-1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tokens"][:, 1:])
        rec = batch["recall"][:, :-1].astype(jnp.float32)
        hit = (jnp.argmax(logits, -1) == batch["tokens"][:, 1:]).astype(jnp.float32) * rec
        count = jnp.maximum(jnp.sum(rec), 1.0)
        acc = jnp.sum(hit) / count
        rec_ce = jnp.sum(ce * rec) / count
        loss = ce.mean() + cfg.sweep.recall_weight * rec_ce
        return loss, {"ce": ce.mean(), "recall_ce": rec_ce, "recall": acc}

    def eval_fn(model, batch):
        logits, ce = _next_token_ce(model, batch["tokens"])
        rec = batch["recall"][:, :-1]
        hit = (jnp.argmax(logits, -1) == batch["tokens"][:, 1:]) & rec
        f = lambda a: jnp.sum(a.astype(jnp.float32), -1)
        return {"recall_hits": f(hit), "recall_count": f(rec), "ce": jnp.mean(ce, -1)}

    d, seed = cfg.data, cfg.run.seed
    return Task(make_model=lambda rngs: DecoderLM(lm, rngs=rngs), loss_fn=loss_fn,
                train_source=RecallFillerSource(d, seed=seed, split="train"),
                eval_source=RecallFillerSource(d, seed=seed, split="test"), eval_fn=eval_fn)


# ---- profiling, search, evaluation --------------------------------------------------------------
def _stack(source, n: int, length: int) -> dict[str, np.ndarray]:
    items = [source[i] for i in range(n)]
    return {k: np.stack([it[k][:length] for it in items]) for k in items[0]}


def profile(model: DecoderLM, cfg: ExperimentConfig, length: int) -> list[np.ndarray]:
    """Mean influence ``E`` per layer ``[N, length, length]`` on the calibration split; the
    loss covers the body tokens, with the dense model's greedy predictions as targets."""
    s, d = cfg.sweep, cfg.data
    calib = _stack(RecallFillerSource(d, seed=cfg.run.seed, split="calibration"),
                   d.calibration_examples, length)
    tokens, body = jnp.asarray(calib["tokens"]), jnp.asarray(calib["body"][:, 1:])
    if s.model_generated_targets:
        targets = jnp.argmax(_next_token_ce(model, tokens)[0], -1)
    else:
        targets = tokens[:, 1:]
    w = body.astype(jnp.float32)
    batches = []
    for i in range(0, d.calibration_examples, s.profile_batch):
        sl = slice(i, i + s.profile_batch)
        batches.append((tokens[sl], targets[sl], w[sl]))

    def loss_fn(model, batch):
        toks, tgt, weight = batch
        logits = model.logits(model(toks, deterministic=True))[:, :-1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
        return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    return moa.profile_influence(model, loss_fn, batches, batch_size=s.profile_batch,
                                 length=length)


def rule_kwargs(s: SearchConfig) -> dict[str, int]:
    return dict(span_block=s.span_block, min_span=s.min_span, sink_size=s.sink_size)


def search(influence: dict[int, list[np.ndarray]], cfg: ExperimentConfig):
    """Per-head ``(alpha, beta)`` for every layer: ``(alphas [layers, N], betas, info)``."""
    s = cfg.sweep
    rule = rule_kwargs(s)
    lens = tuple(s.profile_lengths)
    cand_a, cand_b = moa.candidate_grid(s.alphas, s.betas, lengths=lens + (s.validate_length,))
    costs = np.stack([np.concatenate([moa.plan_costs(e, cand_a, cand_b, n, **rule)
                                      for e in influence[n]]) for n in lens])
    dens = np.stack([moa.plan_density(cand_a, cand_b, n, **rule) for n in lens])
    choice = moa.search_plan(costs, dens, s.density)
    heads = cfg.model.num_heads
    alphas = cand_a[choice].reshape(-1, heads)
    betas = cand_b[choice].reshape(-1, heads)
    return alphas, betas, {"candidates": len(cand_a),
                           "predicted_loss": {n: float(costs[i, np.arange(len(choice)),
                                                             choice].sum())
                                              for i, n in enumerate(lens)}}


def mean_density(alphas, betas, length: int, s: SearchConfig) -> float:
    spans = moa.elastic_spans(np.ravel(alphas), np.ravel(betas), length, **rule_kwargs(s))[0]
    return float(np.mean(spans) / length)


def uniform_plan(target: float, layers: int, heads: int, length: int, s: SearchConfig):
    """Every head the same sink + window (alpha = 0, beta chosen so the span at ``length``
    matches the target KV density; the span grows with N like MoA's, as StreamingLLM at a
    fixed ratio)."""
    best = None
    for beta in np.linspace(0.0, 1.0, 1025):
        dens = mean_density([0.0], [beta], length, s)
        if dens <= target + 1e-9 and (best is None or dens > best[1]):
            best = (beta, dens)
    beta = best[0]
    return np.zeros((layers, heads)), np.full((layers, heads), beta)


def evaluate(model: DecoderLM, cfg: ExperimentConfig, alphas, betas) -> list[dict[str, Any]]:
    """Recall accuracy and body LM loss at every eval length under the plan."""
    d, s = cfg.data, cfg.sweep
    for m, a, b in zip(moa.moa_layers(model), alphas, betas, strict=True):
        m.set_plan(a, b)
    test = _stack(RecallFillerSource(d, seed=cfg.run.seed, split="test"), d.test_examples,
                  d.length)

    @nnx.jit
    def metrics(model, tokens, recall, body):
        logits, ce = _next_token_ce(model, tokens)
        hit = (jnp.argmax(logits, -1) == tokens[:, 1:]) & recall[:, :-1]
        w = body[:, 1:] & ~recall[:, :-1]
        f = lambda a: jnp.sum(a.astype(jnp.float32))
        return f(hit), f(recall[:, :-1]), f(ce * w), f(w)

    rows = []
    for n in s.eval_lengths:
        sums = np.zeros(4)
        for i in range(0, d.test_examples, 64):
            sl = slice(i, i + 64)
            out = metrics(model, *(jnp.asarray(test[k][sl, :n])
                                   for k in ("tokens", "recall", "body")))
            sums += np.asarray([float(x) for x in out])
        rows.append({"length": n, "recall": sums[0] / max(sums[1], 1.0),
                     "filler_loss": sums[2] / max(sums[3], 1.0),
                     "density": mean_density(alphas, betas, n, s)})
    return rows


# ---- run ----------------------------------------------------------------------------------------
def main(cfg: ExperimentConfig) -> dict[str, Any]:
    s = cfg.sweep
    out = pathlib.Path(s.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    runs = []
    for seed in s.seeds:
        scfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
        res = train(scfg, build_task(scfg), desc=f"dense seed={seed}")
        model = res.model
        influence = {n: profile(model, scfg, n) for n in s.profile_lengths}
        alphas, betas, info = search(influence, scfg)
        layers, heads = alphas.shape
        dens = mean_density(alphas, betas, s.validate_length, s)
        ua, ub = uniform_plan(dens, layers, heads, s.validate_length, s)
        plans = {"dense": (np.zeros((layers, heads)), np.ones((layers, heads))),
                 "moa": (alphas, betas), "uniform": (ua, ub)}
        results = {name: evaluate(model, scfg, a, b) for name, (a, b) in plans.items()}
        spans = {name: moa.elastic_spans(np.ravel(a), np.ravel(b), s.validate_length,
                                         **rule_kwargs(s))[0].reshape(layers, heads).tolist()
                 for name, (a, b) in plans.items()}
        runs.append({"seed": seed, "train_seconds": round(res.seconds, 1),
                     "train_ce": res.train_metrics.get("ce"),
                     "alphas": alphas.tolist(), "betas": betas.tolist(),
                     "uniform_beta": float(ub.flat[0]), "spans_at_validate": spans,
                     "search": info, "results": results,
                     "influence_by_distance": _influence_by_distance(
                         influence[max(s.profile_lengths)])})
        print(json.dumps({"seed": seed, "alphas": alphas.tolist(), "betas": betas.tolist(),
                          "results": results}), flush=True)
    total = time.time() - t0
    table = format_table(_summary(runs, s))
    (out / "results.json").write_text(json.dumps({"runs": runs, "seconds": total}, indent=1))
    plan_lines = "\n".join(
        f"seed {r['seed']}: MoA spans at N={s.validate_length} per layer x head "
        f"{r['spans_at_validate']['moa']}; uniform {r['spans_at_validate']['uniform'][0][0]} "
        "for every head" for r in runs)
    (out / "results.md").write_text(
        f"{table}\n\n{plan_lines}\n\n{cfg.run.steps} steps of batch {cfg.run.batch_size}; "
        f"profiled at {list(s.profile_lengths)}, density budget {s.density} (KV density "
        f"mean S/N); total wall time {total:.0f} s\n")
    _plot(runs, s, out)
    print(table)
    print(plan_lines)
    print(f"total wall time: {total:.0f} s; results in {out}")
    return {"runs": runs, "seconds": total}


def _influence_by_distance(layers: list[np.ndarray]) -> list[list[float]]:
    """Per layer x head, the share of the total |E| at distance >= N/2 (long-range heads)."""
    out = []
    for e in layers:
        n = e.shape[-1]
        dist = np.arange(n)[:, None] - np.arange(n)[None, :]
        far = (dist >= n // 2)[None]
        a = np.abs(e)
        out.append((np.sum(a * far, axis=(1, 2)) / np.maximum(a.sum(axis=(1, 2)), 1e-30))
                   .tolist())
    return out


def _summary(runs, s: SearchConfig):
    rows = []
    for plan in ("dense", "moa", "uniform"):
        for i, n in enumerate(s.eval_lengths):
            rec = np.array([r["results"][plan][i]["recall"] for r in runs])
            loss = np.array([r["results"][plan][i]["filler_loss"] for r in runs])
            dens = runs[0]["results"][plan][i]["density"]
            rows.append({"plan": plan, "length": n, "KV density": f"{dens:.3f}",
                         "recall": f"{rec.mean():.4f}",
                         "recall std": f"{rec.std():.4f}" if len(runs) > 1 else "-",
                         "filler loss": f"{loss.mean():.4f}", "seeds": len(runs)})
    return rows


def _plot(runs, s: SearchConfig, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for plan, style in (("dense", "k-"), ("moa", "b-o"), ("uniform", "r-s")):
        rec = np.mean([[row["recall"] for row in r["results"][plan]] for r in runs], axis=0)
        loss = np.mean([[row["filler_loss"] for row in r["results"][plan]] for r in runs],
                       axis=0)
        axes[0].plot(s.eval_lengths, rec, style, label=plan)
        axes[1].plot(s.eval_lengths, loss, style, label=plan)
    for ax, name in zip(axes[:2], ("recall accuracy", "filler LM loss"), strict=True):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set(xlabel="sequence length N", ylabel=name, xticks=s.eval_lengths,
               xticklabels=[str(n) for n in s.eval_lengths])
        ax.axvline(max(s.profile_lengths), color="grey", ls=":", lw=1)
        ax.legend(fontsize=8)
    axes[0].set_title(f"recall vs length (density {s.density}, profiled <= "
                      f"{max(s.profile_lengths)})")
    axes[1].set_title("loss on filler tokens")
    spans = np.asarray(runs[0]["spans_at_validate"]["moa"])
    im = axes[2].imshow(spans / s.validate_length, vmin=0, vmax=1, cmap="viridis",
                        aspect="auto")
    axes[2].set(xlabel="head", ylabel="layer", yticks=range(spans.shape[0]),
                xticks=range(spans.shape[1]),
                title=f"MoA span / N at N = {s.validate_length} (seed {runs[0]['seed']})")
    fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    fig.savefig(out / "moa.png", dpi=110)
    plt.close(fig)
