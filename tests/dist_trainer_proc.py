"""One rank of a 2-process trainer job recording through the trajstore callbacks
(tests/test_distributed_trainers.py).

usage: python -m tests.dist_trainer_proc SCENARIO OUT

The test sets torchrun's environment (MASTER_ADDR, MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE): Lightning and the Hugging Face Trainer find their rank in it and join one gloo job.
Each phase writes OUT/<phase>.r<rank>.json (the error it ended with, if any) and, for trainings,
OUT/<phase>.r<rank>.npz: the full parameters this rank saw after every optimizer step (``steps``,
``rows``) and the loss it logged (``loss``), to compare with what the store recorded.

Scenarios:
  lightning  DDP: ``ddp`` (fresh fit, 3 epochs), ``ddp_resume`` (fit from the epoch-0 checkpoint into
             the same store), ``ddp_again`` (a fresh fit into it: refused); ``fsdp1`` (strategy FSDP:
             refused at setup); FSDP2 through ModelParallelStrategy: ``fsdp2``, ``fsdp2_resume``; then
             ``fail``: rank 1 raises at step 2 and exits while rank 0 waits in the store's collective
  hf         Hugging Face Trainer, DDP: ``hf`` (fresh, 3 epochs), ``hf_resume`` (from checkpoint-3),
             ``hf_again`` (a fresh train into the same store: refused); then ``hf_fail``: rank 1 raises
             as step 3 begins and exits while rank 0 waits in the store's collective
"""
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

RANK = int(os.environ.get("RANK", "0"))
STEPS_PER_EPOCH = 3  # 96 examples, 48 a rank, batches of 16


def digits(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


def full_vector(module: nn.Module) -> np.ndarray:
    """Every parameter in full (an FSDP2 shard is gathered: collective), flattened in order."""
    parts = []
    for p in module.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        parts.append(t.detach().reshape(-1).numpy().copy())
    return np.concatenate(parts)


class Report:
    """What one phase ended with on this rank, written where the test reads it."""

    def __init__(self, out: Path, phase: str):
        self.out, self.phase = out, phase
        self.steps: list[int] = []
        self.rows: list[np.ndarray] = []
        self.loss: list[float] = []

    def take(self, step: int, module: nn.Module, loss: float = math.nan) -> None:
        """The full parameters after optimizer step ``step`` (every rank: collective under FSDP2)."""
        self.steps.append(int(step))
        self.rows.append(full_vector(module))
        self.loss.append(float(loss))

    def write(self, error: BaseException | None, **extra) -> None:
        if self.steps:
            np.savez(self.out / f"{self.phase}.r{RANK}.npz", steps=np.array(self.steps), rows=np.stack(self.rows),
                     loss=np.array(self.loss))
        info = {"error": type(error).__name__ if error else None, "message": str(error) if error else None,
                "where": raised_in(error), **extra}
        (self.out / f"{self.phase}.r{RANK}.json").write_text(json.dumps(info))


def raised_in(error: BaseException | None) -> str | None:
    """The trajstore module (``trajstore/...py``) the error was raised in, else None."""
    tb, where = error.__traceback__ if error else None, None
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/trajstore/" in name:
            where = "trajstore/" + name.rsplit("/trajstore/", 1)[1]
        tb = tb.tb_next
    return where


# -- Lightning ---------------------------------------------------------------------------------
def lightning_phase(out: Path, phase: str, strategy: object, store: Path, ckpt_path: str | None = None,
                    fail_at: int | None = None, every_n_steps: int = 2, max_epochs: int = 3) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from trajstore.integrations.lightning import TrajectoryCallback

    sharded = not isinstance(strategy, str)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

        def configure_model(self):
            if sharded and self._device_mesh is not None:
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                fully_shard(self.net[0], mesh=mesh)
                fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)  # this rank's loss: the ranks' differ
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    report = Report(out, phase)

    class Watch(pl.Callback):
        """Every rank: the parameters after each step (after the trajstore callback ran)."""

        def on_train_start(self, trainer, pl_module):
            report.take(trainer.global_step, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            report.take(trainer.global_step, pl_module, trainer.callback_metrics["train_loss"].item())

    class Fail(pl.Callback):
        """Rank 1 raises after step ``fail_at``, before the trajstore callback records it."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if RANK == 1 and trainer.global_step == fail_at:
                raise RuntimeError(f"rank 1 fails at step {fail_at}")

    pl.seed_everything(0, verbose=False)
    loader = DataLoader(TensorDataset(*digits()), batch_size=16, shuffle=False)
    callbacks = [*([Fail()] if fail_at is not None else []),
                 TrajectoryCallback(store, every_n_steps=every_n_steps, every_n_epochs=1), Watch(),
                 ModelCheckpoint(dirpath=out / f"ckpt-{store.stem}", save_top_k=-1, every_n_epochs=1)]
    trainer = pl.Trainer(strategy=strategy, accelerator="cpu", devices=2, max_epochs=max_epochs, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, deterministic=True,
                         num_sanity_val_steps=0, default_root_dir=out, callbacks=callbacks)
    started, error = time.monotonic(), None
    try:
        trainer.fit(Module(), loader, ckpt_path=ckpt_path)
    except Exception as exc:  # noqa: BLE001 -- reported to the test
        error = exc
    report.write(error, seconds=time.monotonic() - started)
    if fail_at is not None and RANK == 1:
        sys.exit(3)  # a failed rank's process ends, as an uncaught error would end it


def lightning(out: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    class CPUFSDP(FSDPStrategy):
        """Lightning's FSDP1 strategy; a subclass only so that Lightning lets it be tried on CPU (torch's
        FSDP1 itself needs an accelerator, but trajstore refuses it before FSDP wraps anything)."""

    def ckpt(name: str) -> str:  # the checkpoint saved at the end of epoch 0 (step 3)
        return str(next((out / f"ckpt-{name}").glob("epoch=0-*")))

    def fsdp2() -> ModelParallelStrategy:  # FSDP2 on the 1-D data-parallel mesh of the 2 ranks
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)

    lightning_phase(out, "ddp", "ddp", out / "ddp.zarr")
    lightning_phase(out, "ddp_resume", "ddp", out / "ddp.zarr", ckpt_path=ckpt("ddp"))
    lightning_phase(out, "ddp_again", "ddp", out / "ddp.zarr")
    lightning_phase(out, "fsdp1", CPUFSDP(), out / "fsdp1.zarr")
    lightning_phase(out, "fsdp2", fsdp2(), out / "fsdp2.zarr", max_epochs=2)
    lightning_phase(out, "fsdp2_resume", fsdp2(), out / "fsdp2.zarr", ckpt_path=ckpt("fsdp2"), max_epochs=2)
    lightning_phase(out, "fail", "ddp", out / "fail.zarr", fail_at=2, every_n_steps=1, max_epochs=1)


# -- Hugging Face Trainer ------------------------------------------------------------------------
class HFNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def hf_phase(out: Path, phase: str, store: Path, resume: str | None = None, fail_at: int | None = None,
             every_n_steps: int = 2, epochs: int = 3) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from trajstore.integrations.transformers import TrajectoryCallback

    report = Report(out, phase)

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            report.take(state.global_step, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            report.take(state.global_step, model)

    class Fail(TrainerCallback):
        """Rank 1 raises as step ``fail_at`` begins, before the trajstore callback records the step before."""

        def on_step_begin(self, args, state, control, **kwargs):
            if RANK == 1 and state.global_step + 1 == fail_at:
                raise RuntimeError(f"rank 1 fails at step {fail_at}")

    set_seed(0)
    x, y = digits()
    data = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    args = TrainingArguments(output_dir=str(out / store.stem), num_train_epochs=epochs, per_device_train_batch_size=16,
                             learning_rate=0.05, save_strategy="epoch", logging_steps=1, report_to=[],
                             use_cpu=True, ddp_backend="gloo", seed=0, remove_unused_columns=False,
                             disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant", optim="sgd")
    trainer = Trainer(model=HFNet(), args=args, train_dataset=data,
                      callbacks=[*([Fail()] if fail_at is not None else []),
                                 TrajectoryCallback(store, every_n_steps=every_n_steps, every_n_epochs=1), Watch()])
    started, error = time.monotonic(), None
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as exc:  # noqa: BLE001 -- reported to the test
        error = exc
    losses = {int(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e}
    report.loss = [losses.get(s, math.nan) for s in report.steps]
    report.write(error, seconds=time.monotonic() - started, world=trainer.args.world_size,
                 parallel_mode=str(trainer.args.parallel_mode))
    if fail_at is not None and RANK == 1:
        sys.exit(3)  # a failed rank's process ends, as an uncaught error would end it


def hf(out: Path) -> None:
    hf_phase(out, "hf", out / "hf.zarr")
    hf_phase(out, "hf_resume", out / "hf.zarr", resume=str(out / "hf" / f"checkpoint-{STEPS_PER_EPOCH}"))
    hf_phase(out, "hf_again", out / "hf.zarr")
    hf_phase(out, "hf_fail", out / "hf_fail.zarr", fail_at=3, every_n_steps=1, epochs=1)


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    {"lightning": lightning, "hf": hf}[scenario](out)


if __name__ == "__main__":
    main()
