"""Fused neighborhood attention (block-sparse flash attention with per-query box windows).

Arrays and static configs in, arrays out; never imports jaxattn. The adapter that permutes tokens
and builds the tile tables lives in ``jaxattn.ops.backends.neighborhood_pallas``.
"""

from pallas_kernels.neighborhood.kernel import BoxConfig, box_attention

__all__ = ["BoxConfig", "box_attention"]
