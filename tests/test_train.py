"""The shared training loop: config overrides, optimizer schedule, loss going down, determinism
of training and evaluation, gradient accumulation, bf16 policy, parameter sharding rules, the
one MeshConfig shared with jaxattn.parallel, and sown auxiliary losses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn import parallel
from jaxattn.nn import MultiHeadAttention
from jaxattn.nn.mixer import sow_aux_loss
from jaxattn.train import (
    ExperimentConfig,
    MeshConfig,
    OptimConfig,
    RunConfig,
    Task,
    apply_overrides,
    batch_sharding,
    make_mesh,
    make_schedule,
    mesh_rules,
    param_shardings,
    train,
)
from jaxattn.train.sources import DigitsSource


class TinyNet(nnx.Module):
    """Digits classifier with one attention layer over the 8 image rows (tokens)."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(8, 16, rngs=rngs)
        self.attn = MultiHeadAttention(2, 16, rngs=rngs)
        self.out = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, image):
        x = self.inp(image[..., 0])  # [B, 8 rows, 16]
        x = x + self.attn(x)
        return self.out(jnp.mean(x, axis=1)).astype(jnp.float32)


def _loss(model, batch, rngs):
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean((jnp.argmax(logits, -1) == batch["label"])
                                       .astype(jnp.float32))}


def _eval(model, batch):
    logits = model(batch["image"])
    return {"accuracy": (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
            "loss": optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])}


TASK = Task(make_model=lambda rngs: TinyNet(rngs), loss_fn=_loss,
            train_source=DigitsSource("train"), eval_source=DigitsSource("test"), eval_fn=_eval)
TRAIN_ONLY = dataclasses.replace(TASK, eval_fn=None)  # for tests of the train step alone


def _cfg(**run):
    base = dict(steps=20, batch_size=32, log_every=1, progress=False, eval_batch_size=64,
                eval_examples=128)
    base.update(run)
    return ExperimentConfig(model=None, data=None,
                            optim=OptimConfig(learning_rate=2e-2, schedule="constant"),
                            run=RunConfig(**base))


def _params(result):
    return jax.tree.leaves(nnx.state(result.model, nnx.Param))


# ---- config -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Inner:
    widths: tuple[int, ...] = (1, 2)
    pair: tuple[int, float] = (1, 2.0)
    name: str = "x"
    flag: bool = False
    clip: float | None = 1.0


def test_overrides_are_typed():
    cfg = ExperimentConfig(model=_Inner(), data=None)
    out = apply_overrides(cfg, ["model.widths=8,16,32", "model.flag=true", "model.clip=none",
                                "optim.learning_rate=3e-3", "run.steps=7", "model.name=abc",
                                "model.pair=(3, 0.5)", "mesh.rules=(embed,data),(mlp,tensor)"])
    assert out.model.widths == (8, 16, 32) and out.model.flag is True and out.model.clip is None
    assert out.optim.learning_rate == 3e-3 and out.run.steps == 7 and out.model.name == "abc"
    assert out.model.pair == (3, 0.5)
    assert out.mesh.rules == (("embed", "data"), ("mlp", "tensor"))
    assert cfg.run.steps == RunConfig().steps  # frozen: the original is unchanged
    for bad, msg in [("run.steps=1.5", "int"), ("run.stepz=1", "unknown field"),
                     ("model.flag=maybe", "boolean"), ("run.steps", "key=value"),
                     ("optim.learning_rate.x=1", "does not name")]:
        with pytest.raises(ValueError, match=msg):
            apply_overrides(cfg, [bad])


def test_schedule_warmup_then_cosine():
    sched = make_schedule(OptimConfig(learning_rate=1.0, warmup_steps=10), 110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.5, abs=1e-6)
    assert float(sched(110)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        make_schedule(OptimConfig(schedule="step"), 10)


# ---- the loop ---------------------------------------------------------------------------------
def test_loss_decreases_within_20_steps():
    res = train(_cfg(), TASK)
    losses = [h["loss"] for h in res.history if h["split"] == "train"]
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert res.eval_metrics["accuracy"] > 0.3  # 10 classes: chance is 0.1


def test_training_and_eval_are_deterministic():
    a, b = train(_cfg(steps=5), TASK), train(_cfg(steps=5), TASK)
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.eval_metrics == b.eval_metrics
    # evaluating the same parameters twice gives the same numbers
    c = train(_cfg(steps=5, eval_every=5), TASK)
    evals = [h for h in c.history if h["split"] == "eval"]
    assert evals[-1]["accuracy"] == a.eval_metrics["accuracy"]


def test_gradient_accumulation_matches_full_batch():
    full = train(_cfg(steps=1), TRAIN_ONLY)
    acc_cfg = _cfg(steps=1)
    acc_cfg = dataclasses.replace(acc_cfg, optim=dataclasses.replace(acc_cfg.optim,
                                                                     accumulate_steps=4))
    acc = train(acc_cfg, TRAIN_ONLY)
    # loss and gradient of the first step (before any update) agree up to f32 summation order.
    # (Parameters are not compared: Adam's first step is ~lr * sign(g), which turns rounding
    # differences in near-zero gradient entries into full-size differences.)
    for key in ("loss", "grad_norm"):
        assert full.history[0][key] == pytest.approx(acc.history[0][key], rel=1e-5)
    wrong = train(dataclasses.replace(acc_cfg, run=dataclasses.replace(acc_cfg.run, seed=1)),
                  TRAIN_ONLY)
    assert wrong.history[0]["grad_norm"] != pytest.approx(full.history[0]["grad_norm"],
                                                          rel=1e-5)


def test_bf16_policy_keeps_f32_params():
    cfg = _cfg(steps=3, precision="bf16")
    res = train(cfg, TASK)
    assert all(p.dtype == jnp.float32 for p in _params(res))
    assert np.isfinite(res.train_metrics["loss"])
    with pytest.raises(ValueError, match="precision"):
        train(_cfg(steps=1, precision="fp8"), TASK)


def test_rules_shard_parameters_over_the_mesh():
    mesh = make_mesh(MeshConfig(data=4, tensor=2))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "context": 1}
    model = TinyNet(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    rules = mesh_rules(MeshConfig(rules=(("embed", "data"),)))
    sh = param_shardings(params, mesh, rules)
    q = sh["attn"]["query_kernel"]  # logical (embed, heads, head_dim), shape (16, 2, 8)
    assert q.spec == jax.sharding.PartitionSpec("data", "tensor", None)  # heads: default rule
    assert all(a is None for a in sh["inp"]["kernel"].spec)  # nnx.Linear: no names
    cfg = dataclasses.replace(_cfg(steps=2, batch_size=32),
                              mesh=MeshConfig(data=4, tensor=2, rules=(("embed", "data"),)))
    res = train(cfg, TASK)
    kern = nnx.state(res.model, nnx.Param)["attn"]["query_kernel"][...]
    assert kern.sharding.spec == jax.sharding.PartitionSpec("data", "tensor", None)
    with pytest.raises(ValueError, match="divisible"):
        train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, batch_size=30)), TASK)


def test_one_mesh_config_shared_with_jaxattn_parallel():
    """jaxattn.train re-exports jaxattn.parallel's MeshConfig / make_mesh. The config's default
    is data parallelism over every device; make_mesh's keyword sizes name the whole mesh (axes
    not named are 1); ``mesh.*`` overrides still parse."""
    assert MeshConfig is parallel.MeshConfig and make_mesh is parallel.make_mesh
    assert dict(make_mesh(ExperimentConfig(model=None, data=None).mesh).shape) == {
        "data": 8, "fsdp": 1, "tensor": 1, "context": 1}
    assert dict(make_mesh(context=-1).shape)["context"] == 8
    with pytest.raises(ValueError, match="needs 2 devices, 8 are available"):
        make_mesh(tensor=2)
    cfg = apply_overrides(ExperimentConfig(model=None, data=None),
                          ["mesh.data=2", "mesh.context=4"])
    assert cfg.mesh == MeshConfig(data=2, context=4)
    assert dict(make_mesh(cfg.mesh).shape) == {"data": 2, "fsdp": 1, "tensor": 1, "context": 4}


def test_fsdp_mesh_uses_the_default_rules_and_matches_data_parallel():
    """fsdp=4: weights' embed axis and the batch over fsdp (jaxattn.parallel.DEFAULT_RULES), the
    steps traced under axis_rules; the trajectory equals the pure data-parallel run."""
    base = _cfg(steps=3, batch_size=32)
    fsdp = dataclasses.replace(base, mesh=MeshConfig(data=2, fsdp=4))
    assert batch_sharding(make_mesh(fsdp.mesh), mesh_rules(fsdp.mesh)).spec == \
        jax.sharding.PartitionSpec(("data", "fsdp"))
    traced_rules = []

    def loss(model, batch, rngs):  # records the rules active while the step is traced
        traced_rules.append(parallel.current_rules())
        return _loss(model, batch, rngs)

    res_f = train(fsdp, dataclasses.replace(TRAIN_ONLY, loss_fn=loss))
    res_d = train(base, TRAIN_ONLY)
    assert traced_rules and traced_rules[0][0] == mesh_rules(fsdp.mesh)
    assert dict(traced_rules[0][1].shape)["fsdp"] == 4
    kern = nnx.state(res_f.model, nnx.Param)["attn"]["query_kernel"][...]
    assert kern.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, None)
    # Losses, not parameters: Adam's first steps are ~lr * sign(g), so parameters whose gradient
    # is at rounding level may move differently under another reduction order.
    losses = lambda r: [h["loss"] for h in r.history if h["split"] == "train"]
    assert len(losses(res_f)) == 3
    np.testing.assert_allclose(losses(res_f), losses(res_d), rtol=1e-4)
    assert parallel.current_rules() is None  # only active while tracing


def test_metrics_files_are_written(tmp_path):
    import json

    train(_cfg(steps=4, log_every=2, log_dir=str(tmp_path), eval_every=2), TASK)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["split"]) for x in lines] == [
        (2, "train"), (2, "eval"), (4, "train"), (4, "eval")]
    if pytest.importorskip("tensorboardX"):
        assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# ---- auxiliary losses -------------------------------------------------------------------------
AUX_C = np.array([1.0, -1.0, 0.5, -0.25], np.float32)  # every example's x: d(task loss)/dw
AUX_W0 = np.array([0.25, 1.0, -1.0, 0.5], np.float32)  # initial w: d(aux loss)/dw at step 0


class _L2Mixer(nnx.Module):
    """``x @ w``; sows the aux loss ``0.5 |w|^2`` (gradient ``w``) when ``sow``."""

    def __init__(self, sow: bool):
        self.w = nnx.Param(jnp.asarray(AUX_W0))
        self.sows = sow

    def __call__(self, x):
        if self.sows:
            sow_aux_loss(self, "l2", 0.5 * jnp.sum(self.w[...] ** 2))
        return x @ self.w[...]


class _AuxNet(nnx.Module):
    def __init__(self, sow: bool):
        self.mixer = _L2Mixer(sow)

    def __call__(self, x):
        return self.mixer(x)


class _ConstSource:
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"x": AUX_C}


def _aux_task(sow=True, metrics=lambda y: {}):
    def loss(model, batch, rngs):  # mean(x . w): gradient AUX_C
        y = model(batch["x"])
        return jnp.mean(y), metrics(y)

    return Task(make_model=lambda rngs: _AuxNet(sow), loss_fn=loss, train_source=_ConstSource(),
                eval_source=_ConstSource(), eval_fn=lambda model, batch: {"y": model(batch["x"])})


def _aux_run(task, weight, accumulate=1):
    cfg = ExperimentConfig(
        model=None, data=None, mesh=MeshConfig(data=1),
        optim=OptimConfig(learning_rate=0.1, weight_decay=0.0, grad_clip_norm=None,
                          schedule="constant", aux_loss_weight=weight,
                          accumulate_steps=accumulate),
        run=RunConfig(steps=1, batch_size=4, log_every=1, progress=False, eval_batch_size=4,
                      eval_examples=4))
    res = train(cfg, task)
    return res, res.history[0], np.asarray(nnx.state(res.model, nnx.Param)["mixer"]["w"][...])


def test_sown_aux_losses_are_weighted_into_the_trained_loss():
    """The gradient is d(task)/dw + weight * d(aux)/dw = AUX_C + weight * AUX_W0: weight 0 and 2
    give the predicted, different first Adam updates (-lr * g / (|g| + eps)), and the weighted
    aux loss is reported (averaged, not summed, over accumulated micro-batches)."""
    aux_value = 0.5 * float(np.sum(AUX_W0 ** 2))
    task_loss = float(AUX_C @ AUX_W0)
    updates = {}
    for weight in (0.0, 2.0):
        res, logged, w = _aux_run(_aux_task(), weight)
        g = AUX_C.astype(np.float64) + weight * AUX_W0
        assert logged["grad_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-6)
        assert logged["aux_loss"] == pytest.approx(weight * aux_value, rel=1e-6)
        assert logged["loss"] == pytest.approx(task_loss + weight * aux_value, rel=1e-6)
        # Adam's bias-corrected first step in f32: a few ulps from the float64 prediction
        np.testing.assert_allclose(w, AUX_W0 - 0.1 * g / (np.abs(g) + 1e-8), rtol=0, atol=1e-6)
        assert set(res.eval_metrics) == {"y"}  # eval ran the sowing model; aux not reported
        assert len(nnx.state(res.model, nnx.Param)["mixer"]["w"][...].sharding.device_set) == 1
        updates[weight] = w - AUX_W0
    assert np.sign(updates[0.0]).tolist() == [-1, 1, -1, 1]
    assert np.sign(updates[2.0]).tolist() == [-1, -1, 1, -1]
    _, accumulated, _ = _aux_run(_aux_task(), 2.0, accumulate=2)
    for key in ("aux_loss", "loss", "grad_norm"):
        assert accumulated[key] == pytest.approx(logged[key], rel=1e-6)


def test_without_sown_aux_losses_the_metrics_are_unchanged():
    _, logged, _ = _aux_run(_aux_task(sow=False), 2.0)
    assert set(logged) == {"step", "split", "loss", "grad_norm"}
    assert logged["grad_norm"] == pytest.approx(np.linalg.norm(AUX_C), rel=1e-6)
    with pytest.raises(ValueError, match="aux_loss"):
        _aux_run(_aux_task(metrics=lambda y: {"aux_loss": jnp.mean(y)}), 1.0)


class _SharedBufferNet(nnx.Module):
    """Two non-parameter Variables holding the *same* array object (as a module storing one
    initial array as both a running estimate and its sum would)."""

    def __init__(self):
        w0 = jnp.linspace(-1.0, 1.0, 4)
        self.w = nnx.Param(jnp.ones(4))
        self.anchor = nnx.Variable(w0)
        self.twin = nnx.Variable(w0)

    def __call__(self, x):
        return x @ self.w[...] + 0.0 * jnp.sum(self.anchor[...] + self.twin[...])


def test_state_leaves_sharing_one_array_are_copied_before_donation():
    """On an 8-device mesh, jax.device_put(may_alias=False) of a tree whose leaves are one array
    keeps one buffer, and a jit donating that tree crashed XLA CPU (seen with the routing
    mixer's k-means state); the loop gives every leaf its own array first (``_unshared``)."""
    from jaxattn.train.loop import _unshared

    a, b = jnp.arange(3.0), jnp.ones(2)
    (t1, t2) = _unshared({"x": a, "y": a, "z": b}, {"w": b, "n": 3})
    leaves = [t1["x"], t1["y"], t1["z"], t2["w"]]
    assert len({id(x) for x in leaves}) == 4 and t1["x"] is a and t1["z"] is b
    assert np.array_equal(t1["y"], a) and np.array_equal(t2["w"], b) and t2["n"] == 3
    # and a model holding one array in two Variables trains on the default mesh
    task = Task(make_model=lambda rngs: _SharedBufferNet(),
                loss_fn=lambda model, batch, rngs: (jnp.mean(model(batch["x"])), {}),
                train_source=_ConstSource())
    cfg = ExperimentConfig(model=None, data=None,
                           run=RunConfig(steps=2, batch_size=8, progress=False))
    res = train(cfg, task)
    assert res.step == 2
    anchor = np.asarray(nnx.state(res.model)["anchor"][...])
    assert np.array_equal(anchor, np.asarray(jnp.linspace(-1.0, 1.0, 4)))  # untouched
