"""``implementation="xla_chunked"`` for ``dot_product_attention``: online softmax over tiles.

Refuses: a traced ``scale`` (e.g. a ``jax.jit`` argument), because the tiled path's
``custom_vjp`` takes the scale as a static Python number. Everything else runs
(:func:`jaxattn.core.chunked.chunked_attention`): bias, every mask, segment ids, soft-cap, sinks,
dropout, GQA. Tile sizes come from ``jaxattn.Implementation("xla_chunked", block_q, block_kv)``,
or, when not given, from the mask's block structure (:mod:`jaxattn.core.tile_choice`).
"""

from __future__ import annotations

import jax

from jaxattn.core import chunked as chunked_lib
from jaxattn.ops import registry
from jaxattn.ops.call import AttentionCall

__all__ = ["supports", "run", "BACKEND"]


def supports(c: AttentionCall) -> str | None:
    """``None`` unless the scale is traced."""
    if isinstance(c.scale, jax.core.Tracer):
        return "scale must be a Python number"
    return None


def run(c: AttentionCall):
    """``(out [B, T, N, Hv], lse [B, T, N])`` from the chunked path, with the call's tiles or
    tiles chosen for its mask."""
    return chunked_lib.chunked_attention(
        c.query, c.key, c.value, c.bias, c.full_mask, scale=c.scale,
        logits_soft_cap=c.logits_soft_cap, sinks=c.sinks, return_lse=True,
        block_q=c.block_q, block_kv=c.block_kv,  # None: chosen from the mask's structure
        dropout_rate=c.dropout_rate, dropout_rng=c.dropout_rng, dropout_index=c.dropout_index,
        score_mod=c.score_mod, score_mod_args=c.score_mod_args,
    )


# No length heuristic between the two XLA paths: benchmarks/attention_cpu.py measured xla_chunked
# faster than the reference already at L=512 on CPU (one tile), and it never needs [T, S] memory.
BACKEND = registry.Backend("xla_chunked", run, supports=supports, priority=10, tiled=True)
