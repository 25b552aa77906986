"""Block-sparse flash attention in Pallas (forward + backward), driven by block metadata."""

from pallas_kernels.flash.attention import flash_attention, mosaic_gpu_refusal
from pallas_kernels.flash.config import BACKENDS, FlashConfig
from pallas_kernels.flash.lowering import default_backend
from pallas_kernels.flash.metadata import (
    EMPTY,
    FULL,
    PARTIAL,
    BlockSparseMeta,
    block_sparse_meta,
    dense_meta,
)

__all__ = [
    "flash_attention",
    "mosaic_gpu_refusal",
    "FlashConfig",
    "BACKENDS",
    "default_backend",
    "BlockSparseMeta",
    "block_sparse_meta",
    "dense_meta",
    "EMPTY",
    "PARTIAL",
    "FULL",
]
