"""Issue 11, the CLI's papercuts and ``trajstore export``: help texts printed as written, one-line usage
errors, typer Enums for choices, ``--name`` defaulting to the only subspace, ``info`` sizes (the
trajectory's own bytes apart from derived data), data on stdout, ``info``/``verify`` without torch,
``project --json``, and export of snapshots and of a run's final weights to .pt / .safetensors."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from pipeline import extract_subspace, open_subspace
from trajstore import TrajectoryStore

from .synthetic import trajectory, write_store

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def one_line(result, code: int = 2) -> str:
    """The command failed with ``code`` and printed a single line, no traceback; returns it."""
    out = result.output.strip()
    assert result.exit_code == code, (result.exit_code, out, result.exception)
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    return out


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(10, 3_000, rank=3))
    return path


# -- help texts ------------------------------------------------------------------------------------
def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_every_help_text_of_every_command_is_printed_as_written():
    """No rich markup, no emoji codes: ``A:B:S`` stays A:B:S (rich renders ``:B:`` as an emoji) and
    ``[tcp://]HOST:PORT`` keeps its brackets (rich takes ``[tcp://]`` for a style tag)."""
    group = typer.main.get_command(app)
    seen = 0
    for name, command in group.commands.items():
        result = runner.invoke(app, [name, "--help"], terminal_width=100)
        assert result.exit_code == 0, result.output
        shown = _squash(result.output)
        texts = [command.help or ""] + [p.help for p in command.params if getattr(p, "help", None)]
        for text in texts:
            assert _squash(text) in shown, (name, text)
            seen += 1
        assert "🅱" not in result.output and "╭" not in result.output  # no emoji, no rich panel
    assert seen > 60
    assert "A:B:S" in runner.invoke(app, ["train", "--help"]).output
    assert "[tcp://]HOST:PORT" in runner.invoke(app, ["extract", "--help"], terminal_width=200).output


def test_choice_options_are_enums_listed_in_help_and_bad_ones_are_one_line():
    extract_help = runner.invoke(app, ["extract", "--help"]).output
    train_help = runner.invoke(app, ["train", "--help"], terminal_width=200).output
    assert "gram|randomized" in extract_help
    assert "psgd|pbfgs" in train_help and "sgd|random-subspace|psgd|pbfgs|none" in train_help
    out = one_line(runner.invoke(app, ["train", "digits-mlp", "--run", "x", "--optimizer", "adam"]))
    assert "--optimizer" in out and "'psgd', 'pbfgs'" in out
    out = one_line(runner.invoke(app, ["extract", "nowhere.zarr", "--dim", "two"]))
    assert "--dim" in out and "extract --help" in out
    assert "Missing argument 'RUN'" in one_line(runner.invoke(app, ["verify"]))
    assert "nosuch" in one_line(runner.invoke(app, ["nosuch"]))


def test_demo_help_agrees_with_the_readme():
    readme = (ROOT / "README.md").read_text()
    quick = re.search(r"`trajstore demo --quick` takes about (\d+ s)", readme).group(1)
    assert quick in runner.invoke(app, ["demo", "--help"]).output.replace("\n", " ")
    assert not re.search(r"\]\(\.\./|`\.\./", readme[readme.index("## Command line"):readme.index("## How it works")])


# -- --name: the only subspace ----------------------------------------------------------------------
def test_spectrum_and_project_pick_the_only_subspace_and_list_several(store, tmp_path):
    missing = one_line(runner.invoke(app, ["spectrum", str(store)]))
    assert "no subspace" in missing and "trajstore extract" in missing
    extract_subspace(store, dim=2, name="dldr")  # what the demo and `trajstore train` call it
    spectrum = runner.invoke(app, ["spectrum", str(store), "--json"])
    assert spectrum.exit_code == 0, spectrum.output
    assert json.loads(spectrum.stdout)["name"] == "dldr"
    plot = tmp_path / "plane.png"
    projected = runner.invoke(app, ["project", str(store), "--plot", str(plot), "--json"])
    assert projected.exit_code == 0, projected.output
    data = json.loads(projected.stdout)
    sub = open_subspace(store, "dldr")
    assert data["name"] == "dldr" and data["plot"] == str(plot) and plot.stat().st_size > 0
    assert np.allclose(data["coordinates"], sub.coordinates()[:, :2])
    assert data["snapshots"] == sub.snapshots and len(data["steps"]) == len(sub.snapshots)

    extract_subspace(store, dim=3, name="wide")
    for command in (["spectrum", str(store)], ["project", str(store), "--plot", str(plot)]):
        out = one_line(runner.invoke(app, command))
        assert "2 subspaces" in out and "dldr, wide" in out and "--name" in out
    chosen = runner.invoke(app, ["spectrum", str(store), "--name", "wide", "--json"])
    assert json.loads(chosen.stdout)["dim"] == 3


# -- info: the trajectory's own bytes, derived data apart; data on stdout ---------------------------
def _tree_bytes(root: Path, skip: tuple[str, ...] = ()) -> int:
    return sum(f.stat().st_size for f in root.rglob("*")
               if f.is_file() and f.relative_to(root).parts[0] not in skip)


def test_info_counts_the_trajectory_apart_from_gram_subspaces_and_temporary_files(store):
    before = json.loads(runner.invoke(app, ["info", str(store), "--json"]).stdout)
    extract_subspace(store, dim=2, name="dldr")
    (store / "params" / "c" / "3" / "0.0123456789abcdef0123456789abcdef.partial").write_bytes(b"x" * 1000)
    (store / "params" / "c" / "10").mkdir()  # a row beyond committed, as a killed writer leaves it
    (store / "params" / "c" / "10" / "0").write_bytes(b"y" * 500)
    result = runner.invoke(app, ["info", str(store), "--json"])
    data = json.loads(result.stdout)
    own = _tree_bytes(store, skip=("gram", "subspaces")) - 1500
    assert data["stored_bytes"] == own == before["stored_bytes"]  # extraction changes nothing of it
    encoded = sum(f.stat().st_size for f in (store / "params" / "c").rglob("*")
                  if f.is_file() and int(f.relative_to(store / "params" / "c").parts[0]) < 10) - 1000
    assert data["snapshot_bytes"] == encoded < own
    assert data["compression_ratio"] == data["raw_bytes"] / encoded == before["compression_ratio"]
    derived = data["derived_bytes"]
    assert derived["gram"] == _tree_bytes(store / "gram") > 0
    assert derived["subspaces"] == _tree_bytes(store / "subspaces") > 0
    assert set(derived["per_subspace"]) == {"dldr"} and derived["per_subspace"]["dldr"] > 0
    assert derived["temporary"] == 1500
    assert data["total_bytes"] == _tree_bytes(store) == own + derived["gram"] + derived["subspaces"] + 1500

    human = runner.invoke(app, ["info", str(store)], terminal_width=120)
    assert human.exit_code == 0 and human.stderr == ""
    for label in ("stored (trajectory)", "compression", "gram cache", "subspaces", "temporary", "total on disk"):
        assert label in human.stdout, human.stdout
    assert f"{data['compression_ratio']:.3f}x" in human.stdout


def test_verify_and_spectrum_print_their_data_on_stdout(store):
    verified = runner.invoke(app, ["verify", str(store)])
    assert verified.exit_code == 0 and "10 snapshots verified" in verified.stdout
    assert "verified" not in verified.stderr  # only the progress bar goes there
    extract_subspace(store, dim=2)
    table = runner.invoke(app, ["spectrum", str(store), "--top", "3"])
    assert table.exit_code == 0 and "cumulative" in table.stdout and table.stderr == ""


def test_info_and_verify_do_not_import_torch(store):
    script = ("import json, sys, time\n"
              "t0 = time.perf_counter()\n"
              "from cli.main import app\n"
              "loaded = time.perf_counter() - t0\n"
              "codes = []\n"
              "for command in ('info', 'verify'):\n"
              "    try:\n"
              f"        app([command, {str(store)!r}, '--json'])\n"
              "    except SystemExit as exc:\n"
              "        codes.append(exc.code)\n"
              "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules, 'dask': 'dask' in sys.modules,\n"
              "                  'import_s': loaded}), file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["codes"] == [0, 0], proc.stderr
    assert not report["torch"], report
    assert not report["dask"], report


# -- export ------------------------------------------------------------------------------------------
class TiedNet(nn.Module):
    """A tied embedding / output matrix, a float64 parameter and BatchNorm buffers."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x):
        return self.head(self.bn(self.emb(x))) * self.scale.sum().float()


def _recorded(path: Path, model: nn.Module, steps: int = 4) -> list[dict]:
    """Record ``model`` (with buffers) at steps 0, 10, ...; returns its state_dicts as recorded."""
    torch.manual_seed(0)
    states = []
    with TrajectoryStore.create(path, model, buffers=True) as store:
        for i in range(steps):
            model.train()
            model(torch.randint(0, 10, (8,)))  # moves the BN running statistics
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            store.append(model, step=10 * i)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def _check_loads(state: dict, expected: dict) -> None:
    fresh = TiedNet()
    fresh.load_state_dict(state)  # strict: every parameter, tied name and buffer is there
    assert fresh.head.weight is fresh.emb.weight
    for key, value in fresh.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key


def test_export_a_snapshot_to_pt_and_safetensors_loads_strictly(tmp_path):
    from safetensors.torch import load_file

    states = _recorded(tmp_path / "run.zarr", TiedNet())
    pt, st = tmp_path / "last.pt", tmp_path / "step20.safetensors"
    result = runner.invoke(app, ["export", str(tmp_path / "run.zarr"), "-1", str(pt), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["index"] == 3 and data["step"] == 30 and data["buffers"] is True
    assert data["aliases"] == {"head.weight": "emb.weight"}
    _check_loads(torch.load(pt, weights_only=True), states[3])
    result = runner.invoke(app, ["export", str(tmp_path / "run.zarr"), "step=20", str(st)])
    assert result.exit_code == 0, result.output
    _check_loads(load_file(str(st)), states[2])
    assert oct(st.stat().st_mode & 0o777) == oct(pt.stat().st_mode & 0o777)  # not safetensors' private 0600

    before = pt.read_bytes()
    refused = one_line(runner.invoke(app, ["export", str(tmp_path / "run.zarr"), "0", str(pt)]))
    assert "already exists" in refused and "--overwrite" in refused and pt.read_bytes() == before
    assert runner.invoke(app, ["export", str(tmp_path / "run.zarr"), "0", str(pt), "--overwrite"]).exit_code == 0
    _check_loads(torch.load(pt, weights_only=True), states[0])
    for bad, why in (("step=25", "no snapshot of step 25"), ("4", "out of range"), ("-5", "out of range"),
                     ("last", "step=N")):
        assert why in one_line(runner.invoke(app, ["export", str(tmp_path / "run.zarr"), bad, str(tmp_path / "x.pt")]))
    assert ".safetensors" in one_line(runner.invoke(app, ["export", str(tmp_path / "run.zarr"), "0",
                                                          str(tmp_path / "x.npz")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "run.zarr", "step20.safetensors"]  # no temp


def test_export_of_a_store_recorded_sharded_gives_the_parameter_order(tmp_path):
    """A format-2 store (FSDP2's rank-major column map with padding, written here by one process)."""
    from trajstore import distributed
    from trajstore._creating import chunking, create_files
    from trajstore.columns import ColumnMap
    from trajstore.layout import ParamLayout

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    layout = ParamLayout.from_module(model)
    pieces = distributed.rank_pieces(layout, 2)
    chunk, shard = chunking(max(sum(n for _, n in rank) for rank in pieces), 8, 16)
    columns = ColumnMap.rank_major(layout.n, pieces, shard)
    path = str(tmp_path / "sharded.zarr")
    group, meta, lock = create_files(path, model, codec="lossless", metadata=None, overwrite=False, buffers=False,
                                     chunk_size=chunk, shard_size=shard, storage_options=None, durable=False,
                                     break_lock=False, columns=columns)
    with TrajectoryStore(path, group, meta, "a", lock, None) as store:
        store.append(model, step=0)
    with TrajectoryStore.open(path) as store:
        assert not store.columns.is_identity and store.n_columns > store.n_params
    result = runner.invoke(app, ["export", path, "0", str(tmp_path / "w.safetensors")])
    assert result.exit_code == 0, result.output
    assert "no buffers" in result.stderr
    from safetensors.torch import load_file

    fresh = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_export_the_final_weights_of_a_train_run(tmp_path):
    run = tmp_path / "run"
    trained = runner.invoke(app, ["train", "digits-mlp", "--run", str(run), "--sample-epochs", "2", "--dim", "2",
                                  "--subspace-epochs", "1", "--baseline", "none", "--batch-size", "512", "--json"])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["export", str(run), "final-psgd", str(tmp_path / "psgd.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["buffers"] is True
    from safetensors.torch import load_file

    from pipeline.experiments.recipes import build_recipe

    final = torch.load(run / "final-psgd.pt", weights_only=True)
    model = build_recipe("digits-mlp", seed=0, batch_size=64).model
    model.load_state_dict(load_file(str(tmp_path / "psgd.safetensors")))
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    first = runner.invoke(app, ["export", str(run), "0", str(tmp_path / "w0.pt")])  # the run's trajectory
    assert first.exit_code == 0, first.output
    with TrajectoryStore.open(run / "trajectory.zarr") as store:
        expected = store.state_dict(0)
    got = torch.load(tmp_path / "w0.pt", weights_only=True)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    out = one_line(runner.invoke(app, ["export", str(run), "final-pbfgs", str(tmp_path / "b.pt")]))
    assert "final-psgd" in out
    out = one_line(runner.invoke(app, ["export", str(run / "trajectory.zarr"), "final-psgd", str(tmp_path / "c.pt")]))
    assert "not one" in out


def test_a_missing_safetensors_package_is_one_line_with_the_pip_command(store, tmp_path):
    """safetensors made unimportable the way Python itself marks a module absent (None in sys.modules)."""
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    (ckpts / "0.safetensors").write_bytes(b"")
    script = ("import sys\n"
              "sys.modules['safetensors'] = None\n"
              "from typer.testing import CliRunner\n"
              "from cli.main import app\n"
              "import json\n"
              f"a = CliRunner().invoke(app, ['export', {str(store)!r}, '0', {str(tmp_path / 'w.safetensors')!r}])\n"
              f"b = CliRunner().invoke(app, ['import', {str(ckpts)!r}, {str(tmp_path / 'i.zarr')!r}, "
              "'--pattern', '*.safetensors'])\n"
              "print(json.dumps([[a.exit_code, a.output], [b.exit_code, b.output]]))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for code, output in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert code == 2 and len(output.strip().splitlines()) == 1, output
        assert "pip install safetensors" in output and "trajstore[safetensors]" in output, output
    assert not (tmp_path / "w.safetensors").exists()
