"""The specification: plain, readable attention math (references) and the pure-JAX chunked path."""

from jaxattn.core.chunked import chunked_attention, plan_tiles
from jaxattn.core.dense import attention_probabilities, attention_reference
from jaxattn.core.softmax import merge_partials

__all__ = [
    "attention_reference",
    "attention_probabilities",
    "chunked_attention",
    "plan_tiles",
    "merge_partials",
]
