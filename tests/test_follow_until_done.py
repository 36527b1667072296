"""extract --follow --until-done: following ends with the recording, after a last refresh over every snapshot
(the new-user trial: --follow never stopped on its own, and left the subspace behind the store)."""
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
from tests.synthetic import trajectory, write_store
path, t = sys.argv[1], int(sys.argv[2])
x = trajectory(t, 3000, rank=3)
store = write_store(path, x[:3], close=False)
print("started", flush=True)
for i in range(3, t):
    time.sleep(0.15)
    store.append(x[i], step=10 * i)
store.close()
print("done", flush=True)
"""


def start_writer(path: Path, t: int) -> subprocess.Popen:
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(t)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout.readline().strip() == "started"
    return writer


def test_follow_until_done_ends_with_the_recording_over_every_snapshot(tmp_path):
    path = tmp_path / "run.zarr"
    writer = start_writer(path, 17)
    try:
        assert writer_active(str(path))
        began = time.monotonic()
        updates = follow(path, every=5, dim=2, poll=0.2, until_done=True)
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert not writer_active(str(path))
    sub = open_subspace(path)
    assert len(sub.snapshots) == 17 and updates >= 2  # the last refresh took the snapshots after the last "every"
    assert time.monotonic() - began < 60


def test_follow_until_done_waits_for_a_writer_it_has_not_seen(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(6, 500, rank=2))  # recorded and closed before following starts
    stop, result = StopFlag(), {}
    thread = threading.Thread(target=lambda: result.update(n=follow(path, every=2, dim=2, poll=0.1, stop=stop,
                                                                       until_done=True)))
    thread.start()
    time.sleep(3.0)
    assert thread.is_alive()  # no writer seen yet: it may start later
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive() and result["n"] == 1


def test_the_cli_flag(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(4, 300, rank=2))
    r = CliRunner().invoke(app, ["extract", str(path), "--dim", "2", "--until-done"])
    assert r.exit_code == 2 and "--until-done goes with --follow" in " ".join(r.output.split())
    writer = start_writer(tmp_path / "cli.zarr", 12)
    try:
        r = CliRunner().invoke(app, ["extract", str(tmp_path / "cli.zarr"), "--dim", "2", "--follow", "--every", "4",
                                     "--poll", "0.2", "--until-done"])
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    assert r.exit_code == 0 and "the recording has ended" in " ".join(r.output.split()), r.output
    assert len(open_subspace(tmp_path / "cli.zarr").snapshots) == 12
