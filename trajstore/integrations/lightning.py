"""Lightning callback: record snapshots during ``Trainer.fit``, resuming from checkpoints."""
from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl

from ..recorder import Recorder, open_for_recording


class TrajectoryCallback(pl.Callback):
    """Record the LightningModule's parameters every N steps and/or epochs into a store.

    Resuming ``fit(ckpt_path=...)`` truncates the snapshots taken after the checkpoint's step
    and continues, so the store ends with neither duplicates nor gaps.
    """

    def __init__(self, path: "str | os.PathLike", every_n_steps: int | None = None, every_n_epochs: int | None = 1,
                 codec: str = "lossless", buffers: bool = False, record_initial: bool = True):
        self.path, self.codec, self.buffers = str(path), codec, buffers
        self.every_n_steps, self.every_n_epochs, self.record_initial = every_n_steps, every_n_epochs, record_initial
        self.store = None
        self.recorder: Recorder | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.store = open_for_recording(self.path, pl_module, codec=self.codec, buffers=self.buffers)
        self.recorder = Recorder(self.store, pl_module, self.every_n_steps, self.every_n_epochs, self.record_initial)
        self.recorder.start(trainer.global_step, epoch=trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.recorder is not None:
            self.recorder.on_step(trainer.global_step, trainer.current_epoch, trainer.callback_metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is not None:
            self.recorder.epoch_end(trainer.current_epoch, trainer.callback_metrics, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.store is not None:
            store, self.store, self.recorder = self.store, None, None
            store.close()
