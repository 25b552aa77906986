"""Tensor attention: Match3 with one layer, and the polynomial method's error and cost.

Claims tested (Alman & Song, "How to Capture Higher-order Correlations? Generalizing Matrix
Softmax Attention to Kronecker Computation", 2023, motivated by Sanford, Hsu & Telgarsky 2023):

* (b) **Match3** (``y_i = 1`` iff ``x_i + x_j + x_k = 0 mod M`` for some ``j, k``) is hard for one
  layer of standard attention of small size and easy for one layer of tensor attention. The
  spec's measurement on this CPU: n = 8, M = 64, one layer, D = 64, 4 heads, MLP readout, Adam
  2e-3, batch 256, fresh samples: standard 79.3% vs tensor 97.8% test accuracy after 10k steps.
* (a) **Polynomial method**: with entries bounded by ``B``, a degree-``g`` Taylor polynomial gives
  an ``n^(1+o(1))`` approximation whose error falls quickly with ``g`` when ``B`` is small and
  degrades sharply as ``B^3`` grows; the exact computation costs ``n^3``.

Model: ``jaxattn.models.DecoderLM`` with ``causal=False`` (a bidirectional token encoder), no
positions (the task is permutation-equivariant), one ``x + mixer(LN(x))`` block, final LayerNorm,
then a per-token MLP readout to one logit; binary cross-entropy.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxattn.core import tensor as tensor_lib
from jaxattn.core.tensor_chunked import tensor_attention_chunked
from jaxattn.models import DecoderLM, LMConfig, MixerConfig
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task, train
from jaxattn.train.metrics import best_seconds, format_table
from jaxattn.train.sources.match3 import Match3Source

NAME = "tensor_attention"
DESCRIPTION = "Tensor vs standard attention on Match3; polynomial-method error (Alman & Song)"
HERE = pathlib.Path(__file__).parent
MIXERS = {"attention": MixerConfig("attention"), "tensor": MixerConfig("tensor_attention")}


@dataclasses.dataclass(frozen=True)
class Match3DataConfig:
    length: int = 8
    modulus: int = 64
    test_examples: int = 4096

    def sources(self, run: RunConfig, seed: int = 0) -> tuple[Match3Source, Match3Source]:
        """Train source with a fresh example for every step's every row; fixed test set."""
        n_train = max(run.steps, 1) * run.batch_size
        kw = dict(length=self.length, modulus=self.modulus, seed=seed)
        return (Match3Source(num_examples=n_train, split="train", **kw),
                Match3Source(num_examples=self.test_examples, split="test", **kw))


@dataclasses.dataclass(frozen=True)
class Match3ModelConfig:
    mixer: str = "tensor"  # a key of MIXERS
    width: int = 64
    num_heads: int = 4
    readout_ratio: int = 2  # MLP readout hidden width = ratio * width


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    mixers: tuple[str, ...] = ("attention", "tensor")
    widths: tuple[int, ...] = (16, 32, 64)
    seeds: tuple[int, ...] = (0,)
    # (a) polynomial method: entries uniform in [-B, B], head dim, degrees, lengths
    approx_bounds: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    approx_head_dim: int = 4
    approx_degrees: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    approx_error_length: int = 64
    approx_time_lengths: tuple[int, ...] = (64, 128, 256, 512)
    approx_time_degree: int = 4
    approx_polynomial_only_lengths: tuple[int, ...] = (2048, 8192, 32768)  # exact is too slow
    output_dir: str = str(HERE / "results")


class Match3Model(nnx.Module):
    """``tokens int32 [B, n] -> logits f32 [B, n]`` (one logit per token)."""

    def __init__(self, cfg: Match3ModelConfig, modulus: int, length: int, *, rngs: nnx.Rngs):
        lm = LMConfig(vocab_size=modulus, width=cfg.width, max_length=length,
                      num_heads=cfg.num_heads, mixers=(MIXERS[cfg.mixer],), mlp_ratio=0,
                      learned_positions=False, tie_embeddings=True, embed_init_std=1.0,
                      causal=False)
        self.backbone = DecoderLM(lm, rngs=rngs)
        hidden = cfg.readout_ratio * cfg.width
        self.fc1 = nnx.Linear(cfg.width, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, tokens, *, deterministic=None, rngs=None):
        h = self.backbone(tokens, deterministic=deterministic, rngs=rngs)
        return self.fc2(jax.nn.gelu(self.fc1(h)))[..., 0].astype(jnp.float32)


def _config(model: Match3ModelConfig, steps: int) -> ExperimentConfig:
    return ExperimentConfig(
        model=model, data=Match3DataConfig(),
        optim=OptimConfig(learning_rate=2e-3, weight_decay=0.0, warmup_steps=0,
                          schedule="constant", grad_clip_norm=None),
        run=RunConfig(steps=steps, batch_size=256, eval_every=0, eval_batch_size=1024,
                      log_every=500, progress=False),
        sweep=SweepConfig())


def default_config() -> ExperimentConfig:
    """The spec's Match3 budget: 10k steps per (mixer, width); widths 16/32/64."""
    return _config(Match3ModelConfig(), steps=10_000)


def quick_config() -> ExperimentConfig:
    """The CPU preset: 3000 steps, widths 32 and 64, one seed; the approximation part in full."""
    cfg = _config(Match3ModelConfig(), steps=3000)
    return dataclasses.replace(cfg, sweep=dataclasses.replace(cfg.sweep, widths=(32, 64)))


def smoke_config() -> ExperimentConfig:
    cfg = _config(Match3ModelConfig(width=16), steps=2)
    sweep = dataclasses.replace(cfg.sweep, widths=(16,), approx_bounds=(0.5, 2.0),
                                approx_degrees=(1, 3), approx_error_length=8,
                                approx_time_lengths=(8, 16), approx_time_degree=2,
                                approx_polynomial_only_lengths=(32,))
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, test_examples=64),
        run=dataclasses.replace(cfg.run, batch_size=16, eval_batch_size=64), sweep=sweep)


def build_task(cfg: ExperimentConfig, seed: int = 0) -> Task:
    """Match3 model, fresh training examples, binary cross-entropy, per-token test accuracy."""
    train_src, test_src = cfg.data.sources(cfg.run, seed)

    def loss_fn(model, batch, rngs):
        logits = model(batch["tokens"], deterministic=False, rngs=rngs)
        labels = batch["labels"].astype(jnp.float32)
        bce = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
        acc = jnp.mean(((logits > 0) == (batch["labels"] > 0)).astype(jnp.float32))
        return bce, {"bce": bce, "accuracy": acc}

    def eval_fn(model, batch):
        hit = (model(batch["tokens"], deterministic=True) > 0) == (batch["labels"] > 0)
        return {"accuracy": hit.astype(jnp.float32).mean(axis=-1)}

    d = cfg.data
    return Task(make_model=lambda rngs: Match3Model(cfg.model, d.modulus, d.length, rngs=rngs),
                loss_fn=loss_fn, train_source=train_src, eval_source=test_src, eval_fn=eval_fn)


# ---- (a) the polynomial method -------------------------------------------------------------


def _uniform_inputs(seed: int, length: int, head_dim: int, bound: float):
    r = np.random.default_rng(seed)
    qk = [r.uniform(-bound, bound, (1, length, 1, head_dim)) for _ in range(3)]
    v = [r.standard_normal((1, length, 1, head_dim)) for _ in range(2)]
    return tuple(jnp.asarray(x, jnp.float32) for x in qk + v)


def approximation_errors(sw: SweepConfig) -> list[dict[str, Any]]:
    """Relative error ``|approx - exact|_F / |exact|_F`` per (bound, degree), with the
    theoretical bound and whether the dispatched ``"polynomial"`` would accept the call."""
    rows = []
    h, n = sw.approx_head_dim, sw.approx_error_length
    exact_fn = jax.jit(tensor_lib.tensor_attention_reference)
    poly_fn = jax.jit(tensor_lib.tensor_attention_polynomial, static_argnames=("degree",))
    for bound in sw.approx_bounds:
        args = _uniform_inputs(0, n, h, bound)
        exact = np.asarray(exact_fn(*args))
        for g in sw.approx_degrees:
            approx = np.asarray(poly_fn(*args, degree=g))
            err = float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))
            eps = tensor_lib.polynomial_error_bound(bound, h, g)
            rows.append(dict(bound=bound, degree=g, rank=tensor_lib.polynomial_rank(h, g),
                             relative_error=err, error_bound=eps, accepted=eps < 1.0))
    return rows


def approximation_times(sw: SweepConfig) -> list[dict[str, Any]]:
    """Best-of-3 wall time of the exact chunked path and the polynomial method vs length (the
    exact path only up to ``approx_time_lengths``: it grows as ``n^3``)."""
    h, g = sw.approx_head_dim, sw.approx_time_degree
    exact_fn = jax.jit(tensor_attention_chunked)
    poly_fn = jax.jit(lambda *a: tensor_lib.tensor_attention_polynomial(*a, degree=g))
    rows = []
    for n in sw.approx_time_lengths + sw.approx_polynomial_only_lengths:
        args = _uniform_inputs(1, n, h, 0.5)
        exact = best_seconds(exact_fn, *args) if n in sw.approx_time_lengths else None
        poly = best_seconds(poly_fn, *args)
        rows.append(dict(length=n, exact_s=exact, polynomial_s=poly,
                         exact_over_polynomial=None if exact is None else exact / poly))
    return rows


def fitted_exponent(lengths, seconds) -> float:
    """Slope of ``log(seconds)`` against ``log(length)`` (least squares)."""
    return float(np.polyfit(np.log(lengths), np.log(seconds), 1)[0])


# ---- the whole experiment ------------------------------------------------------------------


def match3_sweep(cfg: ExperimentConfig, verbose: bool = True) -> list[dict[str, Any]]:
    sw: SweepConfig = cfg.sweep
    rows = []
    for width in sw.widths:
        for mixer in sw.mixers:
            for seed in sw.seeds:
                pcfg = dataclasses.replace(
                    cfg, model=dataclasses.replace(cfg.model, mixer=mixer, width=width),
                    run=dataclasses.replace(cfg.run, seed=seed))
                curve: list[tuple[int, float]] = []
                record = lambda step, m, curve=curve: curve.append(
                    (step, float(m["accuracy"]))) if step % 100 == 0 else None
                res = train(pcfg, build_task(pcfg, seed), callbacks=(record,),
                            desc=f"{mixer} D={width} seed={seed}")
                rows.append(dict(mixer=mixer, width=width, heads=cfg.model.num_heads,
                                 seed=seed, steps=res.step,
                                 test_accuracy=res.eval_metrics["accuracy"],
                                 seconds=round(res.seconds, 1), train_curve=curve))
                if verbose:
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "train_curve"}),
                          flush=True)
    return rows


def main(cfg: ExperimentConfig) -> dict[str, Any]:
    sw: SweepConfig = cfg.sweep
    out = pathlib.Path(sw.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    errors = approximation_errors(sw)
    times = approximation_times(sw)
    exact = [(r["length"], r["exact_s"]) for r in times if r["exact_s"] is not None]
    exponents = {"exact": fitted_exponent(*zip(*exact, strict=True)),
                 "polynomial": fitted_exponent([r["length"] for r in times],
                                               [r["polynomial_s"] for r in times])}
    match3 = match3_sweep(cfg)
    total = time.time() - t0
    result = dict(match3=match3, approximation_errors=errors, approximation_times=times,
                  time_exponents=exponents, seconds=total)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = _markdown(cfg, match3, errors, times, exponents, total)
    (out / "results.md").write_text(md)
    _plot(match3, errors, times, sw, out)
    print(md)
    print(f"results in {out}")
    return result


def _markdown(cfg, match3, errors, times, exponents, total) -> str:
    sw = cfg.sweep
    acc = [{"mixer": m, **{f"D={w}": _mean_acc(match3, m, w) for w in sw.widths}}
           for m in sw.mixers]
    degrees = sorted({r["degree"] for r in errors})
    err_rows = [{"B": b, **{f"g={g}": _error_cell(errors, b, g) for g in degrees}}
                for b in sw.approx_bounds]
    time_rows = [{"n": r["length"], "exact (ms)": _ms(r["exact_s"]),
                  "polynomial (ms)": _ms(r["polynomial_s"]),
                  "exact / polynomial": "-" if r["exact_s"] is None
                  else f"{r['exact_over_polynomial']:.1f}"} for r in times]
    return (
        f"## Match3 test accuracy (n={cfg.data.length}, M={cfg.data.modulus}, "
        f"{cfg.run.steps} steps of batch {cfg.run.batch_size}, {cfg.model.num_heads} heads, "
        f"seeds {list(sw.seeds)})\n\n{format_table(acc)}\n\n"
        f"## Polynomial method: relative error vs degree (n={sw.approx_error_length}, "
        f"d={sw.approx_head_dim}, entries uniform in [-B, B]; * = refused by "
        f"implementation='polynomial', its error bound >= 1)\n\n{format_table(err_rows)}\n\n"
        f"## Wall time vs length (degree {sw.approx_time_degree}, d={sw.approx_head_dim}, "
        f"best of 3, 2-core CPU)\n\n{format_table(time_rows)}\n\nfitted exponents: exact "
        f"{exponents['exact']:.2f}, polynomial {exponents['polynomial']:.2f}\n\n"
        f"total wall time {total:.0f} s\n")


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.3g}"


def _mean_acc(rows, mixer, width) -> str:
    accs = [r["test_accuracy"] for r in rows if r["mixer"] == mixer and r["width"] == width]
    if not accs:
        return "-"
    return f"{np.mean(accs):.3f}" + (f" +- {np.std(accs):.3f}" if len(accs) > 1 else "")


def _error_cell(errors, bound, degree) -> str:
    r = next(r for r in errors if r["bound"] == bound and r["degree"] == degree)
    return f"{r['relative_error']:.2e}" + ("" if r["accepted"] else "*")


def _plot(match3, errors, times, sw, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for mixer in sw.mixers:
        accs = [np.mean([r["test_accuracy"] for r in match3
                         if r["mixer"] == mixer and r["width"] == w]) for w in sw.widths]
        axes[0].plot(sw.widths, accs, "o-", label=mixer)
    axes[0].set(xlabel="width D", ylabel="Match3 test accuracy", xscale="log",
                title="one layer: tensor vs standard attention")
    axes[0].minorticks_off()
    axes[0].set_xticks(list(sw.widths), [str(w) for w in sw.widths])
    axes[0].legend()
    for bound in sw.approx_bounds:
        rows = [r for r in errors if r["bound"] == bound]
        axes[1].semilogy([r["degree"] for r in rows], [r["relative_error"] for r in rows], "o-",
                         label=f"B={bound}")
    axes[1].set(xlabel="Taylor degree g", ylabel="relative error vs exact",
                title="polynomial method: error vs degree")
    axes[1].legend()
    exact = [(r["length"], r["exact_s"]) for r in times if r["exact_s"] is not None]
    axes[2].loglog(*zip(*exact, strict=True), "o-", label="exact (xla_chunked)")
    axes[2].loglog([r["length"] for r in times], [r["polynomial_s"] for r in times], "o-",
                   label=f"polynomial g={sw.approx_time_degree}")
    axes[2].set(xlabel="length n", ylabel="seconds (best of 3)", title="cost vs length")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(out / "tensor_attention.png", dpi=110)
    plt.close(fig)
