"""Flax NNX layers: thin shells that own parameters and call jaxattn's pure functions."""

from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.nn.rope import apply_rope

__all__ = ["MultiHeadAttention", "apply_rope"]
