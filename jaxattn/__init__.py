"""jaxattn: attention for JAX that is correct, fast and shardable.

Public API (re-exports only)::

    jaxattn.dot_product_attention(q, k, v, mask=jaxattn.masks.CausalMask(), ...)
    jaxattn.explain(q, k, v, ...)          # which implementation runs, and why not the others
    jaxattn.decode_attention(q, k_cache, v_cache, mask=..., key_value_seq_lengths=live)  # decode
    jaxattn.Implementation("xla_chunked", block_q=128, block_kv=256)   # a backend + tile sizes
    jaxattn.masks                          # structured masks with block metadata
    jaxattn.neighborhood_attention(q, k, v, kernel_size, ...)   # NATTEN semantics, 1D/2D/3D
    jaxattn.tensor_attention(q, k1, k2, v1, v2, ...)   # trilinear attention (Alman & Song 2023)
    jaxattn.nn.MultiHeadAttention          # Flax NNX layer
    jaxattn.parallel                       # meshes, logical axes, head / context parallelism
"""

from jaxattn import masks, parallel
from jaxattn.ops.attention import dot_product_attention, explain
from jaxattn.ops.decode import decode_attention
from jaxattn.ops.neighborhood import explain_neighborhood, neighborhood_attention
from jaxattn.ops.neighborhood_planner import plan_speedup as plan_neighborhood
from jaxattn.ops.registry import Implementation
from jaxattn.ops.tensor import explain_tensor_attention, tensor_attention

__all__ = [
    "dot_product_attention",
    "decode_attention",
    "explain",
    "Implementation",
    "masks",
    "parallel",
    "neighborhood_attention",
    "explain_neighborhood",
    "plan_neighborhood",
    "tensor_attention",
    "explain_tensor_attention",
]
__version__ = "0.1.0"
