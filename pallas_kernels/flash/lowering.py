"""How a flash-attention ``pallas_call`` is lowered: interpreter, Triton (GPU) or Mosaic (TPU).

One set of kernels, four ways to run it:

* ``interpret``: the generic Pallas interpreter (any platform; the CPU test path).
* ``tpu_interpret``: the TPU interpreter (``pltpu.InterpretParams``) on CPU, with the TPU memory
  spaces (metadata and sinks in SMEM), so the TPU variant's semantics are tested without a TPU.
* ``triton`` (GPU) and ``mosaic_tpu`` (TPU): compiler params of the platform. Both are checked to
  *lower* from CPU (``lower(lowering_platforms=("cuda",) / ("tpu",))``, see the tests) but have
  NEVER RUN on a GPU or TPU: no device was available when they were written, so the final
  device compilation (ptxas / Mosaic) and the speed are unverified. The Triton lowering is
  deprecated from JAX 0.11; a Mosaic-GPU kernel (``plgpu.kernel`` + ``emit_pipeline``, wgmma)
  is the planned replacement and does not exist yet.
"""

from __future__ import annotations

from jax.experimental import pallas as pl

from pallas_kernels.flash.config import FlashConfig

__all__ = ["call", "default_backend"]


def default_backend(platform: str) -> str:
    """The lowering to use on ``platform`` ("cpu" -> interpreter)."""
    return {"gpu": "triton", "cuda": "triton", "rocm": "triton", "tpu": "mosaic_tpu"}.get(
        platform, "interpret")


def _compiler_params(cfg: FlashConfig, num_grid_dims: int, sequential_minor: int = 0):
    if cfg.backend == "triton":  # lowers from CPU; never run on a GPU
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.backend == "mosaic_tpu":  # lowers from CPU, semantics via tpu_interpret; never run
        from jax.experimental.pallas import tpu as pltpu

        # Every program writes its own output tile (all grid axes parallel), except the
        # ``sequential_minor`` innermost axes of a kernel that accumulates in its output block.
        semantics = ("parallel",) * (num_grid_dims - sequential_minor) + (
            "arbitrary",) * sequential_minor
        return pltpu.CompilerParams(dimension_semantics=semantics)
    return None


def _interpret(cfg: FlashConfig):
    if cfg.backend == "interpret":
        return True
    if cfg.backend == "tpu_interpret":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return False


def call(kernel, *, cfg: FlashConfig, grid, in_specs, out_specs, out_shape, name: str,
         sequential_minor: int = 0):
    """``pl.pallas_call`` with the lowering chosen by ``cfg.backend``; the ``sequential_minor``
    innermost grid axes run in order (Mosaic TPU "arbitrary"; the interpreters are sequential;
    Triton has no such axes, so its callers must not accumulate across programs)."""
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=_interpret(cfg),
        compiler_params=_compiler_params(cfg, len(grid), sequential_minor),
        name=name,
    )
