"""Combiner: position retrieval at L = 256, cost vs length, effective-attention pictures.

Claims tested (Ren et al., "Combiner: Full Attention Transformer with Sparse Computation Cost",
NeurIPS 2021): every Combiner variant gives each query full support over its prefix (sparse
Fixed / Logsparse / Axial patterns have holes) at ``O(L sqrt(L))`` / ``O(L log L)`` cost, so a
task that needs an *arbitrary* earlier position should be solvable by Combiner but not by the
matching sparse pattern. The paper's bits/dim (CIFAR-10, ImageNet-64), Wiki-40B perplexity and
LRA numbers need accelerator-scale training and are not tested here.

**Position retrieval** (the spec's task, defined here): a sequence of ``L`` tokens. Positions
``0 .. L-3`` hold content tokens uniform in ``0 .. C-1`` (``C = 16``); position ``L-2`` holds the
query marker ``Q = C``; position ``L-1`` holds the position token ``C + 1 + p`` with ``p`` uniform
in ``[0, p_max]`` (``p_max = 200``). The target is the content token at position ``p``, predicted
from the last position (cross-entropy over the whole vocabulary; accuracy = argmax hits; chance
1/16). Example ``i`` of a split is drawn by ``numpy.random.default_rng((seed, split, i))``: random
access, a few microseconds per item, train and test never share an example.

**Models**: ``jaxattn.models.DecoderLM`` (causal, learned positions, 2 layers, D = 64, 4 heads,
MLP ratio 2), one mixer kind per run: ``full`` (dense causal attention), ``sparse_fixed`` (the
same attention with a mask: own segment + the last token of each earlier segment, Child et al.
2019's "fixed" pattern, segment 16), ``combiner_fixed`` / ``combiner_logsparse`` /
``combiner_axial`` / ``combiner_mixture`` (segment 16).
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

from jaxattn import masks as masks_lib
from jaxattn.models import DecoderLM, LMConfig, MixerConfig
from jaxattn.nn import combiner as combiner_lib
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task, train
from jaxattn.train.metrics import best_seconds, format_table, peak_bytes

NAME = "combiner"
DESCRIPTION = "Combiner vs full and sparse-Fixed attention: position retrieval, cost vs L"
HERE = pathlib.Path(__file__).parent
_SPLITS = {"train": 1, "test": 2}


@masks_lib.register_mask
class FixedSparseMask(masks_lib.Mask):
    """Child et al. (2019) "fixed" pattern, causal part: ``k`` in the query's own segment or the
    last position of an earlier segment (``k % s == s - 1``); AND it with the causal mask."""

    segment: int = 16

    def _evaluate(self, q, k, xp):
        s = self.segment
        return ((k // s == q // s) | (k % s == s - 1))[None, None]


class RetrievalSource:
    """``src[i] -> {"tokens" int32 [L], "target" int32 []}`` (see the module docstring)."""

    def __init__(self, *, length: int, content: int, max_position: int, num_examples: int,
                 seed: int = 0, split: str = "train"):
        if max_position > length - 3:
            raise ValueError(f"max_position={max_position} must be <= length - 3 = {length - 3}")
        self.length, self.content, self.max_position = length, content, max_position
        self.num_examples, self.seed, self.split = num_examples, seed, _SPLITS[split]

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= int(index) < self.num_examples:
            raise IndexError(f"index {index} out of range [0, {self.num_examples})")
        rng = np.random.default_rng((self.seed, self.split, int(index)))
        tokens = rng.integers(0, self.content, self.length, dtype=np.int32)
        p = int(rng.integers(0, self.max_position + 1))
        tokens[-2] = self.content
        tokens[-1] = self.content + 1 + p
        return {"tokens": tokens, "target": np.asarray(tokens[p], np.int32)}


@dataclasses.dataclass(frozen=True)
class RetrievalDataConfig:
    length: int = 256
    content: int = 16
    max_position: int = 200
    test_examples: int = 1024

    @property
    def vocab_size(self) -> int:
        return self.content + 2 + self.max_position

    def sources(self, run: RunConfig, seed: int = 0):
        n_train = max(run.steps, 1) * run.batch_size
        kw = dict(length=self.length, content=self.content, max_position=self.max_position,
                  seed=seed)
        return (RetrievalSource(num_examples=n_train, split="train", **kw),
                RetrievalSource(num_examples=self.test_examples, split="test", **kw))


@dataclasses.dataclass(frozen=True)
class RetrievalModelConfig:
    mixer: str = "combiner_fixed"  # full | sparse_fixed | combiner_{fixed,logsparse,axial,mixture}
    width: int = 64
    num_heads: int = 4
    layers: int = 2
    mlp_ratio: int = 2
    segment: int = 16


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    mixers: tuple[str, ...] = ("full", "sparse_fixed", "combiner_fixed", "combiner_logsparse",
                               "combiner_axial", "combiner_mixture")
    seeds: tuple[int, ...] = (0,)
    cost_lengths: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    cost_repeats: int = 3
    picture_length: int = 64
    output_dir: str = str(HERE / "results")


def mixer_config(name: str, segment: int) -> MixerConfig:
    if name in ("full", "sparse_fixed"):
        return MixerConfig("attention", (("use_bias", False),))
    opts = () if name == "combiner_logsparse" else (("segment", segment),)
    return MixerConfig(name, opts)


class RetrievalModel(nnx.Module):
    """``tokens int32 [B, L] -> logits f32 [B, V]`` at the last position."""

    def __init__(self, cfg: RetrievalModelConfig, data: RetrievalDataConfig, *,
                 rngs: nnx.Rngs):
        lm = LMConfig(vocab_size=data.vocab_size, width=cfg.width, max_length=data.length,
                      num_heads=cfg.num_heads,
                      mixers=(mixer_config(cfg.mixer, cfg.segment),) * cfg.layers,
                      mlp_ratio=cfg.mlp_ratio, learned_positions=True, tie_embeddings=True)
        self.backbone = DecoderLM(lm, rngs=rngs)
        if cfg.mixer == "sparse_fixed":
            for m in self.backbone.mixers:
                m.mask = FixedSparseMask(cfg.segment)  # ANDed with the layer's causal mask

    def __call__(self, tokens, *, deterministic=None, rngs=None):
        h = self.backbone(tokens, deterministic=deterministic, rngs=rngs)
        return self.backbone.logits(h[:, -1])


def _config(steps: int, batch: int) -> ExperimentConfig:
    return ExperimentConfig(
        model=RetrievalModelConfig(), data=RetrievalDataConfig(),
        optim=OptimConfig(learning_rate=1e-3, weight_decay=0.0, warmup_steps=100,
                          schedule="cosine", grad_clip_norm=1.0),
        run=RunConfig(steps=steps, batch_size=batch, eval_every=0, eval_batch_size=256,
                      log_every=500, progress=False),
        sweep=SweepConfig())


def default_config() -> ExperimentConfig:
    """The spec's budget: 3,000 steps of batch 32 per mixer, six mixers, one seed."""
    return _config(3000, 32)


def quick_config() -> ExperimentConfig:
    """The CPU preset: 400 steps of batch 16, four mixers, costs up to L = 2048."""
    cfg = _config(400, 16)
    sweep = dataclasses.replace(cfg.sweep, mixers=("full", "sparse_fixed", "combiner_fixed",
                                                   "combiner_logsparse"),
                                cost_lengths=(256, 512, 1024, 2048), cost_repeats=2)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_examples=512),
                               sweep=sweep)


def smoke_config() -> ExperimentConfig:
    cfg = _config(2, 8)  # batch 8: divisible by the 8 simulated test devices
    data = RetrievalDataConfig(length=32, max_position=20, test_examples=8)
    model = dataclasses.replace(cfg.model, width=16, num_heads=2, layers=1, segment=8)
    sweep = dataclasses.replace(cfg.sweep, mixers=("sparse_fixed", "combiner_fixed"),
                                cost_lengths=(16, 32), cost_repeats=1, picture_length=16)
    run = dataclasses.replace(cfg.run, eval_batch_size=8)
    return dataclasses.replace(cfg, data=data, model=model, sweep=sweep, run=run,
                               optim=dataclasses.replace(cfg.optim, warmup_steps=0))


def build_task(cfg: ExperimentConfig, seed: int = 0) -> Task:
    """Retrieval model, fresh training examples, cross-entropy at the last position."""
    train_src, test_src = cfg.data.sources(cfg.run, seed)

    def loss_fn(model, batch, rngs):
        logits = model(batch["tokens"], deterministic=False, rngs=rngs)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"]).mean()
        acc = jnp.mean((jnp.argmax(logits, -1) == batch["target"]).astype(jnp.float32))
        return ce, {"ce": ce, "accuracy": acc}

    def eval_fn(model, batch):
        logits = model(batch["tokens"], deterministic=True)
        return {"accuracy": (jnp.argmax(logits, -1) == batch["target"]).astype(jnp.float32)}

    return Task(make_model=lambda rngs: RetrievalModel(cfg.model, cfg.data, rngs=rngs),
                loss_fn=loss_fn, train_source=train_src, eval_source=test_src, eval_fn=eval_fn)


# ---- accuracy ------------------------------------------------------------------------------


def retrieval_sweep(cfg: ExperimentConfig, verbose: bool = True) -> list[dict[str, Any]]:
    rows = []
    for mixer in cfg.sweep.mixers:
        for seed in cfg.sweep.seeds:
            pcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mixer=mixer),
                                       run=dataclasses.replace(cfg.run, seed=seed))
            curve: list[tuple[int, float]] = []
            record = lambda step, m, curve=curve: curve.append(
                (step, float(m["accuracy"]))) if step % 50 == 0 else None
            res = train(pcfg, build_task(pcfg, seed), callbacks=(record,),
                        desc=f"{mixer} seed={seed}")
            rows.append(dict(mixer=mixer, seed=seed, steps=res.step,
                             test_accuracy=res.eval_metrics["accuracy"],
                             final_train_ce=float(res.train_metrics.get("ce", float("nan"))),
                             seconds=round(res.seconds, 1), train_curve=curve))
            if verbose:
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "train_curve"}),
                      flush=True)
    return rows


# ---- cost vs length ------------------------------------------------------------------------


def cost_sweep(sw: SweepConfig, heads: int = 4, head_dim: int = 16) -> list[dict[str, Any]]:
    """Compiled memory (temp + output) and best-of-``cost_repeats`` time of one causal
    attention call (forward), B = 1, per mechanism and length."""
    fns = {
        "full": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                             implementation="xla"),
        **{f"combiner_{v}": (lambda q, k, vv, v=v: combiner_lib.combiner_attention(
            q, k, vv, variant=v)) for v in ("fixed", "logsparse", "axial", "mixture")},
    }
    rows = []
    for length in sw.cost_lengths:
        args = [jax.random.normal(jax.random.key(i), (1, length, heads, head_dim))
                for i in range(3)]
        for name, fn in fns.items():
            compiled = jax.jit(fn).lower(*args).compile()
            best = best_seconds(compiled, *args, repeats=sw.cost_repeats)
            rows.append(dict(name=name, L=length, ms=1e3 * best,
                             mem_mib=peak_bytes(compiled) / 2 ** 20))
    return rows


def fitted_exponent(lengths, values) -> float:
    return float(np.polyfit(np.log(lengths), np.log(values), 1)[0])


# ---- pictures ------------------------------------------------------------------------------


def pictures(sw: SweepConfig, segment: int = 8):
    """``{name: [L, L]}``: Combiner's q(j|i) (head 0, random q, k) and the sparse patterns."""
    length = sw.picture_length
    ks = jax.random.split(jax.random.key(0), 2)
    q, k = (jax.random.normal(kk, (1, length, 1, 16)) for kk in ks)
    out = {}
    for v in ("fixed", "logsparse", "axial", "mixture", "mixture_avg"):
        out[f"combiner_{v}"] = np.asarray(combiner_lib.effective_attention(
            q, k, variant=v, segment=segment))[0, 0]
    for v in ("fixed", "logsparse", "axial"):
        out[f"sparse_{v}"] = combiner_lib.sparse_pattern(length, v, segment).astype(np.float32)
    return out


# ---- the whole experiment ------------------------------------------------------------------


def main(cfg: ExperimentConfig) -> dict[str, Any]:
    sw: SweepConfig = cfg.sweep
    out = pathlib.Path(sw.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pics = pictures(sw)
    holes = {n: int((np.tril(np.ones_like(a)) * (a == 0)).sum()) for n, a in pics.items()}
    cost = cost_sweep(sw)
    exponents = {}
    for name in sorted({r["name"] for r in cost}):
        rs = [r for r in cost if r["name"] == name]
        exponents[name] = {"time": fitted_exponent([r["L"] for r in rs], [r["ms"] for r in rs]),
                           "memory": fitted_exponent([r["L"] for r in rs],
                                                     [r["mem_mib"] for r in rs])}
    acc = retrieval_sweep(cfg)
    total = time.time() - t0
    result = dict(retrieval=acc, cost=cost, cost_exponents=exponents, causal_holes=holes,
                  seconds=total)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = _markdown(cfg, acc, cost, exponents, holes, total)
    (out / "results.md").write_text(md)
    _plot(acc, cost, pics, sw, out)
    print(md)
    print(f"results in {out}")
    return result


def _markdown(cfg, acc, cost, exponents, holes, total) -> str:
    sw = cfg.sweep
    acc_rows = [{"mixer": r["mixer"], "seed": r["seed"],
                 "test accuracy": f"{r['test_accuracy']:.3f}",
                 "final train CE": f"{r['final_train_ce']:.3f}", "seconds": r["seconds"]}
                for r in acc]
    names = sorted({r["name"] for r in cost})
    cost_rows = []
    for length in sw.cost_lengths:
        at = {r["name"]: r for r in cost if r["L"] == length}
        cost_rows.append({"L": length, **{f"{n} ms / MiB": f"{at[n]['ms']:.2f} / "
                                          f"{at[n]['mem_mib']:.2f}" for n in names}})
    exp_rows = [{"mechanism": n, "time exponent": f"{e['time']:.2f}",
                 "memory exponent": f"{e['memory']:.2f}"} for n, e in exponents.items()]
    hole_rows = [{"pattern": n, "causal (i, j <= i) pairs with zero weight": h}
                 for n, h in holes.items()]
    d, m = cfg.data, cfg.model
    return (
        f"## Position retrieval (L={d.length}, p in [0, {d.max_position}], {d.content} content "
        f"tokens; {m.layers} layers, D={m.width}, {m.num_heads} heads, segment {m.segment}; "
        f"{cfg.run.steps} steps of batch {cfg.run.batch_size}; {d.test_examples} test "
        f"examples; chance {1 / d.content:.3f})\n\n{format_table(acc_rows)}\n\n"
        f"## One causal attention call vs L (B=1, 4 heads, head dim 16, f32, forward; "
        f"compiled temp + output memory; best of {sw.cost_repeats}; full = "
        f"jax.nn.dot_product_attention(implementation='xla'))\n\n{format_table(cost_rows)}\n\n"
        f"fitted log-log slopes:\n\n{format_table(exp_rows)}\n\n"
        f"## Support at L={sw.picture_length} (segment 8)\n\n{format_table(hole_rows)}\n\n"
        f"total wall time {total:.0f} s\n")


def _plot(acc, cost, pics, sw, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = [r["mixer"] for r in acc]
    axes[0].bar(range(len(acc)), [r["test_accuracy"] for r in acc])
    axes[0].set_xticks(range(len(acc)), names, rotation=30, ha="right")
    axes[0].set(ylabel="test accuracy", title="position retrieval, L=256", ylim=(0, 1))
    for name in sorted({r["name"] for r in cost}):
        rs = [r for r in cost if r["name"] == name]
        axes[1].loglog([r["L"] for r in rs], [r["ms"] for r in rs], "o-", label=name)
        axes[2].loglog([r["L"] for r in rs], [r["mem_mib"] for r in rs], "o-", label=name)
    axes[1].set(xlabel="L", ylabel="ms (best of runs)", title="time vs L")
    axes[2].set(xlabel="L", ylabel="compiled MiB", title="memory vs L")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "retrieval_and_cost.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 4, figsize=(16, 8))
    order = ["sparse_fixed", "sparse_logsparse", "sparse_axial", "combiner_mixture",
             "combiner_fixed", "combiner_logsparse", "combiner_axial", "combiner_mixture_avg"]
    for ax, name in zip(axes.flat, order, strict=True):
        a = pics[name]
        shown = np.where(a > 0, np.log10(np.maximum(a, 1e-12)), np.nan)
        ax.imshow(shown, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{name}: {'pattern' if name.startswith('sparse') else 'log10 q(j|i)'}")
        ax.set(xlabel="key j", ylabel="query i")
    fig.suptitle(f"L={sw.picture_length}, segment 8: white = zero weight")
    fig.tight_layout()
    fig.savefig(out / "effective_attention.png", dpi=90)
    plt.close(fig)
