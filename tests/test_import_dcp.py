"""Importing torch.distributed.checkpoint (DCP) folders (issue 9).

Real DCP saves on disk (single-process saves, and a real 2-process gloo run of an FSDP2
``fully_shard`` model), real stores, the real CLI; no mocks.
"""
import json
import os
import pickle
import shutil
import socket
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from typer.testing import CliRunner

from cli.main import app
from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError, TrajstoreError
from trajstore.importers import import_checkpoints

from .helpers import MixedNet, flat, sgd_steps

runner = CliRunner()


def save_dcp(folder: Path, state_dict: dict) -> None:
    """``dcp.save`` without a process group (DCP warns that it saves in a single process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state_dict, checkpoint_id=folder)


def dcp_run(folder: Path, names: list[str], layout: str = "nested") -> tuple[MixedNet, np.ndarray, list[dict]]:
    """Train MixedNet with Adam, saving a DCP checkpoint under ``folder/<name>`` for each name (in that
    order). ``layout``: ``nested`` {"model", "optim", "epoch"}, ``flat`` (the model's state dict with
    DDP's ``module.`` prefix), or ``ema`` {"model", "ema", "optim"}. Returns the model, the
    parameter rows, and each checkpoint's model state dict."""
    torch.manual_seed(0)
    model = MixedNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    steps = sgd_steps(model, 3 * len(names))
    rows, saved = [], []
    for i, name in enumerate(names):
        next(steps)
        nn.functional.mse_loss(model(torch.randn(4, 1, 8)), torch.zeros(4, 10)).backward()
        opt.step()
        opt.zero_grad()
        model_sd, optim_sd = get_state_dict(model, opt)
        if layout == "flat":
            state_dict = {"module." + k: v for k, v in model_sd.items()}
        elif layout == "ema":
            state_dict = {"model": model_sd, "ema": {k: v * 0.5 for k, v in model_sd.items()}, "optim": optim_sd}
        else:
            state_dict = {"model": model_sd, "optim": optim_sd, "epoch": i}
        save_dcp(folder / name, state_dict)
        rows.append(flat(model))
        saved.append({k: v.clone() for k, v in model_sd.items()})
    return model, np.stack(rows), saved


def test_nested_dcp_folders_import_the_model_in_natural_step_order_without_optimizer_state(tmp_path):
    model, rows, saved = dcp_run(tmp_path / "run", ["step_5", "step_10", "step_100"])
    assert sorted(os.listdir(tmp_path / "run")) == ["step_10", "step_100", "step_5"]  # not the import order
    import_checkpoints(tmp_path / "run", tmp_path / "run.zarr")
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == [5, 10, 100]
        assert np.array_equal(store.read(slice(None)), rows)
        assert store.layout.names == [n for n, _ in model.named_parameters()]  # "model." dropped, no optim state
        assert set(store.buffer_layout.names) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
        assert torch.equal(store.read_buffers(2)["bn.running_var"], saved[2]["bn.running_var"])
        assert store.metadata["pattern"] == "*/.metadata"


def test_cli_imports_flat_dcp_state_dicts_with_steps_given(tmp_path):
    model, rows, _ = dcp_run(tmp_path / "run", ["ckpt_a", "ckpt_b"], layout="flat")
    result = runner.invoke(app, ["import", str(tmp_path / "run"), str(tmp_path / "run.zarr"), "--pattern", "ckpt_*",
                                 "--steps", "100,300", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["snapshots"] == 2
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == [100, 300]
        assert np.array_equal(store.read(slice(None)), rows)
        assert store.layout.names == [n for n, _ in model.named_parameters()]  # "module." stripped


def test_key_chooses_the_weights_and_a_nested_dict_without_model_is_refused_naming_its_keys(tmp_path):
    _, _, saved = dcp_run(tmp_path / "ema", ["step_1", "step_2"], layout="ema")
    import_checkpoints(tmp_path / "ema", tmp_path / "model.zarr")  # default: the "model" entry
    import_checkpoints(tmp_path / "ema", tmp_path / "ema.zarr", key="ema")
    with TrajectoryStore.open(tmp_path / "model.zarr") as plain, TrajectoryStore.open(tmp_path / "ema.zarr") as ema:
        assert torch.equal(ema.state_dict(1)["fc.weight"], saved[1]["fc.weight"] * 0.5)
        assert torch.equal(plain.state_dict(1)["fc.weight"], saved[1]["fc.weight"])
    with pytest.raises(InvalidArgumentError, match=r"no tensors under key 'weights'.*'ema' \(\d+\), 'model'"):
        import_checkpoints(tmp_path / "ema", tmp_path / "bad.zarr", key="weights")

    model = MixedNet()  # a tutorial-style save: {"app": {"model": ..., "optim": ...}}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_dcp(tmp_path / "app" / "step_7", {"app": dict(zip(("model", "optim"), get_state_dict(model, opt)))})
    with pytest.raises(InvalidArgumentError, match=r"top-level keys .* 'app'.*key='app.model' \(--key app.model\)"):
        import_checkpoints(tmp_path / "app", tmp_path / "app.zarr")
    assert not (tmp_path / "app.zarr").exists()  # refused before anything was written
    result = runner.invoke(app, ["import", str(tmp_path / "app"), str(tmp_path / "app.zarr"), "--key", "app.model"])
    assert result.exit_code == 0, result.output
    with TrajectoryStore.open(tmp_path / "app.zarr") as store:
        assert store.steps.tolist() == [7]
        assert np.array_equal(store.read(0), flat(model))

    torch.save({"model": model.state_dict(), "ema": {"fc.weight": torch.ones(10, 64)}}, tmp_path / "app" / "3.pt")
    import_checkpoints(tmp_path / "app", tmp_path / "pt.zarr", "*.pt", key="ema")  # key= for a .pt file too
    with TrajectoryStore.open(tmp_path / "pt.zarr") as store:
        assert store.layout.names == ["fc.weight"]


def test_folders_that_are_not_dcp_checkpoints_are_refused_before_anything_is_written(tmp_path):
    (tmp_path / "notes" / "step_1").mkdir(parents=True)
    (tmp_path / "notes" / "step_1" / "log.txt").write_text("not a checkpoint")
    with pytest.raises(InvalidArgumentError, match=r"no files match '\*\.pt' .* no folder in it is a DCP checkpoint"):
        import_checkpoints(tmp_path / "notes", tmp_path / "a.zarr")
    with pytest.raises(InvalidArgumentError, match=r"not DCP checkpoints \(no \.metadata\), e\.g\. step_1"):
        import_checkpoints(tmp_path / "notes", tmp_path / "a.zarr", "step_*")

    dcp_run(tmp_path / "run", ["step_1", "step_2"])
    with pytest.raises(InvalidArgumentError, match=r"is one DCP checkpoint.*--pattern 'step_1'"):
        import_checkpoints(tmp_path / "run" / "step_1", tmp_path / "a.zarr")
    (tmp_path / "run" / "step_2" / ".metadata").unlink()  # a save that did not finish
    for pattern in ([], ["--pattern", "step_*"]):
        result = runner.invoke(app, ["import", str(tmp_path / "run"), str(tmp_path / "a.zarr"), *pattern])
        assert result.exit_code == 2 and "step_2 holds .distcp files but no .metadata" in result.output
    assert not (tmp_path / "a.zarr").exists()

    (tmp_path / "run" / "step_2" / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(TrajstoreError, match=r"cannot read the DCP metadata file .*step_2/\.metadata"):
        import_checkpoints(tmp_path / "run", tmp_path / "a.zarr", "step_2")


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_metadata_that_would_run_code_when_unpickled_is_refused_and_not_run(tmp_path):
    dcp_run(tmp_path / "run", ["step_1"])
    payload = _Payload()
    payload.target = str(tmp_path / "pwned")
    (tmp_path / "run" / "step_1" / ".metadata").write_bytes(pickle.dumps(payload))
    with pytest.raises(TrajstoreError, match=r"mkdir, which is not part of DCP's metadata"):
        import_checkpoints(tmp_path / "run", tmp_path / "a.zarr")
    assert not (tmp_path / "pwned").exists()


def test_missing_or_corrupt_distcp_file_is_named_and_commits_nothing_for_its_checkpoint(tmp_path):
    _, rows, _ = dcp_run(tmp_path / "run", ["step_1", "step_2", "step_3"])
    data = tmp_path / "run" / "step_3" / "__0_0.distcp"
    original = data.read_bytes()
    data.unlink()
    with pytest.raises(TrajstoreError, match=r"DCP data file .*step_3/__0_0\.distcp .* is missing"):
        import_checkpoints(tmp_path / "run", tmp_path / "run.zarr")
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == [1, 2]  # the checkpoints before it are committed, nothing of step_3

    data.write_bytes(np.random.default_rng(0).integers(0, 256, len(original), dtype=np.uint8).tobytes())
    with pytest.raises(TrajstoreError, match=r"cannot read DCP data file .*step_3/__0_0\.distcp"):
        import_checkpoints(tmp_path / "run", tmp_path / "run.zarr", resume=True)
    data.write_bytes(original[:100])  # cut inside the first model tensor
    with pytest.raises(TrajstoreError, match=r"step_3/__0_0\.distcp is truncated"):
        import_checkpoints(tmp_path / "run", tmp_path / "run.zarr", resume=True)
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert len(store) == 2

    data.write_bytes(original)  # the file copied back: the import resumes and finishes
    import_checkpoints(tmp_path / "run", tmp_path / "run.zarr", resume=True)
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == [1, 2, 3] and np.array_equal(store.read(slice(None)), rows)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fsdp2_rank(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo job: FSDP2 ``fully_shard`` a small model, train it, and save two
    DCP checkpoints of {"model", "optim"}; rank 0 also saves the gathered full parameters."""
    from torch.distributed.fsdp import fully_shard

    if sys.platform == "linux":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback, whatever the host name resolves to
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3))  # 7 and 3 rows: uneven
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(rank)
    full = {}
    for step in (10, 20):
        for _ in range(3):
            model(torch.randn(8, 5, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{out}/step_{step}")
        full[step] = {name: p.full_tensor() for name, p in model.named_parameters()}  # a collective
    if rank == 0:
        torch.save(full, f"{out}/full.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_fsdp2_sharded_save_from_two_ranks_imports_as_the_full_tensors(tmp_path):
    out = tmp_path / "fsdp"
    out.mkdir()
    torch.multiprocessing.spawn(_fsdp2_rank, args=(_free_port(), str(out)), nprocs=2, join=True)
    assert sorted(p.name for p in (out / "step_10").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    full = torch.load(out / "full.pt", weights_only=True)
    shutil.move(out / "full.pt", tmp_path / "full.pt")
    result = runner.invoke(app, ["import", str(out), str(tmp_path / "fsdp.zarr"), "--json"])
    assert result.exit_code == 0, result.output
    with TrajectoryStore.open(tmp_path / "fsdp.zarr") as store:
        assert store.steps.tolist() == [10, 20]
        assert store.layout.names == list(full[10])
        for i, step in enumerate((10, 20)):
            snapshot = store.state_dict(i)
            for name, tensor in full[step].items():
                assert torch.equal(snapshot[name], tensor), (step, name)
        assert not torch.equal(store.state_dict(0)["0.weight"], store.state_dict(1)["0.weight"])  # trained
