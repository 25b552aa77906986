"""The training loop with a researcher's setup: any optax optimizer, the weight-decay mask,
grain IterDataset / MapDataset pipelines (iterator state checkpointed), the config stored with
each checkpoint (a changed config is refused on resume unless allowed), and the NaN/inf check
of every step inside the jitted step."""

import dataclasses

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn.train import (
    Checkpointer,
    ExperimentConfig,
    NonFiniteLossError,
    OptimConfig,
    RunConfig,
    Task,
    make_optimizer,
    train,
)
from jaxattn.train.optim import decay_mask

N = 32  # examples in the toy source


class Net(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):  # [B, 4] -> [B, 3]
        return self.lin(x)


def _examples():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 4)).astype(np.float32)
    y = rng.normal(size=(N, 3)).astype(np.float32)
    return [{"x": x[i], "y": y[i], "bad": np.float32(0.0)} for i in range(N)]


class Source:
    def __init__(self):
        self.items = _examples()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return self.items[int(i)]


def _mse(model, batch, rngs):
    loss = jnp.mean((model(batch["x"]) - batch["y"]) ** 2)
    nan = jnp.where(jnp.any(batch["bad"] > 0), jnp.float32(jnp.nan), jnp.float32(0.0))
    return loss + nan, {}


def _task(source=None):
    return Task(make_model=Net, loss_fn=_mse, train_source=Source() if source is None else source)


@dataclasses.dataclass(frozen=True)
class ModelCfg:
    width: int = 3


def _cfg(steps=4, ckpt="", model=ModelCfg(), optim=None, **run):
    base = dict(steps=steps, batch_size=8, log_every=1, progress=False, checkpoint_dir=str(ckpt),
                save_every=2, async_save=False)
    base.update(run)
    optim = optim or OptimConfig(learning_rate=1e-2, schedule="constant", grad_clip_norm=None)
    return ExperimentConfig(model=model, data=None, optim=optim, run=RunConfig(**base))


def _params(result):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(result.model, nnx.Param))]


def _stop_at(step):
    def cb(s, _):
        if s == step:
            raise KeyboardInterrupt(f"stopped at {s}")
    return cb


def _interrupted_then_resumed(cfg, task_fn, stop, optimizer=None):
    with pytest.raises(KeyboardInterrupt):
        train(cfg, task_fn(), optimizer=optimizer, callbacks=[_stop_at(stop)])
    return train(cfg, task_fn(), optimizer=optimizer)


# ---- any optax optimizer ----------------------------------------------------------------------
def test_plain_sgd_gives_the_hand_computed_update():
    cfg = _cfg(steps=1, batch_size=N)  # one step over the whole (order-free) source
    res = train(cfg, _task(), optimizer=optax.sgd(0.5))
    init = Net(nnx.Rngs(params=0, dropout=1))
    w, b = np.asarray(init.lin.kernel[...]), np.asarray(init.lin.bias[...])
    x = np.stack([e["x"] for e in _examples()])
    y = np.stack([e["y"] for e in _examples()])
    r = x @ w + b - y  # d mean(r^2) / d(xW + b) = 2 r / r.size
    gw, gb = x.T @ (2 * r / r.size), (2 * r / r.size).sum(0)
    np.testing.assert_allclose(np.asarray(res.model.lin.kernel[...]), w - 0.5 * gw,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res.model.lin.bias[...]), b - 0.5 * gb,
                               rtol=1e-5, atol=1e-6)


def test_optax_chain_with_a_schedule_resumes_bit_for_bit(tmp_path):
    def tx():
        return optax.chain(optax.clip_by_global_norm(1.0),
                           optax.adam(optax.linear_schedule(1e-2, 1e-3, 6)))

    full = train(_cfg(6), _task(), optimizer=tx())
    res = _interrupted_then_resumed(_cfg(6, tmp_path / "c"), _task, 3, optimizer=tx())
    assert res.resumed_from == 2 and res.step == 6
    for a, b in zip(_params(full), _params(res), strict=True):
        np.testing.assert_array_equal(a, b)
    # the checkpoint of the custom optimizer cannot silently resume with the cfg.optim AdamW
    with pytest.raises(ValueError, match="different structure"):
        train(_cfg(8, tmp_path / "c"), _task())


# ---- weight-decay mask ------------------------------------------------------------------------
class Decayed(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(5, 4, rngs=rngs)
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, rngs=rngs)
        self.scale_proj = nnx.Linear(4, 4, rngs=rngs)


def test_matrices_mask_skips_biases_norms_and_embeddings():
    assert OptimConfig().weight_decay_mask == "matrices"  # biases, norms, embeddings skipped
    params = nnx.state(Decayed(nnx.Rngs(0)), nnx.Param)
    mask = decay_mask(params, "matrices")
    decayed = {jax.tree_util.keystr(p) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]
               if m}
    assert decayed == {"['lin']['kernel'].value"}
    cfg = OptimConfig(learning_rate=0.1, weight_decay=0.5, schedule="constant",
                      grad_clip_norm=None, weight_decay_mask="matrices")
    explicit = {"embed": {"embedding": False}, "lin": {"kernel": True, "bias": False},
                "norm": {"scale": False, "bias": False},
                "scale_proj": {"kernel": False, "bias": False}}
    ref = optax.adamw(0.1, weight_decay=0.5, mask=lambda p: jax.tree.map(
        lambda m, _: m, nnx.State(explicit), p))
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
    with jax.numpy_dtype_promotion("standard"):
        ours = make_optimizer(cfg, 10)
        u, _ = ours.update(grads, ours.init(params), params)
        u_ref, _ = ref.update(grads, ref.init(params), params)
        no_decay = optax.adam(0.1)
        u_none, _ = no_decay.update(grads, no_decay.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path(u)[0]
    for (path, a), b, c in zip(flat, jax.tree.leaves(u_ref), jax.tree.leaves(u_none),
                               strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        differs = not np.allclose(np.asarray(a), np.asarray(c))
        assert differs == (jax.tree_util.keystr(path) in decayed), path
    with pytest.raises(ValueError, match="weight_decay_mask"):
        make_optimizer(dataclasses.replace(cfg, weight_decay_mask="some"), 10)


# ---- config stored with each checkpoint -------------------------------------------------------
def test_resume_with_a_changed_config_is_refused_naming_the_fields(tmp_path):
    ckpt = tmp_path / "c"
    train(_cfg(2, ckpt), _task())
    stored = Checkpointer(ckpt).metadata(2)["config"]
    assert stored["optim"]["learning_rate"] == 1e-2 and stored["model"] == {"width": 3}
    changed = _cfg(4, ckpt, model=ModelCfg(width=5),
                   optim=OptimConfig(learning_rate=3e-2, schedule="constant",
                                     grad_clip_norm=None))
    with pytest.raises(ValueError) as err:
        train(changed, _task())
    msg = str(err.value)
    for part in ("model.width: 3 -> 5", "optim.learning_rate: 0.01 -> 0.03", "run.steps: 2 -> 4",
                 "allow_config_change"):
        assert part in msg, msg
    assert "log_every" not in msg
    # fields outside the checked list change freely; the flag allows the rest
    res = train(_cfg(2, ckpt, log_every=7, keep=5, prefetch=0), _task())
    assert res.resumed_from == 2
    res = train(dataclasses.replace(changed, run=dataclasses.replace(
        changed.run, allow_config_change=True)), _task())
    assert res.resumed_from == 2 and res.step == 4


# ---- NaN/inf check of every step --------------------------------------------------------------
class BatchStream(grain.IterDataset):
    """Ready batches of 8 from the toy examples; batch ``bad_batch`` carries ``bad = 1``."""

    def __init__(self, bad_batch=-1):
        super().__init__()
        self.bad_batch = bad_batch

    def __iter__(self):
        return _BatchIter(self.bad_batch)


class _BatchIter(grain.DatasetIterator):
    def __init__(self, bad_batch):
        super().__init__()
        self.i, self.bad_batch, self.items = 0, bad_batch, _examples()

    def __next__(self):
        idx = [(8 * self.i + k) % N for k in range(8)]
        batch = {k: np.stack([self.items[j][k] for j in idx]) for k in ("x", "y", "bad")}
        if self.i == self.bad_batch:
            batch["bad"] = np.ones_like(batch["bad"])
        self.i += 1
        return batch

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def test_nan_at_one_step_between_log_boundaries_names_that_step(tmp_path):
    cfg = _cfg(10, tmp_path / "c", log_every=5, save_every=5)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 \(the first"):
        train(cfg, _task(BatchStream(bad_batch=2)))  # steps 4 and 5 are finite again
    assert Checkpointer(tmp_path / "c").all_steps() == []  # nothing was saved


# ---- grain pipelines --------------------------------------------------------------------------
def _threaded_pipeline():
    """A researcher's pipeline: shuffled examples read by 2 worker threads, batched by grain."""
    return (grain.MapDataset.source(Source()).shuffle(seed=3).repeat()
            .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
            .batch(8, drop_remainder=True))


def test_iter_dataset_with_worker_threads_resumes_where_it_stopped(tmp_path):
    full = train(_cfg(6), _task(_threaded_pipeline()))
    res = _interrupted_then_resumed(_cfg(6, tmp_path / "c"),
                                    lambda: _task(_threaded_pipeline()), 5)
    assert res.resumed_from == 4 and res.step == 6
    assert "data_state" in Checkpointer(tmp_path / "c").metadata(4)
    for a, b in zip(_params(full), _params(res), strict=True):
        np.testing.assert_array_equal(a, b)
    wrong = grain.MapDataset.source(Source()).repeat().to_iter_dataset().batch(3)
    with pytest.raises(ValueError, match="leading dimension 8"):
        train(_cfg(2), _task(wrong))


def test_map_dataset_source_is_batched_like_a_plain_source():
    a = train(_cfg(3), _task())
    b = train(_cfg(3), _task(grain.MapDataset.source(Source())))
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)
