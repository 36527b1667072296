"""Hugging Face ``Trainer`` callback: record snapshots during ``train()``, resuming from checkpoints."""
from __future__ import annotations

import math
import os

from transformers import TrainerCallback

from ..recorder import RecordingSession

STATE_KEY = "trajstore"  # our entry in TrainerState.stateful_callbacks (saved with each checkpoint)


class TrajectoryCallback(TrainerCallback):
    """Record the model's parameters every N steps and/or epochs into a store.

    ``trainer.train(resume_from_checkpoint=...)`` truncates the snapshots taken after the
    checkpoint's global step and continues without duplicates or gaps. A fresh ``train()`` into
    a path that already holds another run raises StoreExistsError, unless ``overwrite=True``.
    The Trainer has no exception hook: if training fails, snapshots already handed to the store
    are still written by its background thread and committed at interpreter exit at the latest,
    and the next callback to begin on the same path closes the store.

    Under ``torchrun`` (DDP) the callback runs on every rank and rank 0 writes. The events it records
    or flushes on (``on_train_begin``, ``on_step_begin``, ``on_step_end``, ``on_epoch_begin``,
    ``on_epoch_end``, ``on_save``, ``on_train_end``) run on every rank in the same order, and what it
    decides from (``state``, ``control.should_save``) is the same on every rank, so the store's
    collectives pair up; ``on_log`` only collects the logs (the same on every rank: the Trainer
    averages the loss over ranks). A rank that fails ends its process, and the others' next
    collective fails then rather than waiting.

    Every checkpoint carries the store's run id (in ``trainer_state.json``, under
    ``stateful_callbacks["trajstore"]``), so resuming a checkpoint of another run into this store
    is refused before anything is dropped.

    ``optimizer_state=True`` records the Trainer's optimizer's state (Adam moments, step counts) with
    every snapshot; single process only (InvalidArgumentError under torchrun).
    """

    def __init__(self, path: "str | os.PathLike", every_n_steps: int | None = None, every_n_epochs: int | None = None,
                 codec: str = "lossless", buffers: bool = False, record_initial: bool = True,
                 overwrite: bool = False, durable: bool = False, optimizer_state: bool = False):
        self.session = RecordingSession(path, every_n_steps, every_n_epochs, codec, buffers, record_initial,
                                        overwrite, durable, optimizer_state)
        self._logs: dict = {}
        self._pending: dict | None = None  # the step whose snapshot waits for that step's logs

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._pending = None
        kept = getattr(state, "stateful_callbacks", None)  # saved with each checkpoint (transformers >= 4.41)
        saved = kept.setdefault(STATE_KEY, {}) if isinstance(kept, dict) else {}
        # every rank (each loads trainer_state.json): under DDP rank 0 writes and the others agree on errors
        self.session.run_id = saved.get("run_id")  # of the checkpoint resumed from, if any
        optimizer = kwargs.get("optimizer") if self.session.optimizer_state else None
        self.session.begin(model, state.global_step, _epoch(state), optimizer)
        saved["run_id"] = self.session.run_id  # written into every checkpoint from now on

    # The Trainer calls on_step_end *before* it logs that step (on_log), evaluates and saves. A due
    # snapshot is taken once that step's logs are in (the weights cannot change before the next
    # step begins), so it carries its own step's metrics, never the step before's.
    def on_step_end(self, args, state, control, **kwargs):
        self._flush()
        if self.session.recorder is not None:
            self._pending, self._logs = {"step": state.global_step, "epoch": _epoch(state), "epoch_end": False}, {}
            self._commit_before_save(control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is not None and state.global_step == self._pending["step"]:
            self._logs.update(logs or {})

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.session.recorder is not None:
            if self._pending is None or self._pending["step"] != state.global_step:
                self._flush()
                self._pending, self._logs = {"step": state.global_step, "epoch": _epoch(state)}, {}
            self._pending["epoch_end"] = True  # epoch-end evaluation logs come after this call
            self._commit_before_save(control)

    def _commit_before_save(self, control) -> None:
        """The Trainer writes its checkpoint right after this call when ``should_save``: commit every
        snapshot queued before it, so a kill after the checkpoint leaves no gap before its step (the
        checkpoint step's own snapshot is re-recorded on resume if it was lost)."""
        if control.should_save and self.session.store is not None:
            self.session.store.flush()

    def on_save(self, args, state, control, **kwargs):
        self._flush()

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._flush()

    def on_train_end(self, args, state, control, **kwargs):
        try:
            self._flush()
        finally:
            self.session.end()

    def _flush(self) -> None:
        """Record the pending step's snapshot, if due, with the metrics logged at that step."""
        pending, self._pending = getattr(self, "_pending", None), None
        recorder = self.session.recorder
        if pending is None or recorder is None:
            return
        recorder.on_step(pending["step"], pending["epoch"], self._logs)
        if pending.get("epoch_end"):
            recorder.epoch_end(pending["epoch"], self._logs, step=pending["step"])


def _epoch(state) -> int:
    """The 0-based epoch a step belongs to: the Trainer's ``state.epoch`` runs over (e, e + 1] in epoch e."""
    return max(0, math.ceil((state.epoch or 0) - 1e-6) - 1)
