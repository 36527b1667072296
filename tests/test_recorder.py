"""Recorder in a plain loop, and the Lightning / Transformers callbacks in real training runs."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from trajstore import TrajectoryStore
from trajstore.recorder import Recorder, open_for_recording


def digits(n=320):
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:n] / 16.0, dtype=torch.float32), torch.tensor(y[:n])


def plain_run(path, epochs, resume_from=None):
    """Train a small MLP on digits; record every 3 steps and each epoch; optionally resume."""
    torch.manual_seed(0)
    x, y = digits()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = open_for_recording(path, model)
    rec = Recorder(store, model, every_n_steps=3, every_n_epochs=1)
    start_epoch = 0
    if resume_from is not None:
        ckpt = resume_from
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        rec.load_state_dict(ckpt["recorder"])
        start_epoch = ckpt["epoch"] + 1
    else:
        rec.start()
    ckpts = {}
    for epoch in range(start_epoch, epochs):
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step({"loss": loss})
        rec.epoch_end(epoch, {"loss": loss.item()})
        ckpts[epoch] = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                        "opt": opt.state_dict(), "recorder": rec.state_dict(), "epoch": epoch}
    store.close()
    return ckpts


def test_plain_loop_records_initial_steps_and_epochs(tmp_path):
    plain_run(tmp_path / "a.zarr", epochs=2)
    with TrajectoryStore.open(tmp_path / "a.zarr") as store:
        # 5 steps per epoch: initial (0), every 3 steps, and each epoch end (5, 10), no duplicate at 0
        assert store.steps.tolist() == [0, 3, 5, 6, 9, 10]
        assert store.epochs.tolist()[2] == 0
        assert not np.isnan(store.metrics("loss")[1])


def test_plain_loop_resume_truncates_and_continues_without_duplicates(tmp_path):
    plain_run(tmp_path / "a.zarr", epochs=3)
    ckpts = plain_run(tmp_path / "b.zarr", epochs=3)  # "crashes" after epoch 2, resumes from epoch 0's checkpoint
    plain_run(tmp_path / "b.zarr", epochs=3, resume_from=ckpts[0])
    with TrajectoryStore.open(tmp_path / "a.zarr") as a, TrajectoryStore.open(tmp_path / "b.zarr") as b:
        assert a.steps.tolist() == b.steps.tolist() == [0, 3, 5, 6, 9, 10, 12, 15]
        assert np.array_equal(a.read(slice(None)), b.read(slice(None)))
        assert b.attrs["truncations"] == [3]


def test_recorder_rejects_a_different_model(tmp_path):
    model = nn.Linear(3, 2)
    open_for_recording(tmp_path / "r.zarr", model).close()
    with pytest.raises(Exception, match="weight"):
        open_for_recording(tmp_path / "r.zarr", nn.Linear(4, 2))


# -- Lightning ---------------------------------------------------------------------------
def lightning_fit(root, store_path, max_epochs, ckpt_path=None, every_n_epochs=1, extra_callbacks=()):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from trajstore.integrations.lightning import TrajectoryCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)

    pl.seed_everything(0)
    loader = DataLoader(TensorDataset(*digits()), batch_size=64, shuffle=False)
    trainer = pl.Trainer(max_epochs=max_epochs, default_root_dir=root, enable_progress_bar=False, logger=False,
                         enable_model_summary=False, accelerator="cpu", deterministic=True,
                         callbacks=[ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1),
                                    TrajectoryCallback(store_path, every_n_steps=2, every_n_epochs=every_n_epochs),
                                    *extra_callbacks])
    trainer.fit(Module(), loader, ckpt_path=ckpt_path)


def test_lightning_callback_records_and_resumes_from_checkpoint(tmp_path):
    lightning_fit(tmp_path / "a", tmp_path / "a.zarr", 3)
    lightning_fit(tmp_path / "b", tmp_path / "b.zarr", 3)
    ckpt = next((tmp_path / "b").glob("epoch=0-*.ckpt"))
    lightning_fit(tmp_path / "b", tmp_path / "b.zarr", 3, ckpt_path=str(ckpt))  # resume after a "crash"
    with TrajectoryStore.open(tmp_path / "a.zarr") as a, TrajectoryStore.open(tmp_path / "b.zarr") as b:
        assert a.steps.tolist() == [0, 2, 4, 5, 6, 8, 10, 12, 14, 15]
        assert b.steps.tolist() == a.steps.tolist()
        assert b.attrs["truncations"] == [4]
        np.testing.assert_allclose(b.read(slice(None)), a.read(slice(None)), rtol=0, atol=1e-6)
        assert "train_loss" in a.metric_names()


# -- Hugging Face Transformers ------------------------------------------------------------
class HFNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def hf_train(out, store_path, resume=None):
    from transformers import Trainer, TrainingArguments, set_seed

    from trajstore.integrations.transformers import TrajectoryCallback

    set_seed(0)
    x, y = digits(256)
    data = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    args = TrainingArguments(output_dir=str(out), num_train_epochs=3, per_device_train_batch_size=64,
                             learning_rate=0.05, save_strategy="epoch", logging_steps=1, report_to=[],
                             use_cpu=True, seed=0, remove_unused_columns=False, disable_tqdm=True,
                             dataloader_num_workers=0, lr_scheduler_type="constant", optim="sgd")
    trainer = Trainer(model=HFNet(), args=args, train_dataset=data,
                      callbacks=[TrajectoryCallback(store_path, every_n_steps=3, every_n_epochs=1)])
    trainer.train(resume_from_checkpoint=resume)


def test_transformers_callback_records_and_resumes_from_checkpoint(tmp_path):
    hf_train(tmp_path / "a", tmp_path / "a.zarr")
    hf_train(tmp_path / "b", tmp_path / "b.zarr")
    hf_train(tmp_path / "b", tmp_path / "b.zarr", resume=str(tmp_path / "b" / "checkpoint-4"))
    with TrajectoryStore.open(tmp_path / "a.zarr") as a, TrajectoryStore.open(tmp_path / "b.zarr") as b:
        assert a.steps.tolist() == [0, 3, 4, 6, 8, 9, 12]
        assert b.steps.tolist() == a.steps.tolist()
        assert b.attrs["truncations"] == [3]
        np.testing.assert_allclose(b.read(slice(None)), a.read(slice(None)), rtol=0, atol=1e-6)
