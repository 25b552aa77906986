"""Test configuration shared by the whole suite.

* CPU only, with 8 simulated devices for sharding tests (must be set before jax is imported).
* ``jax_numpy_dtype_promotion='strict'``: library code never relies on implicit promotion.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")
