"""``implementation="reference"`` for ``neighborhood_attention``: the specification.

Refuses nothing: every validated call runs, on every platform. It builds the dense ``[L, L]``
window mask from NATTEN's formulas
(:func:`jaxattn.core.neighborhood.neighborhood_attention_reference`), so memory grows with
``L * L``; lowest priority.
"""

from __future__ import annotations

from jaxattn.core import neighborhood as na_ref
from jaxattn.ops import registry
from jaxattn.ops.call import NeighborhoodCall

__all__ = ["supports", "run", "BACKEND"]


def supports(call: NeighborhoodCall) -> str | None:
    """Always ``None``: the reference runs every valid call."""
    return None


def run(c: NeighborhoodCall):
    """``(out [B, *spatial, N, Hv], lse [B, *spatial, N])`` from the dense reference."""
    p = c.params
    return na_ref.neighborhood_attention_reference(
        c.query, c.key, c.value, p.kernel_size, dilation=p.dilation, stride=p.stride,
        is_causal=p.is_causal, scale=c.scale, additional_keys=c.additional_keys,
        additional_values=c.additional_values, bias=c.bias, return_lse=True)


BACKEND = registry.Backend("reference", run, supports=supports, priority=0)
