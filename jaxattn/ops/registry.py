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

__all__ = [
    "Backend", "Explanation", "Implementation", "register", "backends", "choose", "explain",
    "as_implementation",
]


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of a primitive."""

    name: str
    run: Callable[[Any], Any]
    supports: Callable[[Any], str | None]
    prefer: Callable[[Any], str | None] = lambda call: None
    priority: int = 0  # higher runs first when choosing automatically
    tiled: bool = False  # takes tile sizes from ``Implementation(name, block_q, block_kv)``


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A backend name plus tile sizes: ``implementation=Implementation("xla_chunked", 128, 256)``.

    For tiled backends (``"xla_chunked"``, ``"pallas"``): ``block_q`` / ``block_kv`` override
    the backend's default tile sizes (``None`` keeps the default). Hashable, so it can be a static
    argument of ``jax.jit`` and travel inside ``shard_map``'d code (e.g. the per-hop attention of
    ring context parallelism). A plain string is the same as ``Implementation(name)``.
    """

    name: str
    block_q: int | None = None
    block_kv: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"Implementation.name must be a str, got {self.name!r}")
        for what in ("block_q", "block_kv"):
            v = getattr(self, what)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"Implementation.{what} must be a positive int or None, got {v!r}")

    @property
    def has_tiles(self) -> bool:
        return self.block_q is not None or self.block_kv is not None


def as_implementation(implementation) -> Implementation | None:
    """``None`` | ``str`` | :class:`Implementation` -> ``Implementation | None``."""
    if implementation is None or isinstance(implementation, Implementation):
        return implementation
    if isinstance(implementation, str):
        return Implementation(implementation)
    raise TypeError(
        "implementation must be None, a backend name or jaxattn.Implementation(name, block_q, "
        f"block_kv); got {type(implementation).__name__}"
    )


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


def choose(primitive: str, call, implementation: str | Implementation | None) -> Backend:
    """Pick the backend for ``call``; raise ``ValueError`` with the reason when impossible.

    An :class:`Implementation` with tile sizes may only name a tiled backend.
    """
    table = _TABLE.get(primitive, {})
    impl = as_implementation(implementation)
    implementation = None if impl is None else impl.name
    if impl is not None and impl.has_tiles and implementation in table:
        if not table[implementation].tiled:
            tiled = sorted(n for n, b in table.items() if b.tiled)
            raise ValueError(
                f"implementation {implementation!r} has no tiles, so block_q/block_kv do not "
                f"apply; tiled implementations: {tiled}"
            )
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
