"""Test configuration shared by the whole suite.

* CPU only, with 8 simulated devices for sharding tests (must be set before jax is imported),
  and fast-compile XLA flags for every program (below; ``JAXATTN_TEST_FAST_COMPILE=0`` to compile
  with XLA's defaults).
* ``jax_numpy_dtype_promotion='strict'``: library code never relies on implicit promotion.
* The per-test time budget (``JAXATTN_TEST_BUDGET_S``, default 30 s; ``@pytest.mark.budget``):
  the hooks live in ``tests/budget_plugin.py`` (no jax import, so its self-test is cheap) and are
  registered here.
"""

import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()

# Fast compilation for every program the suite builds on CPU (library code, training loops,
# shard_map, the Pallas interpreter), not only the tests' own jits: LLVM optimisations off and
# XLA's older CPU fusion emitters (tests/attention_testing.py, CPU_COMPILE_OPTIONS, measured the
# same per program). The HLO is unchanged and XLA CPU does no fast-math reassociation under either
# setting, so results agree to rounding; measured per test: the MoH smoke run 6.8 s -> 2.5 s,
# test_nat_classifier_learns_digits 16 s -> 9 s (less compile time outweighs slower kernels at
# these sizes). XLA aborts on an unknown flag, so a child process checks that this jaxlib knows
# them first (once: workers inherit the result). JAXATTN_TEST_FAST_COMPILE=0 turns it off.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                 "--xla_cpu_use_fusion_emitters=false")


def _flags_accepted(flags: str) -> bool:
    probe = "import jax.numpy as jnp; jnp.zeros(2).block_until_ready()"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          timeout=120, check=False)
    return done.returncode == 0


if (os.environ.get("JAX_PLATFORMS") == "cpu"
        and os.environ.get("JAXATTN_TEST_FAST_COMPILE", "1") != "0"
        and "xla_backend_optimization_level" not in _flags):
    _fast = " ".join((_flags, *_FAST_COMPILE))
    if _flags_accepted(_fast):
        _flags = _fast
    os.environ["JAXATTN_TEST_FAST_COMPILE"] = "1" if _flags == _fast else "0"
os.environ["XLA_FLAGS"] = _flags

import jax  # noqa: E402

# registers the per-test time budget hooks
from budget_plugin import pytest_configure  # noqa: E402, F401

jax.config.update("jax_numpy_dtype_promotion", "strict")
