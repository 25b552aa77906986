"""The one training loop every experiment uses.

The model is split once (``nnx.split`` into ``graphdef``, parameters and the remaining state);
``train_step`` and ``eval_step`` are pure functions of arrays, compiled with ``jax.jit`` and
explicit input/output ``NamedSharding``s over a :mod:`jaxattn.parallel` mesh (``data``,
``fsdp``, ``tensor``, ``context``; data parallel by default). Parameters and the batch are placed
by the logical-axis rules of :mod:`jaxattn.parallel.logical` (``MeshConfig.rules`` in front of
``DEFAULT_RULES``), and the steps are traced under ``axis_rules`` so layers' activation
constraints (``jaxattn.parallel.constrain``) follow the same table. The batch of step ``s`` is
``train_dataset[s]`` and the dropout key is ``fold_in(key, s)``, so a run restored from a
checkpoint continues bit-for-bit. The train step donates the state buffers it is given
(parameters, optimizer state, the rest); the loop only ever uses the state a step returns.

The loss runs under :func:`jaxattn.nn.mixer.capture_aux_losses`: auxiliary losses sown by the
model's mixers are added to it, weighted by ``OptimConfig.aux_loss_weight`` (averaged over
micro-batches like the loss when ``accumulate_steps > 1``).

The optimizer is AdamW from ``cfg.optim`` (:func:`jaxattn.train.optim.make_optimizer`) or any
``optax.GradientTransformation`` passed as ``train(..., optimizer=tx)``; accumulation and the
aux-loss weight still come from ``cfg.optim``.

Non-finite losses: every step checks ``isfinite`` of its loss and gradient norm inside the
jitted step and keeps, on device, the first step where either was NaN/inf (a small carry next
to the train state, not checkpointed). The host reads that carry only at log, eval and save
boundaries and at the end (no extra device sync per step) and raises
:class:`NonFiniteLossError` naming the *first* bad step, even when later steps were finite again.

Under ``jax.distributed`` each process reads its own shard of the data (``train_dataset`` shards
a random-access source by ``jax.process_index()``; an ``IterDataset`` yields this process's
batches) and :func:`jaxattn.train.data.global_batch` assembles the global batch with
``jax.make_array_from_process_local_data``; every process saves and restores the checkpoint
(orbax writes it once into the shared directory); only process 0 writes metrics files and shows
the progress bar.

Each checkpoint stores, as JSON metadata, the run's config (:func:`jaxattn.train.config.
json_config`), whether the optimizer came from ``cfg.optim`` or was passed in, a signature of
the state's structure and, for ``grain.IterDataset`` sources, the data iterator's state.
Resuming with a config that differs in a field of :data:`jaxattn.train.config.
RESUME_CHECKED_FIELDS` (model, data, optim, ``run.steps``/``batch_size``/``seed``) raises a
ValueError naming every differing field, unless ``run.allow_config_change``. A run whose
``run.steps`` is not beyond the checkpoint's step trains nothing, so its ``run.steps`` is not
compared. A state whose structure differs (another model or optimizer) is always refused (it
could not be restored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxattn import parallel
from jaxattn.nn.mixer import capture_aux_losses, total_aux_loss
from jaxattn.parallel.logical import MeshConfig, make_mesh
from jaxattn.parallel.mesh_axes import has_explicit_axes
from jaxattn.train.checkpoint import Checkpointer, abstract_like
from jaxattn.train.config import (
    ExperimentConfig,
    OptimConfig,
    RunConfig,
    config_differences,
    json_config,
)
from jaxattn.train.data import (
    IterBatches,
    Prefetcher,
    eval_batches,
    global_batch,
    is_iter_dataset,
    train_dataset,
)
from jaxattn.train.metrics import MetricsWriter, ProgressBar
from jaxattn.train.optim import make_optimizer

__all__ = [
    "NonFiniteLossError",
    "Task",
    "TrainResult",
    "batch_sharding",
    "mesh_rules",
    "param_shardings",
    "train",
]

LossFn = Callable[[nnx.Module, Any, nnx.Rngs], tuple[jax.Array, dict[str, jax.Array]]]
EvalFn = Callable[[nnx.Module, Any], dict[str, jax.Array]]


class NonFiniteLossError(FloatingPointError):
    """A step's training loss or gradient norm became NaN or infinite (checked on device every
    step, reported at the next log/eval/save boundary naming the first such step); the run
    stopped without saving anything after it."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What an experiment supplies to the loop.

    Attributes:
      make_model: ``rngs -> nnx.Module``, a fresh module each call (the loop copies its
        arrays onto the mesh and donates those copies to the train step).
      loss_fn: ``(model, batch, rngs) -> (scalar loss, {name: scalar})``; ``rngs`` has a
        ``dropout`` stream keyed by the step. Aux losses the model sows
        (:func:`jaxattn.nn.mixer.sow_aux_loss`) are added to the loss times
        ``OptimConfig.aux_loss_weight``; the step metrics then report that weighted sum as
        ``aux_loss`` and ``loss`` is the total that was differentiated.
      train_source: a random-access source of examples (``len``, ``[i] -> dict of numpy
        arrays``; also a ``grain.MapDataset``), shuffled and batched by the loop; or a
        ``grain.IterDataset`` pipeline (its own workers, prefetch, shuffling and batching)
        yielding this process's batches (leading dimension ``run.batch_size /
        process_count``), whose iterator state is checkpointed (see
        :mod:`jaxattn.train.data`).
      eval_source: optional source for ``eval_fn``.
      eval_fn: ``(model, batch) -> {name: per-example values [B]}``; the loop averages them
        over the eval set (padding excluded).
    """

    make_model: Callable[[nnx.Rngs], nnx.Module]
    loss_fn: LossFn
    train_source: Any
    eval_source: Any = None
    eval_fn: EvalFn | None = None


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module
    step: int
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    history: list[dict[str, Any]]
    resumed_from: int | None
    stopped_early: bool
    seconds: float
    input_wait_seconds: float = 0.0  # time the loop waited for training batches


# ---- mesh and shardings -----------------------------------------------------------------------
def _run_mesh(cfg: MeshConfig) -> jax.sharding.Mesh:
    """The mesh of a run: ``cfg`` over all devices, or, when no size is ``-1``, over the first
    ``data * fsdp * tensor * context`` of them (``mesh.data=2`` on 8 devices uses 2)."""
    devices = jax.devices()
    sizes = cfg.sizes()
    if -1 not in sizes and all(s >= 1 for s in sizes) and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]
    return make_mesh(cfg, devices)


def mesh_rules(cfg: MeshConfig) -> tuple:
    """The logical-axis rules of a run: ``cfg.rules`` first, then ``DEFAULT_RULES``."""
    return tuple(tuple(r) for r in cfg.rules) + tuple(parallel.DEFAULT_RULES)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Sequence = parallel.DEFAULT_RULES
                   ) -> NamedSharding:
    """Sharding of a global batch: its leading axis over the mesh axes of logical ``batch``."""
    return parallel.logical_sharding(("batch",), mesh, tuple(rules))


def _logical_names(var: nnx.Variable) -> tuple | None:
    meta = var.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names is not None:
            return tuple(names)
    return None


def param_shardings(params: nnx.State, mesh: jax.sharding.Mesh,
                     rules: Sequence = parallel.DEFAULT_RULES) -> Any:
    """NamedShardings for ``params`` from their logical axis names (``out_sharding`` metadata)
    through ``rules`` (:func:`jaxattn.parallel.logical_to_spec`: a mesh axis is used once per
    array, dimensions not divisible by their mesh axes stay unsharded). Names without a rule
    and unannotated parameters are replicated."""
    rules = tuple(rules)
    known = {name for name, _ in rules}

    def one(var):
        value = var[...] if isinstance(var, nnx.Variable) else var
        names = _logical_names(var) if isinstance(var, nnx.Variable) else None
        if names is None or len(names) != np.ndim(value):
            return NamedSharding(mesh, P())
        names = tuple(n if n in known else None for n in names)
        return parallel.logical_sharding(names, mesh, rules, np.shape(value))

    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _leaf_shardings(tree: Any, shardings_prefix: Any) -> Any:
    """Expand a prefix tree of shardings (one per Variable) to one per array leaf."""
    flat = jax.tree_util.tree_structure(tree)
    return jax.tree_util.tree_unflatten(
        flat, jax.tree.leaves(jax.tree.map(lambda s, sub: [s] * len(jax.tree.leaves(sub)),
                                           shardings_prefix, tree,
                                           is_leaf=lambda x: isinstance(x, nnx.Variable)),
                              is_leaf=lambda x: isinstance(x, NamedSharding)))


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


# ---- steps ------------------------------------------------------------------------------------
def _under_rules(fn, mesh, rules):
    """``fn`` traced inside ``jaxattn.parallel.axis_rules(mesh, rules)``."""

    @functools.wraps(fn)
    def wrapped(*args):
        with parallel.axis_rules(mesh, rules):
            return fn(*args)

    return wrapped


def _compute_dtype(run: RunConfig):
    """``None`` (f32 compute) or ``jnp.bfloat16`` from ``run.precision``."""
    if run.precision not in ("f32", "bf16"):
        raise ValueError(f"run.precision must be 'f32' or 'bf16', got {run.precision!r}")
    return None if run.precision == "f32" else jnp.bfloat16


def _with_aux_losses(loss_fn: LossFn, weight: float) -> LossFn:
    """``loss_fn`` run under :func:`jaxattn.nn.mixer.capture_aux_losses`: the f32 loss plus
    ``weight`` times the sum of the aux losses sown during it, and that weighted sum reported as
    metric ``aux_loss`` (only when something was sown, so other tasks' metrics are unchanged)."""

    def loss_with_aux(model, batch, rngs):
        (loss, metrics), aux = capture_aux_losses(loss_fn, model, batch, rngs)
        loss = loss.astype(jnp.float32)
        if not aux:
            return loss, metrics
        if "aux_loss" in metrics:
            raise ValueError("task.loss_fn returned a metric named 'aux_loss'; the loop reports "
                             "the weighted sum of the sown aux losses under that name")
        weighted = weight * total_aux_loss(aux)
        return loss + weighted, {**metrics, "aux_loss": weighted}

    return loss_with_aux


def _micro_batches(batch: Any, accumulate: int) -> Any:
    """``[B, ...] -> [accumulate, B / accumulate, ...]`` for every leaf of ``batch``."""
    return jax.tree.map(
        lambda x: x.reshape((accumulate, x.shape[0] // accumulate) + x.shape[1:]), batch)


def _accumulated_grads(grad_fn, accumulate: int, params, rest, batch, key):
    """Loss, metrics and gradients averaged over ``accumulate`` micro-batches (a ``scan``;
    micro-batch ``i`` uses dropout key ``fold_in(key, i)``), and the final ``rest``."""
    micro = _micro_batches(batch, accumulate)

    def body(carry, inputs):
        g_acc, loss_acc, metrics_acc, r = carry
        i, mb = inputs
        (loss, (metrics, r)), g = grad_fn(params, r, mb, jax.random.fold_in(key, i))
        g_acc = jax.tree.map(jnp.add, g_acc, g)
        metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
        return (g_acc, loss_acc + loss, metrics_acc, r), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    metrics0 = jax.eval_shape(lambda: grad_fn(params, rest, jax.tree.map(
        lambda x: x[0], micro), key)[0][1][0])
    metrics0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics0)
    idx = jnp.arange(accumulate, dtype=jnp.int32)
    (grads, loss, metrics, rest), _ = jax.lax.scan(
        body, (zeros, jnp.zeros((), jnp.float32), metrics0, rest), (idx, micro))
    inv = 1.0 / accumulate
    grads = jax.tree.map(lambda g: g * jnp.asarray(inv, g.dtype), grads)
    metrics = jax.tree.map(lambda a: a * jnp.asarray(inv, a.dtype), metrics)
    return loss * inv, metrics, rest, grads


def _initial_health() -> dict[str, jax.Array]:
    """The on-device non-finite record: ``first_bad`` (1-based step of the first step whose loss
    or gradient norm was NaN/inf, 0 while none was) and that step's loss and gradient norm."""
    return {"first_bad": jnp.zeros((), jnp.int32), "loss": jnp.zeros((), jnp.float32),
            "grad_norm": jnp.zeros((), jnp.float32)}


def _update_health(health: dict, step, loss, grad_norm) -> dict:
    """``health`` after the step of 0-based index ``step`` (cheap scalar ops in the step)."""
    loss, grad_norm = loss.astype(jnp.float32), grad_norm.astype(jnp.float32)
    bad = jnp.logical_not(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    new = bad & (health["first_bad"] == 0)
    return {"first_bad": jnp.where(new, step + 1, health["first_bad"]).astype(jnp.int32),
            "loss": jnp.where(new, loss, health["loss"]),
            "grad_norm": jnp.where(new, grad_norm, health["grad_norm"])}


def _build_steps(graphdef, task: Task, tx: optax.GradientTransformation, run: RunConfig,
                 optim: OptimConfig, seed: int):
    """The pure ``train_step(params, opt_state, rest, health, batch, step) -> (params,
    opt_state, rest, health, metrics)`` and ``eval_step(params, rest, batch, valid) ->
    ({name: sum}, n_valid)``."""
    compute_dtype = _compute_dtype(run)
    base_key = jax.random.key(seed + 1)
    accumulate = optim.accumulate_steps
    task_loss = _with_aux_losses(task.loss_fn, optim.aux_loss_weight)

    def merged(params, rest, batch):
        """The model and batch of one step, cast to the compute dtype (labels untouched)."""
        if compute_dtype is not None:
            params, batch = _cast_floats(params, compute_dtype), _cast_floats(batch, compute_dtype)
        return nnx.merge(graphdef, params, rest), batch

    def loss_of(params, rest, batch, key):
        model, batch = merged(params, rest, batch)
        loss, metrics = task_loss(model, batch, nnx.Rngs(dropout=key))
        return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def train_step(params, opt_state, rest, health, batch, step):
        key = jax.random.fold_in(base_key, step)
        if accumulate == 1:
            (loss, (metrics, rest)), grads = grad_fn(params, rest, batch, key)
        else:
            loss, metrics, rest, grads = _accumulated_grads(
                grad_fn, accumulate, params, rest, batch, key)
        # optax mixes Python floats with int32 step counts internally (bias correction,
        # schedules); allow standard promotion for the optimizer only, so the model code
        # above still runs under the strict mode the test-suite sets.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, **metrics}
        return params, opt_state, rest, _update_health(health, step, loss, grad_norm), metrics

    def eval_step(params, rest, batch, valid):
        model, batch = merged(params, rest, batch)
        # aux losses sown during evaluation are collected and dropped (they are per batch, the
        # eval metrics per example)
        per_example, _ = capture_aux_losses(task.eval_fn, model, batch)
        w = valid.astype(jnp.float32)
        sums = {k: jnp.sum(v.astype(jnp.float32) * w) for k, v in per_example.items()}
        return sums, jnp.sum(w)

    return train_step, eval_step


# ---- state: initialise, compile, restore ------------------------------------------------------
_STATE_KEYS = ("params", "opt_state", "rest")  # the train state (and checkpoint) layout


def _unshared(*trees):
    """``trees`` with every array leaf that is the same object as an earlier leaf replaced by a
    copy. Two state leaves sharing one buffer (e.g. a module storing one initial array in two
    Variables) would be donated twice by the train step; ``device_put(..., may_alias=False)``
    does not copy them on a multi-device mesh (jax 0.10), and XLA CPU then crashes."""
    seen: set[int] = set()

    def fresh(x):
        if not isinstance(x, jax.Array):
            return x
        if id(x) in seen:
            return jnp.array(x, copy=True)
        seen.add(id(x))
        return x

    return tuple(jax.tree.map(fresh, t) for t in trees)


def _init_state(task: Task, seed: int, tx: optax.GradientTransformation,
                mesh: jax.sharding.Mesh, rules: tuple):
    """Build the model and split it: ``(graphdef, state, shardings)`` with ``state`` and
    ``shardings`` dicts over :data:`_STATE_KEYS`, the state placed on ``mesh``. The arrays are
    fresh copies the loop owns (the train step donates them)."""
    model = task.make_model(nnx.Rngs(params=seed, dropout=seed + 1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    params, rest = _unshared(params, rest)
    repl = NamedSharding(mesh, P())
    p_sh = _leaf_shardings(params, param_shardings(params, mesh, rules))
    r_sh = jax.tree.map(lambda _: repl, rest)
    params = jax.device_put(params, p_sh, may_alias=False)
    rest = jax.device_put(rest, r_sh, may_alias=False)
    with jax.numpy_dtype_promotion("standard"):  # optax internals; see train_step
        opt_state = jax.jit(tx.init)(params)
    o_sh = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else repl, opt_state)
    opt_state = jax.device_put(opt_state, o_sh, may_alias=False)
    state = {"params": params, "opt_state": opt_state, "rest": rest}
    return graphdef, state, {"params": p_sh, "opt_state": o_sh, "rest": r_sh}


def _compile_steps(graphdef, task: Task, tx, cfg: ExperimentConfig, mesh, rules, shardings,
                   batch_sh):
    """``jax.jit`` of the steps with explicit shardings, traced under the run's rules (so
    layers' activation constraints use the same table). The train step donates the state it
    is given; the eval step (``None`` without ``task.eval_fn`` and ``eval_source``) reads it."""
    train_step, eval_step = _build_steps(graphdef, task, tx, cfg.run, cfg.optim, cfg.run.seed)
    train_step, eval_step = (_under_rules(f, mesh, rules) for f in (train_step, eval_step))
    repl = NamedSharding(mesh, P())
    state_sh = tuple(shardings[k] for k in _STATE_KEYS)
    train_jit = jax.jit(train_step, in_shardings=(*state_sh, repl, batch_sh, repl),
                        out_shardings=(*state_sh, repl, repl), donate_argnums=(0, 1, 2, 3))
    if task.eval_fn is None or task.eval_source is None:
        return train_jit, None
    eval_jit = jax.jit(eval_step, in_shardings=(shardings["params"], shardings["rest"],
                                                batch_sh, batch_sh),
                       out_shardings=(repl, repl))
    return train_jit, eval_jit


def _restore(ckpt: Checkpointer | None, state: dict, shardings: dict
             ) -> tuple[int | None, dict]:
    """``(step, state)`` of the newest readable checkpoint placed on ``shardings``, or
    ``(None, state)`` when there is none."""
    if ckpt is None:
        return None, state
    restored = ckpt.restore_latest(abstract_like(state, shardings))
    if restored is None:
        return None, state
    step, saved = restored
    return step, {k: saved[k] for k in _STATE_KEYS}


def _train_step(train_jit, state: dict, health: dict, batch, step: int
                ) -> tuple[dict, dict, dict[str, Any]]:
    """One optimizer step; ``state``'s and ``health``'s buffers are donated (use only the
    returned ones)."""
    *new, health, metrics = train_jit(*(state[k] for k in _STATE_KEYS), health, batch,
                                      jnp.asarray(step, jnp.int32))
    return dict(zip(_STATE_KEYS, new, strict=True)), health, metrics


# ---- the loop ---------------------------------------------------------------------------------
def _check_finite(health: dict, last_saved: int | None) -> None:
    """Raise :class:`NonFiniteLossError` if the on-device record holds a bad step (reads three
    scalars: one device sync, done only at log/eval/save boundaries)."""
    record = jax.device_get(health)
    step = int(record["first_bad"])
    if step == 0:
        return
    loss, grad_norm = float(record["loss"]), float(record["grad_norm"])
    what = (f"training loss is {loss}" if not math.isfinite(loss)
            else f"gradient norm is {grad_norm} (loss {loss})")
    where = (f"the last good checkpoint (step {last_saved}) is kept"
             if last_saved is not None else "no checkpoint was written")
    raise NonFiniteLossError(
        f"{what} at step {step} (the first non-finite step; every step is checked): stopping "
        f"the run; {where} and nothing after step {step - 1} is saved. Lower the learning "
        f"rate, enable gradient clipping or check the data.")


@dataclasses.dataclass
class _Progress:
    """Host-side record of a run: logged history, the on-device non-finite record (``health``,
    see :func:`_initial_health`), step metrics since the last log, the latest train / eval
    metrics, the last saved step."""

    last_saved: int | None
    health: dict[str, Any]
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    window: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    stopped_early: bool = False

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        self.window.append(metrics)

    def check_finite(self) -> None:
        _check_finite(self.health, self.last_saved)


def _log_train(progress: _Progress, step: int, writer: MetricsWriter, bar: ProgressBar) -> None:
    """Average the step metrics since the last log and write them (after the NaN check)."""
    progress.check_finite()
    window = progress.window
    progress.train_metrics = {k: float(np.mean([float(m[k]) for m in window]))
                              for k in window[-1]}
    window.clear()
    writer.write(step, progress.train_metrics, "train")
    progress.history.append({"step": step, "split": "train", **progress.train_metrics})
    bar.update(0, loss=progress.train_metrics["loss"])


def _evaluate(eval_jit, source, run: RunConfig, batch_sh, state: dict) -> dict[str, float]:
    """Per-example eval metrics averaged over the eval set (padding excluded)."""
    totals: dict[str, float] = {}
    count = 0.0
    for batch, valid in eval_batches(source, global_batch_size=run.eval_batch_size,
                                     max_examples=run.eval_examples):
        mask = np.zeros(len(next(iter(batch.values()))), np.bool_)
        mask[:valid] = True
        sums, n = eval_jit(state["params"], state["rest"], global_batch(batch, batch_sh),
                           global_batch(mask, batch_sh))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        count += float(n)
    return {k: v / max(count, 1.0) for k, v in totals.items()}


def _log_eval(progress: _Progress, step: int, metrics: dict[str, float],
              writer: MetricsWriter) -> None:
    progress.eval_metrics = metrics
    writer.write(step, metrics, "eval")
    progress.history.append({"step": step, "split": "eval", **metrics})


def _eval_mid_run(progress: _Progress, step: int, metrics: dict[str, float],
                  writer: MetricsWriter, run: RunConfig) -> None:
    """Log a periodic evaluation; sets ``stopped_early`` when the early-stop metric passes."""
    progress.check_finite()
    _log_eval(progress, step, metrics, writer)
    if run.early_stop_metric and \
            progress.eval_metrics.get(run.early_stop_metric, -math.inf) > run.early_stop_above:
        progress.stopped_early = True


def _save(progress: _Progress, ckpt: Checkpointer, step: int, state: dict,
          metadata: dict[str, Any]) -> None:
    """Checkpoint ``state`` and ``metadata`` at ``step`` (after the NaN check: a bad step is
    never saved)."""
    progress.check_finite()
    ckpt.save(step, state, metadata)
    progress.last_saved = step


def _is_eval_step(run: RunConfig, step: int) -> bool:
    return bool(run.eval_every) and step % run.eval_every == 0 and step < run.steps


def _is_save_step(run: RunConfig, step: int, stopped_early: bool) -> bool:
    return (bool(run.save_every) and step % run.save_every == 0) or step == run.steps \
        or stopped_early


def _check_batch_split(run: RunConfig, accumulate: int, mesh, batch_sh) -> None:
    """The global batch must split over the batch's devices times the micro-batches."""
    batch_axes = batch_sh.spec[0] or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    n_data = math.prod(mesh.shape[a] for a in batch_axes)
    if run.batch_size % (n_data * accumulate):
        raise ValueError(f"batch_size {run.batch_size} must be divisible by the batch's devices "
                         f"({n_data}, mesh axes {batch_axes}) x accumulate_steps ({accumulate})")
    if run.steps < 1:
        raise ValueError(f"run.steps must be >= 1, got {run.steps}")


def _state_signature(state: dict) -> str:
    """A short hash of the state's tree structure, shapes and dtypes (checkpoint metadata)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    text = repr([(jax.tree_util.keystr(p), tuple(np.shape(x)), str(x.dtype)) for p, x in leaves])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_resume(meta: dict[str, Any], step: int, cfg: ExperimentConfig, optimizer_kind: str,
                  signature: str, where: str) -> None:
    """Refuse to resume from the checkpoint of ``step`` (``meta``: its stored metadata) when its
    state could not be restored into this run's or its config differs in a checked field."""
    if meta.get("state_signature", signature) != signature:
        raise ValueError(
            f"cannot resume from the checkpoint at step {step} in {where}: its state has a "
            f"different structure (model parameters or optimizer state: the optimizer was "
            f"{meta.get('optimizer')!r}, now {optimizer_kind!r}). Use another "
            f"run.checkpoint_dir.")
    if "config" not in meta:
        print(f"train: the checkpoint at step {step} in {where} stores no readable config; "
              f"resuming without checking it", file=sys.stderr)
        return
    diffs = config_differences(meta["config"], json_config(cfg))
    if step >= cfg.run.steps:  # nothing left to train: the run's length does not matter
        diffs = [d for d in diffs if d[0] != "run.steps"]
    if meta.get("optimizer", optimizer_kind) != optimizer_kind:
        diffs.append(("optimizer", meta["optimizer"], optimizer_kind))
    if not diffs:
        return
    listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs)
    if cfg.run.allow_config_change:
        print(f"train: resuming from step {step} with a changed config "
              f"(run.allow_config_change): {listing}", file=sys.stderr)
        return
    raise ValueError(
        f"refusing to resume from the checkpoint at step {step} in {where}: the config differs "
        f"in {len(diffs)} field(s): {listing}. Set run.allow_config_change=true to resume "
        f"anyway, or use another run.checkpoint_dir.")


def _train_batches(task: Task, cfg: ExperimentConfig, start: int, meta: dict[str, Any]):
    """``(step-indexed batches, IterBatches or None)`` of ``task.train_source`` from ``start``;
    an IterDataset is set to the iterator state stored in the resumed checkpoint's ``meta``."""
    run = cfg.run
    if not is_iter_dataset(task.train_source):
        return train_dataset(task.train_source, global_batch_size=run.batch_size,
                             seed=run.seed), None
    if run.prefetch >= 32:
        raise ValueError(f"run.prefetch must be < 32 with an IterDataset source, got "
                         f"{run.prefetch}")
    pc = jax.process_count()
    if run.batch_size % pc:
        raise ValueError(f"global batch {run.batch_size} not divisible by {pc} processes")
    state = meta.get("data_state")
    if start and state is None:
        if not run.allow_config_change:
            raise ValueError(
                f"the checkpoint at step {start} stores no state for the train IterDataset "
                f"(written with another source?): resuming would replay the stream from its "
                f"start. Set run.allow_config_change=true to accept that.")
        print(f"train: resuming at step {start} with the train IterDataset restarted from its "
              f"start (run.allow_config_change)", file=sys.stderr)
    it = IterBatches(task.train_source, start=start, local_batch_size=run.batch_size // pc,
                     state=state)
    return it, it


def train(cfg: ExperimentConfig, task: Task, *,
          optimizer: optax.GradientTransformation | None = None,
          mesh: jax.sharding.Mesh | None = None,
          callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
          desc: str = "") -> TrainResult:
    """Train ``task`` under ``cfg``; resume from ``cfg.run.checkpoint_dir`` when it holds a
    checkpoint. ``optimizer`` replaces the AdamW built from ``cfg.optim`` (gradient
    accumulation and ``aux_loss_weight`` still come from ``cfg.optim``; a schedule inside it
    is the researcher's to build over ``cfg.run.steps``). ``callbacks(step, metrics)`` run on
    the host after every step (metrics are device arrays; reading them synchronises). ``mesh``
    defaults to ``cfg.mesh`` over the first devices it needs (all of them when a size is
    ``-1``).

    Raises:
      NonFiniteLossError: a step's loss or gradient norm was NaN/inf (every step is checked on
        device; reported before the next log, eval or save, naming the first bad step).
      ValueError: resuming from a checkpoint whose stored config differs in a checked field
        (see the module docstring; ``run.allow_config_change`` permits it) or whose state has
        another structure.
    """
    mesh = _run_mesh(cfg.mesh) if mesh is None else mesh
    # a mesh with Explicit axes (jax.make_mesh's default) needs JAX's mesh context for eager
    # and jitted work on arrays whose sharding is part of their type
    with jax.set_mesh(mesh) if has_explicit_axes(mesh) else contextlib.nullcontext():
        return _train(cfg, task, mesh, callbacks, desc, optimizer)


def _train(cfg: ExperimentConfig, task: Task, mesh: jax.sharding.Mesh,
           callbacks: Sequence[Callable[[int, dict[str, Any]], None]], desc: str,
           optimizer: optax.GradientTransformation | None = None) -> TrainResult:
    """:func:`train` on a resolved mesh (inside its mesh context when it has Explicit axes)."""
    run, t0 = cfg.run, time.time()
    rules = mesh_rules(cfg.mesh)
    batch_sh = batch_sharding(mesh, rules)
    _check_batch_split(run, cfg.optim.accumulate_steps, mesh, batch_sh)
    tx = make_optimizer(cfg.optim, run.steps) if optimizer is None else optimizer
    optimizer_kind = "cfg.optim" if optimizer is None else "custom"
    graphdef, state, shardings = _init_state(task, run.seed, tx, mesh, rules)
    train_jit, eval_jit = _compile_steps(graphdef, task, tx, cfg, mesh, rules, shardings,
                                         batch_sh)
    ckpt = Checkpointer(run.checkpoint_dir, keep=run.keep, async_save=run.async_save) \
        if run.checkpoint_dir else None
    signature = _state_signature(state)
    meta: dict[str, Any] = {}
    latest = ckpt.latest_step() if ckpt is not None else None
    if latest is not None:  # before restoring: a changed model must not look like corruption
        _check_resume(ckpt.metadata(latest), latest, cfg, optimizer_kind, signature,
                      run.checkpoint_dir)
    resumed_from, state = _restore(ckpt, state, shardings)
    if resumed_from is not None:
        meta = ckpt.metadata(resumed_from)
        if resumed_from != latest:
            _check_resume(meta, resumed_from, cfg, optimizer_kind, signature,
                          run.checkpoint_dir)
    step = resumed_from or 0
    saved_meta = {"config": json_config(cfg), "optimizer": optimizer_kind,
                  "state_signature": signature}

    dataset, iter_batches = _train_batches(task, cfg, step, meta)
    # under jax.distributed every process computes the same (global) metrics: one writes them
    primary = jax.process_index() == 0
    writer = MetricsWriter(run.log_dir if run.log_dir and primary else None)
    bar = ProgressBar(run.steps, initial=step, enabled=run.progress and primary, desc=desc)
    evaluate = functools.partial(_evaluate, eval_jit, task.eval_source, run, batch_sh)
    progress = _Progress(last_saved=resumed_from,
                         health=jax.device_put(_initial_health(), NamedSharding(mesh, P())))
    batches = Prefetcher(dataset, step, run.steps, depth=run.prefetch)
    try:
        while step < run.steps:
            state, progress.health, metrics = _train_step(
                train_jit, state, progress.health, global_batch(batches.get(step), batch_sh),
                step)
            step += 1
            progress.record(step, metrics)
            for cb in callbacks:
                cb(step, metrics)
            if step % max(run.log_every, 1) == 0 or step == run.steps:
                _log_train(progress, step, writer, bar)
            bar.update(1)
            if eval_jit is not None and _is_eval_step(run, step):
                _eval_mid_run(progress, step, evaluate(state), writer, run)
            if ckpt is not None and _is_save_step(run, step, progress.stopped_early):
                extra = {} if iter_batches is None else \
                    {"data_state": iter_batches.state_after(step)}
                _save(progress, ckpt, step, state, {**saved_meta, **extra})
            if progress.stopped_early:
                break
        progress.check_finite()
        last = progress.history[-1] if progress.history else {}
        if eval_jit is not None and (last.get("split") != "eval" or last["step"] != step):
            _log_eval(progress, step, evaluate(state), writer)
    finally:
        batches.close()
        if iter_batches is not None:
            iter_batches.close()
        bar.close()
        writer.close()
        if ckpt is not None:
            ckpt.close()

    return TrainResult(
        model=nnx.merge(graphdef, state["params"], state["rest"]),
        step=step,
        train_metrics=progress.train_metrics,
        eval_metrics=progress.eval_metrics,
        history=progress.history,
        resumed_from=resumed_from,
        stopped_early=progress.stopped_early,
        seconds=time.time() - t0,
        input_wait_seconds=batches.wait_seconds,
    )
