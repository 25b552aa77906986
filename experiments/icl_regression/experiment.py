"""In-context linear regression with one layer of multi-head softmax attention.

Claims tested (He, Pan, Chen, Yang, "In-Context Linear Regression Demystified: Training Dynamics
and Mechanistic Interpretability of Multi-Head Softmax Attention", ICML 2025): trained from
random init, the per-head key-query matrices become diagonal and homogeneous on the x block
(``KQ^h ~ omega_h [[I_d, 0], [0, 0]]``), typically two heads with opposite-sign ``omega``, and the
output-value vectors last-entry-only with zero sum (``OV^h ~ mu_h e_{d+1}``, ``sum_h mu_h ~ 0``);
the model then implements debiased one-step GD and beats a single head; softmax attention keeps
working on contexts longer than the training length where linear attention does not.

Setup (the paper's code): d = 5, L = 40, sigma^2 = 0.1, ``beta ~ N(0, I/d)``, Adam 1e-3, 256 fresh
prompts per step, MSE on the (noisy) query target. The train source yields only integer seeds
(a batch of ``run.batch_size = 8`` seeds per step); the loss draws ``data.prompts_per_seed = 32``
prompts from each seed on device, so fresh data cost almost no host work and the batch still
splits over data-parallel devices. The held-out sets are fixed draws of their own PRNG streams.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.icl_regression import analysis
from experiments.icl_regression.model import ICLModel, ICLModelConfig, circuits, sample_prompts
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task, train
from jaxattn.train.metrics import format_table

NAME = "icl_regression"
DESCRIPTION = "in-context linear regression, multi-head softmax attention (He et al., 2025)"
HERE = pathlib.Path(__file__).parent

# PRNG streams of the data: training prompts, held-out evaluation prompts, and the prompts the
# baselines' step sizes are fitted on (train distribution, never the evaluation set).
TRAIN_STREAM, EVAL_STREAM, FIT_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ICLDataConfig:
    """``dim`` d, context ``length`` L, ``noise_var`` sigma^2; ``prompts_per_seed`` fresh prompts
    drawn from each seed of the training batch (``run.batch_size`` seeds per step);
    ``eval_prompts`` held-out prompts per evaluated length; ``seed`` picks the data streams."""

    dim: int = 5
    length: int = 40
    noise_var: float = 0.1
    prompts_per_seed: int = 32
    eval_prompts: int = 8192
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Softmax models with each of ``heads`` x ``seeds``; a linear-attention baseline with
    ``linear_heads`` heads (0: none) x ``linear_seeds``; evaluation at ``test_lengths``;
    baselines' steps fitted on ``fit_prompts`` prompts per length.

    One linear run gives two rows: ``"linear"`` (fixed divisor L_train: unnormalised) and
    ``"linear_mean"`` (divisor L: the same parameters evaluated as a mean over the context). At
    the training length the two are the same function, so their training is identical."""

    heads: tuple[int, ...] = (1, 2, 4)
    seeds: tuple[int, ...] = (0, 1)
    linear_heads: int = 4
    linear_seeds: tuple[int, ...] = (0,)
    test_lengths: tuple[int, ...] = (40, 80, 160)
    fit_prompts: int = 65536
    output_dir: str = str(HERE / "results")


def default_config() -> ExperimentConfig:
    """The spec's setup at 20k steps per run (the spec's measured point); 4 seeds for the
    softmax models, 2 for the linear baseline (about 15 minutes on 2 cores)."""
    return ExperimentConfig(
        model=ICLModelConfig(heads=4, attention="softmax"),
        data=ICLDataConfig(),
        # Adam as in the paper's code: no weight decay, no clipping, constant learning rate
        optim=OptimConfig(learning_rate=1e-3, weight_decay=0.0, schedule="constant",
                          grad_clip_norm=None),
        # batch_size counts seeds: 8 seeds x data.prompts_per_seed = 32 -> 256 prompts per step
        run=RunConfig(steps=20000, batch_size=8, eval_every=0, eval_batch_size=256,
                      log_every=500, progress=False),
        sweep=SweepConfig(seeds=(0, 1, 2, 3), linear_seeds=(0, 1)),
    )


def quick_config() -> ExperimentConfig:
    """The CPU preset (about 4-5 minutes on 2 cores at ~350 steps/s): 10k steps per run; 2 seeds
    for the softmax models, 1 for the linear baseline."""
    cfg = default_config()
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, steps=10000),
                               sweep=SweepConfig())


def smoke_config() -> ExperimentConfig:
    cfg = quick_config()
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, eval_prompts=256),
        run=dataclasses.replace(cfg.run, steps=2, log_every=1),
        sweep=dataclasses.replace(cfg.sweep, heads=(2,), seeds=(0,), linear_heads=1,
                                  test_lengths=(40, 80), fit_prompts=1024))


# ---- data -------------------------------------------------------------------------------------
class StepSeeds:
    """Train source: item ``i`` is ``{"seed": int32 i}``, the seed of a group of prompts."""

    def __init__(self, size: int = 2**31 - 1):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range [0, {self.size})")
        return {"seed": np.int32(index)}


class PromptSet:
    """A fixed set of prompts: item ``i`` is ``{"context" [L, d+1], "query" [d+1],
    "target" []}``."""

    def __init__(self, context: np.ndarray, query: np.ndarray, target: np.ndarray):
        self.context, self.query, self.target = context, query, target

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, index) -> dict[str, np.ndarray]:
        i = int(index)
        return {"context": self.context[i], "query": self.query[i], "target": self.target[i]}


def stream_key(data: ICLDataConfig, stream: int) -> jax.Array:
    """The typed PRNG key of one data stream."""
    return jax.random.fold_in(jax.random.key(data.seed), stream)


def draw_prompts(data: ICLDataConfig, stream: int, length: int, count: int) -> PromptSet:
    """``count`` prompts of context ``length`` from ``stream`` (a fixed draw; numpy arrays)."""
    key = jax.random.fold_in(stream_key(data, stream), length)
    context, query, target = sample_prompts(key, count, dim=data.dim, length=length,
                                            noise_var=data.noise_var)
    return PromptSet(np.asarray(context), np.asarray(query), np.asarray(target))


@functools.lru_cache(maxsize=8)
def fixed_prompts(data: ICLDataConfig, stream: int, length: int, count: int) -> PromptSet:
    """:func:`draw_prompts`, cached (the evaluation sets, read by every run)."""
    return draw_prompts(data, stream, length, count)


# ---- task -------------------------------------------------------------------------------------
def build_task(cfg: ExperimentConfig) -> Task:
    """The model of ``cfg.model``; loss: MSE on the query targets of ``data.prompts_per_seed``
    prompts drawn from each seed of the batch; eval: squared error on the fixed held-out set."""
    data: ICLDataConfig = cfg.data
    train_key = stream_key(data, TRAIN_STREAM)

    def draw(seed):
        return sample_prompts(jax.random.fold_in(train_key, seed), data.prompts_per_seed,
                              dim=data.dim, length=data.length, noise_var=data.noise_var)

    def loss_fn(model, batch, rngs):
        context, query, target = jax.vmap(draw)(batch["seed"])  # [seeds, prompts, ...]
        n = context.shape[0] * context.shape[1]
        context, query = context.reshape(n, *context.shape[2:]), query.reshape(n, -1)
        mse = jnp.mean((model(context, query) - target.reshape(n)) ** 2)
        return mse, {"mse": mse}

    def eval_fn(model, batch):
        return {"mse": (model(batch["context"], batch["query"]) - batch["target"]) ** 2}

    return Task(
        make_model=lambda rngs: ICLModel(cfg.model, dim=data.dim, train_length=data.length,
                                         rngs=rngs),
        loss_fn=loss_fn, train_source=StepSeeds(),
        eval_source=fixed_prompts(data, EVAL_STREAM, data.length, data.eval_prompts),
        eval_fn=eval_fn)


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef, state, context, query):
    return nnx.merge(graphdef, state)(context, query)


def eval_mse(model: ICLModel, prompts: PromptSet, chunk: int = 4096) -> float:
    """Mean squared error of ``model`` on ``prompts`` (float64 mean)."""
    graphdef, state = nnx.split(model)
    preds = [np.asarray(_predict(graphdef, state, jnp.asarray(prompts.context[i:i + chunk]),
                                 jnp.asarray(prompts.query[i:i + chunk])))
             for i in range(0, len(prompts), chunk)]
    err = np.concatenate(preds).astype(np.float64) - prompts.target
    return float(np.mean(err ** 2))


# ---- baselines --------------------------------------------------------------------------------
def baselines(data: ICLDataConfig, lengths: tuple[int, ...], fit_prompts: int
              ) -> dict[str, Any]:
    """Eval MSE of one-step GD and debiased GD (step fitted at each length, and the step fitted
    at the training length), ridge (lambda = sigma^2 d) and zero, per test length."""
    feats = {"gd": analysis.gd_feature, "debiased_gd": analysis.debiased_gd_feature}
    steps = {name: {} for name in feats}
    for length in lengths:
        fit = draw_prompts(data, FIT_STREAM, length, fit_prompts)
        for name, feat in feats.items():
            steps[name][length] = analysis.fit_step(feat(fit.context, fit.query), fit.target)
    mse: dict[str, dict[int, float]] = {}
    for length in lengths:
        ev = fixed_prompts(data, EVAL_STREAM, length, data.eval_prompts)
        rows = {}
        for name, feat in feats.items():
            a = feat(ev.context, ev.query)
            rows[name] = steps[name][length] * a
            rows[f"{name} (step of L={data.length})"] = steps[name][data.length] * a
        rows["ridge"] = analysis.ridge_predict(ev.context, ev.query, data.noise_var * data.dim)
        rows["zero"] = np.zeros_like(ev.target, dtype=np.float64)
        for name, pred in rows.items():
            mse.setdefault(name, {})[length] = float(np.mean((pred - ev.target) ** 2))
    analytic = {length: analysis.optimal_gd_step(data.dim, length, data.noise_var)
                for length in lengths}
    return {"mse": mse, "steps": steps, "gd_step_closed_form": analytic}


# ---- the sweep --------------------------------------------------------------------------------
def _runs(sw: SweepConfig) -> list[tuple[str, int, int]]:
    runs = [("softmax", h, s) for h in sw.heads for s in sw.seeds]
    if sw.linear_heads:
        runs += [("linear", sw.linear_heads, s) for s in sw.linear_seeds]
    return runs


def _label(attention: str, heads: int) -> str:
    return f"{attention} H={heads}"


def main(cfg: ExperimentConfig) -> dict[str, Any]:
    sw: SweepConfig = cfg.sweep
    data: ICLDataConfig = cfg.data
    out = pathlib.Path(sw.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths = tuple(sorted(set(sw.test_lengths) | {data.length}))
    t0 = time.time()
    base = baselines(data, lengths, sw.fit_prompts)
    runs = []
    for attention, heads, seed in _runs(sw):
        pcfg = dataclasses.replace(cfg, model=ICLModelConfig(heads=heads, attention=attention),
                                   run=dataclasses.replace(cfg.run, seed=seed))
        res = train(pcfg, build_task(pcfg), desc=f"{_label(attention, heads)} seed={seed}")
        models = {attention: res.model}
        if attention == "linear":  # the same parameters, normalised by the actual length
            mean_model = ICLModel(ICLModelConfig(heads=heads, attention="linear_mean"),
                                  dim=data.dim, train_length=data.length, rngs=nnx.Rngs(0))
            nnx.update(mean_model, nnx.state(res.model, nnx.Param))
            models["linear_mean"] = mean_model
        for name, model in models.items():
            kq, ov = circuits(model)
            stats = analysis.pattern_stats(kq, ov)
            runs.append(dict(
                attention=name, heads=heads, seed=seed, steps=res.step,
                seconds=round(res.seconds, 1), steps_per_s=round(res.step / res.seconds, 1),
                eval_mse_loop=res.eval_metrics["mse"],
                mse={length: eval_mse(model, fixed_prompts(data, EVAL_STREAM, length,
                                                           data.eval_prompts))
                     for length in lengths},
                kq=kq.tolist(), ov=ov.tolist(), stats=stats, check=analysis.check_pattern(stats),
                curve=[(h["step"], h["mse"]) for h in res.history if h["split"] == "train"]))
            print(json.dumps({k: runs[-1][k] for k in ("attention", "heads", "seed", "seconds",
                                                        "steps_per_s", "eval_mse_loop")}),
                  flush=True)
    total = time.time() - t0
    acceptance = _acceptance(runs, base, data.length, lengths)
    md = _markdown(cfg, runs, base, acceptance, lengths, total)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(
        {"config": {"steps": cfg.run.steps,
                    "prompts_per_step": cfg.run.batch_size * data.prompts_per_seed,
                    "eval_prompts": data.eval_prompts, "dim": data.dim, "length": data.length,
                    "noise_var": data.noise_var},
         "baselines": base, "runs": runs, "acceptance": acceptance, "seconds": total},
        indent=1))
    _plot_patterns(runs, out)
    _plot_lengths(runs, base, lengths, data.length, out)
    print(md)
    print(f"total wall time: {total:.0f} s; results in {out}")
    return {"runs": runs, "baselines": base, "acceptance": acceptance}


# ---- summaries --------------------------------------------------------------------------------
def _mean_mse(runs, attention, heads, length):
    vals = [r["mse"][length] for r in runs if r["attention"] == attention and r["heads"] == heads]
    return float(np.mean(vals)) if vals else math.nan


def _acceptance(runs, base, train_length, lengths) -> dict[str, Any]:
    """The issue's acceptance criteria, evaluated on the runs."""
    gd = base["mse"]["gd"][train_length]
    multi = [r for r in runs if r["attention"] == "softmax" and r["heads"] >= 2]
    top = max((r["heads"] for r in runs if r["attention"] == "softmax"), default=0)
    one = _mean_mse(runs, "softmax", 1, train_length)
    best = _mean_mse(runs, "softmax", top, train_length)
    acc: dict[str, Any] = {
        "pattern_runs_ok": [sum(r["check"]["ok"] for r in multi), len(multi)],
        "mse_within_10pct_of_gd": [sum(r["mse"][train_length] <= 1.1 * gd for r in multi),
                                   len(multi)],
        "max_ratio_to_gd_multihead": max((r["mse"][train_length] / gd for r in multi),
                                         default=math.nan),
        "single_head_ratio": one / best if top > 1 else math.nan,
        "single_head_40pct_worse": bool(one >= 1.4 * best) if top > 1 else False,
    }
    longer = [length for length in lengths if length > train_length]
    ratios = {}
    for r in runs:
        key = f"{_label(r['attention'], r['heads'])} seed={r['seed']}"
        ratios[key] = {length: r["mse"][length] / base["mse"]["gd"][length] for length in longer}
    acc["ratio_to_gd_at_longer_lengths"] = ratios
    soft = [v for k, v in ratios.items() if k.startswith(f"softmax H={top} ")]
    acc["softmax_within_10pct_of_gd_at_longer"] = bool(soft) and all(
        x <= 1.1 for v in soft for x in v.values())
    return acc


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _markdown(cfg, runs, base, acc, lengths, total) -> str:
    data: ICLDataConfig = cfg.data
    L = data.length
    gd = base["mse"]["gd"][L]
    mse_rows = []
    for attention, heads in dict.fromkeys((r["attention"], r["heads"]) for r in runs):
        vals = np.array([r["mse"][L] for r in runs
                         if r["attention"] == attention and r["heads"] == heads])
        mse_rows.append({"model / baseline": _label(attention, heads),
                         "eval MSE": _fmt(vals.mean()),
                         "seeds": " / ".join(_fmt(v) for v in vals),
                         "/ optimal GD": f"{vals.mean() / gd:.3f}"})
    names = {"gd": "one-step GD (optimal step)", "debiased_gd": "debiased one-step GD",
             "ridge": f"ridge (lambda = {data.noise_var * data.dim:g})", "zero": "zero"}
    for key, name in names.items():
        v = base["mse"][key][L]
        mse_rows.append({"model / baseline": name, "eval MSE": _fmt(v), "seeds": "-",
                         "/ optimal GD": f"{v / gd:.3f}"})
    pat_rows, check_rows = [], []
    for r in runs:
        if r["attention"] != "softmax":
            continue
        s = r["stats"]
        for h in range(r["heads"]):
            pat_rows.append({
                "H": r["heads"], "seed": r["seed"], "head": h,
                "omega (mean x-diag KQ)": f"{s['omega'][h]:+.3f}",
                "max abs(diag - omega)": f"{s['diag_spread'][h]:.3f}",
                "max abs(off-diag)": f"{s['offdiag'][h]:.3f}",
                "max abs(y col)": f"{s['y_col'][h]:.3f}",
                "max abs(y row) (inert)": f"{s['y_row'][h]:.3f}",
                "mu (OV last)": f"{s['mu'][h]:+.3f}",
                "max abs(OV x)": f"{s['ov_x'][h]:.3f}",
                "mu*omega": f"{s['mu_omega'][h]:+.3f}"})
        c = r["check"]
        check_rows.append({
            "H": r["heads"], "seed": r["seed"], "active heads": ",".join(map(str, c["active"])),
            "sum mu": f"{s['mu_sum']:+.3f}", "max abs(mu)": f"{max(map(abs, s['mu'])):.3f}",
            "eta_eff": f"{s['eta_eff']:.3f}", "opposite signs": c["opposite_signs"],
            "diag homogeneous": c["diagonal_homogeneous"],
            "last-entry only": c["last_entry_only"], "zero-sum": c["zero_sum"],
            "pattern ok": c["ok"]})
    len_rows = [{"model / baseline": f"{_label(r['attention'], r['heads'])} seed={r['seed']}",
                 **{f"L={n}": _fmt(r["mse"][n]) for n in lengths}} for r in runs]
    for key in ("gd", f"gd (step of L={L})", "debiased_gd", f"debiased_gd (step of L={L})",
                "ridge", "zero"):
        len_rows.append({"model / baseline": key,
                         **{f"L={n}": _fmt(base["mse"][key][n]) for n in lengths}})
    steps = base["steps"]["gd"]
    step_line = ", ".join(
        f"L={n}: {steps[n]:.3f} (closed form {base['gd_step_closed_form'][n]:.3f})"
        for n in lengths)
    rate = np.mean([r["steps_per_s"] for r in runs])
    acc_lines = [
        f"* patterns (H >= 2): {acc['pattern_runs_ok'][0]} of {acc['pattern_runs_ok'][1]} runs "
        "pass every check",
        f"* eval MSE within 10% of optimal one-step GD (H >= 2): "
        f"{acc['mse_within_10pct_of_gd'][0]} of {acc['mse_within_10pct_of_gd'][1]} runs "
        f"(worst ratio {acc['max_ratio_to_gd_multihead']:.3f})",
        f"* H = 1 at least 40% worse than the largest H: {acc['single_head_40pct_worse']} "
        f"(ratio {acc['single_head_ratio']:.3f})",
        f"* largest-H softmax within 10% of optimal GD at every longer length: "
        f"{acc['softmax_within_10pct_of_gd_at_longer']}",
    ]
    return "\n".join([
        f"# In-context linear regression (d = {data.dim}, L = {L}, sigma^2 = {data.noise_var})",
        "",
        f"{cfg.run.steps} Adam steps per run, each on "
        f"{cfg.run.batch_size * data.prompts_per_seed} fresh prompts; eval on "
        f"{data.eval_prompts} held-out prompts per length; total wall time {total:.0f} s "
        f"({rate:.0f} steps/s per run on average, compile and evaluation included).",
        "",
        f"## Eval MSE at the training length L = {L}",
        "", format_table(mse_rows), "",
        f"Fitted one-step GD steps: {step_line}.",
        "",
        "## Learned circuits (softmax runs)",
        "", format_table(pat_rows), "", format_table(check_rows), "",
        "omega: mean of the x-block diagonal of KQ^h = Q^hT K^h (logit z_q^T KQ^h z_i / "
        "sqrt(d+1)); y col: KQ[:d, d] (query x vs key y); y row: KQ[d, :], multiplied by the "
        "query's 0 entry, so it has no effect on the output (Q^h's y column gets no gradient); "
        "mu: last entry of OV^h = (O^h V^h)^T; eta_eff = sum_h mu_h omega_h / sqrt(d+1), the "
        "step of the debiased GD predictor that the small-omega expansion gives.",
        "",
        f"## Length generalisation (trained at L = {L})",
        "", format_table(len_rows), "",
        "## Acceptance", "", *acc_lines, "",
    ])


def _plot_patterns(runs, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in runs if r["attention"] == "softmax"]
    if not shown:
        return
    cols = max(r["heads"] for r in shown) + 1
    fig, axes = plt.subplots(len(shown), cols, figsize=(2.3 * cols, 2.3 * len(shown)),
                             squeeze=False)
    for row, r in zip(axes, shown, strict=True):
        kq, ov = np.asarray(r["kq"]), np.asarray(r["ov"])
        vmax = float(np.abs(kq[:, :-1, :]).max())
        for h in range(cols - 1):
            ax = row[h]
            if h >= r["heads"]:
                ax.axis("off")
                continue
            ax.imshow(kq[h], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            ax.set_title(f"H={r['heads']} seed {r['seed']}: KQ head {h}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = row[-1]
        omax = float(np.abs(ov).max())
        im = ax.imshow(ov, cmap="RdBu_r", vmin=-omax, vmax=omax, aspect="auto")
        ax.set_title(f"H={r['heads']} seed {r['seed']}: OV (rows: heads)", fontsize=8)
        ax.set_xticks(range(ov.shape[1]), [*(f"x{i}" for i in range(ov.shape[1] - 1)), "y"],
                      fontsize=6)
        ax.set_yticks(range(ov.shape[0]))
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.suptitle("softmax attention: KQ^h (rows: query coordinates, columns: key coordinates, "
                 "last = y; one colour scale per run) and OV^h", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(out / "patterns.png", dpi=110)
    plt.close(fig)


def _plot_lengths(runs, base, lengths, train_length, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    models = list(dict.fromkeys(_label(r["attention"], r["heads"]) for r in runs))
    markers = "osv^D*"
    for r in runs:
        label = _label(r["attention"], r["heads"])
        i = models.index(label)
        ax.plot(lengths, [r["mse"][n] for n in lengths], color=f"C{i}",
                marker=markers[i % len(markers)], linestyle=("-", "--", "-.", ":")[r["seed"] % 4],
                alpha=0.85, label=f"{label} seed={r['seed']}")
    styles = {"gd": "k--", f"gd (step of L={train_length})": "k:", "ridge": "g--"}
    for key, style in styles.items():
        ax.plot(lengths, [base["mse"][key][n] for n in lengths], style, lw=1, label=key)
    ax.set(xscale="log", yscale="log", xlabel="test context length L",
           ylabel="eval MSE (noisy target)",
           title=f"trained at L = {train_length}, tested at longer contexts")
    ax.minorticks_off()
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "length_generalization.png", dpi=110)
    plt.close(fig)
