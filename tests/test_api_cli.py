"""Issue 12-17: bad CLI input is one line and exit 2 before any work, recipes import from the current
directory, a failed start blocks no retry, and lock holders are named (an extraction, a writer, this
process); extractions into different subspace names run side by side."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipeline import extract_subspace, open_subspace
from trajstore import TrajectoryStore
from trajstore.errors import StoreLockedError
from trajstore.format import LOCK_NAME
from trajstore.maintenance import gc

from .helpers import MixedNet
from .synthetic import trajectory, write_store

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
BAR = "━"  # drawn by rich's progress bar


def one_line_error(result) -> str:
    """Exit 2, a single line, no traceback, no progress bar; returns that line."""
    out = result.output.strip()
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert "Traceback" not in out and BAR not in out, out
    assert len(out.splitlines()) == 1, out
    return out


@pytest.fixture
def store12(tmp_path) -> Path:
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(12, 5_000, rank=3))
    return path


def untouched(path: Path) -> bool:
    return not (path / "gram").exists() and not (path / "subspaces").exists()


# -- 12 and 17: extract ---------------------------------------------------------------------------
@pytest.mark.parametrize("case, expect", [
    (["--snapshots", "a:b"], "--snapshots"),
    (["--snapshots", "0:13:0"], "--snapshots"),
    (["--snapshots", "1:2:3:4"], "--snapshots"),
    (["--snapshots", "1,,2"], "--snapshots"),
    (["--snapshots", "0:10:-1"], "--snapshots"),
    (["--snapshots", "3,-1"], "--snapshots"),
    (["--snapshots", "0:40"], "beyond"),
    (["--dim", "0"], "--dim"),
    (["--dim", "-2"], "--dim"),
    (["--dim", "40"], "t - 1"),
    (["--variance", "1.5"], "--variance"),
    (["--variance", "0"], "--variance"),
    (["--variance", "nan"], "--variance"),
    (["--block-size", "0"], "--block-size"),
    (["--block-size", "-5"], "--block-size"),
    (["--method", "svd"], "--method"),
    (["--name", ""], "--name"),
    (["--name", "a/b"], "--name"),
])
def test_bad_extract_arguments_are_one_line_before_any_work(store12, case, expect):
    dims = [] if {"--dim", "--variance"} & set(case) else ["--dim", "2"]
    out = one_line_error(runner.invoke(app, ["extract", str(store12), *dims, *case]))
    assert expect in out, out
    assert untouched(store12)


@pytest.mark.parametrize("case", [["--every", "0"], ["--every", "-1"], ["--poll", "0"], ["--poll", "-1"]])
def test_bad_follow_arguments_are_refused_instead_of_spinning(store12, case):
    command = [sys.executable, "-m", "cli.main", "extract", str(store12), "--follow", "--dim", "2", *case]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    err = result.stderr.strip()
    assert result.returncode == 2 and len(err.splitlines()) == 1 and case[0] in err, err
    assert untouched(store12)


@pytest.mark.parametrize("case", [["--top", "0"], ["--top", "-3"]])
def test_bad_spectrum_rows(store12, case):
    extract_subspace(store12, dim=2)
    out = one_line_error(runner.invoke(app, ["spectrum", str(store12), *case]))
    assert "--top" in out


def test_a_long_error_message_stays_on_one_line(store12):
    extract_subspace(store12, dim=2)
    out = one_line_error(runner.invoke(app, ["extract", str(store12), "--dim", "2"]))  # already exists: long
    assert "already exists" in out and len(out) > 100


# -- 12 and 14: train -----------------------------------------------------------------------------
_TRAIN_CASES = [
    (["--dim", "0"], "--dim"),
    (["--dim", "-1"], "--dim"),
    (["--variance", "1.5"], "--variance"),
    (["--variance", "0"], "--variance"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--subspace-lr", "-1"], "--subspace-lr"),
    (["--optimizer", "pbfgs", "--subspace-lr", "0"], "--subspace-lr"),
    (["--sample-epochs", "0"], "--sample-epochs"),
    (["--sample-every", "0"], "--sample-every"),
    (["--subspace-epochs", "-1"], "--subspace-epochs"),
    (["--label-noise", "1.5"], "--label-noise"),
    (["--label-noise", "-0.1"], "--label-noise"),
    (["--seed", "-1"], "--seed"),
    (["--snapshots", "0:3:0"], "--snapshots"),
    (["--snapshots", "x"], "--snapshots"),
    (["--device", "cpux"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--baseline", "adam"], "--baseline"),
]
if not torch.cuda.is_available():
    _TRAIN_CASES.append((["--device", "cuda"], "--device"))


@pytest.mark.parametrize("case, expect", _TRAIN_CASES)
def test_bad_train_arguments_are_one_line_and_write_nothing(tmp_path, case, expect):
    dims = [] if {"--dim", "--variance"} & set(case) else ["--dim", "2"]
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "digits-mlp", "--run", str(run), "--sample-epochs", "3", *dims,
                                 "--subspace-epochs", "1", "--baseline", "none", *case])
    out = one_line_error(result)
    assert expect in out, out
    assert not run.exists(), sorted(p.name for p in run.iterdir())


def test_unknown_recipe_module_writes_nothing(tmp_path):
    run = tmp_path / "run"
    out = one_line_error(runner.invoke(app, ["train", "no_such_module_xyz:build", "--run", str(run)]))
    assert "no_such_module_xyz" in out and not run.exists()
    out = one_line_error(runner.invoke(app, ["train", "tests.user_recipe:nope", "--run", str(run)]))
    assert "nope" in out and not run.exists()


def test_console_script_imports_a_recipe_from_the_current_directory_and_a_failed_start_is_retried(tmp_path):
    exe = shutil.which("trajstore")
    assert exe, "the trajstore console script is not installed (pip install -e .)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the checkout's packages; the current directory is NOT added
    (tmp_path / "myrecipe.py").write_text("def build(seed, batch_size):\n    raise RuntimeError('not written yet')\n")
    cmd = [exe, "train", "myrecipe:build", "--run", "run", "--sample-epochs", "3", "--dim", "2",
           "--subspace-epochs", "1", "--baseline", "none", "--json"]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode != 0 and "not written yet" in first.stderr, first.stderr[-2000:]
    run = tmp_path / "run"
    assert not run.exists() or not any(run.iterdir()), sorted(p.name for p in run.iterdir())
    (tmp_path / "myrecipe.py").write_text((ROOT / "tests" / "user_recipe.py").read_text())
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert json.loads(second.stdout)["psgd"]["epochs"] == 1
    assert (run / "report.json").exists()


# -- 13: a lock held by this very process ---------------------------------------------------------
def test_a_second_writer_in_this_process_is_told_to_close_the_first(tmp_path):
    path = tmp_path / "run.zarr"
    model = MixedNet()
    store = TrajectoryStore.create(path, model)
    try:
        with pytest.raises(StoreLockedError) as info:
            TrajectoryStore.open(path, "a")
        message = str(info.value)
        assert "held by this process (an unclosed store object: close() it, or use `with`)" in message, message
        store.append(model, step=1)  # not re-entered: the first writer still owns the store
    finally:
        store.close()
    with TrajectoryStore.open(path, "a") as again:  # closed: the next writer gets the lock
        assert len(again) == 1


# -- 16: who holds a lock; extractions side by side -----------------------------------------------
_HOLD = ("import sys, time; from trajstore import TrajectoryStore; "
         "s = TrajectoryStore.open(sys.argv[1], 'a'); print('locked', flush=True); time.sleep(60)")
_OLD_HOLD = ("import fcntl, json, os, socket, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
             "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); "
             "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname(), "
             "'since': '2024-01-01T00:00:00'}).encode()); print('locked', flush=True); time.sleep(60)")


def test_lock_file_records_what_holds_it_and_old_lock_files_still_read(store12):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(store12)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        holder = json.loads((store12 / LOCK_NAME).read_text())
        assert holder["pid"] == proc.pid and "writer" in holder["purpose"]
        with pytest.raises(StoreLockedError) as info:
            TrajectoryStore.open(store12, "a")
        assert f"pid {proc.pid}" in str(info.value) and "writer" in str(info.value)
        assert "this process" not in str(info.value)
    finally:
        proc.kill()
        proc.wait()
    old = subprocess.Popen([sys.executable, "-c", _OLD_HOLD, str(store12 / LOCK_NAME)], cwd=ROOT,
                           stdout=subprocess.PIPE, text=True)
    try:  # a lock file written before the purpose field existed
        assert old.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"being written by pid {old.pid}"):
            TrajectoryStore.open(store12, "a")
    finally:
        old.kill()
        old.wait()


def _extract_cmd(path: Path, name: str, dim: int) -> list[str]:
    return [sys.executable, "-m", "cli.main", "extract", str(path), "--dim", str(dim), "--name", name, "--json"]


def test_two_extractions_into_different_names_run_side_by_side(tmp_path):
    path, ref = tmp_path / "run.zarr", tmp_path / "ref.zarr"
    write_store(path, trajectory(24, 500_000, rank=4), chunk=1 << 12, shard=1 << 15)
    shutil.copytree(path, ref)
    want = {"a": extract_subspace(ref, dim=3, name="a"), "b": extract_subspace(ref, dim=2, name="b")}
    first = subprocess.Popen(_extract_cmd(path, "a", 3), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    done = path / "gram" / "update" / "done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and not (done.exists() and any(done.iterdir())) and first.poll() is None:
        time.sleep(0.005)
    os.kill(first.pid, signal.SIGSTOP)  # frozen in its Gram pass, holding its locks
    second = None
    try:
        assert (path / "gram" / "update").exists(), "the first extraction should be frozen in its Gram pass"
        same = one_line_error(runner.invoke(app, ["extract", str(path), "--dim", "3", "--name", "a"]))
        assert f"pid {first.pid}" in same and "extract" in same and "--name" in same, same
        kept = " ".join(gc(path).kept)  # gc must not touch derived data under a running extraction
        assert "left alone" in kept and "extraction" in kept and f"pid {first.pid}" in kept, kept
        second = subprocess.Popen(_extract_cmd(path, "b", 2), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = second.stderr.readline()  # not refused: it waits for the shared Gram pass
        assert "waiting" in line and f"pid {first.pid}" in line, line
        assert second.poll() is None
    finally:
        os.kill(first.pid, signal.SIGCONT)
        if second is not None and second.poll() is not None:
            first.kill()
    out_a, err_a = first.communicate(timeout=300)
    assert first.returncode == 0, err_a
    out_b, err_b = second.communicate(timeout=300)
    assert second.returncode == 0, err_b
    for name, out in (("a", out_a), ("b", out_b)):
        got = open_subspace(path, name)
        assert json.loads(out)["dim"] == want[name].dim
        assert np.array_equal(got.to_numpy(), want[name].to_numpy())
        assert np.array_equal(got.singular_values, want[name].singular_values)
    assert open_subspace(path, "b").attrs["gram_blocks_computed"] == 0  # b reused a's Gram pass
