"""Shape letters and jaxtyping aliases shared by jaxattn's public functions.

Letters: ``B`` batch, ``T`` query length, ``S`` key/value length, ``N`` query heads, ``K`` kv
heads (``N % K == 0``), ``H`` query/key head dim, ``Hv`` value head dim. A ``#`` prefix means the
axis may be 1 (broadcast). The aliases are annotations: they document the contract and can be
checked at run time with :func:`check_shapes` (or any jaxtyping-aware type checker); the
functions themselves validate their inputs with explicit error messages.
"""

from __future__ import annotations

from typing import Any

import jaxtyping
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "Query",
    "Key",
    "Value",
    "Output",
    "LSE",
    "Bias",
    "BoolMask",
    "QuerySegmentIds",
    "KVSegmentIds",
    "Sinks",
    "check_shapes",
]

Query = Float[Array, "B T N H"]
Key = Float[Array, "B S K H"]
Value = Float[Array, "B S K Hv"]
Output = Float[Array, "B T N Hv"]
LSE = Float[Array, "B T N"]  # natural-log sum-exp of the logits, f32
Bias = Float[Array, "#B #N #T #S"]
BoolMask = Bool[Array, "#B #N #T #S"]  # True = may attend
QuerySegmentIds = Int[Array, "B T"]
KVSegmentIds = Int[Array, "B S"]
Sinks = Float[Array, " N"]


def check_shapes(**named: tuple[Any, Any]) -> None:
    """Check arrays against aliases with one consistent binding of the shape letters.

    ``check_shapes(query=(q, Query), key=(k, Key), out=(o, Output))`` raises ``TypeError``
    naming the first argument whose shape or dtype breaks the contract, e.g. a key whose ``H``
    differs from the query's.
    """

    @jaxtyping.jaxtyped(typechecker=None)
    def _check():
        for name, (x, alias) in named.items():
            if not isinstance(x, alias):
                shape = getattr(x, "shape", None)
                dtype = getattr(x, "dtype", type(x).__name__)
                raise TypeError(
                    f"{name} has shape {shape} and dtype {dtype}, which does not match "
                    f"{alias} given the other arguments ({', '.join(named)})")

    _check()
