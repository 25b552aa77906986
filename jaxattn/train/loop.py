"""The one training loop every experiment uses.

The model is split once (``nnx.split`` into ``graphdef``, parameters and the remaining state);
``train_step`` and ``eval_step`` are pure functions of arrays, compiled with ``jax.jit`` and
explicit input/output ``NamedSharding``s over a :mod:`jaxattn.parallel` mesh (``data``,
``fsdp``, ``tensor``, ``context``; data parallel by default). Parameters and the batch are placed
by the logical-axis rules of :mod:`jaxattn.parallel.logical` (``MeshConfig.rules`` in front of
``DEFAULT_RULES``), and the steps are traced under ``axis_rules`` so layers' activation
constraints (``jaxattn.parallel.constrain``) follow the same table. The batch of step ``s`` is
``train_dataset[s]`` and the dropout key is ``fold_in(key, s)``, so a run restored from a
checkpoint continues bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
from jaxattn.train.checkpoint import Checkpointer, abstract_like
from jaxattn.train.config import ExperimentConfig, MeshConfig, RunConfig
from jaxattn.train.data import eval_batches, global_batch, train_dataset
from jaxattn.train.metrics import MetricsWriter, ProgressBar
from jaxattn.train.optim import make_optimizer

__all__ = [
    "NonFiniteLossError",
    "Task",
    "TrainResult",
    "batch_sharding",
    "make_mesh",
    "mesh_rules",
    "param_shardings",
    "train",
]

LossFn = Callable[[nnx.Module, Any, nnx.Rngs], tuple[jax.Array, dict[str, jax.Array]]]
EvalFn = Callable[[nnx.Module, Any], dict[str, jax.Array]]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the run stopped without saving."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What an experiment supplies to the loop.

    Attributes:
      make_model: ``rngs -> nnx.Module``.
      loss_fn: ``(model, batch, rngs) -> (scalar loss, {name: scalar})``; ``rngs`` has a
        ``dropout`` stream keyed by the step.
      train_source: random-access source (``len``, ``[i] -> dict of numpy arrays``).
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


# ---- mesh and shardings -----------------------------------------------------------------------
def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A ``("data", "fsdp", "tensor", "context")`` mesh over ``devices`` (default: all).

    Without a ``-1`` size the mesh takes the first ``data * fsdp * tensor * context`` devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = (cfg.data, cfg.fsdp, cfg.tensor, cfg.context)
    if -1 not in sizes and all(s >= 1 for s in sizes) and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]
    return parallel.make_mesh(parallel.MeshConfig(*sizes), devices)


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


def _build_steps(graphdef, task: Task, tx: optax.GradientTransformation, run: RunConfig,
                 accumulate: int, seed: int):
    compute_dtype = {"f32": None, "bf16": jnp.bfloat16}.get(run.precision, "bad")
    if compute_dtype == "bad":
        raise ValueError(f"run.precision must be 'f32' or 'bf16', got {run.precision!r}")
    base_key = jax.random.key(seed + 1)

    def loss_of(params, rest, batch, key):
        p = params if compute_dtype is None else _cast_floats(params, compute_dtype)
        if compute_dtype is not None:  # bf16 compute: floating inputs too, labels untouched
            batch = _cast_floats(batch, compute_dtype)
        model = nnx.merge(graphdef, p, rest)
        loss, aux = task.loss_fn(model, batch, nnx.Rngs(dropout=key))
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        return loss.astype(jnp.float32), (aux, new_rest)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def train_step(params, opt_state, rest, batch, step):
        key = jax.random.fold_in(base_key, step)
        if accumulate == 1:
            (loss, (aux, rest)), grads = grad_fn(params, rest, batch, key)
        else:
            micro = jax.tree.map(
                lambda x: x.reshape((accumulate, x.shape[0] // accumulate) + x.shape[1:]), batch)

            def body(carry, inputs):
                g_acc, loss_acc, aux_acc, r = carry
                i, mb = inputs
                (l, (a, r)), g = grad_fn(params, r, mb, jax.random.fold_in(key, i))
                g_acc = jax.tree.map(jnp.add, g_acc, g)
                aux_acc = jax.tree.map(jnp.add, aux_acc, a)
                return (g_acc, loss_acc + l, aux_acc, r), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            aux0 = jax.eval_shape(lambda: grad_fn(params, rest, jax.tree.map(
                lambda x: x[0], micro), key)[0][1][0])
            aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0)
            idx = jnp.arange(accumulate, dtype=jnp.int32)
            (grads, loss, aux, rest), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32), aux0, rest), (idx, micro))
            inv = 1.0 / accumulate
            grads = jax.tree.map(lambda g: g * jnp.asarray(inv, g.dtype), grads)
            loss = loss * inv
            aux = jax.tree.map(lambda a: a * jnp.asarray(inv, a.dtype), aux)
        # optax mixes Python floats with int32 step counts internally (bias correction,
        # schedules); allow standard promotion for the optimizer only, so the model code
        # above still runs under the strict mode the test-suite sets.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return params, opt_state, rest, metrics

    def eval_step(params, rest, batch, valid):
        p = params if compute_dtype is None else _cast_floats(params, compute_dtype)
        if compute_dtype is not None:
            batch = _cast_floats(batch, compute_dtype)
        model = nnx.merge(graphdef, p, rest)
        per_example = task.eval_fn(model, batch)
        w = valid.astype(jnp.float32)
        sums = {k: jnp.sum(v.astype(jnp.float32) * w) for k, v in per_example.items()}
        return sums, jnp.sum(w)

    return train_step, eval_step


# ---- the loop ---------------------------------------------------------------------------------
def _check_finite(pending: list[tuple[int, Any]], last_saved: int | None) -> None:
    for step, loss in pending:
        value = float(loss)
        if not math.isfinite(value):
            where = (f"the last good checkpoint (step {last_saved}) is kept"
                     if last_saved is not None else "no checkpoint was written")
            raise NonFiniteLossError(
                f"training loss is {value} at step {step}: stopping the run; {where} and "
                f"nothing after step {step - 1} is saved. Lower the learning rate, enable "
                f"gradient clipping or check the data.")
    pending.clear()


def train(cfg: ExperimentConfig, task: Task, *, mesh: jax.sharding.Mesh | None = None,
          callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
          desc: str = "") -> TrainResult:
    """Train ``task`` under ``cfg``; resume from ``cfg.run.checkpoint_dir`` when it holds a
    checkpoint. ``callbacks(step, metrics)`` run on the host after every step (metrics are
    device arrays; reading them synchronises).

    Raises:
      NonFiniteLossError: the loss became NaN/inf (checked before every save and log).
    """
    run, t0 = cfg.run, time.time()
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    rules = mesh_rules(cfg.mesh)
    batch_sh = batch_sharding(mesh, rules)
    batch_axes = batch_sh.spec[0] or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    n_data = math.prod(mesh.shape[a] for a in batch_axes)
    accumulate = cfg.optim.accumulate_steps
    if run.batch_size % (n_data * accumulate):
        raise ValueError(f"batch_size {run.batch_size} must be divisible by the batch's devices "
                         f"({n_data}, mesh axes {batch_axes}) x accumulate_steps ({accumulate})")
    if run.steps < 1:
        raise ValueError(f"run.steps must be >= 1, got {run.steps}")

    model = task.make_model(nnx.Rngs(params=run.seed, dropout=run.seed + 1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    repl = NamedSharding(mesh, P())
    p_sh = _leaf_shardings(params, param_shardings(params, mesh, rules))
    r_sh = jax.tree.map(lambda _: repl, rest)
    params = jax.device_put(params, p_sh)
    rest = jax.device_put(rest, r_sh)
    tx = make_optimizer(cfg.optim, run.steps)
    with jax.numpy_dtype_promotion("standard"):  # optax internals; see train_step
        opt_state = jax.jit(tx.init)(params)
    o_sh = jax.tree.map(
        lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else repl, opt_state)
    opt_state = jax.device_put(opt_state, o_sh)

    train_step, eval_step = _build_steps(graphdef, task, tx, run, accumulate, run.seed)
    # Trace under the run's rules so layers' activation constraints use the same table.
    train_step, eval_step = (_under_rules(f, mesh, rules) for f in (train_step, eval_step))
    train_step = jax.jit(train_step, in_shardings=(p_sh, o_sh, r_sh, batch_sh, repl),
                         out_shardings=(p_sh, o_sh, r_sh, repl))
    eval_jit = None
    if task.eval_fn is not None and task.eval_source is not None:
        eval_jit = jax.jit(eval_step, in_shardings=(p_sh, r_sh, batch_sh, batch_sh),
                           out_shardings=(repl, repl))

    ckpt = Checkpointer(run.checkpoint_dir, keep=run.keep, async_save=run.async_save) \
        if run.checkpoint_dir else None
    start, resumed_from = 0, None
    if ckpt is not None:
        target = {"params": params, "opt_state": opt_state, "rest": rest}
        shardings = {"params": p_sh, "opt_state": o_sh, "rest": r_sh}
        restored = ckpt.restore_latest(abstract_like(target, shardings))
        if restored is not None:
            start, state = restored
            params, opt_state, rest = state["params"], state["opt_state"], state["rest"]
            resumed_from = start

    dataset = train_dataset(task.train_source, global_batch_size=run.batch_size, seed=run.seed)
    writer = MetricsWriter(run.log_dir or None)
    bar = ProgressBar(run.steps, initial=start, enabled=run.progress, desc=desc)

    def evaluate() -> dict[str, float]:
        totals: dict[str, float] = {}
        count = 0.0
        for batch, valid in eval_batches(task.eval_source, global_batch_size=run.eval_batch_size,
                                         max_examples=run.eval_examples):
            mask = np.zeros(len(next(iter(batch.values()))), np.bool_)
            mask[:valid] = True
            sums, n = eval_jit(params, rest, global_batch(batch, batch_sh),
                               global_batch(mask, batch_sh))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            count += float(n)
        return {k: v / max(count, 1.0) for k, v in totals.items()}

    history: list[dict[str, Any]] = []
    pending: list[tuple[int, Any]] = []
    window: list[dict[str, Any]] = []
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    last_saved = resumed_from
    stopped_early = False
    step = start
    try:
        while step < run.steps:
            batch = global_batch(dataset[step], batch_sh)
            params, opt_state, rest, metrics = train_step(
                params, opt_state, rest, batch, jnp.asarray(step, jnp.int32))
            step += 1
            pending.append((step, metrics["loss"]))
            window.append(metrics)
            for cb in callbacks:
                cb(step, metrics)
            is_log = step % max(run.log_every, 1) == 0 or step == run.steps
            if is_log:
                _check_finite(pending, last_saved)
                train_metrics = {k: float(np.mean([float(m[k]) for m in window]))
                                 for k in window[-1]}
                window.clear()
                writer.write(step, train_metrics, "train")
                history.append({"step": step, "split": "train", **train_metrics})
                bar.update(0, loss=train_metrics["loss"])
            bar.update(1)
            if eval_jit is not None and run.eval_every and step % run.eval_every == 0 \
                    and step < run.steps:
                _check_finite(pending, last_saved)
                eval_metrics = evaluate()
                writer.write(step, eval_metrics, "eval")
                history.append({"step": step, "split": "eval", **eval_metrics})
                if run.early_stop_metric and \
                        eval_metrics.get(run.early_stop_metric, -math.inf) > run.early_stop_above:
                    stopped_early = True
            if ckpt is not None and ((run.save_every and step % run.save_every == 0)
                                     or step == run.steps or stopped_early):
                _check_finite(pending, last_saved)
                ckpt.save(step, {"params": params, "opt_state": opt_state, "rest": rest})
                last_saved = step
            if stopped_early:
                break
        _check_finite(pending, last_saved)
        if eval_jit is not None and (not history or history[-1].get("split") != "eval"
                                     or history[-1]["step"] != step):
            eval_metrics = evaluate()
            writer.write(step, eval_metrics, "eval")
            history.append({"step": step, "split": "eval", **eval_metrics})
    finally:
        bar.close()
        writer.close()
        if ckpt is not None:
            ckpt.close()

    return TrainResult(
        model=nnx.merge(graphdef, params, rest),
        step=step,
        train_metrics=train_metrics,
        eval_metrics=eval_metrics,
        history=history,
        resumed_from=resumed_from,
        stopped_early=stopped_early,
        seconds=time.time() - t0,
    )
