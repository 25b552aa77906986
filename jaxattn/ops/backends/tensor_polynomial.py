"""``implementation="polynomial"`` for ``tensor_attention``: the paper's low-rank approximation.

Approximate, so it runs only when named (automatic selection never picks it). Refuses:

* no ``polynomial_degree``;
* a traced ``scale`` (the Taylor coefficients are computed on the host);
* inputs whose largest entry is unknown: traced inputs (under ``jit`` / ``grad``) need the
  caller's ``entry_bound=B``; concrete inputs give their own bound;
* an error bound that does not hold: :func:`jaxattn.core.tensor.polynomial_error_bound` ``>= 1``
  for the bound ``B`` and the degree (the weights could then be zero or negative; Alman & Song's
  guarantee needs ``B = o((log n)^(1/3))``), naming the smallest degree that would do;
* more than ``MAX_RANK`` monomials (the factors would dwarf the exact computation).

With a declared ``entry_bound``, outputs of a call whose ``query`` / ``key1`` / ``key2`` exceed it
are NaN (checked on device, under ``jit`` too): never a silently wrong answer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.core import tensor as tensor_lib
from jaxattn.ops import registry
from jaxattn.ops.call import TensorAttentionCall

__all__ = ["MAX_RANK", "entry_bound_of", "supports", "prefer", "run", "BACKEND"]

MAX_RANK = 1 << 17


def entry_bound_of(c: TensorAttentionCall) -> float | None:
    """The declared bound, else the largest ``|entry|`` of concrete ``query``/``key1``/``key2``,
    else None."""
    if c.entry_bound is not None:
        return c.entry_bound
    if c.traced:
        return None
    return float(max(np.abs(np.asarray(x, np.float32)).max() for x in (c.query, c.key1, c.key2)))


def supports(c: TensorAttentionCall) -> str | None:
    """``None`` if the polynomial method's error bound holds for this call, else why not."""
    g = c.polynomial_degree
    if g is None:
        return "needs polynomial_degree=g (the Taylor degree)"
    if isinstance(c.scale, jax.core.Tracer):
        return "scale must be a Python number"
    h = c.query.shape[-1]
    rank = tensor_lib.polynomial_rank(h, g)
    if rank > MAX_RANK:
        return f"degree {g} at head_dim {h} has {rank} monomials (> {MAX_RANK})"
    bound = entry_bound_of(c)
    if bound is None:
        return ("the inputs are traced, so their largest entry is unknown: pass entry_bound=B "
                "(every |entry| of query, key1, key2 <= B) or call outside jit")
    if c.entry_bound is not None and not c.traced:
        actual = float(max(np.abs(np.asarray(x, np.float32)).max()
                           for x in (c.query, c.key1, c.key2)))
        if actual > c.entry_bound:
            return f"entries up to {actual:.3g} exceed entry_bound={c.entry_bound:.3g}"
    eps = tensor_lib.polynomial_error_bound(bound, h, g, c.scale)
    if eps >= 1.0:
        need = tensor_lib.min_polynomial_degree(bound, h, c.scale)
        hint = f"degree >= {need} would" if need is not None else "no degree <= 64 would"
        return (f"error bound e^(2R) R^(g+1)/(g+1)! = {eps:.3g} >= 1 for entries up to "
                f"{bound:.3g} (R = {abs(c.scale) * h * bound ** 3:.3g}) at degree {g}; {hint} "
                "hold")
    return None


def prefer(c: TensorAttentionCall) -> str | None:
    """Never chosen automatically: it is an approximation."""
    return "approximate: runs only when named"


def run(c: TensorAttentionCall):
    """``(out [B, T, N, Hv], None)``: the approximation has no exact LSE."""
    if c.return_lse:
        raise ValueError("implementation='polynomial' has no log-sum-exp; use return_lse=False")
    out = tensor_lib.tensor_attention_polynomial(
        c.query, c.key1, c.key2, c.value1, c.value2, degree=c.polynomial_degree, scale=c.scale,
        is_causal=c.is_causal)
    if c.entry_bound is not None:
        biggest = jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32)
                                     for x in (c.query, c.key1, c.key2)]))
        out = jnp.where(biggest <= c.entry_bound, out, jnp.asarray(jnp.nan, out.dtype))
    return out, None


BACKEND = registry.Backend("polynomial", run, supports=supports, prefer=prefer, priority=-10)
