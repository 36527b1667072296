"""The subspace-training paths of a run: P-SGD and P-BFGS weights at the phase's start and every epoch's end.

``RUN/paths/METHOD.zarr`` (``psgd``, ``pbfgs``) is an ordinary trajectory store of the run's model (the
layout of ``RUN/trajectory.zarr``, lossless), recorded through a :class:`~trajstore.recorder.Recorder`:
snapshot 0 is the start (the run's ``start_snapshot``), then one snapshot per epoch, keyed by the
phase's optimizer steps, with that epoch's ``train_loss``, ``test_loss`` and ``test_acc`` as metrics.
The last one equals ``final-METHOD.pt``. It resumes with the runner: every epoch's snapshot is flushed
before the checkpoint that covers it, and the checkpoint holds the phase's step (``path_step``) and the
store's run id (``path_run``), so a resumed phase truncates what came after its checkpoint and records
the same path as an uninterrupted run, bit for bit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch import nn

from trajstore import TrajectoryStore
from trajstore.errors import CorruptSnapshotError
from trajstore.layout import ParamLayout
from trajstore.recorder import Recorder

PATHS_DIR = "paths"
RECORDED = {"psgd": "P-SGD", "pbfgs": "P-BFGS"}  # method -> label; other methods record no path
_METRICS = ("train_loss", "test_loss", "test_acc")


def path_store(run_dir: "str | os.PathLike", method: str) -> Path:
    """Where the run directory ``run_dir`` records ``method``'s path: ``run_dir/paths/METHOD.zarr``."""
    return Path(run_dir) / PATHS_DIR / f"{method}.zarr"


def recorded_paths(run_dir: "str | os.PathLike") -> dict[str, Path]:
    """method -> store, for each method whose path the run directory holds (a store with a zarr.json)."""
    return {m: path_store(run_dir, m) for m in RECORDED if (path_store(run_dir, m) / "zarr.json").is_file()}


class PathRecorder:
    """One phase's path: :meth:`begin` at the phase's start or resume, :meth:`epoch_end` after each
    epoch (before the checkpoint), :meth:`close` at the end (also on errors)."""

    def __init__(self, store: TrajectoryStore, recorder: Recorder, method: str):
        self.store, self.recorder, self.method = store, recorder, method

    @classmethod
    def begin(cls, run_dir: "str | os.PathLike", method: str, state: dict, model: nn.Module, metadata: dict,
              log: Callable[[str], None]) -> "PathRecorder | None":
        """Create the store (a phase starting: ``state`` has no checkpointed model) with the start weights,
        or reopen it at the checkpoint's ``path_step`` (``model`` already restored from it). None for a
        method that records no path, or a phase checkpointed without one (a run begun by an older version,
        or a path store deleted since): its path is not recorded, and `landscape` draws start -> final."""
        if method not in RECORDED:
            return None
        path = path_store(run_dir, method)
        if "model" not in state:  # the phase starts (or a kill came before its first checkpoint): begin afresh
            path.parent.mkdir(exist_ok=True)
            store = TrajectoryStore.create(path, model, overwrite=True, process_group=None,
                                           metadata={**metadata, "method": method, "path": "per epoch"})
            return cls._start(store, model, method, 0, None)
        if "path_step" not in state or not (path / "zarr.json").is_file():
            why = ("this phase was checkpointed by a version that recorded no path" if "path_step" not in state
                   else f"{path} is missing (deleted?)")
            log(f"{method}: its path is not recorded ({why}); `trajstore landscape` draws start -> final instead")
            return None
        step = int(state["path_step"])
        store = TrajectoryStore.open(path, "a", process_group=None)
        try:
            store.layout.check_same(ParamLayout.from_module(model), "the run's model")
        except BaseException:
            store.close()
            raise
        recorder = cls._start(store, model, method, step, state.get("path_run"))
        steps = store.steps
        if not len(steps) or int(steps[-1]) != step:
            recorder.close()
            raise CorruptSnapshotError(
                f"{path} ends at step {int(steps[-1]) if len(steps) else 'none'}, but the run's checkpoint is at "
                f"step {step} of {method}: its path has a gap. Delete {path} and resume: the run continues "
                "without recording that path")
        return recorder

    @classmethod
    def _start(cls, store: TrajectoryStore, model: nn.Module, method: str, step: int,
               run_id: str | None) -> "PathRecorder":
        recorder = Recorder(store, model, every_n_epochs=1)
        try:
            recorder.start(step, run_id=run_id)  # a resume drops what came after the checkpoint
        except BaseException:
            store.close()
            raise
        return cls(store, recorder, method)

    def epoch_end(self, epoch: int, state: dict) -> None:
        """Record epoch ``epoch``'s weights (0-based within the phase) with its metrics, commit them, and
        put the step and run id into ``state`` for the checkpoint that follows."""
        entry = state["history"][self.method][-1]
        self.recorder.epoch_end(epoch, {k: float(entry[k]) for k in _METRICS})
        self.store.flush()  # committed before the checkpoint that covers it
        state["path_step"] = self.recorder.global_step
        state["path_run"] = self.store.run_id

    def close(self) -> None:
        """Commit what is queued and release the store's lock."""
        self.store.close()
