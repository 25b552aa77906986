"""One process of the two-process training-loop test (tests/test_train_multiprocess.py).

Usage: python train_worker.py <process_id> <num_processes> <port> <out_dir> <phase>

Each process owns 2 CPU devices; together they form one data-parallel mesh over 4 devices, and
each process feeds its own shard of the data (``jaxattn.train.data.train_dataset`` shards the
source by ``jax.process_index()``). Phases:

* ``first``: an uninterrupted run (``<out_dir>/full_ckpt``, metrics in ``<out_dir>/full_logs``),
  then the global batch of every step gathered to the host, then a run in ``<out_dir>/ckpt``
  stopped by an exception in step ``STOP_AFTER``'s callback (a preemption after the step-4
  checkpoint).
* ``resume``: the same run restarted in ``<out_dir>/ckpt``; it resumes from step 4.

Results go to ``<out_dir>/<phase>_<process_id>.npz`` (final parameters, gathered batches,
``resumed_from``), which the parent compares across processes and with one process's run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import worker_jax  # noqa: E402

jax = worker_jax.start(2, fast_compile=True)

import numpy as np  # noqa: E402
import train_problem as tp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxattn.train import MeshConfig, batch_sharding, make_mesh, mesh_rules, train  # noqa: E402
from jaxattn.train.data import global_batch, train_dataset  # noqa: E402


class Preempted(Exception):
    """Raised by the interrupted run's callback after step ``STOP_AFTER``."""


def _host_params(result) -> list[np.ndarray]:
    """The final parameters (replicated over both processes) as numpy arrays."""
    leaves = jax.tree.leaves(nnx.state(result.model, nnx.Param))
    assert all(x.is_fully_replicated for x in leaves)
    return [np.asarray(x.addressable_data(0)) for x in leaves]


def _global_batches() -> np.ndarray:
    """``tokens [STEPS, BATCH, SEQ]``: each step's global batch as the loop builds it (this
    process's shard, assembled over both processes), gathered to the host."""
    mesh = make_mesh(MeshConfig())
    sharding = batch_sharding(mesh, mesh_rules(MeshConfig()))
    ds = train_dataset(tp.Tokens(), global_batch_size=tp.BATCH, seed=0)
    return np.stack([
        multihost_utils.process_allgather(global_batch(ds[s], sharding)["tokens"], tiled=True)
        for s in range(tp.STEPS)])


def _stop_after(step, metrics):
    if step == tp.STOP_AFTER:
        raise Preempted(step)


def main():
    pid, nproc, port, out_dir, phase = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                        sys.argv[4], sys.argv[5])
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
        initialization_timeout=60,
    )
    assert jax.process_count() == nproc and len(jax.devices()) == 2 * nproc, jax.devices()
    ckpt = os.path.join(out_dir, "ckpt")
    out = {}
    if phase == "first":
        full = train(tp.config(os.path.join(out_dir, "full_ckpt"),
                               os.path.join(out_dir, "full_logs")), tp.task())
        out.update({f"param_{i}": p for i, p in enumerate(_host_params(full))})
        out["batches"] = _global_batches()
        out["losses"] = np.asarray([h["loss"] for h in full.history if h["split"] == "train"])
        try:
            train(tp.config(ckpt), tp.task(), callbacks=[_stop_after])
            raise AssertionError("the interrupted run was not interrupted")
        except Preempted:
            pass
    else:
        resumed = train(tp.config(ckpt), tp.task())
        out.update({f"param_{i}": p for i, p in enumerate(_host_params(resumed))})
        out["resumed_from"] = np.asarray(resumed.resumed_from)
    np.savez(os.path.join(out_dir, f"{phase}_{pid}.npz"), **out)
    print(f"WORKER_OK {pid}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
