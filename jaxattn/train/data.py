"""grain pipelines over random-access sources, sharded across processes, and conversion of
host batches into global ``jax.Array``s on the mesh.

The training stream of a random-access source (``len``/``[i]``, including a
``grain.MapDataset`` of examples) is a ``grain.MapDataset`` (shuffle -> repeat -> batch), so the
batch of step ``s`` is ``dataset[s]``: a restarted run sees exactly the batches it would have
seen, with no iterator state to checkpoint. A source with ``get_batch(indices)`` (the batch
protocol, :func:`has_batch_entry`; e.g. ``MQARSource``) is asked once per batch, for the same
indices in the same order.

A ``grain.IterDataset`` source is the researcher's own pipeline (with its own worker threads /
processes, ``prefetch`` / ``mp_prefetch``, shuffling and *batching*): it must yield dicts of
numpy arrays that are already this process's batch (leading dimension ``global batch /
process_count``). :class:`IterBatches` reads it in order and records the iterator's
``get_state()`` after every batch; the loop stores the state of the saved step with each
checkpoint and restores it (``set_state``) on resume, so a resumed run continues the stream
where the saved run was rather than replaying it from the start.
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

__all__ = ["IterBatches", "Prefetcher", "eval_batches", "global_batch", "has_batch_entry",
           "is_iter_dataset", "train_dataset"]


def has_batch_entry(source: Any) -> bool:
    """Whether a random-access ``source`` offers ``source.get_batch(indices int [n])``: a dict
    of arrays with leading dimension ``n``, row ``j`` equal to ``source[indices[j]]`` (the
    batch protocol; the loop then builds a batch in one call instead of ``n``)."""
    return callable(getattr(source, "get_batch", None))


def is_iter_dataset(source: Any) -> bool:
    """Whether ``source`` is a ``grain.IterDataset`` (a pipeline read by iterating it)."""
    return isinstance(source, grain.IterDataset)


class IterBatches:
    """Step-indexed view of a ``grain.IterDataset`` of ready batches: ``self[step]`` must be
    asked for consecutive steps from ``start`` (as :class:`Prefetcher` does) and is the next
    batch of the iterator. ``state_after(step)`` is the iterator state once the batch of step
    ``step - 1`` was read, i.e. the state a run resuming at ``step`` restores (kept for the last
    ``window`` steps). Each batch leaf must have leading dimension ``local_batch_size``.
    """

    def __init__(self, dataset: Any, *, start: int, local_batch_size: int,
                 state: Any = None, window: int = 64):
        self._it = iter(dataset)
        if state is not None:
            self._it.set_state(state)
        self._next, self._local, self._window = start, local_batch_size, window
        self._states: dict[int, Any] = {start: copy.deepcopy(self._it.get_state())}

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        if step != self._next:
            raise ValueError(f"IterBatches reads in order: expected step {self._next}, "
                             f"got {step}")
        try:
            batch = next(self._it)
        except StopIteration:
            raise ValueError(f"the train IterDataset ended at step {step}: it must yield at "
                             f"least run.steps batches (repeat it)") from None
        for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]:
            shape = np.shape(leaf)
            if not shape or shape[0] != self._local:
                raise ValueError(
                    f"train IterDataset batch leaf {jax.tree_util.keystr(path)} has shape "
                    f"{shape}; an IterDataset must yield batches with leading dimension "
                    f"{self._local} (global batch / processes)")
        self._next += 1
        self._states[step + 1] = copy.deepcopy(self._it.get_state())
        self._states.pop(step + 1 - self._window, None)
        return batch

    def state_after(self, step: int) -> Any:
        """The iterator state to resume at ``step`` (after ``step`` batches were consumed)."""
        if step not in self._states:
            raise KeyError(f"no iterator state recorded for step {step} (kept: "
                           f"{sorted(self._states)})")
        return self._states[step]

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


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
    if not has_batch_entry(source):
        return ds.shuffle(seed=seed).repeat().batch(local, drop_remainder=True)
    # the same pipeline over the indices (its shuffle depends only on length and seed), then
    # one ``get_batch`` call per batch instead of one ``source[i]`` per example
    ids, _ = _process_shard(range(len(source)), process_index, process_count)
    return ids.shuffle(seed=seed).repeat().batch(local, drop_remainder=True).map(
        source.get_batch)


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
    ids = _process_shard(range(len(source)), process_index, process_count)[0] \
        if has_batch_entry(source) else None
    for start in range(0, n, local):
        if ids is not None:
            chosen = [ids[i] for i in range(start, min(start + local, n))]
            valid = len(chosen)
            yield source.get_batch(np.array(chosen + [chosen[0]] * (local - valid))), valid
            continue
        items = [ds[i] for i in range(start, min(start + local, n))]
        valid = len(items)
        items += [items[0]] * (local - valid)
        yield jax.tree.map(lambda *xs: np.stack(xs), *items), valid


def global_batch(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> Any:
    """Assemble per-process numpy batches into global arrays sharded along axis 0."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


class Prefetcher:
    """``dataset[start], dataset[start + 1], ...`` prepared by one background thread, at most
    ``depth`` batches ahead, so the host builds step ``t + 1``'s batch while the device runs step
    ``t`` (XLA releases the GIL while it computes). ``depth=0`` reads synchronously.

    :meth:`get` must be called with consecutive steps; an exception raised while reading is
    re-raised there, at the step that failed. ``wait_seconds`` is the time :meth:`get` spent
    blocked (with ``depth=0``: the whole read time), i.e. the input pipeline's cost to the loop.
    """

    def __init__(self, dataset: Any, start: int, stop: int, depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self._dataset, self._next, self.depth = dataset, start, depth
        self.wait_seconds = 0.0
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._work, args=(start, stop), daemon=True,
                                            name="jaxattn-prefetch")
            self._thread.start()

    def _work(self, start: int, stop: int) -> None:
        for i in range(start, stop):
            if self._stop.is_set():
                return
            try:
                item = (i, self._dataset[i], None)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                item = (i, None, err)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def get(self, step: int) -> dict[str, np.ndarray]:
        """The batch of ``step`` (the step after the previous call's)."""
        if step != self._next:
            raise ValueError(f"Prefetcher expected step {self._next}, got {step}")
        self._next += 1
        t0 = time.perf_counter()
        if self._thread is None:
            batch = self._dataset[step]
            self.wait_seconds += time.perf_counter() - t0
            return batch
        i, batch, err = self._queue.get()
        self.wait_seconds += time.perf_counter() - t0
        if err is not None:
            raise err
        if i != step:  # cannot happen with consecutive calls; guard against silent misorder
            raise RuntimeError(f"prefetched batch {i} arrived for step {step}")
        return batch

    def close(self) -> None:
        """Stop the thread (pending batches are dropped)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
