"""Test configuration shared by the whole suite.

* CPU only, with 8 simulated devices for sharding tests (must be set before jax is imported).
* ``jax_numpy_dtype_promotion='strict'``: library code never relies on implicit promotion.
* The per-test time budget (``JAXATTN_TEST_BUDGET_S``, default 30 s; ``@pytest.mark.budget``):
  the hooks live in ``tests/budget_plugin.py`` (no jax import, so its self-test is cheap) and are
  registered here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

# registers the per-test time budget hooks
from budget_plugin import pytest_configure  # noqa: E402, F401

jax.config.update("jax_numpy_dtype_promotion", "strict")
