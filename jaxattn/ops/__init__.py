"""Dispatched primitives: one function per primitive, one ``implementation=`` argument."""

from jaxattn.ops import registry
from jaxattn.ops.attention import dot_product_attention, explain
from jaxattn.ops.decode import decode_attention
from jaxattn.ops.neighborhood import explain_neighborhood, neighborhood_attention
from jaxattn.ops.registry import Implementation
from jaxattn.ops.tensor import explain_tensor_attention, tensor_attention

__all__ = [
    "dot_product_attention",
    "decode_attention",
    "explain",
    "Implementation",
    "registry",
    "neighborhood_attention",
    "explain_neighborhood",
    "tensor_attention",
    "explain_tensor_attention",
]
