"""Checkpoint-folder import and the store CLI commands, through the real console entry point."""
import json
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app
from trajstore import TrajectoryStore

from .helpers import MixedNet, flat, sgd_steps

runner = CliRunner()


def checkpoint_folder(folder, epochs=12, wrap="module.", suffix=".pt"):
    torch.manual_seed(0)
    model = MixedNet()
    rows = []
    folder.mkdir()
    steps = sgd_steps(model, 10 * epochs)
    for epoch in range(epochs):
        rows.append(flat(model))
        sd = {wrap + k: v.clone() for k, v in model.state_dict().items()}
        if suffix == ".pt":
            torch.save(sd, folder / f"{epoch}.pt")
        else:
            save_file(sd, str(folder / f"{epoch}.safetensors"))
        for _ in range(10):
            next(steps)
    return model, np.stack(rows)


def test_import_pt_folder_in_natural_order_strips_prefixes_and_keeps_buffers_apart(tmp_path):
    model, rows = checkpoint_folder(tmp_path / "ckpts", wrap="module._orig_mod.")
    result = runner.invoke(app, ["import", str(tmp_path / "ckpts"), str(tmp_path / "run.zarr"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["snapshots"] == 12 and info["parameters"] == rows.shape[1]
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == list(range(12))  # 10.pt after 9.pt, not after 1.pt
        assert np.array_equal(store.read(slice(None)), rows)
        assert store.layout.names == [n for n, _ in model.named_parameters()]
        assert set(store.buffer_layout.names) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
        saved = torch.load(tmp_path / "ckpts" / "11.pt", weights_only=True)
        assert torch.equal(store.read_buffers(11)["bn.running_mean"], saved["module._orig_mod.bn.running_mean"])


def test_import_safetensors(tmp_path):
    checkpoint_folder(tmp_path / "st", epochs=3, wrap="", suffix=".safetensors")
    result = runner.invoke(app, ["import", str(tmp_path / "st"), str(tmp_path / "s.zarr"), "--pattern", "*.safetensors"])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    with TrajectoryStore.open(tmp_path / "s.zarr") as store:
        assert len(store) == 3
        for epoch in range(3):
            saved, got = load_file(str(tmp_path / "st" / f"{epoch}.safetensors")), store.state_dict(epoch)
            assert set(got) == set(saved)
            assert all(torch.equal(got[k], saved[k]) for k in saved)


def test_info_json_and_human_output_via_console_script(tmp_path):
    checkpoint_folder(tmp_path / "ckpts", epochs=3)
    runner.invoke(app, ["import", str(tmp_path / "ckpts"), str(tmp_path / "run.zarr")])
    proc = subprocess.run([sys.executable, "-m", "cli.main", "info", str(tmp_path / "run.zarr"), "--json"],
                          capture_output=True, text=True, check=True)
    data = json.loads(proc.stdout)
    assert data["snapshots"] == 3 and data["format_version"] == 1 and data["codec"] == "lossless"
    assert data["raw_bytes"] == 3 * data["parameters"] * 4
    assert data["compression_ratio"] == data["raw_bytes"] / data["snapshot_bytes"]
    human = runner.invoke(app, ["info", str(tmp_path / "run.zarr")])
    assert human.exit_code == 0 and "compression" in human.output and "format version" in human.output
    ok = runner.invoke(app, ["verify", str(tmp_path / "run.zarr")])
    assert ok.exit_code == 0 and "3 snapshots verified" in ok.output


def test_cli_errors_are_one_clear_line_and_nonzero(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Traceback" not in result.output
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["import", str(tmp_path / "empty"), str(tmp_path / "x.zarr")])
    assert result.exit_code == 2 and "no files match" in " ".join(result.output.split())
