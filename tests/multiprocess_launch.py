"""Shared by the two-process tests: load a problem module from ``tests/multiprocess/`` and run a
worker script as two ``jax.distributed`` processes on loopback (gloo collectives)."""

import importlib.util
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "multiprocess")


def load_problem(name: str):
    """The module ``tests/multiprocess/<name>.py`` (shared by the workers and the test)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(WORKERS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_workers(worker: str, args, *, timeout_s: float, env_extra=None, label="workers"):
    """Run ``tests/multiprocess/<worker>`` as processes 0 and 1 (``argv: index 2 port *args``).

    Skips the test when gloo CPU collectives are unavailable (the worker prints
    ``GLOO_UNAVAILABLE``); fails with both logs when a worker fails or times out (a worker is
    never left behind). Returns both logs.
    """
    port = _free_port()
    env = dict(os.environ, **(env_extra or {}))
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    script = os.path.join(WORKERS, worker)
    procs = [subprocess.Popen([sys.executable, script, str(i), "2", str(port), *map(str, args)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env)
             for i in range(2)]
    logs = ["", ""]
    try:
        for i, p in enumerate(procs):
            logs[i], _ = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for i, p in enumerate(procs):  # never leave a worker behind
            if p.poll() is None:
                p.kill()
                logs[i] = p.communicate()[0] + f"\n(killed after {timeout_s} s)"
    text = "\n".join(logs)
    if "GLOO_UNAVAILABLE" in text:
        pytest.skip("gloo CPU collectives unavailable: " + text.split("GLOO_UNAVAILABLE")[1]
                    .splitlines()[0])
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"{label} failed (codes {codes}):\n{text[-6000:]}"
    return logs
