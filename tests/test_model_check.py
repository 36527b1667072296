"""The store API, model-checked (issue 12): hypothesis runs random sequences of valid and invalid
``append``, ``flush``, ``close``, reopen, ``truncate_after_step``, reads, ``load_into`` and
``state_dict``, with kill -9 of the writer process in between, against a plain in-memory reference
of what must be committed. Invalid calls raise typed errors and change nothing.

The writer is a real process (tests/model_writer_proc.py) so that it can be killed; the test
process reads the store as any reader would.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from trajstore import TrajectoryStore
from trajstore.errors import SnapshotIndexError
from trajstore.store import metric_key

from .model_writer_proc import snapshot

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("TRAJSTORE_MODEL_CHECK_EXAMPLES", 60))
SLOW_EXAMPLES = int(os.environ.get("TRAJSTORE_MODEL_CHECK_SLOW_EXAMPLES", 5000))

# invalid appends: (what goes wrong, the error class it must raise)
BAD_DATA = {"short": "LayoutMismatchError", "long": "LayoutMismatchError", "2d": "LayoutMismatchError",
            "complex": "InvalidArgumentError", "bool": "InvalidArgumentError", "list": "InvalidArgumentError",
            "nan": "NonFiniteError"}
BAD_STEPS = [True, 1.5, "3", None, -1]
BAD_METRICS = [{"lr": [0.1, 0.2]}, {"loss": "low"}, {"loss": {"a": 1}}, {"": 1.0}, {"loss": None}, [("loss", 1)],
               {"c": 1.0}, {"zarr.json": 1.0}, {"x" * 201: 1.0}, {"a/b": 1.0, "a_b": 2.0}]
METRIC_NAMES = ["loss", "acc", "train/loss", "val loss", "x\\y"]


class Writer:
    """The writer process: one per test session, replaced after each kill by a spare started ahead."""

    def __init__(self):
        self.proc = None
        self.spare = None

    @staticmethod
    def _start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tests.model_writer_proc"], cwd=ROOT, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, op: str, **args) -> dict:
        if self.proc is None:
            self.proc, self.spare = self.spare or self._start(), None
        if self.spare is None:
            self.spare = self._start()  # its imports overlap with this process's work
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the writer process died during {op}"
        return json.loads(line)

    @staticmethod
    def _kill(proc: "subprocess.Popen | None") -> None:
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()

    def kill(self) -> None:
        self._kill(self.proc)
        self.proc = None

    def stop(self) -> None:
        self.kill()
        self._kill(self.spare)
        self.spare = None


WRITER = Writer()
BASE = Path(tempfile.mkdtemp(prefix="trajstore-model-check-"))


class StoreModel(RuleBasedStateMachine):
    """Reference: ``rows`` acknowledged in order (seed, damage, step, metrics); the first
    ``committed`` of them are known committed (flush, close, truncate returned)."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, str | None, int, dict]] = []
        self.committed = 0
        self.state = "none"  # open, closed, killed
        self.path = None

    @initialize(codec=st.sampled_from(["lossless", "xor-delta:3"]))
    def create(self, codec):
        self.path = str(Path(tempfile.mkdtemp(dir=BASE)) / "run.zarr")
        if WRITER.proc is not None:
            WRITER.call("close")  # the previous example's store
        assert WRITER.call("create", path=self.path, codec=codec) == {"ok": None}
        self.state = "open"

    def teardown(self):
        if self.path is not None:
            if self.state == "open":
                WRITER.call("close")
                self.state, self.committed = "closed", len(self.rows)
            self.check_reads()
            shutil.rmtree(Path(self.path).parent, ignore_errors=True)

    # -- writes -------------------------------------------------------------------------------
    def next_step(self, delta: int) -> int:
        return self.rows[-1][2] + delta if self.rows else delta - 1

    @precondition(lambda self: self.state == "open")
    @rule(seed=st.integers(0, 2**20), delta=st.integers(1, 3), damage=st.sampled_from([None, None, "float64", "nan"]),
          metrics=st.dictionaries(st.sampled_from(METRIC_NAMES), st.floats(allow_nan=True, allow_infinity=False),
                                  max_size=2))
    def append(self, seed, delta, damage, metrics):
        step = self.next_step(delta)
        got = WRITER.call("append", seed=seed, damage=damage, step=step, metrics=metrics, allow_nonfinite=True)
        assert got == {"ok": len(self.rows)}, got
        self.rows.append((seed, damage, step, metrics))

    @precondition(lambda self: self.state == "open")
    @rule(seed=st.integers(0, 2**20), data=st.data())
    def refused_append(self, seed, data):
        kind = data.draw(st.sampled_from(["data", "step", "metrics", "repeat"] if self.rows else ["data", "step", "metrics"]))
        step, damage, metrics, want = self.next_step(1), None, None, "InvalidArgumentError"
        if kind == "data":
            damage = data.draw(st.sampled_from(sorted(BAD_DATA)))
            want = BAD_DATA[damage]
        elif kind == "step":
            step = data.draw(st.sampled_from(BAD_STEPS))
        elif kind == "metrics":
            metrics = data.draw(st.sampled_from(BAD_METRICS))
        else:
            step = self.rows[-1][2] - data.draw(st.integers(0, 2))  # repeats or goes back
        got = WRITER.call("append", seed=seed, damage=damage, step=step, metrics=metrics)
        assert got.get("error") == want and got["typed"], f"{kind} {damage} {step} {metrics}: {got}"

    @precondition(lambda self: self.state == "open")
    @rule(length=st.sampled_from([2.0, True, 2.5, "1", None, -1]))
    def refused_truncate(self, length):
        got = WRITER.call("truncate_after_step", step=length)
        assert got.get("error") == "InvalidArgumentError" and got["typed"], (length, got)

    @precondition(lambda self: self.state == "open")
    @rule()
    def flush(self):
        assert WRITER.call("flush") == {"ok": None}
        self.committed = len(self.rows)

    @precondition(lambda self: self.state == "open")
    @rule()
    def close(self):
        assert WRITER.call("close") == {"ok": None}
        self.state, self.committed = "closed", len(self.rows)

    @precondition(lambda self: self.state == "closed")
    @rule()
    def append_after_close(self):
        got = WRITER.call("append", seed=0, step=self.next_step(1))
        assert got.get("error") == "InvalidArgumentError" and "closed" in got["message"], got

    @precondition(lambda self: self.state == "open")
    @rule(now=st.integers(0, 3))
    def kill(self, now):
        if now == 0:  # one draw in four: a restart is the costly step of this machine
            WRITER.kill()
            self.state = "killed"

    @precondition(lambda self: self.state in ("closed", "killed"))
    @rule()
    def reopen(self):
        got = WRITER.call("open", path=self.path)
        t = got.get("ok")
        assert isinstance(t, int) and self.committed <= t <= len(self.rows), (got, self.committed, len(self.rows))
        del self.rows[t:]  # a kill loses at most the snapshots not yet committed
        self.committed, self.state = t, "open"

    @precondition(lambda self: self.state == "open")
    @rule(data=st.data())
    def truncate_after_step(self, data):
        steps = [row[2] for row in self.rows]
        step = data.draw(st.sampled_from(steps) if steps else st.integers(0, 5))
        keep = sum(s <= step for s in steps)
        assert WRITER.call("truncate_after_step", step=step) == {"ok": keep}
        del self.rows[keep:]
        self.committed = keep

    # -- reads ----------------------------------------------------------------------------------
    @rule()
    def check_reads(self):
        """A reader sees a committed prefix of the reference, exactly, through every read API."""
        with TrajectoryStore.open(self.path) as store:
            t = len(store)
            assert self.committed <= t <= len(self.rows)
            want = np.stack([snapshot(seed, damage).astype(np.float32) for seed, damage, _, _ in self.rows[:t]]
                            ) if t else np.empty((0, 16), np.float32)
            np.testing.assert_array_equal(store.read(slice(None)), want)
            assert store.steps.tolist() == [row[2] for row in self.rows[:t]]
            for name in store.metric_names():
                values = [next((v for k, v in row[3].items() if metric_key(k) == name), math.nan)
                          for row in self.rows[:t]]
                np.testing.assert_array_equal(store.metrics(name), np.array(values, np.float64))
            with pytest.raises(SnapshotIndexError):
                store.read(t)
            if t:
                i = t - 1
                linear = torch.nn.Linear(3, 4)
                store.load_into(linear, i)
                sd = store.state_dict(i)
                np.testing.assert_array_equal(torch.cat([linear.weight.detach().reshape(-1), linear.bias.detach()]),
                                              want[i])
                np.testing.assert_array_equal(torch.cat([sd["weight"].reshape(-1), sd["bias"]]), want[i])

    @invariant()
    def reference_is_consistent(self):
        steps = [row[2] for row in self.rows]
        assert steps == sorted(set(steps)) and self.committed <= len(self.rows)


def _run(examples: int) -> None:
    test = StoreModel.TestCase
    test.settings = settings(max_examples=examples, stateful_step_count=15, deadline=None, database=None,
                             derandomize=True, suppress_health_check=list(HealthCheck))
    try:
        test("runTest").runTest()
    finally:
        WRITER.stop()


def test_the_store_api_matches_its_reference_model():
    _run(EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_the_store_api_matches_its_reference_model_at_volume():
    _run(SLOW_EXAMPLES)
