"""One process of the two-process context-parallel test (tests/test_parallel_multiprocess.py).

Usage: python cp_worker.py <process_id> <num_processes> <port> <out_dir>

Each process owns 4 CPU devices; together they form an 8-device mesh (data=2 x context=4, the
data axis spanning the two processes). The worker runs sharded attention forward + backward and one
SGD training step of a tiny attention model for every strategy, gathers the results to the host
and writes them to ``<out_dir>/result_<process_id>.npz``; the parent compares them with a
single-process computation.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import worker_jax  # noqa: E402

jax = worker_jax.start(4)

import cp_problem  # noqa: E402
import numpy as np  # noqa: E402


def main():
    pid, nproc, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
        initialization_timeout=60,
    )
    assert jax.process_count() == nproc, jax.process_count()
    assert len(jax.devices()) == 4 * nproc, jax.devices()
    results = cp_problem.sharded_results()  # fully replicated global arrays
    host = {name: np.asarray(x.addressable_data(0)) for name, x in results.items()}
    np.savez(os.path.join(out_dir, f"result_{pid}.npz"), **host)
    print(f"WORKER_OK {pid}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
