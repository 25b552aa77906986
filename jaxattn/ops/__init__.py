"""Dispatched primitives: one function per primitive, one ``implementation=`` argument."""

from jaxattn.ops import registry
from jaxattn.ops.attention import dot_product_attention, explain

__all__ = ["dot_product_attention", "explain", "registry"]
