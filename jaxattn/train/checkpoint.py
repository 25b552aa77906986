"""Checkpoints with orbax ``CheckpointManager``: periodic (async) saves, keep-N, resume from
the latest good checkpoint onto the current mesh.

* Restoring takes an *abstract* target (``jax.ShapeDtypeStruct`` with the current mesh's
  shardings), so a checkpoint written on 8 devices restores onto 4 (or 1) devices.
* If the latest checkpoint cannot be read it is reported, moved aside to
  ``<dir>/corrupt_<step>_<time>`` (kept for inspection, and out of the way of a later save of
  the same step) and the previous one is tried.
* Each save can carry a JSON ``metadata`` dict (orbax custom metadata: the loop stores the run's
  config and, for ``grain.IterDataset`` sources, the data iterator's state), read back with
  :meth:`Checkpointer.metadata`.
* Unfinished saves (a process killed mid-write) never become visible: orbax writes to a
  temporary directory and renames it when complete.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "abstract_like"]


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
        self.manager.save(int(step), args=ocp.args.StandardSave(state),
                          custom_metadata=dict(metadata or {}))

    def metadata(self, step: int) -> dict[str, Any]:
        """The ``metadata`` saved with ``step`` (``{}`` when none was, or it is unreadable)."""
        self.wait()
        try:
            meta = self.manager.metadata(int(step))
        except Exception:  # noqa: BLE001 - old or partial checkpoints: treated as no metadata
            return {}
        return dict(getattr(meta, "custom_metadata", None) or {})

    def _quarantine(self, step: int) -> pathlib.Path | None:
        src = self.directory / str(step)
        if not src.exists():
            return None
        dst = self.directory / f"corrupt_{step}_{int(time.time())}"
        src.rename(dst)
        self.manager.reload()
        return dst

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any] | None:
        """Restore the newest readable checkpoint onto ``abstract_state``'s shardings.

        Returns ``(step, state)``, or None when there is no readable checkpoint.
        """
        self.wait()
        for step in reversed(self.all_steps()):
            try:
                state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as err:  # orbax raises many types for unreadable data
                moved = self._quarantine(step)
                print(
                    f"checkpoint: step {step} in {self.directory} is unreadable "
                    f"({type(err).__name__}: {str(err)[:200]}); moved it to {moved} and "
                    f"trying the previous checkpoint",
                    file=sys.stderr,
                )
                continue
            return step, state
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
