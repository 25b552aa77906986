"""Every backend of every dispatched primitive, registered here and nowhere else.

One module per backend; each states at its top what it refuses and why, and exposes ``supports``,
``prefer`` (where it has a preference), ``run`` and ``BACKEND``. The tables below list them in
automatic-selection order (highest priority first), which is also the order ``explain()`` reports.
Backends import :mod:`jaxattn.ops.call` and :mod:`jaxattn.ops.registry`, never the public
``jaxattn.ops.attention`` / ``jaxattn.ops.neighborhood`` modules, so there is no import cycle.
"""

from jaxattn.ops import registry
from jaxattn.ops.backends import (
    cudnn,
    neighborhood_pallas,
    neighborhood_reference,
    neighborhood_xla,
    pallas,
    reference,
    tensor_polynomial,
    tensor_reference,
    tensor_xla_chunked,
    xla_chunked,
)
from jaxattn.ops.call import ATTENTION, NEIGHBORHOOD, TENSOR

__all__ = ["TABLES"]

TABLES: dict[str, tuple[registry.Backend, ...]] = {
    ATTENTION: (cudnn.BACKEND, pallas.BACKEND, xla_chunked.BACKEND, reference.BACKEND),
    NEIGHBORHOOD: (neighborhood_pallas.BACKEND, neighborhood_xla.BACKEND,
                   neighborhood_reference.BACKEND),
    TENSOR: (tensor_xla_chunked.BACKEND, tensor_reference.BACKEND, tensor_polynomial.BACKEND),
}


def _register_all() -> None:
    for primitive, table in TABLES.items():
        priorities = [b.priority for b in table]
        if priorities != sorted(priorities, reverse=True):
            raise AssertionError(f"{primitive} backends must be listed by priority: {priorities}")
        for backend in table:
            registry.register(primitive, backend)


_register_all()
