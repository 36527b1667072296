"""kill -9 a real writer process at random instants; every committed snapshot survives bit for bit."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trajstore import TrajectoryStore
from trajstore.lock import StaleLockWarning

from .writer_proc import row

ROOT = Path(__file__).resolve().parents[1]
N = 200_003


def start_writer(path, codec, *extra):
    return subprocess.Popen([sys.executable, "-m", "tests.writer_proc", str(path), codec, str(N), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def check_intact(path) -> int:
    with TrajectoryStore.open(path) as store:
        t = len(store)
        got = store.read(slice(None))
        for i in range(t):
            assert np.array_equal(got[i].view(np.uint32), row(i, N).view(np.uint32)), f"snapshot {i} differs"
        assert store.steps.tolist() == list(range(t))
        assert store.metrics("i").tolist() == [float(i) for i in range(t)]
        return t


@pytest.mark.parametrize("codec", ["lossless", "xor-delta:4"])
def test_kill_9_at_random_moments_loses_nothing_committed(tmp_path, codec):
    path = tmp_path / "run.zarr"
    rng = random.Random(1234)
    seen = []
    for attempt in range(5):
        proc = start_writer(path, codec)
        first = json.loads(proc.stdout.readline())
        if attempt:
            assert first["start"] == seen[-1], "a reopened writer must resume right after the last commit"
        time.sleep(rng.uniform(0.05, 1.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with pytest.warns(StaleLockWarning, match=str(proc.pid)):
            TrajectoryStore.open(path, "a").close()  # the dead writer's lock is reported, then released
        seen.append(check_intact(path))
    assert seen[-1] > seen[0] > 0, f"the writer should have made progress across restarts: {seen}"


def test_full_disk_surfaces_one_clear_error_and_keeps_committed_data(tmp_path):
    path = tmp_path / "run.zarr"
    proc = start_writer(path, "lossless", "--fsize-limit-after", "4")
    out, err = proc.communicate(timeout=120)
    lines = [json.loads(x) for x in out.splitlines()]
    result = lines[1]
    assert result["error"] == "StoreWriteError", (out, err)
    assert "snapshot 4" in result["message"] and "reopen" in result["message"]
    assert check_intact(path) == 4
    with TrajectoryStore.open(path, "a") as store:  # space is back: resume where it stopped
        store.append(row(4, N), step=4, metrics={"i": 4.0})
    assert check_intact(path) == 5
