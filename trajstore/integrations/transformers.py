"""Hugging Face ``Trainer`` callback: record snapshots during ``train()``, resuming from checkpoints."""
from __future__ import annotations

import os

from transformers import TrainerCallback

try:  # transformers >= 4.42 saves the state of such callbacks in its checkpoints
    from transformers.trainer_callback import ExportableState
except ImportError:  # pragma: no cover - older transformers
    class ExportableState:  # type: ignore[no-redef]
        pass

from ..recorder import RecordingSession


class TrajectoryCallback(TrainerCallback, ExportableState):
    """Record the model's parameters every N steps and/or epochs into a store.

    ``trainer.train(resume_from_checkpoint=...)`` truncates the snapshots taken after the
    checkpoint's global step and continues without duplicates or gaps. A fresh ``train()`` into
    a path that already holds another run raises StoreExistsError, unless ``overwrite=True``.
    The Trainer has no exception hook: if training fails, snapshots already handed to the store
    are still written by its background thread and committed at interpreter exit at the latest.
    """

    def __init__(self, path: "str | os.PathLike", every_n_steps: int | None = None, every_n_epochs: int | None = 1,
                 codec: str = "lossless", buffers: bool = False, record_initial: bool = True,
                 overwrite: bool = False, durable: bool = False):
        self._args = dict(path=str(path), every_n_steps=every_n_steps, every_n_epochs=every_n_epochs, codec=codec,
                          buffers=buffers, record_initial=record_initial, overwrite=overwrite, durable=durable)
        self.session = RecordingSession(path, every_n_steps, every_n_epochs, codec, buffers, record_initial,
                                        overwrite, durable)
        self._logs: dict = {}

    def state(self) -> dict:
        """Saved in checkpoints (with ``restore_callback_states_from_checkpoint=True``): the store's run
        id, so resuming a checkpoint of another run into this store is refused."""
        return {"args": self._args, "attributes": {"run_id": self.session.run_id}}

    @property
    def run_id(self) -> str | None:
        return self.session.run_id

    @run_id.setter
    def run_id(self, value: str | None) -> None:
        self.session.run_id = value

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self.session.begin(model, state.global_step, int(state.epoch or 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._logs.update(logs or {})

    def on_step_end(self, args, state, control, **kwargs):
        if self.session.recorder is not None:
            self.session.recorder.on_step(state.global_step, int(state.epoch or 0), self._logs)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.session.recorder is not None:
            epoch = max(0, round(state.epoch or 0) - 1)
            self.session.recorder.epoch_end(epoch, self._logs, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.session.end()
