"""The Lightning and Hugging Face callbacks in real 2-process trainers (gloo, CPU): tests/dist_trainer_proc.py.

One launch per trainer (imports dominate): every phase of it (fresh run, resume from a checkpoint,
a second fresh run, FSDP1 and FSDP2, a rank that fails) leaves a report per rank that the tests read.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trajstore import TrajectoryStore
from trajstore.inspect import verify

ROOT = Path(__file__).resolve().parents[1]
STEPS = [0, 2, 3, 4, 6, 8, 9]  # every 2 steps and each epoch's end (3 steps an epoch), 3 epochs


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(scenario: str, out: Path) -> Path:
    """Run the scenario as a 2-process job, launched as torchrun launches one; its reports are in ``out``."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": _port(), "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "0", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.dist_trainer_proc", scenario, str(out)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {scenario} job hung: " + "\n".join(p.communicate()[0][-3000:] for p in procs))
    codes = [p.returncode for p in procs]
    # rank 1 ends its process after failing on purpose (the last phase); anything else is a failure
    assert codes == [0, 3], "\n".join(log[-4000:] for log in logs)
    return out


def _report(out: Path, phase: str) -> list[dict]:
    return [json.loads((out / f"{phase}.r{r}.json").read_text()) for r in (0, 1)]


def _seen(out: Path, phase: str) -> list[dict[str, np.ndarray]]:
    """What each rank saw: its full parameters after every step, and the loss it logged."""
    return [dict(np.load(out / f"{phase}.r{r}.npz")) for r in (0, 1)]


def _check_recording(out: Path, store_path: Path, fresh: str, resumed: str, steps: list[int], resumed_at: int,
                     metric: str) -> TrajectoryStore:
    """The store holds ``steps`` once each, every row bit-equal to the parameters at its step (the rows
    after ``resumed_at`` as the resumed run saw them), and rank 0's logged metric."""
    store = TrajectoryStore.open(store_path)
    assert store.steps.tolist() == steps  # no duplicates, no gaps
    assert store.attrs["truncations"] == [steps.index(resumed_at) + 1]  # the resume dropped what followed it
    assert verify(store_path).ok
    by_step: dict[int, tuple[np.ndarray, float]] = {}  # (parameters, rank 0's loss): the resumed run after its start
    for phase, keep in ((fresh, lambda s: s <= resumed_at), (resumed, lambda s: s > resumed_at)):
        seen = _seen(out, phase)
        assert np.array_equal(seen[0]["rows"], seen[1]["rows"])  # every rank has (or gathers) the same weights
        by_step.update({s: (row, loss) for s, row, loss in zip(seen[0]["steps"].tolist(), seen[0]["rows"],
                                                               seen[0]["loss"]) if keep(s)})
    for i, step in enumerate(steps):
        assert np.array_equal(store.read(i), by_step[step][0]), f"snapshot {i} (step {step})"
    assert np.allclose(store.metrics(metric)[1:], [by_step[s][1] for s in steps[1:]], rtol=0, atol=1e-6)
    return store


def _check_failure(out: Path, phase: str, store_path: Path) -> None:
    """Rank 1 failed and ended; rank 0, waiting for it inside a store collective, raised soon after,
    closed the store without collectives and kept every committed snapshot."""
    zero, one = _report(out, phase)
    assert one["error"] == "RuntimeError" and "rank 1 fails" in one["message"]
    assert zero["where"] and zero["where"].startswith("trajstore/"), zero  # stopped inside trajstore's collective
    assert zero["seconds"] < 60, zero  # the whole training, that wait included
    with TrajectoryStore.open(store_path, "a", process_group=None) as store:  # rank 0 released the writer lock
        assert store.steps.tolist() == [0, 1]
    assert verify(store_path).ok


@pytest.fixture(scope="module")
def lightning_job(tmp_path_factory):
    return _launch("lightning", tmp_path_factory.mktemp("lightning"))


@pytest.fixture(scope="module")
def hf_job(tmp_path_factory):
    return _launch("hf", tmp_path_factory.mktemp("hf"))


def test_lightning_ddp_records_resumes_and_refuses_a_second_run_on_every_rank(lightning_job):
    out = lightning_job
    assert [r["error"] for r in _report(out, "ddp") + _report(out, "ddp_resume")] == [None] * 4
    store = _check_recording(out, out / "ddp.zarr", "ddp", "ddp_resume", STEPS, 3, "train_loss")
    assert store.columns.is_identity and store.epochs.tolist() == [0, 0, 0, 1, 1, 2, 2]
    ranks = _seen(out, "ddp")  # each rank logged the loss of its own batches: the store has rank 0's
    assert not np.allclose(ranks[0]["loss"][1:], ranks[1]["loss"][1:])
    again = _report(out, "ddp_again")  # a fresh fit into the same path
    assert [r["error"] for r in again] == ["StoreExistsError"] * 2 and "already holds 7 snapshots" in again[1]["message"]
    assert TrajectoryStore.open(out / "ddp.zarr").steps.tolist() == STEPS  # left as it was


def test_lightning_fsdp2_model_parallel_writes_each_rank_shard_and_resumes(lightning_job):
    out = lightning_job
    assert [r["error"] for r in _report(out, "fsdp2") + _report(out, "fsdp2_resume")] == [None] * 4
    store = _check_recording(out, out / "fsdp2.zarr", "fsdp2", "fsdp2_resume", STEPS[:5], 3, "train_loss")
    assert store.attrs["format_version"] == 2 and len(store.columns.rank_columns) == 2  # sharded: each rank its columns


def test_lightning_fsdp1_is_refused_on_every_rank_before_training(lightning_job):
    out = lightning_job
    reports = _report(out, "fsdp1")
    assert [r["error"] for r in reports] == ["InvalidArgumentError"] * 2
    assert all("FSDP1" in r["message"] and "ModelParallelStrategy" in r["message"] for r in reports)
    assert not (out / "fsdp1.zarr").exists()


def test_lightning_rank_failing_alone_does_not_hang_the_other(lightning_job):
    out = lightning_job
    _check_failure(out, "fail", out / "fail.zarr")


def test_hf_trainer_ddp_records_resumes_and_refuses_a_second_run_on_every_rank(hf_job):
    out = hf_job
    reports = _report(out, "hf") + _report(out, "hf_resume")
    assert [r["error"] for r in reports] == [None] * 4
    assert all(r["world"] == 2 and r["parallel_mode"].endswith("DISTRIBUTED") for r in reports)
    store = _check_recording(out, out / "hf.zarr", "hf", "hf_resume", STEPS, 3, "loss")
    assert store.columns.is_identity and store.epochs.tolist() == [0, 0, 0, 1, 1, 2, 2]
    again = _report(out, "hf_again")
    assert [r["error"] for r in again] == ["StoreExistsError"] * 2
    assert TrajectoryStore.open(out / "hf.zarr").steps.tolist() == STEPS


def test_hf_trainer_rank_failing_alone_does_not_hang_the_other(hf_job):
    out = hf_job
    _check_failure(out, "hf_fail", out / "hf_fail.zarr")
