"""Paper reproductions built on :mod:`jaxattn.train`.

Run one with ``python -m experiments <name> [--quick] [--override key=value ...]``; list them
with ``python -m experiments --list``. Each registered module provides ``NAME``,
``DESCRIPTION``, ``default_config()``, ``quick_config()``, ``smoke_config()`` (a tiny config
for tests), ``build_task(cfg) -> jaxattn.train.Task`` and ``main(cfg)``; optionally
``medium_config()`` (a longer CPU preset, ``--medium``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> module path. Nothing in jaxattn imports this package.
REGISTRY: dict[str, str] = {
    "zoology": "experiments.zoology.experiment",
    "nat_digits": "experiments.nat_digits.experiment",
    "moh": "experiments.moh.experiment",
    "tensor_attention": "experiments.tensor_attention.experiment",
    "random_features": "experiments.random_features.experiment",
    "icl_regression": "experiments.icl_regression.experiment",
    "combiner": "experiments.combiner.experiment",
    "routing": "experiments.routing.experiment",
    "moa": "experiments.moa.experiment",
    "bam": "experiments.bam.experiment",
    "uoe": "experiments.uoe.experiment",
}


def get(name: str) -> ModuleType:
    """The experiment module registered as ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; registered: {sorted(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])


__all__ = ["REGISTRY", "get"]
