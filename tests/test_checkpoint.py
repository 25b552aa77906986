"""Checkpoints: SIGKILL mid-run then restart ends with exactly the parameters of an
uninterrupted run; a corrupted latest checkpoint falls back to the previous one; a NaN loss
stops the run without saving; restore onto a different mesh (8 devices -> 4)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxattn.nn import MultiHeadAttention
from jaxattn.train import (
    ExperimentConfig,
    MeshConfig,
    NonFiniteLossError,
    OptimConfig,
    RunConfig,
    Task,
    make_mesh,
    train,
)
from jaxattn.train.data import train_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(4, 16, rngs=rngs)
        self.attn = MultiHeadAttention(2, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):  # [B, 6, 4]
        h = self.inp(x)
        return self.out(jnp.mean(h + self.attn(h), axis=1))


class ToySource:
    """Random inputs ``[6, 4]`` and labels; ``poison`` indices carry ``bad = 1``."""

    def __init__(self, n=64, poison=()):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(n, 6, 4)).astype(np.float32)
        self.y = (self.x[:, 0, 0] > 0).astype(np.int32) + (self.x[:, 1, 1] > 0)
        self.poison = set(poison)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i],
                "bad": np.float32(1.0 if int(i) in self.poison else 0.0)}


def _loss(model, batch, rngs):
    ce = optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()
    nan = jnp.where(jnp.any(batch["bad"] > 0), jnp.float32(jnp.nan), jnp.float32(0.0))
    return ce + nan, {}


def _task(poison=()):
    return Task(make_model=Net, loss_fn=_loss, train_source=ToySource(poison=poison))


def _cfg(ckpt, steps, **run):
    base = dict(steps=steps, batch_size=8, log_every=1, progress=False, checkpoint_dir=str(ckpt),
                save_every=2, keep=3)
    base.update(run)
    return ExperimentConfig(model=None, data=None, optim=OptimConfig(learning_rate=1e-2),
                            run=RunConfig(**base))


def _params(result):
    return jax.tree.leaves(nnx.state(result.model, nnx.Param))


# ---- SIGKILL and resume -----------------------------------------------------------------------
CHILD = textwrap.dedent('''
    import sys, time
    import numpy as np
    import jax
    from flax import nnx
    sys.path.insert(0, {tests!r})
    from test_checkpoint import _cfg, _task
    from jaxattn.train import train

    ckpt, out, slow, hang_step, keep = sys.argv[1], sys.argv[2], float(sys.argv[3]), \
        int(sys.argv[4]), int(sys.argv[5])
    if hang_step:
        from test_checkpoint import hang_inside_background_commit
        hang_inside_background_commit(ckpt, hang_step)
    cfg = _cfg(ckpt, 40, save_every=4, async_save=True, keep=keep)
    res = train(cfg, _task(), callbacks=[lambda step, m: time.sleep(slow)])
    print("resumed_from", res.resumed_from, flush=True)
    np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(nnx.state(res.model, nnx.Param))])
''')


def hang_inside_background_commit(ckpt, step):
    """Test-only hook (called in the child): the async save of ``step`` writes
    ``<ckpt>.save_started`` (the thread's name) and then blocks forever inside orbax's background
    commit thread, in the handler's ``finalize`` (``CheckpointHandler`` protocol): after the array
    data is written to the temporary directory, before it is merged, its metadata committed and
    the directory renamed. The parent's SIGKILL therefore always lands mid-save."""
    import pathlib
    import threading

    import orbax.checkpoint as ocp

    finalize = ocp.StandardCheckpointHandler.finalize
    root = pathlib.Path(ckpt).absolute()

    def finalize_or_hang(self, directory):
        if pathlib.Path(directory).relative_to(root).parts[0].split(".")[0] == str(step):
            marker = root.parent / f"{root.name}.save_started"
            marker.with_suffix(".tmp").write_text(threading.current_thread().name)
            marker.with_suffix(".tmp").rename(marker)
            threading.Event().wait()
        return finalize(self, directory)

    ocp.StandardCheckpointHandler.finalize = finalize_or_hang


def _child(tmp_path, ckpt, out, slow, hang_step=0, keep=3):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=os.path.join(ROOT, "tests")))
    # The three runs compile the same programs: a compilation cache shared by them (this test's
    # own directory) lets the later ones load the executables instead of compiling again.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), str(slow),
                             str(hang_step), str(keep)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _steps(ckpt):
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() \
        else []


def _saved(ckpt, step):
    return any(s >= step for s in _steps(ckpt))


@pytest.mark.parametrize("when", ["right_after_save", "mid_steps", "mid_async_save"])
def test_sigkill_then_resume_gives_identical_parameters(tmp_path, when):
    """SIGKILL as soon as the step-12 checkpoint is visible, or 0.25 s later (between saves,
    steps in flight), or while the async save of step 16 is inside its background commit (data
    written to orbax's temporary directory, not committed: :func:`hang_inside_background_commit`),
    then resume: the final parameters equal an uninterrupted run's. The half-written step 16 is
    never visible nor restored, and the resumed run saves step 16 again over its leftovers."""
    deadline = time.time() + 240
    ckpt = tmp_path / "ckpt"
    ref = _child(tmp_path, tmp_path / "ref_ckpt", tmp_path / "ref.npz", 0.0)
    # The killed run starts once the reference has compiled its train step and saved a first
    # checkpoint (or finished): it then loads the step from the cache; the two still overlap.
    while time.time() < deadline and ref.poll() is None and not _saved(tmp_path / "ref_ckpt", 4):
        time.sleep(0.05)
    mid_save = when == "mid_async_save"
    killed = _child(tmp_path, ckpt, tmp_path / "run.npz", 0.1, hang_step=16 if mid_save else 0)
    save_started = tmp_path / "ckpt.save_started"
    try:
        while time.time() < deadline and not (save_started.exists() if mid_save
                                              else _saved(ckpt, 12)):
            assert killed.poll() is None, killed.stdout.read()
            time.sleep(0.05)
        if when == "mid_steps":
            time.sleep(0.25)  # the child sleeps 0.1 s per step: a kill between saves 12 and 16
    finally:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run.npz").exists()
    done_before = max(_steps(ckpt))
    assert 12 <= done_before < 40
    if mid_save:  # killed inside the background thread, the save of 16 half done
        assert save_started.read_text() != "MainThread"
        assert done_before == 12, _steps(ckpt)
        left = [p.name for p in ckpt.iterdir() if p.name.startswith("16")]
        assert len(left) == 1 and "orbax-checkpoint-tmp" in left[0], sorted(ckpt.iterdir())
    resumed = _child(tmp_path, ckpt, tmp_path / "run.npz", 0.0, keep=12)
    log, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, log
    start = int(log.split("resumed_from")[-1].split()[0])
    assert start >= 12, log
    if mid_save:
        assert start == 12, log
        assert 16 in _steps(ckpt) and not list(ckpt.glob("*tmp*")), sorted(ckpt.iterdir())
    ref_log, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, ref_log
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
    assert len(a.files) == len(b.files) > 0
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


# ---- corruption, NaN, mesh change -------------------------------------------------------------
def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path, capfd):
    ckpt = tmp_path / "ckpt"
    train(_cfg(ckpt, 6), _task())
    assert _steps(ckpt) == [2, 4, 6]
    for path in (ckpt / "6").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage" * 3)
    # run.steps 6 -> 8 changes the schedule: resuming needs the explicit permission
    res = train(_cfg(ckpt, 8, allow_config_change=True), _task())
    err = capfd.readouterr().err
    assert "step 6" in err and "unreadable" in err
    assert res.resumed_from == 4 and res.step == 8
    assert list(ckpt.glob("corrupt_6_*"))
    assert 8 in _steps(ckpt)


def test_nan_loss_stops_without_saving(tmp_path):
    cfg = _cfg(tmp_path / "ckpt", 30, save_every=1)
    ds = train_dataset(ToySource(), global_batch_size=8, seed=0)
    first = {}
    for step in range(30):
        for i in ds[step]["x"][:, 0, 0]:
            idx = int(np.nonzero(ToySource().x[:, 0, 0] == i)[0][0])
            first.setdefault(idx, step)
    poison, bad_step = next((i, s) for i, s in sorted(first.items(), key=lambda t: t[1])
                            if s >= 3)
    with pytest.raises(NonFiniteLossError, match=rf"nan at step {bad_step + 1}"):
        train(cfg, _task(poison=[poison]))
    steps = _steps(tmp_path / "ckpt")
    assert steps and max(steps) == bad_step  # the last good step, nothing after it
    res = train(_cfg(tmp_path / "ckpt", bad_step), _task())
    assert res.resumed_from == bad_step
    assert all(np.all(np.isfinite(p)) for p in _params(res))


def test_restore_onto_a_smaller_mesh(tmp_path):
    rules = (("embed", "data"),)
    big = make_mesh(MeshConfig(data=8))
    cfg = _cfg(tmp_path / "ckpt", 2)
    cfg = ExperimentConfig(model=None, data=None, optim=cfg.optim, run=cfg.run,
                           mesh=MeshConfig(rules=rules))
    first = train(cfg, _task(), mesh=big)
    kernel = nnx.state(first.model, nnx.Param)["attn"]["query_kernel"][...]
    assert len(kernel.sharding.device_set) == 8
    small = make_mesh(MeshConfig(data=4), devices=jax.devices()[:4])
    again = train(cfg, _task(), mesh=small)
    assert again.resumed_from == 2
    kernel4 = nnx.state(again.model, nnx.Param)["attn"]["query_kernel"][...]
    assert len(kernel4.sharding.device_set) == 4
    assert kernel4.sharding.spec[0] == "data"
    for x, y in zip(_params(first), _params(again), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unwritable_checkpoint_directory_fails_before_training(tmp_path):
    """A checkpoint directory that cannot be written (under a file; read-only when not root) is
    reported with its path before any step runs."""
    import stat

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    bad_dirs = [blocker / "ckpt"]
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:  # root ignores directory permissions
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        bad_dirs.append(ro / "ckpt")
    steps_run = []
    try:
        for bad in bad_dirs:
            with pytest.raises(OSError, match="not writable"):
                train(_cfg(bad, 4), _task(), callbacks=[lambda s, m: steps_run.append(s)])
    finally:
        ro.chmod(stat.S_IRWXU)
    assert steps_run == []  # refused before the first step


def test_bit_flipped_and_truncated_checkpoints_fall_back_to_the_previous(tmp_path, capfd):
    """One flipped bit in each data file of the newest checkpoint (the OCDBT database under
    ``default/d/``; the per-process files beside it may be superseded data), or those files
    truncated: reported, moved aside, and the run resumes from the previous checkpoint."""
    for damage in ("bit_flip", "truncate"):
        ckpt = tmp_path / damage
        train(_cfg(ckpt, 6), _task())
        for data in (ckpt / "6").rglob("*"):
            if not (data.is_file() and "/d/" in str(data)):
                continue
            raw = bytearray(data.read_bytes())
            if damage == "bit_flip":
                raw[len(raw) // 2] ^= 0x10
            else:
                raw = raw[: len(raw) // 3]
            data.write_bytes(bytes(raw))
        res = train(_cfg(ckpt, 6), _task())
        err = capfd.readouterr().err
        assert "step 6" in err and "unreadable" in err, damage
        assert res.resumed_from == 4 and res.step == 6, damage


def test_silent_corruption_is_caught_by_content_checksums(tmp_path, monkeypatch, capfd):
    """A restore that decodes but returns other bits than were saved (a flip the storage did
    not notice) is rejected by the saved checksums, and the previous step is used."""
    from jaxattn.train.checkpoint import Checkpointer, state_checksums

    ck = Checkpointer(tmp_path / "c", async_save=False)
    for step, value in ((1, 1.0), (2, 2.0)):
        ck.save(step, {"w": jnp.full((4, 4), value)})
    ck.wait()
    real_restore = ck.manager.restore

    def flip_one_bit_of_step_2(step, args):
        state = real_restore(step, args=args)
        if step == 2:
            bits = jax.lax.bitcast_convert_type(state["w"], jnp.uint32)
            state = {"w": jax.lax.bitcast_convert_type(bits.at[1, 2].add(1), jnp.float32)}
        return state

    monkeypatch.setattr(ck.manager, "restore", flip_one_bit_of_step_2)
    abstract = {"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
    step, state = ck.restore_latest(abstract)
    assert step == 1 and float(state["w"][0, 0]) == 1.0
    assert "checksums differ" in capfd.readouterr().err
    assert state_checksums({"w": jnp.ones(3)}) != state_checksums({"w": jnp.ones(3) * 2})
    ck.close()
