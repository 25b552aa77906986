"""``implementation="reference"`` for ``dot_product_attention``: the specification.

Refuses nothing: every validated call runs, on every platform. It materialises the ``[B, N, T, S]``
logits and probabilities in f32 (:func:`jaxattn.core.dense.attention_reference`), so memory grows
with ``T * S``; it has the lowest priority and automatic selection takes it only when no other
backend can run the call.
"""

from __future__ import annotations

from jaxattn.core import dense
from jaxattn.ops import registry
from jaxattn.ops.call import AttentionCall

__all__ = ["supports", "run", "BACKEND"]


def supports(call: AttentionCall) -> str | None:
    """Always ``None``: the reference runs every valid call."""
    return None


def run(c: AttentionCall):
    """``(out [B, T, N, Hv], lse [B, T, N])`` from the dense reference."""
    return dense.attention_reference(
        c.query, c.key, c.value, c.bias, c.full_mask, scale=c.scale,
        logits_soft_cap=c.logits_soft_cap, sinks=c.sinks, dropout_rate=c.dropout_rate,
        dropout_rng=c.dropout_rng, dropout_index=c.dropout_index,
        score_mod=c.score_mod, score_mod_args=c.score_mod_args, return_lse=True,
    )


BACKEND = registry.Backend("reference", run, supports=supports, priority=0)
