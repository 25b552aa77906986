"""grain pipelines over random-access sources, sharded across processes, and conversion of
host batches into global ``jax.Array``s on the mesh.

The training stream is a ``grain.MapDataset`` (shuffle -> repeat -> batch), so the batch of
step ``s`` is ``dataset[s]``: a restarted run sees exactly the batches it would have seen, with
no iterator state to checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

__all__ = ["eval_batches", "global_batch", "train_dataset"]


def _process_shard(source: Any, process_index: int | None, process_count: int | None):
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if not 0 <= pi < pc:
        raise ValueError(f"process_index {pi} out of range for {pc} processes")
    ds = grain.MapDataset.source(source)
    return ds[pi::pc] if pc > 1 else ds, pc


def train_dataset(source: Any, *, global_batch_size: int, seed: int,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
    """Infinite shuffled batches of this process's shard: ``ds[step]`` is a dict of numpy
    arrays with leading dimension ``global_batch_size / process_count``."""
    ds, pc = _process_shard(source, process_index, process_count)
    if global_batch_size % pc:
        raise ValueError(f"global batch {global_batch_size} not divisible by {pc} processes")
    local = global_batch_size // pc
    if len(ds) < local:
        raise ValueError(f"the source has {len(ds)} examples per process, fewer than one "
                         f"batch of {local}")
    return ds.shuffle(seed=seed).repeat().batch(local, drop_remainder=True)


def eval_batches(source: Any, *, global_batch_size: int, max_examples: int = 0,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Yield ``(batch, n_valid)`` over the (first ``max_examples`` of the) source in order;
    the last batch is padded with copies of its first example to keep shapes static."""
    ds, pc = _process_shard(source, process_index, process_count)
    if global_batch_size % pc:
        raise ValueError(f"eval batch {global_batch_size} not divisible by {pc} processes")
    local = global_batch_size // pc
    n = len(ds) if max_examples <= 0 else min(len(ds), max(max_examples // pc, 1))
    for start in range(0, n, local):
        items = [ds[i] for i in range(start, min(start + local, n))]
        valid = len(items)
        items += [items[0]] * (local - valid)
        yield jax.tree.map(lambda *xs: np.stack(xs), *items), valid


def global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> Any:
    """Assemble per-process numpy batches into global arrays sharded along axis 0."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
