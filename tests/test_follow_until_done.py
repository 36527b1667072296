"""extract --follow --until-done: following ends with the recording (no writer and no new snapshot for --idle
seconds), after a last refresh over every snapshot (the new-user trial: --follow never stopped on its own, and
left the subspace behind the store)."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from pipeline import open_subspace
from pipeline.compute import StopFlag
from pipeline.follow import follow
from trajstore.lock import writer_active

from .synthetic import trajectory, write_store

ROOT = Path(__file__).resolve().parents[1]
WRITER = """
import sys, time
from trajstore import TrajectoryStore
from tests.synthetic import trajectory, write_store
path, t, reopen = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
x = trajectory(t, 3000, rank=3)
store = write_store(path, x[:3], close=False)
print("started", flush=True)
for i in range(3, t):
    time.sleep(0.15)
    if reopen and i % 4 == 0:  # a writer that closes the store between epochs and opens it again
        store.close()
        time.sleep(reopen)
        store = TrajectoryStore.open(path, "a")
    store.append(x[i], step=10 * i)
store.close()
print("done", flush=True)
"""


def start_writer(path: Path, t: int, reopen: float = 0.0) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(t), str(reopen)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "started"
    return writer


def watched_follow(path: Path, seconds: float = 120, **options) -> int:
    """follow(), stopped by a watchdog after ``seconds`` (then the test fails instead of hanging)."""
    stop = StopFlag()
    watchdog = threading.Timer(seconds, stop.set)
    watchdog.start()
    try:
        updates = follow(path, stop=stop, **options)
    finally:
        watchdog.cancel()
    assert not stop, f"follow did not end by itself within {seconds} s"
    return updates


def test_follow_until_done_ends_with_the_recording_over_every_snapshot(tmp_path):
    path = tmp_path / "run.zarr"
    writer = start_writer(path, 17)
    try:
        assert writer_active(str(path))
        updates = watched_follow(path, every=5, dim=2, poll=0.2, until_done=True, idle=1.5)
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert not writer_active(str(path)) and updates >= 1
    assert len(open_subspace(path).snapshots) == 17  # the last refresh took the snapshots after the last "every"


def test_a_writer_that_reopens_the_store_between_epochs_is_followed_to_the_end(tmp_path):
    """Pauses shorter than --idle (the store closed and reopened, nothing committed) do not end the recording."""
    path = tmp_path / "run.zarr"
    writer = start_writer(path, 14, reopen=1.2)
    try:
        watched_follow(path, every=3, dim=2, poll=0.1, until_done=True, idle=4.0)
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert len(open_subspace(path).snapshots) == 14


def test_a_recording_that_ended_before_following_started_is_refreshed_once(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(6, 500, rank=2))
    began = time.monotonic()
    assert watched_follow(path, every=2, dim=2, poll=0.1, until_done=True, idle=1.0) == 1
    assert 1.0 <= time.monotonic() - began < 60 and len(open_subspace(path).snapshots) == 6


def test_the_cli_flags(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(4, 300, rank=2))
    r = CliRunner().invoke(app, ["extract", str(path), "--dim", "2", "--until-done"])
    assert r.exit_code == 2 and "--until-done goes with --follow" in " ".join(r.output.split())
    r = CliRunner().invoke(app, ["extract", str(path), "--dim", "5", "--follow", "--until-done", "--idle", "0.5"])
    assert r.exit_code == 1 and "none was extracted" in " ".join(r.output.split())  # 4 snapshots, d = 5: too few
    writer = start_writer(tmp_path / "cli.zarr", 12)
    try:
        r = CliRunner().invoke(app, ["extract", str(tmp_path / "cli.zarr"), "--dim", "2", "--follow", "--every", "4",
                                     "--poll", "0.2", "--until-done", "--idle", "1.5"])
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert r.exit_code == 0 and "the recording has ended" in " ".join(r.output.split()), r.output
    assert len(open_subspace(tmp_path / "cli.zarr").snapshots) == 12
