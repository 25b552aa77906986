"""Flax NNX layers: thin shells that own parameters and call jaxattn's pure functions."""

from jaxattn.nn.attention import MultiHeadAttention
from jaxattn.nn.neighborhood import (
    NATClassifier,
    NATConfig,
    NeighborhoodAttention,
    NeighborhoodAttention1D,
    NeighborhoodAttention2D,
    NeighborhoodAttention3D,
)
from jaxattn.nn.rope import apply_rope

__all__ = [
    "MultiHeadAttention",
    "apply_rope",
    "NeighborhoodAttention",
    "NeighborhoodAttention1D",
    "NeighborhoodAttention2D",
    "NeighborhoodAttention3D",
    "NATClassifier",
    "NATConfig",
]
