"""``implementation="reference"`` for ``tensor_attention``: the specification.

Refuses nothing: it enumerates every key pair
(:func:`jaxattn.core.tensor.tensor_attention_reference`), so memory grows with ``T * S^2``; lowest
exact priority.
"""

from __future__ import annotations

from jaxattn.core import tensor as tensor_lib
from jaxattn.ops import registry
from jaxattn.ops.call import TensorAttentionCall

__all__ = ["supports", "run", "BACKEND"]


def supports(call: TensorAttentionCall) -> str | None:
    """Always ``None``: the reference runs every valid call."""
    return None


def run(c: TensorAttentionCall):
    """``(out [B, T, N, Hv], lse [B, T, N])`` from the pair enumeration."""
    return tensor_lib.tensor_attention_reference(
        c.query, c.key1, c.key2, c.value1, c.value2, scale=c.scale, is_causal=c.is_causal,
        return_lse=True)


BACKEND = registry.Backend("reference", run, supports=supports, priority=0)
