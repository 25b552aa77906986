"""``implementation="xla"`` for ``neighborhood_attention``: query tiles against their key halo.

Refuses nothing: every validated call runs, on every platform, including relative-position bias,
a traced scale and additional keys/values (merged by LSE). The algorithm is
:func:`jaxattn.core.neighborhood_xla.neighborhood_attention_xla`: cost and memory grow with
``L * halo``, never ``L * L``; differentiable by autodiff.
"""

from __future__ import annotations

from jaxattn.core import neighborhood_xla as na_xla
from jaxattn.ops import registry
from jaxattn.ops.call import NeighborhoodCall

__all__ = ["supports", "run", "BACKEND"]


def supports(call: NeighborhoodCall) -> str | None:
    """Always ``None``: the tiled XLA path runs every valid call."""
    return None


def run(c: NeighborhoodCall):
    """``(out [B, *spatial, N, Hv]`` in the query dtype, ``lse [B, *spatial, N])``."""
    out, lse = na_xla.neighborhood_attention_xla(c.query, c.key, c.value, c.params,
                                                 scale=c.scale, bias=c.bias)
    out, lse = na_xla.merge_additional_kv(c.query, c.additional_keys, c.additional_values, out,
                                          lse, scale=c.scale)
    return out.astype(c.dtype), lse


BACKEND = registry.Backend("xla", run, supports=supports, priority=10)
