"""Lightning callback: record snapshots during ``Trainer.fit``, resuming from checkpoints."""
from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl

from ..errors import InvalidArgumentError
from ..recorder import RecordingSession, fsdp1_refusal


class TrajectoryCallback(pl.Callback):
    """Record the LightningModule's parameters every N steps and/or epochs into a store.

    Resuming ``fit(ckpt_path=...)`` truncates the snapshots taken after the checkpoint's step
    and continues, so the store ends with neither duplicates nor gaps.

    Multi-process (every rank runs every hook below, so the store's collectives pair up):
    ``strategy="ddp"``: rank 0 writes; ``ModelParallelStrategy`` (FSDP2, ``fully_shard`` in
    ``configure_model``): every rank writes its shard. FSDP1 (``strategy="fsdp"``) and DeepSpeed
    ZeRO-3 are refused in :meth:`setup`, on every rank. A rank that raises closes its store without
    collectives (:meth:`on_exception`); the others' next collective fails once its process has ended.

    ``optimizer_state=True`` records the trainer's optimizer's state (momentum buffers, Adam moments)
    with every snapshot: one optimizer, single process only (InvalidArgumentError otherwise).
    """

    def __init__(self, path: "str | os.PathLike", every_n_steps: int | None = None, every_n_epochs: int | None = None,
                 codec: str = "lossless", buffers: bool = False, record_initial: bool = True,
                 overwrite: bool = False, durable: bool = False, optimizer_state: bool = False):
        self.session = RecordingSession(path, every_n_steps, every_n_epochs, codec, buffers, record_initial,
                                        overwrite, durable, optimizer_state)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse FSDP1 (``strategy="fsdp"``) and DeepSpeed ZeRO-3 on every rank, before they wrap the model:
        their parameters are flat or partitioned shards with no per-tensor layout to record. FSDP2
        (ModelParallelStrategy) records sharded, every rank its own shard."""
        from lightning.pytorch.strategies import FSDPStrategy

        if stage != "fit":
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            raise InvalidArgumentError(fsdp1_refusal(f"Lightning's {type(trainer.strategy).__name__}"))
        if getattr(trainer.strategy, "zero_stage_3", False):  # DeepSpeed ZeRO-3: every parameter an empty stub
            raise InvalidArgumentError(
                "trajstore cannot record a model trained with DeepSpeed ZeRO stage 3 (its parameters are partitioned "
                "stubs): use ZeRO stage 1 or 2 (rank 0 writes, as with DDP) or ModelParallelStrategy (FSDP2)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every rank: under DDP rank 0 writes and the others agree on errors; FSDP2 shards are written by each
        optimizer = None
        if self.session.optimizer_state:
            if len(trainer.optimizers) != 1:
                raise InvalidArgumentError(f"optimizer_state=True records one optimizer; this trainer has "
                                           f"{len(trainer.optimizers)}: record without optimizer_state")
            optimizer = trainer.optimizers[0]
        self.session.begin(pl_module, trainer.global_step, trainer.current_epoch, optimizer)

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
