"""``implementation="xla_chunked"`` for ``tensor_attention``: online softmax over key-pair tiles.

Refuses: a traced ``scale`` (the ``custom_vjp`` takes it as a static Python number). Exact,
memory linear in the lengths (:mod:`jaxattn.core.tensor_chunked`); tile sizes from
``jaxattn.Implementation("xla_chunked", block_q, block_kv)``. Preferred over the reference
whenever it can run.
"""

from __future__ import annotations

import jax

from jaxattn.core import tensor_chunked
from jaxattn.ops import registry
from jaxattn.ops.call import TensorAttentionCall

__all__ = ["supports", "run", "BACKEND"]


def supports(c: TensorAttentionCall) -> str | None:
    """``None`` unless the scale is traced."""
    if isinstance(c.scale, jax.core.Tracer):
        return "scale must be a Python number"
    return None


def run(c: TensorAttentionCall):
    """``(out [B, T, N, Hv], lse [B, T, N])`` with the call's tiles or the defaults."""
    return tensor_chunked.tensor_attention_chunked(
        c.query, c.key1, c.key2, c.value1, c.value2, scale=c.scale, is_causal=c.is_causal,
        block_q=c.block_q or tensor_chunked.DEFAULT_BLOCK_Q,
        block_kv=c.block_kv or tensor_chunked.DEFAULT_BLOCK_KV, return_lse=True)


BACKEND = registry.Backend("xla_chunked", run, supports=supports, priority=10, tiled=True)
