"""The start of every two-process worker: CPU jax with ``device_count`` devices per process,
strict dtype promotion and gloo collectives (a failure to enable them is printed as
``GLOO_UNAVAILABLE ...``, which the parent turns into a skip). Import it before anything that
imports jax; ``start(n)`` returns the configured ``jax`` module."""

import os

# the suite's fast-compile flags (tests/conftest.py exports whether this jaxlib accepts them)
_FAST = (" --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
         " --xla_cpu_use_fusion_emitters=false")


def start(device_count: int, fast_compile: bool = False):
    """Set the environment, import and configure jax; return it."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    fast = _FAST if fast_compile and os.environ.get("JAXATTN_TEST_FAST_COMPILE") == "1" else ""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={device_count}" + fast
    import jax

    jax.config.update("jax_numpy_dtype_promotion", "strict")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:  # noqa: BLE001 - reported to the parent
        print(f"GLOO_UNAVAILABLE {type(e).__name__}: {e}", flush=True)
    return jax
