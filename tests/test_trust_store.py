"""Issue 8's holes in the store and recorder: each test here failed on the main it was written against."""
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from trajstore import InvalidArgumentError, StoreExistsError, TrajectoryStore
from trajstore.errors import NotAStoreError
from trajstore.inspect import verify
from trajstore.format import METRICS, PARAMS, ROW_ARRAYS
from trajstore.layout import ParamLayout, TensorSpec
from trajstore.recorder import Recorder, RecordingSession, open_for_recording

from .helpers import flat

ROOT = Path(__file__).resolve().parents[1]


def small_run(path, seed, steps=3, overwrite=False):
    """A fresh run: initial weights, then one snapshot per SGD step. Returns the weights recorded."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    store = open_for_recording(path, model, overwrite=overwrite)
    try:
        rec = Recorder(store, model, every_n_steps=1)
        rec.start()
        weights = [flat(model)]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(steps):
            loss = model(torch.randn(4, 8)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step()
            weights.append(flat(model))
    finally:
        store.close()
    return np.stack(weights)


# -- hole 1: a fresh run into an existing path must not mix with the old one -----------------
def test_fresh_run_into_existing_store_raises_instead_of_mixing_runs(tmp_path):
    path = tmp_path / "run.zarr"
    run_a = small_run(path, seed=0)
    with pytest.raises(StoreExistsError, match=r"(?s)run.zarr.*new path.*overwrite=True.*checkpoint"):
        small_run(path, seed=1)
    with TrajectoryStore.open(path) as store:  # run A untouched
        assert np.array_equal(store.read(slice(None)), run_a)
    run_b = small_run(path, seed=1, overwrite=True)  # an explicit overwrite replaces run A entirely
    with TrajectoryStore.open(path) as store:
        assert np.array_equal(store.read(slice(None)), run_b)
        assert store.steps.tolist() == [0, 1, 2, 3]


def test_session_overwrite_never_deletes_on_a_resume(tmp_path):
    path = tmp_path / "run.zarr"
    run_a = small_run(path, seed=0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    nn.utils.vector_to_parameters(torch.from_numpy(run_a[2]), model.parameters())  # run A's weights at step 2
    session = RecordingSession(path, every_n_steps=1, overwrite=True)
    session.begin(model, global_step=2, epoch=None)  # a resume: truncate after step 2, keep the rest
    session.end()
    with TrajectoryStore.open(path) as store:
        assert np.array_equal(store.read(slice(None)), run_a[:3])


def test_lightning_fit_twice_into_one_path_raises(tmp_path):
    from .test_recorder import lightning_fit

    lightning_fit(tmp_path / "a", tmp_path / "a.zarr", 1)
    with TrajectoryStore.open(tmp_path / "a.zarr") as store:
        before = store.read(slice(None))
    with pytest.raises(StoreExistsError, match="a.zarr"):
        lightning_fit(tmp_path / "b", tmp_path / "a.zarr", 1)
    with TrajectoryStore.open(tmp_path / "a.zarr", "a") as store:  # unlocked again, and intact
        assert np.array_equal(store.read(slice(None)), before)


def test_a_resume_of_another_run_is_refused_before_anything_is_dropped(tmp_path):
    path = tmp_path / "run.zarr"
    run_a = small_run(path, seed=0)
    other = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))  # run B's weights at its step 2
    with open_for_recording(path, other) as store:
        with pytest.raises(StoreExistsError, match="snapshot at step 2 differs"):
            Recorder(store, other, every_n_steps=1).start(2)
        # a checkpoint saved while recording another store carries that store's run id
        with pytest.raises(StoreExistsError, match="recorded into run 0123"):
            Recorder(store, other, every_n_steps=1).load_state_dict({"global_step": 1, "run_id": "0123"})
    with TrajectoryStore.open(path) as store:
        assert np.array_equal(store.read(slice(None)), run_a)  # nothing truncated
        run_id = store.run_id
    same = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    nn.utils.vector_to_parameters(torch.from_numpy(run_a[2]), same.parameters())
    with open_for_recording(path, same) as store:
        Recorder(store, same, every_n_steps=1).load_state_dict({"global_step": 2, "run_id": run_id})
        assert store.steps.tolist() == [0, 1, 2]


def test_lightning_refuses_a_checkpoint_of_a_run_recorded_elsewhere(tmp_path):
    from .test_recorder import lightning_fit

    lightning_fit(tmp_path / "a", tmp_path / "a.zarr", 1)
    lightning_fit(tmp_path / "b", tmp_path / "b.zarr", 1)  # the same script, recorded to another store
    with TrajectoryStore.open(tmp_path / "a.zarr") as store:
        before = store.read(slice(None))
    (ckpt_b,) = (tmp_path / "b").glob("*.ckpt")
    with pytest.raises(StoreExistsError, match="recorded into run"):
        lightning_fit(tmp_path / "c", tmp_path / "a.zarr", 2, ckpt_path=ckpt_b)
    with TrajectoryStore.open(tmp_path / "a.zarr") as store:
        assert np.array_equal(store.read(slice(None)), before)


# -- hole 2: a kill between two array resizes must not brick the store -------------------------
def layout(n=1000):
    return ParamLayout([TensorSpec("w", (n,), "float32")])


def test_arrays_left_at_different_sizes_heal_on_open(tmp_path):
    path = tmp_path / "run.zarr"
    with TrajectoryStore.create(path, layout()) as store:
        for i in range(16):  # exactly the first capacity: the next append resizes every array
            store.append(np.full(1000, i, np.float32), step=i, metrics={"loss": float(i)})
    with TrajectoryStore.open(path, "a") as store:  # simulate a kill after params grew, before the rest
        store.group[PARAMS].resize((32, 1000))
    with TrajectoryStore.open(path, "a") as store:
        for i in range(16, 40):
            store.append(np.full(1000, i, np.float32), step=i, metrics={"loss": float(i)})
    with TrajectoryStore.open(path) as store:
        assert len(store) == 40 and store.steps.tolist() == list(range(40))
        assert store.metrics("loss").tolist() == [float(i) for i in range(40)]
        sizes = {name: store.group[name].shape[0] for name in (PARAMS, *ROW_ARRAYS, f"{METRICS}/loss")}
        assert len(set(sizes.values())) == 1, sizes


# -- hole 5: two creators racing on one path ----------------------------------------------
def test_create_never_clears_a_store_created_meanwhile(tmp_path):
    path = tmp_path / "run.zarr"
    with TrajectoryStore.create(path, layout()) as store:
        store.append(np.ones(1000, np.float32), step=0)
    for _ in range(2):
        with pytest.raises(StoreExistsError, match="overwrite=True"):
            TrajectoryStore.create(path, layout())
    with TrajectoryStore.open(path) as store:
        assert len(store) == 1


def test_concurrent_creators_one_wins_and_nothing_is_cleared(tmp_path):
    from trajstore import StoreLockedError

    for trial in range(10):
        path = tmp_path / f"run{trial}.zarr"
        barrier = threading.Barrier(2)
        outcome = []

        def creator(value):
            barrier.wait()
            try:
                store = TrajectoryStore.create(path, layout())
            except (StoreExistsError, StoreLockedError) as exc:
                outcome.append(type(exc).__name__)
                return
            store.append(np.full(1000, value, np.float32), step=0)
            store.close()
            outcome.append("created")

        threads = [threading.Thread(target=creator, args=(v,)) for v in (1.0, 2.0)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert outcome.count("created") == 1, outcome
        with TrajectoryStore.open(path) as store:
            assert len(store) == 1 and store.read(0)[0] in (1.0, 2.0)


# -- hole 6: snapshots acknowledged by append() survive a script that never calls close() -----
SCRIPT = """
import sys
import numpy as np
from trajstore import TrajectoryStore
from trajstore.layout import ParamLayout, TensorSpec
store = TrajectoryStore.create(sys.argv[1], ParamLayout([TensorSpec("w", (1_500_000,), "float32")]),
                               queue_depth=10)
for i in range(10):
    store.append(np.random.default_rng(i).standard_normal(1_500_000).astype(np.float32), step=i)
print("appended", flush=True)
if sys.argv[2] == "raise":
    raise RuntimeError("training crashed")
"""


@pytest.mark.parametrize("ending", ["normal", "raise"])
def test_acknowledged_snapshots_are_committed_at_interpreter_exit(tmp_path, ending):
    path = tmp_path / "run.zarr"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), ending], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert "appended" in proc.stdout
    assert (proc.returncode != 0) == (ending == "raise"), proc.stderr
    with TrajectoryStore.open(path, "a") as store:  # committed, and the lock was released
        assert len(store) == 10
        for i in (0, 9):
            assert np.array_equal(store.read(i), np.random.default_rng(i).standard_normal(1_500_000).astype(np.float32))


# -- issue 12's first two holes, which live in the same append path --------------------------
@pytest.mark.parametrize("bad", [dict(step=None), dict(step=1, metrics={"lr": [0.1]}),
                                 dict(step=1, metrics={"g": torch.ones(3)}), dict(step=1.5),
                                 dict(step=1, epoch="x")])
def test_a_refused_append_leaves_the_store_exactly_as_it_was(tmp_path, bad):
    path = tmp_path / "run.zarr"
    with TrajectoryStore.create(path, layout(), queue_depth=1) as store:
        store.append(np.zeros(1000, np.float32), step=0)
        for _ in range(3):  # repeated failures must neither leak the staging buffer nor skip a row
            with pytest.raises(InvalidArgumentError):
                store.append(np.ones(1000, np.float32), **bad)
        store.append(np.full(1000, 2, np.float32), step=2)
    with TrajectoryStore.open(path) as store:
        assert store.steps.tolist() == [0, 2]
        assert np.array_equal(store.read(1), np.full(1000, 2, np.float32))


def test_metric_names_with_slashes_are_stored_flat_and_survive_resizes(tmp_path):
    path = tmp_path / "run.zarr"
    with TrajectoryStore.create(path, layout()) as store:
        for i in range(40):  # past two resizes
            store.append(np.full(1000, i, np.float32), step=i, metrics={"train/loss": i / 2, "val/acc": 1.0})
    with TrajectoryStore.open(path) as store:
        assert store.metric_names() == ["train_loss", "val_acc"]
        assert store.metrics("train/loss").tolist() == [i / 2 for i in range(40)]


# -- hole 12: durable mode orders data, commit and directory on disk ---------------------------
DURABLE_SCRIPT = """
import sys
import numpy as np
from trajstore import TrajectoryStore
from trajstore.layout import ParamLayout, TensorSpec
with TrajectoryStore.create(sys.argv[1], ParamLayout([TensorSpec("w", (50_000,), "float32")]),
                            durable=sys.argv[2] == "1", chunk_size=8192, shard_size=16384) as store:
    for i in range(3):
        store.append(np.full(50_000, i, np.float32), step=i, metrics={"loss": 1.0})
"""


def traced_events(tmp_path, durable: bool) -> tuple[list[tuple[str, str]], Path]:
    """fsync and rename system calls of a real writer process, in order, as (call, path)."""
    import re
    import shutil

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    path = tmp_path / f"run{int(durable)}.zarr"
    trace = tmp_path / "trace.txt"
    subprocess.run(["strace", "-f", "-y", "-qq", "-e", "trace=fsync,rename,renameat,renameat2", "-o", str(trace),
                    sys.executable, "-c", DURABLE_SCRIPT, str(path), str(int(durable))], cwd=ROOT, check=True,
                   timeout=120)
    events = []
    for line in trace.read_text().splitlines():
        if m := re.search(r"fsync\(\d+<([^>]*)>\)", line):
            events.append(("fsync", m.group(1)))
        elif m := re.search(r"rename\w*\(.*\"([^\"]+)\",? ?\w*(?:\) = 0| <unfinished)", line):  # threads split lines
            events.append(("rename", m.group(1)))
    return events, path


def test_durable_mode_fsyncs_each_snapshot_before_its_commit_and_the_commit_after(tmp_path):
    events, root = traced_events(tmp_path, durable=True)
    commit = ("rename", str(root / "zarr.json"))
    for i in range(3):
        written = events.index(("rename", str(root / "params" / "c" / str(i) / "0")))
        committed = events.index(commit, written)
        between = events[written:committed]
        for needed in (f"params/c/{i}/0", f"params/c/{i}/3", f"params/c/{i}", "params/c", "step/c/0",
                       "metrics/loss/c/0"):
            assert ("fsync", str(root / needed)) in between, f"{needed} not synced before snapshot {i}'s commit"
        after = events[committed + 1:committed + 3]
        assert after == [("fsync", str(root / "zarr.json")), ("fsync", str(root))], after
    plain, root = traced_events(tmp_path, durable=False)
    assert not [e for e in plain if e[0] == "fsync" and "/params/" in e[1]], "the default mode should not fsync"


# -- found by review: the edges of the fixes above -----------------------------------------
def test_a_metric_created_just_before_a_kill_is_healed_on_reopen(tmp_path, monkeypatch):
    import trajstore._creating
    from trajstore._creating import BACKFILL, create_row_array as _create_row_array

    monkeypatch.setattr(trajstore._creating, "ROW_CHUNK", 4)  # small row chunks: the backfill spans two
    path = tmp_path / "run.zarr"
    with TrajectoryStore.create(path, layout()) as store:
        for i in range(6):
            store.append(np.zeros(1000, np.float32), step=i, metrics={"loss": 1.0})
    with TrajectoryStore.open(path, "a") as store:  # a writer killed after creating "acc", before backfilling
        _create_row_array(store.group["metrics"], "acc", 16, "float64", float("nan"), {BACKFILL: 6})
    with TrajectoryStore.open(path) as store:  # readers meanwhile: NaN by design, not damage
        assert np.isnan(store.metrics("acc")).all()
    with TrajectoryStore.open(path, "a") as store:
        store.append(np.zeros(1000, np.float32), step=6, metrics={"acc": 0.5})
    with TrajectoryStore.open(path) as store:
        acc = store.metrics("acc")
        assert np.isnan(acc[:6]).all() and acc[6] == 0.5
    from trajstore.inspect import verify

    assert verify(path).ok


def test_overwrite_refuses_while_an_extraction_holds_the_store(tmp_path):
    from trajstore import StoreLockedError

    path = tmp_path / "run.zarr"
    with TrajectoryStore.create(path, layout()) as store:
        store.append(np.zeros(1000, np.float32), step=0)
    with TrajectoryStore.open(path) as reader, reader.derived():
        with pytest.raises(StoreLockedError):
            TrajectoryStore.create(path, layout(), overwrite=True)
    with TrajectoryStore.open(path) as store:
        assert len(store) == 1


def test_import_resume_refuses_when_the_folder_changed(tmp_path):
    from trajstore.importers import import_checkpoints

    folder = tmp_path / "ckpts"
    folder.mkdir()
    for i in (1, 2, 3):
        torch.save({"w": torch.full((5,), float(i))}, folder / f"epoch{i}.pt")
    import_checkpoints(folder, tmp_path / "run.zarr")
    torch.save({"w": torch.full((5,), 0.0)}, folder / "epoch0.pt")  # a file appeared before the others
    with pytest.raises(InvalidArgumentError, match="files changed"):
        import_checkpoints(folder, tmp_path / "run.zarr", resume=True)
    import_checkpoints(folder, tmp_path / "new.zarr", resume=True)  # nothing to resume: a fresh import
    with TrajectoryStore.open(tmp_path / "new.zarr") as store:
        assert store.steps.tolist() == [0, 1, 2, 3]


def test_a_creator_that_loses_the_race_never_clears_the_winner(tmp_path, monkeypatch):
    """Hole 5, with the losing interleaving forced: the other creator finishes after this one
    looked at the path and before it took the lock."""
    import trajstore._creating

    path = tmp_path / "run.zarr"
    real_lock, raced = trajstore._creating.WriterLock, []

    class LateLock(real_lock):
        def acquire(self):
            if not raced:
                raced.append(True)
                with TrajectoryStore.create(path, layout()) as winner:  # the other creator wins meanwhile
                    winner.append(np.full(1000, 7, np.float32), step=0)
            return super().acquire()

    monkeypatch.setattr(trajstore._creating, "WriterLock", LateLock)
    with pytest.raises(StoreExistsError):
        TrajectoryStore.create(path, layout())
    monkeypatch.undo()
    with TrajectoryStore.open(path) as store:
        assert len(store) == 1 and store.read(0)[0] == 7


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "sub").mkdir(parents=True)
    (folder / "ep1.pt").write_bytes(b"weights")
    (folder / "sub" / "notes.txt").write_text("mine")
    with pytest.raises(StoreExistsError, match="no trajstore store"):
        TrajectoryStore.create(folder, layout(), overwrite=True)
    assert (folder / "ep1.pt").read_bytes() == b"weights" and (folder / "sub" / "notes.txt").exists()
    with TrajectoryStore.create(tmp_path / "run.zarr", layout()) as store:
        store.append(np.ones(1000, np.float32), step=0)
    with TrajectoryStore.create(tmp_path / "run.zarr", layout(), overwrite=True) as store:  # a store: replaced
        assert len(store) == 0


def test_a_create_killed_before_its_attributes_is_created_again_without_overwrite(tmp_path):
    import json

    path = tmp_path / "run.zarr"
    TrajectoryStore.create(path, layout()).close()
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"] = {}  # the state a kill leaves between creating the arrays and writing the attributes
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(NotAStoreError, match="creation was interrupted.*nothing was ever committed"):
        verify(path)  # says what happened and what to do (found by the fault campaign's import kills)
    with TrajectoryStore.create(path, layout()) as store:
        store.append(np.ones(1000, np.float32), step=0)
    with TrajectoryStore.open(path) as store:
        assert len(store) == 1
    (path / "mine.txt").write_text("not ours")  # anything else in the folder: never cleared
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"] = {}
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(StoreExistsError):
        TrajectoryStore.create(path, layout())
