"""Lightning callback: record snapshots during ``Trainer.fit``, resuming from checkpoints."""
from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl

from ..recorder import RecordingSession


class TrajectoryCallback(pl.Callback):
    """Record the LightningModule's parameters every N steps and/or epochs into a store.

    Resuming ``fit(ckpt_path=...)`` truncates the snapshots taken after the checkpoint's step
    and continues, so the store ends with neither duplicates nor gaps.
    """

    def __init__(self, path: "str | os.PathLike", every_n_steps: int | None = None, every_n_epochs: int | None = None,
                 codec: str = "lossless", buffers: bool = False, record_initial: bool = True,
                 overwrite: bool = False, durable: bool = False):
        self.session = RecordingSession(path, every_n_steps, every_n_epochs, codec, buffers, record_initial,
                                        overwrite, durable)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank: under DDP rank 0 writes and the others agree on errors; FSDP2 shards are written by each
        self.session.begin(pl_module, trainer.global_step, trainer.current_epoch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.session.recorder is not None:
            self.session.recorder.on_step(trainer.global_step, trainer.current_epoch, trainer.callback_metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session.recorder is not None:
            self.session.recorder.epoch_end(trainer.current_epoch, trainer.callback_metrics, step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.session.end()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Commit every snapshot queued so far before the checkpoint is written: a kill after it
        must not leave a resume with a gap before the checkpoint's step."""
        if self.session.store is not None:
            self.session.store.flush()

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the store's run id, so a resume into another run's store is refused."""
        return {"run_id": self.session.run_id}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.run_id = state_dict.get("run_id")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.session.end(failed=True)
