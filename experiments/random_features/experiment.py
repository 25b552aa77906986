"""Random-feature attention vs a random-feature MLP on permutation-invariant targets.

Claims tested (Fu, Guo, Bai, Mei, "What can a Single Attention Layer Learn? A Study Through the
Random Features Lens", NeurIPS 2023; theory + simulations, no benchmark numbers): an attention
layer with frozen random query-key matrices and trained values (RFA) learns targets
``(1/N) sum_i F(x_0, x_i)`` with fewer samples than a two-layer random-feature MLP on the
flattened tokens, with an advantage that does not shrink as ``N`` grows; identity-biased
``W ~ N(W_0, sigma^2)`` beats zero-mean ``W`` for targets of ``<x_0, x_i>``.

The sweep (the spec's smallest CPU experiment): ``d = 8``, ``N = 16`` (and a rerun at ``N = 32``),
``M = 512`` heads (``4608`` features; the MLP gets as many ReLU features), targets T1-T3 of
:mod:`experiments.random_features.data`, ``n`` in 256..8192 training examples (prefixes of one
8192-example set), 1024 validation and 4096 test examples, closed-form ridge
(:func:`jaxattn.nn.random_features.ridge_fit`) with ``lambda`` chosen per target on the
validation set from a grid relative to the mean squared feature norm, 3 seeds. Metric: test MSE
divided by the test target variance. ``build_task`` trains ``v`` by Adam through the shared loop
instead; ``sweep.gradient_steps > 0`` adds that run to ``main``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.random_features.data import (
    TARGETS,
    RFADataConfig,
    draw_split,
    target_values,
    unit_vector,
)
from jaxattn.nn.random_features import (
    RandomFeatureAttention,
    rfa_features,
    rfmlp_features,
    ridge_fit,
    ridge_solve,
    sample_rfa_weights,
    sample_rfmlp_weights,
)
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task, train
from jaxattn.train.metrics import format_table

NAME = "random_features"
DESCRIPTION = "random-feature attention vs random-feature MLP, closed-form ridge (Fu et al., 2023)"
HERE = pathlib.Path(__file__).parent

# model name -> (kind, W sampling); the two RFA models share their Gaussian draw (W differs by
# exactly W_0), so their comparison is paired
MODELS: dict[str, tuple[str, str]] = {
    "rfa_zero": ("rfa", "zero"),
    "rfa_biased": ("rfa", "identity"),
    "rfmlp": ("rfmlp", ""),
}
LABELS = {"rfa_zero": "RFA, zero-mean W", "rfa_biased": "RFA, W ~ N(W_0, s^2)",
          "rfmlp": "RFMLP (ReLU), same #features"}


@dataclasses.dataclass(frozen=True)
class RFAModelConfig:
    """The RFA module of ``build_task``: ``heads`` frozen ``W_m`` (``bias`` "zero" or
    "identity", entry std ``sigma``) and trained ``v_m``."""

    heads: int = 512
    bias: str = "identity"
    sigma: float = 0.5


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """The closed-form sweep of ``main`` (``d`` from ``cfg.data``, ``M`` and ``sigma`` from
    ``cfg.model``)."""

    models: tuple[str, ...] = tuple(MODELS)
    targets: tuple[str, ...] = tuple(TARGETS)
    train_sizes: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    tokens: tuple[int, ...] = (16, 32)  # N: the spec's run and its N = 32 rerun
    seeds: tuple[int, ...] = (0, 1, 2)
    val_examples: int = 1024
    test_examples: int = 4096
    # ridge lambda = c * mean_j ||phi_j||^2 over the training rows, c from this grid
    lambda_grid: tuple[float, ...] = (1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    # sensitivity of the two RFA samplings to sigma (first N only; not used for the verdicts)
    sigma_check: tuple[float, ...] = (0.25, 1.0)
    sigma_check_seeds: tuple[int, ...] = (0,)
    chunk: int = 1024  # examples per feature-map call (bounds the [chunk, M, N] scores)
    gradient_steps: int = 0  # > 0: also train v by Adam through jaxattn.train (cfg.data's task)
    output_dir: str = str(HERE / "results")


def default_config() -> ExperimentConfig:
    return ExperimentConfig(
        model=RFAModelConfig(), data=RFADataConfig(),
        optim=OptimConfig(learning_rate=1e-4, weight_decay=0.0, warmup_steps=50,
                          schedule="cosine", grad_clip_norm=None),
        run=RunConfig(steps=2000, batch_size=256, eval_every=0, eval_batch_size=1024,
                      log_every=200, progress=False),
        sweep=SweepConfig(gradient_steps=2000),
    )


def quick_config() -> ExperimentConfig:
    """The CPU preset: the spec's whole closed-form sweep (N = 16 and 32, 3 seeds); no Adam
    runs and no sigma check (``default_config`` adds both)."""
    cfg = default_config()
    return dataclasses.replace(cfg, sweep=dataclasses.replace(
        cfg.sweep, gradient_steps=0, sigma_check=()))


def smoke_config() -> ExperimentConfig:
    cfg = quick_config()
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, heads=16),
        data=dataclasses.replace(cfg.data, tokens=4, train_examples=64, test_examples=32),
        run=dataclasses.replace(cfg.run, steps=2, batch_size=16, eval_batch_size=32),
        sweep=dataclasses.replace(cfg.sweep, tokens=(4,), seeds=(0,), train_sizes=(32, 64),
                                  val_examples=32, test_examples=32, chunk=32))


def build_task(cfg: ExperimentConfig) -> Task:
    """RFA with frozen ``W`` and trainable ``v`` (zeros at init), mean squared error; the eval
    metric ``relative_mse`` is the squared error over the test target variance."""
    m, data = cfg.model, cfg.data
    train_src, test_src = data.sources()
    var = float(np.var(test_src.y))

    def loss_fn(model, batch, rngs):
        del rngs
        mse = jnp.mean((model(batch["x0"], batch["xs"]) - batch["y"]) ** 2)
        return mse, {"mse": mse}

    def eval_fn(model, batch):
        err = (model(batch["x0"], batch["xs"]) - batch["y"]) ** 2
        return {"mse": err, "relative_mse": err / var}

    return Task(make_model=lambda rngs: RandomFeatureAttention(
        data.dim, m.heads, bias=m.bias, sigma=m.sigma, rngs=rngs),
        loss_fn=loss_fn, train_source=train_src, eval_source=test_src, eval_fn=eval_fn)


# ---- the closed-form sweep --------------------------------------------------------------------
@functools.cache
def _feature_fn(kind: str):
    return jax.jit(rfa_features if kind == "rfa" else rfmlp_features)


def _features(kind: str, x0: np.ndarray, xs: np.ndarray, weights: jax.Array, chunk: int
              ) -> jax.Array:
    """The feature map over ``x0 [n, d]``, ``xs [n, N, d]`` in chunks of ``chunk`` rows (the
    last chunk padded, so every call has one shape)."""
    fn, n, out = _feature_fn(kind), len(x0), []
    for s in range(0, n, chunk):
        a, b = x0[s:s + chunk], xs[s:s + chunk]
        pad = chunk - len(a)
        if pad:
            a = np.concatenate([a, np.repeat(a[:1], pad, 0)])
            b = np.concatenate([b, np.repeat(b[:1], pad, 0)])
        out.append(fn(jnp.asarray(a), jnp.asarray(b), weights)[:chunk - pad])
    return jnp.concatenate(out)


def _weights(model: str, seed: int, tokens: int, dim: int, heads: int, sigma: float):
    kind, bias = MODELS[model]
    key_w, key_u = jax.random.split(jax.random.key(seed))
    if kind == "rfa":
        return sample_rfa_weights(key_w, num_heads=heads, dim=dim, bias=bias, sigma=sigma)
    return sample_rfmlp_weights(key_u, in_dim=(tokens + 1) * dim, num_features=heads * (dim + 1))


@jax.jit
def _errors(phi_eval: jax.Array, w: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared errors ``[L, K]`` of weights ``w [L, P, K]`` on ``phi_eval [n, P]``."""
    pred = jnp.einsum("np,lpk->lnk", phi_eval, w, precision=jax.lax.Precision.HIGHEST)
    return jnp.mean((pred - y[None]) ** 2, axis=1)


@jax.jit
def _gram_block(phi: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    hi = jax.lax.Precision.HIGHEST
    return jnp.matmul(phi.T, phi, precision=hi), jnp.matmul(phi.T, y, precision=hi)


def _ridge_paths(phi: jax.Array, y: np.ndarray, sizes: tuple[int, ...], grid: tuple[float, ...]):
    """Yield ``(n, lams [L], w [L, P, K])`` for the first ``n`` rows, ``n`` ascending. Small
    ``n`` (``n < P / 2``) solve the dual system (:func:`ridge_fit`); larger ``n`` the primal one,
    with ``Phi^T Phi`` accumulated over the nested prefixes, so the Gram matrices of all large
    ``n`` together cost one ``[n_max, P]`` product."""
    p = phi.shape[1]
    gram = rhs = None
    done = 0
    yj = jnp.asarray(y)
    for n in sorted(sizes):
        p_n = phi[:n]
        scale = float(jnp.mean(jnp.sum(p_n * p_n, axis=1)))  # mean squared feature norm
        lams = np.asarray(grid, np.float32) * np.float32(scale)
        if 2 * n < p:
            yield n, lams, ridge_fit(p_n, yj[:n], lams)
            continue
        g, r = _gram_block(phi[done:n], yj[done:n])
        gram, rhs = (g, r) if gram is None else (gram + g, rhs + r)
        done = n
        yield n, lams, ridge_solve(gram, rhs, n, lams)


def fit_sizes(phi: dict[str, jax.Array], y: dict[str, np.ndarray], sizes: tuple[int, ...],
              grid: tuple[float, ...]) -> list[dict[str, Any]]:
    """Ridge on the first ``n`` training rows for each ``n`` in ``sizes``; ``lambda`` per target
    by validation MSE. ``phi``/``y`` hold "train", "val", "test" (``y`` ``[n, K]``). Returns one
    record per (n, target column): chosen lambda, relative train, validation and test MSE (MSE
    over the split's target variance)."""
    var_val, var_test = np.var(y["val"], axis=0), np.var(y["test"], axis=0)
    records = []
    for n, lams, w in _ridge_paths(phi["train"], y["train"], sizes, grid):  # w [L, P, K]
        val = np.asarray(_errors(phi["val"], w, jnp.asarray(y["val"]))) / var_val  # [L, K]
        test = np.asarray(_errors(phi["test"], w, jnp.asarray(y["test"]))) / var_test
        fit = np.asarray(_errors(phi["train"][:n], w, jnp.asarray(y["train"][:n]))) / np.var(
            y["train"][:n], axis=0)
        val = np.where(np.isfinite(val), val, np.inf)  # a lambda too small for float32
        for k in range(val.shape[1]):
            best = int(np.argmin(val[:, k]))
            records.append(dict(n=n, column=k, lambda_rel=grid[best], lambda_abs=float(lams[best]),
                                failed_lambdas=int(np.sum(~np.isfinite(val[:, k]))),
                                train_rel_mse=float(fit[best, k]), val_rel_mse=float(val[best, k]),
                                test_rel_mse=float(test[best, k])))
    return records


def sweep_groups(cfg: ExperimentConfig) -> list[tuple[int, int, float, tuple[str, ...]]]:
    """``(N, seed, sigma, models)`` of every feature draw: the main sweep (every N and seed at
    ``cfg.model.sigma``) then the sigma check (the RFA models at the first N)."""
    sw = cfg.sweep
    groups = [(n, s, cfg.model.sigma, sw.models) for n in sw.tokens for s in sw.seeds]
    rfa = tuple(m for m in sw.models if MODELS[m][0] == "rfa")
    groups += [(sw.tokens[0], s, sigma, rfa) for sigma in sw.sigma_check
               for s in sw.sigma_check_seeds if rfa]
    return groups


def run_sweep(cfg: ExperimentConfig, *, verbose: bool = True) -> list[dict[str, Any]]:
    """For every group of :func:`sweep_groups` and model: features once, then ridge at every
    training size for all targets together. One row per (N, seed, sigma, model, target, n)."""
    sw, dim, heads = cfg.sweep, cfg.data.dim, cfg.model.heads
    rows, n_max = [], max(sw.train_sizes)
    sizes = {"train": n_max, "val": sw.val_examples, "test": sw.test_examples}
    data: dict[tuple[int, int], tuple[dict, dict]] = {}
    for tokens, seed, sigma, models in sweep_groups(cfg):
        if (tokens, seed) not in data:
            beta = unit_vector(seed, dim)
            inputs = {s: draw_split(seed, s, n, tokens, dim) for s, n in sizes.items()}
            y = {s: np.stack([target_values(t, *inputs[s], beta) for t in sw.targets], -1)
                 for s in sizes}
            data = {(tokens, seed): (inputs, y)}  # keep one data set at a time
        inputs, y = data[(tokens, seed)]
        for model in models:
            t0 = time.time()
            weights = _weights(model, seed, tokens, dim, heads, sigma)
            phi = {s: _features(MODELS[model][0], *inputs[s], weights, sw.chunk) for s in sizes}
            for rec in fit_sizes(phi, y, sw.train_sizes, sw.lambda_grid):
                target = sw.targets[rec.pop("column")]
                rows.append(dict(tokens=tokens, seed=seed, sigma=sigma, model=model,
                                 target=target, **rec))
            if verbose:
                print(f"N={tokens} seed={seed} sigma={sigma} {model:10s} n={n_max}: "
                      + ", ".join(f"{r['target']} {r['test_rel_mse']:.3f}"
                                  for r in rows[-len(sw.targets):])
                      + f"  ({time.time() - t0:.1f} s)", flush=True)
    return rows


# ---- gradient training of v through the shared loop (optional in main) ------------------------
def gradient_runs(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Adam on ``v`` for both RFA samplings (``cfg.data``'s target, ``N``, training size)."""
    out = []
    steps = cfg.sweep.gradient_steps
    for bias in ("zero", "identity"):
        pcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, bias=bias),
                                   run=dataclasses.replace(cfg.run, steps=steps))
        res = train(pcfg, build_task(pcfg), desc=f"adam {bias}")
        out.append(dict(model="rfa_zero" if bias == "zero" else "rfa_biased",
                        target=cfg.data.target, tokens=cfg.data.tokens,
                        n=cfg.data.train_examples, steps=steps,
                        test_rel_mse=res.eval_metrics["relative_mse"],
                        seconds=round(res.seconds, 1)))
        print(json.dumps(out[-1]), flush=True)
    return out


# ---- results ----------------------------------------------------------------------------------
def _stats(rows, **match) -> np.ndarray:
    return np.array([r["test_rel_mse"] for r in rows
                     if all(r[k] == v for k, v in match.items())])


def _cell(v: np.ndarray) -> str:
    return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) else "-"


def results_table(rows: list[dict[str, Any]], sw: SweepConfig, sigma: float) -> str:
    """Markdown: one row per (N, target, model) of the main sweep, test MSE / var (mean ± std
    over seeds) per n."""
    table = []
    for tokens in sw.tokens:
        for target in sw.targets:
            for model in sw.models:
                row = {"N": tokens, "target": target, "model": model}
                for n in sw.train_sizes:
                    row[f"n={n}"] = _cell(_stats(rows, tokens=tokens, target=target,
                                                 model=model, n=n, sigma=sigma))
                table.append(row)
    return format_table(table)


def advantage_table(rows: list[dict[str, Any]], sw: SweepConfig, sigma: float) -> str:
    """RFMLP's error over each RFA's at every n, per N and target (means over seeds)."""
    table = []
    for target in sw.targets:
        for tokens in sw.tokens:
            for model in ("rfa_zero", "rfa_biased"):
                row = {"target": target, "N": tokens, "ratio": f"rfmlp / {model}"}
                for n in sw.train_sizes:
                    mlp, rfa = (_stats(rows, tokens=tokens, target=target, model=m, n=n,
                                       sigma=sigma) for m in ("rfmlp", model))
                    ok = len(mlp) and len(rfa)
                    row[f"n={n}"] = f"{mlp.mean() / rfa.mean():.1f}" if ok else "-"
                table.append(row)
    return format_table(table)


def sigma_table(rows: list[dict[str, Any]], sw: SweepConfig, sigma: float, tokens: int,
                seeds: tuple[int, ...]) -> str:
    """The sigma check: the RFA models at ``tokens`` keys, ``seeds``, every sigma."""
    table = []
    for target in sw.targets:
        for s in sorted({sigma, *sw.sigma_check}):
            for model in ("rfa_zero", "rfa_biased"):
                row = {"target": target, "sigma": s, "model": model}
                for n in sw.train_sizes:
                    v = np.concatenate([_stats(rows, tokens=tokens, target=target, model=model,
                                               n=n, sigma=s, seed=seed) for seed in seeds])
                    row[f"n={n}"] = f"{v.mean():.3f}" if len(v) else "-"
                table.append(row)
    return format_table(table)


def _plot(rows: list[dict[str, Any]], sw: SweepConfig, sigma: float, out: pathlib.Path,
          heads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    nr, nc = len(sw.tokens), len(sw.targets)
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.4 * nr), squeeze=False)
    sizes = np.asarray(sw.train_sizes)
    for i, tokens in enumerate(sw.tokens):
        for j, target in enumerate(sw.targets):
            ax = axes[i, j]
            for model in sw.models:
                stats = [_stats(rows, tokens=tokens, target=target, model=model, n=n,
                                sigma=sigma) for n in sizes]
                mean = np.array([s.mean() for s in stats])
                std = np.array([s.std() for s in stats])
                ax.errorbar(sizes, mean, yerr=std, marker="o", ms=3, capsize=2,
                            label=LABELS.get(model, model))
            ax.set(xscale="log", yscale="log", xlabel="training examples n",
                   ylabel="test MSE / Var(y)", title=f"{target}: {TARGETS[target]}, N={tokens}")
            ax.set_xticks(sizes, [f"{n // 1024}k" if n >= 1024 else str(n) for n in sizes])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.title.set_fontsize(8)
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"M = {heads} heads, sigma = {sigma}; mean ± std over seeds",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(out / "random_features.png", dpi=110)
    plt.close(fig)


def main(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    sw: SweepConfig = cfg.sweep
    sigma = cfg.model.sigma
    out = pathlib.Path(sw.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = run_sweep(cfg)
    sweep_seconds = time.time() - t0
    adam = gradient_runs(cfg) if sw.gradient_steps > 0 else []
    total = time.time() - t0
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "adam": adam, "sweep_seconds": sweep_seconds, "seconds": total,
         "config": {"dim": cfg.data.dim, "heads": cfg.model.heads, "sigma": sigma,
                    **dataclasses.asdict(sw)}}, indent=1))
    lines = [f"Test MSE / Var(y), mean ± std over seeds {list(sw.seeds)}; sigma = {sigma}:", "",
             results_table(rows, sw, sigma), "",
             "RFMLP test error / RFA test error (means over seeds):", "",
             advantage_table(rows, sw, sigma)]
    if sw.sigma_check and sw.sigma_check_seeds:
        lines += ["", f"Sigma check (N = {sw.tokens[0]}, seeds {list(sw.sigma_check_seeds)}):",
                  "", sigma_table(rows, sw, sigma, sw.tokens[0], sw.sigma_check_seeds)]
    if adam:
        lines += ["", "Adam on v through jaxattn.train:", "", format_table(adam)]
    lines += ["", f"d = {cfg.data.dim}, M = {cfg.model.heads} heads "
              f"({cfg.model.heads * (cfg.data.dim + 1)} features), {sw.val_examples} validation "
              f"and {sw.test_examples} test examples, lambda grid {list(sw.lambda_grid)} x mean "
              f"squared feature norm; closed-form sweep {sweep_seconds:.0f} s, total wall time "
              f"{total:.0f} s"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, sw, sigma, out, cfg.model.heads)
    print("\n".join(lines))
    print(f"results in {out}")
    return rows
