"""Backend table for dispatched primitives.

Each primitive (``"attention"``, ``"neighborhood"``, ...) has an ordered table of backends. A
backend declares

* ``supports(call) -> str | None``: ``None`` if it can run this call here, else the reason why not;
* ``prefer(call) -> str | None``: for automatic selection only, ``None`` if it is a good choice for
  this call, else why a later backend is better (e.g. "short sequence: reference is faster");
* ``run(call)``: compute the result.

``choose(primitive, call, implementation)`` returns the backend to run. With an explicit name it
raises ``ValueError`` carrying the reason when that backend cannot run the call; with ``None`` it
takes the first backend (in priority order) that supports and prefers the call, falling back to
the first that merely supports it. ``explain`` reports every backend's verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["Backend", "Explanation", "register", "backends", "choose", "explain"]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of a primitive."""

    name: str
    run: Callable[[Any], Any]
    supports: Callable[[Any], str | None]
    prefer: Callable[[Any], str | None] = lambda call: None
    priority: int = 0  # higher runs first when choosing automatically


_TABLE: dict[str, dict[str, Backend]] = {}


def register(primitive: str, backend: Backend, *, replace: bool = False) -> None:
    """Add ``backend`` to ``primitive``'s table (later issues register Pallas etc. here)."""
    table = _TABLE.setdefault(primitive, {})
    if backend.name in table and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered for {primitive!r}")
    table[backend.name] = backend


def backends(primitive: str) -> list[Backend]:
    """Registered backends of ``primitive`` in automatic-selection order."""
    table = _TABLE.get(primitive, {})
    return sorted(table.values(), key=lambda b: -b.priority)


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Which backend would run, and every backend's verdict (``None`` = usable)."""

    primitive: str
    chosen: str
    verdicts: dict[str, str | None]

    def __str__(self) -> str:
        lines = [f"{self.primitive}: would run {self.chosen!r}"]
        for name, why in self.verdicts.items():
            mark = "chosen" if name == self.chosen else (why or "usable, lower priority")
            lines.append(f"  {name:>12}: {mark}")
        return "\n".join(lines)


def _verdicts(primitive: str, call) -> tuple[dict[str, str | None], str | None]:
    verdicts: dict[str, str | None] = {}
    chosen = fallback = None
    for b in backends(primitive):
        why = b.supports(call)
        if why is None:
            fallback = fallback or b.name
            pref = b.prefer(call)
            if pref is None and chosen is None:
                chosen = b.name
            elif pref is not None:
                why = f"usable, not preferred: {pref}"
        verdicts[b.name] = why
    return verdicts, chosen or fallback


def choose(primitive: str, call, implementation: str | None) -> Backend:
    """Pick the backend for ``call``; raise ``ValueError`` with the reason when impossible."""
    table = _TABLE.get(primitive, {})
    if implementation is not None:
        if implementation not in table:
            raise ValueError(
                f"unknown implementation {implementation!r} for {primitive}; "
                f"known: {sorted(table)}"
            )
        why = table[implementation].supports(call)
        if why is not None:
            raise ValueError(f"implementation={implementation!r} cannot run this call: {why}")
        return table[implementation]
    verdicts, chosen = _verdicts(primitive, call)
    if chosen is None:
        raise ValueError(f"no {primitive} implementation can run this call: {verdicts}")
    return table[chosen]


def explain(primitive: str, call) -> Explanation:
    """Every backend's verdict on ``call`` and the one automatic selection would run."""
    verdicts, chosen = _verdicts(primitive, call)
    return Explanation(primitive, chosen or "<none>", verdicts)
