"""Hostile-review findings 9 (import: tied aliases, steps and epochs from file names) and 12 (CLI
arguments that used to wait, print a traceback, poison a run folder or render as emoji)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipeline import extract_subspace
from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError, LayoutMismatchError
from trajstore.importers import import_checkpoints

from .test_api_import import HF_PATTERN, TinyGPT, hf_folder, params_of, train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
BAR = "━"


def one_line_error(result, code: int = 2) -> str:
    out = result.output.strip()
    assert result.exit_code == code, (result.exit_code, out, result.exception)
    assert "Traceback" not in out and BAR not in out, out
    assert len(out.splitlines()) == 1, out
    return out


# -- 9a: tied aliases must hold the same values ---------------------------------------------------

def tied_folder(root: Path, bad: int | None, k: int = 3) -> list[dict]:
    """``0.pt`` .. of a TinyGPT whose files keep both tied keys; in file ``bad`` ``lm_head.weight``
    differs from ``wte.weight`` (an untied model's checkpoint)."""
    torch.manual_seed(0)
    model, snaps = TinyGPT(), []
    root.mkdir(parents=True)
    for i in range(k):
        sd = {key: v.clone() for key, v in model.state_dict().items()}
        if i == bad:
            sd["lm_head.weight"] = sd["wte.weight"] + 0.25
        torch.save(sd, root / f"{i}.pt")
        snaps.append(params_of(model))
        train(model, 2, seed=i)
    return snaps


@pytest.mark.parametrize("bad", [0, 2])
def test_like_refuses_a_file_whose_tied_keys_hold_different_values(tmp_path, bad):
    tied_folder(tmp_path / "ckpts", bad)
    with pytest.raises(LayoutMismatchError) as info:
        import_checkpoints(tmp_path / "ckpts", tmp_path / "run.zarr", like=TinyGPT())
    message = str(info.value)
    assert f"{bad}.pt" in message and "lm_head.weight" in message and "wte.weight" in message, message
    if bad == 0:
        assert not (tmp_path / "run.zarr").exists()
    else:  # the files before it are imported, the bad one is not
        with TrajectoryStore.open(tmp_path / "run.zarr") as store:
            assert len(store) == bad


def test_like_a_store_checks_the_tie_too_and_equal_tied_keys_import(tmp_path):
    with TrajectoryStore.create(tmp_path / "ref.zarr", TinyGPT(), buffers=True):
        pass
    tied_folder(tmp_path / "bad", 1)
    with pytest.raises(LayoutMismatchError, match=r"1\.pt.*lm_head\.weight"):
        import_checkpoints(tmp_path / "bad", tmp_path / "run.zarr", like=tmp_path / "ref.zarr")
    snaps = tied_folder(tmp_path / "good", None)
    import_checkpoints(tmp_path / "good", tmp_path / "good.zarr", like=TinyGPT())
    with TrajectoryStore.open(tmp_path / "good.zarr") as store:
        assert len(store) == 3
        assert torch.equal(store.state_dict(2)["wte.weight"], snaps[2]["wte.weight"])


# -- 9b: which number of a file name is its step --------------------------------------------------

def named_folder(root: Path, names: list[str]) -> list[np.ndarray]:
    root.mkdir(parents=True)
    rows = []
    for i, name in enumerate(names):
        w = torch.full((4,), float(i))
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"w": w}, root / name)
        rows.append(w.numpy())
    return rows


@pytest.mark.parametrize("names, steps", [
    (["step100_acc0.81.pt", "step200_acc0.87.pt", "step300_acc0.90.pt"], [100, 200, 300]),
    (["model_global_step100_loss2.5.pt", "model_global_step250_loss1.5.pt"], [100, 250]),
    (["checkpoint-5_v2.pt", "checkpoint-10_v2.pt"], [5, 10]),
    (["iter_500_lr0.1.pt", "iter_1000_lr0.1.pt"], [500, 1000]),
    (["net_it3_b64.pt", "net_it7_b64.pt"], [3, 7]),
    (["epoch=0-step=120.pt", "epoch=1-step=240.pt"], [120, 240]),
    (["STEP-8-of-20.pt", "STEP-16-of-20.pt"], [8, 16]),
    (["ckpt_000120.pt", "ckpt_000240.pt"], [120, 240]),
    (["epoch=3.pt", "epoch=4.pt"], [3, 4]),
])
def test_a_labelled_step_wins_over_other_numbers_in_the_name(tmp_path, names, steps):
    rows = named_folder(tmp_path / "ckpts", names)
    import_checkpoints(tmp_path / "ckpts", tmp_path / "run.zarr")
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == steps
        assert np.array_equal(store.read(slice(None)), np.stack(rows))


@pytest.mark.parametrize("names", [
    ["resnet18_5.pt", "resnet18_6.pt"],
    ["acc0.81.pt", "acc0.87.pt"],
    ["run3/model_1_2.pt", "run3/model_2_2.pt"],
])
def test_several_unlabelled_numbers_are_refused_before_anything_is_written(tmp_path, names):
    named_folder(tmp_path / "ckpts", names)
    with pytest.raises(InvalidArgumentError, match=r"(?s)step.*steps="):
        import_checkpoints(tmp_path / "ckpts", tmp_path / "run.zarr", "**/*.pt")
    assert not (tmp_path / "run.zarr").exists()
    import_checkpoints(tmp_path / "ckpts", tmp_path / "pos.zarr", "**/*.pt", steps="position")
    import_checkpoints(tmp_path / "ckpts", tmp_path / "list.zarr", "**/*.pt", steps=[10, 30])
    with TrajectoryStore.open(tmp_path / "pos.zarr") as a, TrajectoryStore.open(tmp_path / "list.zarr") as b:
        assert a.steps.tolist() == [0, 1] and b.steps.tolist() == [10, 30]


def test_explicit_steps_are_checked(tmp_path):
    named_folder(tmp_path / "ckpts", ["a.pt", "b.pt", "c.pt"])
    for steps, match in (([1, 2], "3 files"), ([3, 2, 1], "does not follow"), ([0, 1, -1], "steps"),
                         ("last", "position")):
        with pytest.raises(InvalidArgumentError, match=match):
            import_checkpoints(tmp_path / "ckpts", tmp_path / "run.zarr", steps=steps)
        assert not (tmp_path / "run.zarr").exists()


def test_cli_steps_option(tmp_path):
    named_folder(tmp_path / "ckpts", ["resnet18_5.pt", "resnet18_6.pt"])
    out = one_line_error(runner.invoke(app, ["import", str(tmp_path / "ckpts"), str(tmp_path / "x.zarr")]))
    assert "--steps" in out, out
    assert not (tmp_path / "x.zarr").exists()
    out = one_line_error(runner.invoke(app, ["import", str(tmp_path / "ckpts"), str(tmp_path / "x.zarr"),
                                             "--steps", "5,x"]))
    assert "--steps" in out and not (tmp_path / "x.zarr").exists()
    for option, expect in (("position", [0, 1]), ("5, 6", [5, 6])):
        target = tmp_path / f"{len(expect)}{expect[0]}.zarr"
        result = runner.invoke(app, ["import", str(tmp_path / "ckpts"), str(target), "--steps", option, "--json"])
        assert result.exit_code == 0, result.output
        with TrajectoryStore.open(target) as store:
            assert store.steps.tolist() == expect


# -- 9c: epochs are recorded only where known -----------------------------------------------------

def test_epoch_is_unknown_unless_the_trainer_state_or_the_name_gives_it(tmp_path):
    named_folder(tmp_path / "plain", ["0.pt", "1.pt", "2.pt"])
    import_checkpoints(tmp_path / "plain", tmp_path / "plain.zarr")
    named_folder(tmp_path / "named", ["epoch=0-step=120.pt", "epoch=1-step=240.pt", "epoch=2.pt"])
    import_checkpoints(tmp_path / "named", tmp_path / "named.zarr", steps=[120, 240, 360])
    hf_folder(tmp_path / "out")  # trainer_state epoch = step / 10: 0.7, 1.4, 2.1, 2.8, 3.0
    import_checkpoints(tmp_path / "out", tmp_path / "hf.zarr", HF_PATTERN)
    with TrajectoryStore.open(tmp_path / "plain.zarr") as plain, \
            TrajectoryStore.open(tmp_path / "named.zarr") as named, TrajectoryStore.open(tmp_path / "hf.zarr") as hf:
        assert plain.steps.tolist() == [0, 1, 2] and plain.epochs.tolist() == [-1, -1, -1]
        assert named.steps.tolist() == [120, 240, 360] and named.epochs.tolist() == [0, 1, 2]
        assert hf.steps.tolist() == [7, 14, 21, 28, 30]
        assert hf.epochs.tolist() == [0, 1, 2, 2, 2]  # 0-based, as the Trainer callback records them


# -- 12: extract --scheduler ----------------------------------------------------------------------

from .test_api_cli import store12, untouched  # noqa: E402,F401 -- the same store and check


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, expect", [
    ("bogus:1", "bogus"),
    ("tcp://", "--scheduler"),
    ("127.0.0.1:notaport", "--scheduler"),
    ("127.0.0.1:99999", "--scheduler"),
    ("closed", "127.0.0.1"),
])
def test_an_unusable_scheduler_is_one_line_at_once(store12, address, expect):
    if address == "closed":
        address = f"127.0.0.1:{_closed_port()}"
    began = time.monotonic()
    out = one_line_error(runner.invoke(app, ["extract", str(store12), "--dim", "2", "--scheduler", address]))
    assert time.monotonic() - began < 10
    assert expect in out and "--scheduler" in out, out
    assert untouched(store12)


def test_a_scheduler_that_never_answers_times_out_in_one_line(store12):
    with socket.socket() as server:  # accepts connections and drops them: dask retries until its timeout
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]

        def drop():
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                conn.close()

        threading.Thread(target=drop, daemon=True).start()
        env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
        result = subprocess.run([sys.executable, "-m", "cli.main", "extract", str(store12), "--dim", "2",
                                 "--scheduler", f"127.0.0.1:{port}"], cwd=ROOT, env=env, capture_output=True,
                                text=True, timeout=120)
    err = result.stderr.strip()
    assert result.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"127.0.0.1:{port}" in err and "cannot connect" in err, err  # timed out, or reset
    assert untouched(store12)


def test_extract_on_a_scheduler_address_still_works(store12):
    from distributed import LocalCluster

    reference = extract_subspace(store12, dim=2, name="threads")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        result = runner.invoke(app, ["extract", str(store12), "--dim", "2", "--name", "remote", "--json",
                                     "--scheduler", cluster.scheduler_address])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dim"] == 2
    from pipeline import open_subspace

    remote = open_subspace(store12, "remote")
    assert np.abs(np.abs(remote.to_numpy()) - np.abs(reference.to_numpy())).max() <= 1e-8


# -- 12: --plot into a folder that does not exist -------------------------------------------------

def test_plot_into_a_missing_folder_is_one_line(store12, tmp_path):
    extract_subspace(store12, dim=2)
    for command in (["spectrum", str(store12)], ["project", str(store12)]):
        for target in (tmp_path / "nope" / "x.png", tmp_path):
            out = one_line_error(runner.invoke(app, [*command, "--plot", str(target)]))
            assert "--plot" in out and str(target) in out, out
    assert not (tmp_path / "nope").exists()
    result = runner.invoke(app, ["spectrum", str(store12), "--plot", str(tmp_path / "ok.png")])
    assert result.exit_code == 0 and (tmp_path / "ok.png").stat().st_size > 0, result.output


# -- 12: train selections known to be too small are refused before any work ----------------------

def _train(run: Path, *options: str):
    return runner.invoke(app, ["train", "digits-mlp", "--run", str(run), "--sample-epochs", "3",
                               "--subspace-epochs", "1", "--baseline", "none", *options])


@pytest.mark.parametrize("options, expect", [
    (["--dim", "5", "--snapshots", "0:3"], "--dim"),
    (["--dim", "3", "--snapshots", "0:3"], "--dim"),
    (["--dim", "2", "--snapshots", "5:2"], "--snapshots"),
    (["--dim", "2", "--snapshots", "0:9"], "--snapshots"),
    (["--dim", "2", "--snapshots", "0,1,7"], "--snapshots"),
    (["--dim", "3", "--snapshots", "0,1,2"], "--dim"),
    (["--dim", "2", "--snapshots", "-2:"], "--dim"),  # the last 2 of 4
    (["--dim", "4", "--snapshots", "0:4", "--sample-every", "5"], "--dim"),  # 4 at most, whatever the steps
    (["--dim", "2", "--snapshots", "4:4", "--sample-every", "5"], "--snapshots"),
])
def test_train_selection_too_small_for_dim_is_refused_at_once_and_writes_nothing(tmp_path, options, expect):
    began = time.monotonic()
    out = one_line_error(_train(tmp_path / "run", *options))
    assert time.monotonic() - began < 10, out
    assert expect in out, out
    assert not (tmp_path / "run").exists()


def test_a_run_refused_late_for_too_few_snapshots_accepts_a_corrected_resume(tmp_path):
    """With --sample-every the number of snapshots is known only after sampling: the refusal keeps the
    sampled trajectory, and the same command with a lower --dim and --resume carries on from it."""
    run = tmp_path / "run"
    common = ["train", "digits-mlp", "--run", str(run), "--sample-epochs", "1", "--sample-every", "10",
              "--subspace-epochs", "1", "--baseline", "none"]
    first = runner.invoke(app, [*common, "--dim", "3"])  # 22 steps an epoch: snapshots at 0, 10, 20
    assert first.exit_code == 2 and "Traceback" not in first.output, first.output
    last = first.output.strip().splitlines()[-1]  # after the sampling phase's log lines
    assert last.startswith("error:") and "--dim" in last and "--resume" in last, first.output
    second = runner.invoke(app, [*common, "--dim", "2", "--resume", "--json"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["psgd"]["epochs"] == 1
    assert json.loads((run / "config.json").read_text())["dim"] == 2


# -- 12: error messages are printed verbatim: no emoji, no markup ---------------------------------

def test_error_messages_are_printed_verbatim(store12, tmp_path):
    out = one_line_error(runner.invoke(app, ["extract", str(store12), "--dim", "2", "--snapshots", "3:-1:-1"]))
    assert "3:-1:-1" in out and "\N{THUMBS DOWN SIGN}" not in out, out
    out = one_line_error(_train(tmp_path / "run", "--dim", "2", "--snapshots", "3:-1:-1"))
    assert "3:-1:-1" in out and "\N{THUMBS DOWN SIGN}" not in out, out
    out = one_line_error(runner.invoke(app, ["extract", str(store12), "--dim", "2", "--snapshots", "[bold]:smile:"]))
    assert "[bold]:smile:" in out, out


# -- 12: import --like module:function from the current directory ---------------------------------

def test_console_script_import_like_a_recipe_in_the_current_directory(tmp_path):
    exe = shutil.which("trajstore")
    assert exe, "the trajstore console script is not installed (pip install -e .)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the checkout's packages; the current directory is NOT added
    (tmp_path / "myrec.py").write_text(
        "import torch\n"
        "class Tied(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(5, 3)\n"
        "        self.head = torch.nn.Linear(3, 5, bias=False)\n"
        "        self.head.weight = self.emb.weight\n"
        "def build(seed, batch_size):\n"
        "    return Tied(), None, None, None\n")
    (tmp_path / "ckpts").mkdir()
    for i in range(3):
        emb = torch.full((5, 3), float(i))
        torch.save({"emb.weight": emb, "head.weight": emb}, tmp_path / "ckpts" / f"{i}.pt")
    cmd = [exe, "import", "ckpts", "run.zarr", "--like", "myrec:build", "--json"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["parameters"] == 15
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.layout.aliases == {"head.weight": "emb.weight"}
