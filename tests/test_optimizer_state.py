"""Optional optimizer state per snapshot: recorded with the weights, committed with them, checksummed,
verified, read back by parameter name and loaded into an optimizer to resume exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trajstore import (CorruptSnapshotError, InvalidArgumentError, LayoutMismatchError, NonFiniteError, Recorder,
                       TrajectoryStore)
from trajstore.inspect import info, verify
from trajstore.recorder import open_for_recording

ROOT = Path(__file__).resolve().parents[1]
OPTIMIZERS = {
    "sgd-momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw-amsgrad": lambda params: torch.optim.AdamW(params, lr=1e-2, amsgrad=True),
}


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def train(model: nn.Module, opt, steps: range, on_step=None) -> None:
    """Deterministic steps: batch k is the same whatever run takes step k."""
    dtype = next(model.parameters()).dtype
    for k in steps:
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(100 + k)).to(dtype)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(k + 1)


def copy_state(opt) -> dict:
    return {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
            for i, s in opt.state_dict()["state"].items()}


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_state_recorded_read_and_resumed_exactly(tmp_path, kind, dtype):
    model = make_model(dtype)
    opt = OPTIMIZERS[kind](model.parameters())
    store = open_for_recording(tmp_path / "run.zarr", model, optimizer_state=True)
    rec = Recorder(store, model, every_n_steps=2, optimizer=opt, record_optimizer_state=True)
    rec.start()
    states, weights = {0: {}}, {0: {k: v.clone() for k, v in model.state_dict().items()}}

    def on_step(step):
        if rec.on_step(step):
            states[step], weights[step] = copy_state(opt), {k: v.clone() for k, v in model.state_dict().items()}

    train(model, opt, range(8), on_step)
    store.close()
    names = [n for n, _ in model.named_parameters()]
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert list(store.steps) == [0, 2, 4, 6, 8] and store.attrs["format_version"] == 3
        assert store.optimizer_state(0) == {}  # before the first step: no state
        for index, step in enumerate(store.steps):
            got = store.optimizer_state(index)
            want = {names[i]: s for i, s in states[int(step)].items()}
            assert got.keys() == want.keys()
            for name, keys in want.items():
                assert got[name].keys() == keys.keys()
                for key, value in keys.items():
                    assert got[name][key].dtype == value.dtype and torch.equal(got[name][key], value), (name, key)
        # resume from snapshot 2 (step 4) in a fresh model and optimizer: the same trajectory, bit for bit
        fresh = make_model(dtype, seed=9)
        fresh_opt = OPTIMIZERS[kind](fresh.parameters())
        store.load_into(fresh, 2)
        store.load_optimizer_state(fresh_opt, fresh, 2)
    train(fresh, fresh_opt, range(4, 8))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights[8].items())
    summary = info(tmp_path / "run.zarr")
    assert summary["optimizer_state"]["keys"] == sorted(states[8][0])
    assert 0 < summary["optimizer_state"]["bytes"] < summary["stored_bytes"]
    assert verify(tmp_path / "run.zarr").ok


def test_off_by_default_and_misuse_is_refused(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with TrajectoryStore.create(tmp_path / "plain.zarr", model) as plain:
        with pytest.raises(InvalidArgumentError, match="created without optimizer state"):
            plain.append(model, step=0, optimizer=opt)
        plain.append(model, step=0)
        assert plain.attrs["format_version"] == 1 and "optimizer" not in plain.group
        with pytest.raises(InvalidArgumentError, match="records no optimizer state"):
            plain.optimizer_state(0)
        with pytest.raises(InvalidArgumentError, match="created without optimizer state"):
            Recorder(plain, model, every_n_steps=1, optimizer=opt, record_optimizer_state=True)
    assert info(tmp_path / "plain.zarr")["optimizer_state"] is None
    with pytest.raises(InvalidArgumentError, match="created without optimizer state"):
        open_for_recording(tmp_path / "plain.zarr", model, optimizer_state=True)
    with TrajectoryStore.create(tmp_path / "opt.zarr", model, optimizer_state=True) as store:
        with pytest.raises(InvalidArgumentError, match="pass optimizer="):
            store.append(model, step=0)
        with pytest.raises(InvalidArgumentError, match="pass optimizer=opt"):
            Recorder(store, model, every_n_steps=1)
        with pytest.raises(InvalidArgumentError, match="needs the model"):
            store.append(model.state_dict(), step=0, optimizer=opt)
        other = make_model()
        with pytest.raises(LayoutMismatchError, match="not one of the model's"):
            store.append(model, step=0, optimizer=torch.optim.SGD(other.parameters(), lr=0.1))
        assert len(store) == 0  # nothing of the refused appends was recorded


class Factored(torch.optim.Optimizer):
    """State of another shape than the parameter's (as Adafactor's row statistics)."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["row"] = torch.zeros(p.shape[0] + 1)


def test_state_trajstore_cannot_record_and_nonfinite_state(tmp_path):
    model = make_model()
    with TrajectoryStore.create(tmp_path / "run.zarr", model, optimizer_state=True) as store:
        opt = Factored(model.parameters())
        opt.step()
        with pytest.raises(InvalidArgumentError, match="'row' of tensor '0.weight' has shape"):
            store.append(model, step=0, optimizer=opt)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train(model, sgd, range(1))
        sgd.state[model[0].bias]["sub/key"] = torch.zeros(8)  # not one zarr node name
        with pytest.raises(InvalidArgumentError, match="'sub/key' of tensor '0.bias' cannot be stored"):
            store.append(model, step=0, optimizer=sgd)
        del sgd.state[model[0].bias]["sub/key"]
        sgd.state[model[2].bias]["momentum_buffer"][0] = float("nan")
        with pytest.raises(NonFiniteError, match="optimizer state 'momentum_buffer'"):
            store.append(model, step=1, optimizer=sgd)
        assert len(store) == 0
        store.append(model, step=1, optimizer=sgd, allow_nonfinite=True)
    report = verify(tmp_path / "run.zarr")
    assert report.ok, report.to_json()  # recorded on purpose
    assert store.attrs["committed"] == 1


def _adam_run_with_a_flipped_state_byte(tmp_path, key: str) -> torch.nn.Module:
    """4 Adam snapshots with their state in run.zarr, then one bit of row 2's ``key`` shard flipped; the model."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with TrajectoryStore.create(tmp_path / "run.zarr", model, optimizer_state=True) as store:
        for step in range(4):
            train(model, opt, range(step, step + 1))
            store.append(model, step=step, optimizer=opt)
    shard = tmp_path / "run.zarr" / "optimizer" / key / "values" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    return model


def test_corrupt_state_chunk_is_found_and_named(tmp_path):
    model = _adam_run_with_a_flipped_state_byte(tmp_path, "exp_avg_sq")  # in row 2
    report = verify(tmp_path / "run.zarr")
    assert not report.ok and list(report.problems) == [2]
    assert "optimizer state 'exp_avg_sq' unreadable" in report.problems[2][0]
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        with pytest.raises(CorruptSnapshotError, match="optimizer state 'exp_avg_sq' of snapshot 2"):
            store.optimizer_state(2)
        with pytest.raises(CorruptSnapshotError):
            store.load_optimizer_state(torch.optim.Adam(model.parameters()), model, 2)
        assert set(store.optimizer_state(3)["0.weight"]) == {"exp_avg", "exp_avg_sq", "step"}
    (tmp_path / "run.zarr" / "optimizer" / "exp_avg" / "present" / "c" / "1" / "0").unlink()
    assert sorted(verify(tmp_path / "run.zarr").problems) == [1, 2]


def test_truncation_leaves_no_stale_state(tmp_path):
    """A resumed run that rewrites rows with other state keys: nothing of the dropped rows shows through."""
    model = make_model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    with TrajectoryStore.create(tmp_path / "run.zarr", model, optimizer_state=True) as store:
        for step in range(5):
            train(model, adam, range(step, step + 1))
            store.append(model, step=step, optimizer=adam)
        store.truncate_after_step(1)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # no state at all
        store.append(model, step=2, optimizer=sgd)
        momentum = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        train(model, momentum, range(1))
        store.append(model, step=3, optimizer=momentum)
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert set(store.optimizer_state(1)["0.weight"]) == {"exp_avg", "exp_avg_sq", "step"}
        assert store.optimizer_state(2) == {}
        assert {k for s in store.optimizer_state(3).values() for k in s} == {"momentum_buffer"}
        assert store.optimizer_state_keys == ["exp_avg", "exp_avg_sq", "momentum_buffer", "step"]
    assert verify(tmp_path / "run.zarr").ok


KILL_WRITER = """
import sys, torch
from torch import nn
from trajstore import TrajectoryStore
sys.path.insert(0, sys.argv[3])
from test_optimizer_state import fill_row
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 100))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model(torch.randn(4, 300)).sum().backward()
opt.step()
store = TrajectoryStore.open(sys.argv[1], "a") if sys.argv[2] == "open" else \\
    TrajectoryStore.create(sys.argv[1], model, optimizer_state=True, chunk_size=4096, shard_size=8192)
step = int(store.steps[-1]) + 1 if len(store) else 0
print("ready", flush=True)
while True:
    fill_row(model, opt, step)
    store.append(model, step=step, optimizer=opt)
    step += 1
"""


def fill_row(model: nn.Module, opt, step: int) -> None:
    """Weights and Adam state that tell the step they belong to (so a row mixing two appends shows)."""
    with torch.no_grad():
        for j, p in enumerate(model.parameters()):
            gen = torch.Generator().manual_seed(step * 10 + j)
            p.copy_(torch.randn(p.shape, generator=gen))
            opt.state[p]["exp_avg"].copy_(torch.randn(p.shape, generator=gen))
            opt.state[p]["exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen))
            opt.state[p]["step"].fill_(step)


def test_a_kill_never_leaves_a_snapshot_with_half_its_state(tmp_path):
    """SIGKILL a writer mid-stream (45 shard files a row: a kill lands inside a row's writes): every committed
    snapshot has all of its own state, checksummed; the store then takes appends again, overwriting the rest."""
    path = tmp_path / "run.zarr"
    model = nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 100))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 300)).sum().backward()
    opt.step()
    proc = subprocess.Popen([sys.executable, "-c", KILL_WRITER, str(path), "create", str(Path(__file__).parent)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def check(rows) -> None:
        report = verify(path)
        assert report.ok, report.to_json()
        with TrajectoryStore.open(path) as store:
            for i in rows(len(store)):
                fill_row(model, opt, int(store.steps[i]))
                state = store.optimizer_state(i)
                assert np.array_equal(store.read(i), torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
                for name, p in model.named_parameters():
                    assert all(torch.equal(state[name][key], opt.state[p][key]) for key in opt.state[p]), (i, name)

    check(lambda t: (0, t - 1))  # the first, and the last committed
    with pytest.warns(UserWarning, match="broke a stale lock"), TrajectoryStore.open(path, "a") as store:
        t = len(store)
        assert t >= 2 and store.group["params"].shape[0] > t  # the killed writer had grown the arrays
        for step in range(int(store.steps[-1]) + 1, int(store.steps[-1]) + 3):
            fill_row(model, opt, step)
            store.append(model, step=step, optimizer=opt)
    check(lambda t: range(t - 3, t))


MULTI = """
import json, os, sys, torch, torch.distributed as dist
from torch import nn
from trajstore import TrajectoryStore
rank = int(sys.argv[2])
dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{sys.argv[3]}")
model = nn.Linear(3, 2)
try:
    TrajectoryStore.create(sys.argv[1], model, optimizer_state=True)
    out = "created"
except Exception as exc:
    out = f"{type(exc).__name__}: {exc}"
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_multiprocess_recording_refuses_optimizer_state(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, "-c", MULTI, str(tmp_path / "run.zarr"), str(rank), port], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1]).startswith("InvalidArgumentError: TrajectoryStore.create(..., "
                                                                   "optimizer_state=True): optimizer state cannot be "
                                                                   "recorded in a multi-process job")
    assert not (tmp_path / "run.zarr").exists()  # refused before anything was written


def _check_final_state(path, model: nn.Module, opt) -> None:
    """The store's last snapshot holds the trainer's final weights and optimizer state."""
    with TrajectoryStore.open(path) as store:
        state = store.optimizer_state(-1)
        assert np.array_equal(store.read(-1), torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        for name, p in model.named_parameters():
            want = opt.state[p]
            assert want and all(torch.equal(torch.as_tensor(state[name][k]), torch.as_tensor(v))
                                for k, v in want.items()), name


def test_lightning_callback_records_the_trainers_optimizer(tmp_path):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from trajstore.integrations.lightning import TrajectoryCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def training_step(self, batch, _):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    data = TensorDataset(torch.randn(64, 6, generator=torch.Generator().manual_seed(0)))
    module = Module()
    trainer = pl.Trainer(max_steps=4, default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                         enable_model_summary=False, accelerator="cpu", enable_checkpointing=False,
                         callbacks=[TrajectoryCallback(tmp_path / "run.zarr", every_n_steps=2, optimizer_state=True)])
    trainer.fit(module, DataLoader(data, batch_size=16))
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == [0, 2, 4] and store.optimizer_state(0) == {}
    _check_final_state(tmp_path / "run.zarr", module, trainer.optimizers[0])


def test_transformers_callback_records_the_trainers_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from trajstore.integrations.transformers import TrajectoryCallback

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": out.pow(2).mean(), "logits": out}

    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=16,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    model = Net()
    trainer = Trainer(model=model, args=args, train_dataset=[{"x": row} for row in x],
                      callbacks=[TrajectoryCallback(tmp_path / "run.zarr", every_n_steps=2, optimizer_state=True)])
    trainer.train()
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == [0, 2, 4] and set(store.optimizer_state_keys) >= {"exp_avg", "exp_avg_sq"}
    _check_final_state(tmp_path / "run.zarr", model, trainer.optimizer)


class ScaledLinear(nn.Module):
    """A 0-d parameter (per-tensor state: Adam's moments land in 'scalars') and a linear layer."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.scale * self.lin(x)


def test_state_kind_appearing_late_is_healthy(tmp_path):
    """exp_avg starts as a 0-d tensor's scalar; elementwise values appear later: verify and repair say ok."""
    from trajstore.maintenance import repair

    torch.manual_seed(0)
    model = ScaledLinear()
    model.lin.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with TrajectoryStore.create(tmp_path / "run.zarr", model, optimizer_state=True) as store:
        for step in range(3):
            model(torch.randn(4, 3)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            store.append(model, step=step, optimizer=opt)
            model.lin.requires_grad_(True)  # its state (values arrays) appears at row 1
        store.flush()
        assert set(store.optimizer_state(0)) == {"scale"}
    report = verify(tmp_path / "run.zarr")
    assert report.ok, report.to_json()
    assert repair(tmp_path / "run.zarr", dry_run=True).action == "none"


def test_repair_truncates_at_corrupt_state(tmp_path):
    """A flipped byte in optimizer state: repair finds it (as verify does) and truncates there."""
    from trajstore.maintenance import repair

    _adam_run_with_a_flipped_state_byte(tmp_path, "exp_avg")  # in row 2
    dry = repair(tmp_path / "run.zarr", dry_run=True)
    assert dry.action == "truncate" and [d.index for d in dry.dropped if d.bad] == [2]
    assert "optimizer state 'exp_avg'" in dry.dropped[0].reasons[0]
    report = repair(tmp_path / "run.zarr")
    assert report.ok and report.committed_after == 2
    assert verify(tmp_path / "run.zarr").ok


def test_gc_removes_state_rows_beyond_committed(tmp_path):
    from trajstore.maintenance import gc

    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with TrajectoryStore.create(tmp_path / "run.zarr", model, optimizer_state=True) as store:
        for step in range(5):
            train(model, opt, range(step, step + 1))
            store.append(model, step=step, optimizer=opt)
        store.truncate(2)
    assert info(tmp_path / "run.zarr")["derived_bytes"]["temporary"] > 0
    removed = {item.path for item in gc(tmp_path / "run.zarr").removed}
    assert "optimizer/exp_avg/values/c/4/0" in removed and "optimizer/step/scalars/c/3/0" in removed
    assert info(tmp_path / "run.zarr")["derived_bytes"]["temporary"] == 0
    assert verify(tmp_path / "run.zarr").ok
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert set(store.optimizer_state(1)["0.weight"]) == {"exp_avg", "exp_avg_sq", "step"}


def test_mixed_dtype_model_state_is_exact(tmp_path):
    """bf16 + float32 model: a float32 tensor's state appearing after the bf16 one's is stored exactly
    (the key's dtype holds the whole layout), and 0-d parameters of both dtypes keep their state exact."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(1.0, dtype=torch.bfloat16))
            self.b = nn.Parameter(torch.tensor(1.0))
            self.lin16 = nn.Linear(3, 2).to(torch.bfloat16)
            self.lin32 = nn.Linear(3, 2)

        def loss(self, x):
            return (self.a.float() * 1.2345678 + self.b * 3.3333333
                    + self.lin16(x.bfloat16()).float().sum() + self.lin32(x).pow(2).sum())

    torch.manual_seed(0)
    model = Mixed()
    model.lin32.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with TrajectoryStore.create(tmp_path / "run.zarr", model, optimizer_state=True) as store:
        for step in range(2):
            model.loss(torch.randn(4, 3)).backward()
            opt.step()
            opt.zero_grad()
            store.append(model, step=step, optimizer=opt)
            model.lin32.requires_grad_(True)  # float32 elementwise state from row 1 on
        store.flush()
        recorded = store.optimizer_state(1)
        for name, p in model.named_parameters():
            live = opt.state[p]["momentum_buffer"]
            assert torch.equal(recorded[name]["momentum_buffer"].to(live.dtype), live), name
            assert torch.equal(recorded[name]["momentum_buffer"].double(), live.double()), name
        fresh = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        store.load_optimizer_state(fresh, model, 1)
        for p in model.parameters():
            assert fresh.state[p]["momentum_buffer"].dtype == p.dtype
            assert torch.equal(fresh.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    assert verify(tmp_path / "run.zarr").ok


def test_state_of_another_optimizer_kind_is_refused(tmp_path):
    """Adam's moments never load silently into an SGD (fresh, or with its own momentum state)."""
    model = make_model()
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    with TrajectoryStore.create(tmp_path / "run.zarr", model, optimizer_state=True) as store:
        train(model, adam, range(2))
        store.append(model, step=0, optimizer=adam)
        store.flush()
        fresh_sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        with pytest.raises(InvalidArgumentError, match=r"this SGD keeps \['momentum_buffer'\]"):
            store.load_optimizer_state(fresh_sgd, model, 0)
        assert not fresh_sgd.state  # nothing was loaded
        trained_sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        train(model, trained_sgd, range(1))
        with pytest.raises(InvalidArgumentError, match="exp_avg"):
            store.load_optimizer_state(trained_sgd, model, 0)
        amsgrad = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)  # keeps max_exp_avg_sq too
        with pytest.raises(InvalidArgumentError, match="max_exp_avg_sq"):
            store.load_optimizer_state(amsgrad, model, 0)
        same = torch.optim.Adam(model.parameters(), lr=1e-2)
        store.load_optimizer_state(same, model, 0)
        assert all(torch.equal(same.state[p]["exp_avg"], adam.state[p]["exp_avg"]) for p in model.parameters())
