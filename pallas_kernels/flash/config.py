"""Static configuration of the block-sparse flash-attention kernels."""

from __future__ import annotations

import dataclasses

__all__ = ["FlashConfig", "BACKENDS"]

# "interpret": the portable pallas_call run by the Pallas interpreter (any platform, CPU tests).
# "triton":    the same pallas_call with Triton compiler params (GPU). Lowers (checked from
#              CPU) but has never run on a GPU: none was available when it was written.
# "mosaic_tpu": the same pallas_call with Mosaic TPU compiler params, metadata in SMEM. Lowers
#              (checked from CPU) but has never run on a TPU; K/V of one (batch, kv head) sit
#              whole in VMEM, so it only suits moderate lengths.
# "tpu_interpret": the Mosaic-TPU variant run by the TPU interpreter (pltpu.InterpretParams) on
#              CPU: checks its TPU-specific memory spaces (SMEM metadata) without a TPU.
# "mosaic_gpu": forward by the Hopper Mosaic-GPU kernel (pallas_kernels/flash/mosaic_gpu.py:
#              TMA + wgmma, warp-specialised; bf16/f16, no segment ids / sinks), backward by the
#              Triton-lowered dq / dkv kernels. Lowers from CPU and its forward passes the
#              Mosaic-GPU interpreter; NEVER RUN on a GPU.
BACKENDS = ("interpret", "triton", "mosaic_gpu", "mosaic_tpu", "tpu_interpret")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Block sizes, softmax parameters and lowering of one flash-attention call.

    Attributes:
      block_q, block_kv: forward tile sizes; the block metadata must be built on this grid.
        The backward kernels use the same tiles (so they can reuse the same metadata).
      scale: logit scale (multiplies ``Q K^T``).
      logits_soft_cap: ``c`` for ``c * tanh(logits / c)``, or ``None``.
      backend: one of :data:`BACKENDS`.
      num_warps, num_stages: Triton launch parameters (ignored elsewhere).
      count_visits: also return the number of kv blocks each query block computed (testing).
      dropout_rate: attention dropout on the probabilities (the kernels regenerate the keep
        mask of each tile from a hash of its global indices and the ``dropout_seed`` argument of
        ``flash_attention``; see :mod:`pallas_kernels.flash.dropout`).
    """

    block_q: int = 128
    block_kv: int = 128
    scale: float = 1.0
    logits_soft_cap: float | None = None
    backend: str = "interpret"
    num_warps: int = 4
    num_stages: int = 2
    count_visits: bool = False
    dropout_rate: float = 0.0

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"FlashConfig.{name} must be a positive int, got {v!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"FlashConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.logits_soft_cap is not None and not self.logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be positive, got {self.logits_soft_cap}")
        if not (isinstance(self.dropout_rate, int | float) and 0.0 <= self.dropout_rate < 1.0):
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if not isinstance(self.scale, int | float):
            raise TypeError(f"FlashConfig.scale must be a Python number, got {type(self.scale)}")
