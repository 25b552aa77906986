"""Checkpoints with orbax ``CheckpointManager``: periodic (async) saves, keep-N, resume from
the latest good checkpoint onto the current mesh.

* Restoring takes an *abstract* target (``jax.ShapeDtypeStruct`` with the current mesh's
  shardings), so a checkpoint written on 8 devices restores onto 4 (or 1) devices.
* If the latest checkpoint cannot be read it is reported, moved aside to
  ``<dir>/corrupt_<step>_<time>`` (kept for inspection, and out of the way of a later save of
  the same step) and the previous one is tried.
* Under ``jax.distributed`` every process saves and restores (as orbax requires) into the one
  shared directory, which orbax writes once; a checkpoint unreadable on any process is treated
  as unreadable on all of them, and process 0 alone moves it aside.
* Each save can carry a JSON ``metadata`` dict (orbax custom metadata: the loop stores the run's
  config and, for ``grain.IterDataset`` sources, the data iterator's state), read back with
  :meth:`Checkpointer.metadata`.
* Unfinished saves (a process killed mid-write) never become visible: orbax writes to a
  temporary directory and renames it when complete.
* Silent corruption (a flipped bit that still decodes) is caught by content checksums: each
  save stores one 32-bit sum of every leaf's raw bits (:func:`state_checksums`; a single
  flipped bit always changes it) and a restore whose sums differ is treated as unreadable.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

__all__ = ["Checkpointer", "abstract_like", "state_checksums"]

_CHECKSUMS = "content_checksums"  # metadata key


def _leaf_words(x):
    """The raw bits of ``x`` as uint32 words (narrower dtypes widened, wider ones split)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _sums(leaves):
    return [jnp.sum(_leaf_words(x), dtype=jnp.uint32) for x in leaves]


def state_checksums(state: Any) -> list[int]:
    """One uint32 sum (mod 2**32) of the raw bits of every array leaf of ``state``, in
    ``jax.tree.leaves`` order: a single flipped bit anywhere changes its leaf's sum."""
    leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
    return [int(v) for v in jax.device_get(_sums(leaves))]


def _on_every_process(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (``ok`` itself with a single process)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves with the given shardings (a tree matching ``tree``)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _check_writable(directory: pathlib.Path) -> None:
    """Create ``directory`` and write, read back and delete a small probe file in it, so a
    read-only, missing-permission or full checkpoint directory fails before training starts
    (not at the first save, an hour in), with the path and the reason."""
    probe = directory / f".write_probe_{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        if probe.read_bytes() != b"\0" * 4096:
            raise OSError("the probe file read back differently")
    except OSError as err:
        raise OSError(f"checkpoint directory {str(directory)!r} is not writable "
                      f"({err.strerror or err}); fix it or choose another run.checkpoint_dir "
                      "before training") from err
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # the directory itself could not be made: nothing to remove
            pass


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` for a single pytree ``state``."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory).absolute()
        _check_writable(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, metadata: dict[str, Any] | None = None) -> None:
        """Start saving ``state`` (and the JSON-serialisable ``metadata``) at ``step`` (returns
        once device data is copied to host when async). Saving a step that already exists is a
        no-op."""
        if step in self.all_steps():
            return
        meta = {**dict(metadata or {}), _CHECKSUMS: state_checksums(state)}
        self.manager.save(int(step), args=ocp.args.StandardSave(state), custom_metadata=meta)

    def metadata(self, step: int) -> dict[str, Any]:
        """The ``metadata`` saved with ``step`` (``{}`` when none was, or it is unreadable)."""
        self.wait()
        try:
            meta = self.manager.metadata(int(step))
        except Exception:  # noqa: BLE001 - old or partial checkpoints: treated as no metadata
            return {}
        return dict(getattr(meta, "custom_metadata", None) or {})

    def _quarantine(self, step: int) -> pathlib.Path | None:
        """Move ``<dir>/<step>`` to ``<dir>/corrupt_<step>_<time>`` (returned; None when it was
        gone). Under ``jax.distributed`` every process calls this: process 0 renames, the others
        wait for it, then all reload their step lists (so all of them save that step again)."""
        src = self.directory / str(step)
        dst = None
        if jax.process_index() == 0 and src.exists():
            dst = self.directory / f"corrupt_{step}_{int(time.time())}"
            src.rename(dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxattn_checkpoint_quarantine_{step}")
        self.manager.reload()
        return dst

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """Restore the newest readable checkpoint onto ``abstract_state``'s shardings.

        Returns ``(step, state)``, or None when there is no readable checkpoint.
        """
        self.wait()
        for step in reversed(self.all_steps()):
            state, err = None, None
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable data
                err = e
            # every process must take the same branch (the checksums and saves are collective)
            if not _on_every_process(err is None) and err is None:
                err = RuntimeError("another process could not read it")
            if err is None:
                try:
                    self._verify(step, state)  # global sums: the same verdict on every process
                except Exception as e:  # noqa: BLE001 - reported below like unreadable data
                    err = e
            if err is not None:
                moved = self._quarantine(step)
                print(
                    f"checkpoint: step {step} in {self.directory} is unreadable "
                    f"({type(err).__name__}: {str(err)[:200]}); moved it to "
                    f"{moved or 'corrupt_' + str(step) + '_* (by process 0)'} and trying the "
                    f"previous checkpoint",
                    file=sys.stderr,
                )
                continue
            return step, state
        return None

    def _verify(self, step: int, state: Any) -> None:
        """Raise if ``state``'s content checksums differ from those saved with ``step``
        (checkpoints saved without them are accepted)."""
        want = self.metadata(step).get(_CHECKSUMS)
        if want is None:
            return
        got = state_checksums(state)
        bad = [i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b]
        if bad or len(got) != len(want):
            raise ValueError(f"content checksums differ from the saved ones in {len(bad)} of "
                             f"{len(want)} arrays (first: leaf {bad[:1]}): the data changed "
                             "after it was written")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
