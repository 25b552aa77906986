"""Routing Transformer (Roy et al., 2021): long-distance associative recall at L = 512.

Three one-layer decoders (D = 64, 4 heads, no MLP, token shift: position t also embeds token
t - 1, so recall is one content lookup) differ only in their token mixer: local only
(4 block-local heads, block 32 + flange 32), local + routing (2 local + 2 routing heads, C = 8,
w = 64, shared q/k) and full causal attention. The task (README) asks for the value that followed
the first occurrence of a key, at the key's second occurrence, mostly more than 64 tokens back.
Metrics: recall on far pairs (distance >= 64, out of the local heads' reach) and near pairs;
for the routing model, the occupancy entropy of the k-means clusters and the rate at which a
query and the position it must read (the first occurrence's value) share a routing cluster,
over training.
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

from jaxattn.models.layers import MixerConfig
from jaxattn.models.lm import DecoderLM, LMConfig
from jaxattn.nn import routing as routing_lib  # registers the "routing" mixer
from jaxattn.train import ExperimentConfig, OptimConfig, RunConfig, Task, train
from jaxattn.train.metrics import format_table, plot_lines

NAME = "routing"
DESCRIPTION = ("Routing Transformer: long-distance associative recall, local vs local+routing "
               "vs full attention (Roy et al., 2021)")
HERE = pathlib.Path(__file__).parent
VARIANTS = ("local", "routing", "full")


@dataclasses.dataclass(frozen=True)
class RecallDataConfig:
    num_pairs: int = 256  # L = 2 * num_pairs tokens
    num_keys: int = 256  # key tokens 0 .. num_keys - 1 (distinct within a sequence)
    num_values: int = 64  # value tokens num_keys .. num_keys + num_values - 1
    num_queries: int = 16  # keys that occur twice
    # slots holding a (key, value) pair; the other num_pairs - num_active slots hold the filler
    # pair (F, F) with F = num_keys + num_values (0: every slot is active)
    num_active: int = 0
    far: int = 64  # a pair is "far" when its two key occurrences are >= far tokens apart
    train_examples: int = 200_000
    test_examples: int = 256


@dataclasses.dataclass(frozen=True)
class RoutingModelConfig:
    width: int = 64
    num_heads: int = 4
    # one layer: with the token shift below the task is one content lookup; two layers stayed on
    # the loss plateau for the full-attention control in the quick budget (README)
    layers: int = 1
    block: int = 32
    flange: int = 32
    routing_heads: int = 2
    num_clusters: int = 8
    window: int = 64
    # every variant's input at t also embeds token t - 1 (LMConfig.token_shift): the value
    # position 2a + 1 then carries its key, so one attention hop solves recall
    token_shift: bool = True


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    variants: tuple[str, ...] = VARIANTS
    seeds: tuple[int, ...] = (0,)  # each seed trains every variant (model init and data)
    output_dir: str = str(HERE / "results")


# ---- data ---------------------------------------------------------------------------------------
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SPLITS = {"train": 1, "test": 2}


def _hash64(x: int) -> int:
    """A splitmix64-style integer hash (seeds the per-example generator)."""
    with np.errstate(over="ignore"):
        z = np.uint64(x) + _MIX
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return int(z ^ (z >> np.uint64(31)))


class RecallSource:
    """Random-access associative recall: ``src[i]`` -> ``tokens [L]``, ``labels [L]`` (-1
    except at the second occurrence of a query key, where it is the value to recall),
    ``distance [L]`` (tokens between the two key occurrences at labelled positions, else 0) and
    ``target [L]`` (position of the value after the first occurrence, at labelled positions).
    With ``num_active`` set, the active pairs sit in random slots (kept in order) and the other
    slots hold the filler pair ``(F, F)``, ``F = num_keys + num_values`` (one extra token).

    Example ``i`` is a function of ``(seed, split, i)`` alone (a NumPy generator seeded by a
    hash of the three, a few microseconds per example)."""

    def __init__(self, cfg: RecallDataConfig, *, seed: int = 0, split: str = "train"):
        active = cfg.num_active or cfg.num_pairs
        if not (active <= cfg.num_pairs and cfg.num_keys >= active
                and 2 * cfg.num_queries <= active):
            raise ValueError("need num_active <= num_pairs, num_keys >= num_active and "
                             "2 * num_queries <= num_active")
        self.cfg, self.seed, self.split = cfg, seed, _SPLITS[split]
        self.num_examples = cfg.train_examples if split == "train" else cfg.test_examples

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        c = self.cfg
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range [0, {self.num_examples})")
        rng = np.random.default_rng(_hash64((self.seed * 4 + self.split) * (1 << 40) + index))
        n = c.num_active or c.num_pairs
        keys = rng.permutation(c.num_keys)[:n]
        values = c.num_keys + rng.integers(0, c.num_values, size=n)
        # second occurrences b (distinct) copy the (key, value) of an earlier, unused slot a
        order = rng.permutation(np.arange(1, n))
        seconds: list[int] = []
        used: set[int] = set()
        sources: list[int] = []
        for b in order:
            if len(seconds) == c.num_queries:
                break
            free = [a for a in range(int(b)) if a not in used and a not in seconds]
            if not free or int(b) in used:
                continue
            a = int(free[rng.integers(0, len(free))])
            seconds.append(int(b))
            sources.append(a)
            used.update((a, int(b)))
        for a, b in zip(sources, seconds, strict=True):
            keys[b], values[b] = keys[a], values[a]
        # the n active pairs occupy n random slots (in order); the rest hold the filler pair
        slot = np.sort(rng.permutation(c.num_pairs)[:n])
        filler = c.num_keys + c.num_values
        tokens = np.full(2 * c.num_pairs, filler, np.int32)
        tokens[2 * slot], tokens[2 * slot + 1] = keys, values
        labels = np.full(2 * c.num_pairs, -1, np.int32)
        distance = np.zeros(2 * c.num_pairs, np.int32)
        target = np.zeros(2 * c.num_pairs, np.int32)
        for a, b in zip(sources, seconds, strict=True):
            sa, sb = int(slot[a]), int(slot[b])
            labels[2 * sb] = values[a]
            distance[2 * sb] = 2 * (sb - sa)
            target[2 * sb] = 2 * sa + 1
        return {"tokens": tokens, "labels": labels, "distance": distance, "target": target}


# ---- configs ------------------------------------------------------------------------------------
def default_config() -> ExperimentConfig:
    """The spec's run: 3,000 steps of batch 32 per variant (2-core CPU: 1,000 steps took
    214-289 s per variant, so about 40 minutes for the three; README)."""
    return ExperimentConfig(
        model=RoutingModelConfig(), data=RecallDataConfig(),
        optim=OptimConfig(weight_decay_mask="all",  # as the committed results
                          learning_rate=1e-3, weight_decay=0.1, warmup_steps=100,
                          schedule="cosine", grad_clip_norm=1.0, aux_loss_weight=1.0),
        run=RunConfig(steps=3000, batch_size=32, eval_every=500, eval_batch_size=64,
                      log_every=100, progress=False),
        sweep=SweepConfig())


def quick_config() -> ExperimentConfig:
    """CPU preset (about 4 minutes on 2 cores for three variants times two seeds): L = 128
    (64 (key, value) pairs, every slot active; 8 query keys, 64 keys, 16 values), one layer with
    the token shift, local heads block 16 + flange 16, routing heads C = 4, w = 32 (C w = L), a
    pair is far at distance >= 32 (out of the local heads' reach); 1,000 steps of batch 32,
    lr 3e-3 (cosine), seeds 0 and 1."""
    cfg = default_config()
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, block=16, flange=16, num_clusters=4,
                                       window=32),
        data=dataclasses.replace(cfg.data, num_pairs=64, num_keys=64, num_values=16,
                                 num_active=0, num_queries=8, far=32, test_examples=256),
        optim=dataclasses.replace(cfg.optim, learning_rate=3e-3, warmup_steps=50),
        run=dataclasses.replace(cfg.run, steps=QUICK_STEPS, batch_size=32, eval_every=200,
                                eval_batch_size=128, log_every=100),
        sweep=dataclasses.replace(cfg.sweep, seeds=(0, 1)))


QUICK_STEPS = 1000


def smoke_config() -> ExperimentConfig:
    """Tiny config for tests: every variant trains 2 steps at L = 64."""
    cfg = quick_config()
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, width=16, block=8, flange=8, window=8,
                                       num_clusters=4),
        data=dataclasses.replace(cfg.data, num_pairs=32, num_keys=64, num_values=8,
                                 num_queries=4, far=16, train_examples=64, test_examples=16),
        run=dataclasses.replace(cfg.run, steps=2, batch_size=8, eval_every=0,
                                eval_batch_size=8),
        sweep=SweepConfig(output_dir=str(HERE / "results" / "smoke")))  # one seed


# ---- task ---------------------------------------------------------------------------------------
def mixer_config(m: RoutingModelConfig, variant: str) -> MixerConfig:
    if variant == "full":
        return MixerConfig("attention")
    routing_heads = m.routing_heads if variant == "routing" else 0
    if variant not in ("local", "routing"):
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return MixerConfig("routing", (("routing_heads", routing_heads), ("block", m.block),
                                   ("flange", m.flange), ("num_clusters", m.num_clusters),
                                   ("window", m.window)))


def build_task(cfg: ExperimentConfig, variant: str = "routing") -> Task:
    d, m = cfg.data, cfg.model
    length = 2 * d.num_pairs
    lm = LMConfig(vocab_size=d.num_keys + d.num_values + 1, width=m.width, max_length=length,
                  num_heads=m.num_heads, mixers=(mixer_config(m, variant),) * m.layers,
                  mlp_ratio=0, token_shift=m.token_shift)

    def loss_fn(model, batch, rngs):
        h = model(batch["tokens"], deterministic=False, rngs=rngs)
        w = (batch["labels"] >= 0).astype(jnp.float32)
        logits = model.logits(h)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                             jnp.maximum(batch["labels"], 0))
        ce = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
        hit = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32) * w
        return ce, {"ce": ce, "accuracy": jnp.sum(hit) / jnp.maximum(jnp.sum(w), 1.0)}

    def eval_fn(model, batch):
        h = model(batch["tokens"], deterministic=True)
        labelled = batch["labels"] >= 0
        hit = (jnp.argmax(model.logits(h), -1) == batch["labels"]) & labelled
        far = labelled & (batch["distance"] >= d.far)
        near = labelled & ~far
        f32 = lambda a: jnp.sum(a.astype(jnp.float32), -1)
        out = {"far_hits": f32(hit & far), "far_count": f32(far),
               "near_hits": f32(hit & near), "near_count": f32(near)}
        if variant == "routing":
            out.update(routing_stats(model, batch, labelled))
        return out

    return Task(make_model=lambda rngs: DecoderLM(lm, rngs=rngs), loss_fn=loss_fn,
                train_source=RecallSource(d, seed=cfg.run.seed, split="train"),
                eval_source=RecallSource(d, seed=cfg.run.seed, split="test"), eval_fn=eval_fn)


def _last_mixer_input(model: DecoderLM, tokens: jax.Array) -> jax.Array:
    """The normalised input of the last mixer (DecoderLM's forward up to it; no MLPs here)."""
    x = model.embed_inputs(tokens)
    for norm, mixer in list(zip(model.norms, model.mixers, strict=True))[:-1]:
        x = x + mixer(norm(x), deterministic=True)
    return model.norms[-1](x)


def routing_stats(model: DecoderLM, batch, labelled) -> dict[str, jax.Array]:
    """Per example, last layer's routing heads: ``coclust_hits / coclust_count`` (query and the
    value after the key's first occurrence share a cluster in at least one routing head),
    ``entropy`` (k-means occupancy entropy of the hard assignments / log C, mean over heads),
    ``coverage`` (fraction of positions in at least one balanced cluster)."""
    mixer = model.mixers[-1]
    x = _last_mixer_input(model, batch["tokens"])
    q, k, _ = mixer.routed_vectors(x)
    mu = mixer.centroids[...]
    length = x.shape[1]
    window = min(mixer.window, length)
    q_idx, _ = routing_lib.cluster_membership(q, k, mu, window=window, is_causal=mixer.causal)
    member = jnp.any(jax.nn.one_hot(q_idx, length, dtype=jnp.bool_), axis=-2)  # [B, N, C, L]
    tq = jnp.take_along_axis(member, jnp.arange(length)[None, None, None], axis=-1)
    tt = jnp.take_along_axis(member, batch["target"][:, None, None, :], axis=-1)
    shared = jnp.any(tq & tt, axis=(1, 2)) & labelled  # [B, L]
    assign = routing_lib.nearest_centroid(q, mu)  # [B, L, N]
    c = mu.shape[1]
    frac = jnp.mean(jax.nn.one_hot(assign, c, dtype=jnp.float32), axis=1)  # [B, N, C]
    ent = -jnp.sum(jnp.where(frac > 0, frac * jnp.log(jnp.maximum(frac, 1e-12)), 0.0), -1)
    covered = jnp.any(member, axis=(1, 2))  # [B, L]
    split = parity_split(member)
    return {"coclust_hits": jnp.sum(shared.astype(jnp.float32), -1),
            "coclust_count": jnp.sum(labelled.astype(jnp.float32), -1),
            "entropy": jnp.mean(ent, -1) / np.log(c), "parity_split": split,
            "coverage": jnp.mean(covered.astype(jnp.float32), -1)}


def parity_split(member: jax.Array) -> jax.Array:
    """How strictly the balanced clusters separate key positions (even) from value positions
    (odd): ``member [B, N, C, L]`` (bool, position in cluster) -> ``[B]``, the mean over heads
    and clusters of ``|2 * (share of even positions) - 1|``. 1 when every cluster holds only
    keys or only values, 0 when each holds as many of both; a uniformly random cluster of ``w``
    positions gives about ``0.8 / sqrt(w)``."""
    even = jnp.arange(member.shape[-1]) % 2 == 0
    share = jnp.sum(member & even, -1) / jnp.maximum(jnp.sum(member, -1), 1)  # [B, N, C]
    return jnp.mean(jnp.abs(2.0 * share - 1.0), axis=(1, 2))


def _ratio(m: dict[str, float], name: str) -> float:
    return m.get(f"{name}_hits", float("nan")) / max(m.get(f"{name}_count", 0.0), 1e-9)


def chance_coclustering(m: RoutingModelConfig, length: int) -> float:
    """P(two positions share a cluster in at least one routing head) if each cluster were a
    uniformly random set of w positions."""
    p = (min(m.window, length) / length) ** 2
    return 1.0 - (1.0 - p) ** (m.num_clusters * m.routing_heads)


# ---- run ----------------------------------------------------------------------------------------
def _variant_row(variant: str, seed: int, res) -> dict[str, Any]:
    e = res.eval_metrics
    row = {"variant": variant, "seed": seed, "far_recall": round(_ratio(e, "far"), 4),
           "near_recall": round(_ratio(e, "near"), 4),
           "train_ce": round(res.train_metrics.get("ce", float("nan")), 4),
           "steps": res.step, "seconds": round(res.seconds, 1)}
    if variant == "routing":
        row.update(coclustering=round(_ratio(e, "coclust"), 4),
                   entropy=round(e["entropy"], 4), coverage=round(e["coverage"], 4),
                   parity_split=round(e["parity_split"], 4))
    return row


def _mean_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant averaging the numeric columns over seeds (``seed = "mean"``)."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == variant]
        mean = {"variant": variant, "seed": "mean"}
        for key in group[0]:
            if key not in mean:
                mean[key] = round(float(np.mean([r[key] for r in group])), 4)
        out.append(mean)
    return out


def plot_results(far_curves: dict, routing_curves: dict, out: pathlib.Path) -> None:
    """``results/recall_training.png`` (far recall of every variant and seed over training) and
    ``results/routing_training.png`` (co-clustering and occupancy entropy of the routing heads);
    curves as saved in ``results.json`` (``{series: (steps, values)}``)."""
    plot_lines({"far recall (test split)": far_curves}, out / "recall_training.png",
               xlabel="step", ylabel="far recall", ylim=(0.0, 1.02))
    if routing_curves:
        plot_lines({"routing heads of the local + routing model": routing_curves},
                   out / "routing_training.png", xlabel="step", ylabel="rate",
                   ylim=(0.0, 1.02))


def main(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    out = pathlib.Path(cfg.sweep.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, far_curves, routing_curves, t0 = [], {}, {}, time.time()
    for seed in cfg.sweep.seeds:
        seeded = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
        for variant in cfg.sweep.variants:
            res = train(seeded, build_task(seeded, variant), desc=f"{variant} seed {seed}")
            row = _variant_row(variant, seed, res)
            evals = [h for h in res.history if h["split"] == "eval"]
            steps = [h["step"] for h in evals]
            far_curves[f"{variant}, seed {seed}"] = (steps, [_ratio(h, "far") for h in evals])
            if variant == "routing":
                routing_curves[f"co-clustering, seed {seed}"] = (
                    steps, [_ratio(h, "coclust") for h in evals])
                routing_curves[f"entropy / log C, seed {seed}"] = (
                    steps, [h["entropy"] for h in evals])
                routing_curves[f"key/value split of clusters, seed {seed}"] = (
                    steps, [h["parity_split"] for h in evals])
            print(json.dumps(row), flush=True)
            rows.append(row)
    total = time.time() - t0
    if len(cfg.sweep.seeds) > 1:
        rows = rows + _mean_rows(rows)
    chance = chance_coclustering(cfg.model, 2 * cfg.data.num_pairs)
    (out / "results.json").write_text(json.dumps(
        {"rows": rows, "far_recall_curves": far_curves, "routing_curves": routing_curves,
         "chance_coclustering": chance, "chance_recall": 1.0 / cfg.data.num_values,
         "seconds": total}, indent=1))
    table = format_table([{k: r.get(k, "-") for k in
                           ("variant", "seed", "far_recall", "near_recall", "train_ce",
                            "coclustering", "entropy", "coverage", "parity_split", "steps",
                            "seconds")}
                          for r in rows])
    (out / "results.md").write_text(
        table + f"\n\nchance recall 1/{cfg.data.num_values} = {1 / cfg.data.num_values:.4f}; "
        f"chance co-clustering {chance:.4f}; total wall time {total:.0f} s\n")
    plot_results(far_curves, routing_curves, out)
    print(table)
    return rows
