"""`trajstore repair` and `trajstore gc` on real damaged stores: what they drop, keep, and survive."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cli.main import app
from trajstore import TrajectoryStore
from trajstore.errors import LocalPathRequiredError, StoreLockedError, SubspaceNotFoundError
from trajstore.lock import StaleLockWarning
from trajstore.inspect import verify
from trajstore.maintenance import MARKER, gc, repair

from .helpers import MixedNet, sgd_steps
from .writer_proc import layout, row

ROOT = Path(__file__).resolve().parents[1]
N = 20_000


def record(path, codec="lossless", t=10, n=N, chunk=1 << 12, shard=1 << 13):
    store = TrajectoryStore.create(path, layout(n), codec=codec, chunk_size=chunk, shard_size=shard,
                                   metadata={"seed": 0, "note": "test"})
    for i in range(t):
        store.append(row(i, n), step=10 * i, epoch=i // 3, metrics={"loss": 1.0 / (i + 1)} if i % 2 else {})
    store.close()


def contents(path) -> dict:
    """Everything a snapshot carries, read back: decoded rows (as bits), steps, epochs, times, metrics, buffers."""
    with TrajectoryStore.open(path) as store:
        t = len(store)
        out = {"rows": store.read(slice(None)).view(np.uint32), "step": store.steps, "epoch": store.epochs,
               "wall_time": store.wall_times, "metrics": {m: store.metrics(m) for m in store.metric_names()}}
        out["buffers"] = store.group["buffers"][:t] if "buffers" in store.group else None
        return out


def select(c: dict, keep: list[int]) -> dict:
    return {k: ({m: v[keep] for m, v in c[k].items()} if k == "metrics" else None if c[k] is None else c[k][keep])
            for k in c}


def assert_same(a: dict, b: dict) -> None:
    assert a["rows"].shape == b["rows"].shape and np.array_equal(a["rows"], b["rows"])
    for key in ("step", "epoch", "wall_time", "buffers"):
        same = a[key] is None and b[key] is None or np.array_equal(a[key], b[key], equal_nan=a[key].dtype.kind == "f")
        assert same, key
    assert a["metrics"].keys() == b["metrics"].keys()
    for m in a["metrics"]:
        assert np.array_equal(a["metrics"][m], b["metrics"][m], equal_nan=True), m


def flip(path, key, offset=100):
    f = Path(path) / key
    data = bytearray(f.read_bytes())
    data[offset] ^= 0xFF
    f.write_bytes(bytes(data))


def tree(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def siblings(path) -> list[str]:
    return sorted(p.name for p in Path(path).parent.iterdir())


def test_repair_truncates_to_the_first_bad_snapshot_and_names_the_good_ones_it_drops(tmp_path):
    from pipeline.gram import cached_rows, update_gram

    path = tmp_path / "run.zarr"
    record(path)
    before = contents(path)
    with TrajectoryStore.open(path) as store, store.derived() as root:
        update_gram(store, root)
    flip(path, "params/c/4/1")
    assert sorted(int(i) for i in verify(path).to_json()["bad_snapshots"]) == [4]
    report = repair(path)
    assert report.ok and report.action == "truncate" and (report.committed_before, report.committed_after) == (10, 4)
    assert [(d.index, d.step, d.bad) for d in report.dropped] == [(i, 10 * i, i == 4) for i in range(4, 10)]
    assert "crc32c" in report.dropped[0].reasons[0]
    assert len(report.dropped[0].reasons) == 1, report.dropped[0].reasons  # (the trial: said twice)
    assert "trajstore repair" not in report.dropped[0].reasons[0]  # (and told to run what is running)
    assert all("after the first bad snapshot 4" in d.reasons[0] for d in report.dropped[1:])
    assert verify(path).ok
    assert_same(contents(path), select(before, list(range(4))))
    with TrajectoryStore.open(path) as store:
        assert store.attrs["truncations"] == [4]  # the store's own truncate path
        assert cached_rows(store) == 4  # ... so the cached Gram no longer covers the dropped rows
    with TrajectoryStore.open(path, "a") as store:  # and the writer resumes right after
        store.append(row(99, N), step=99)
    assert contents(path)["step"].tolist() == [0, 10, 20, 30, 99]


def test_repair_finds_short_arrays_and_missing_files(tmp_path):
    path = tmp_path / "run.zarr"
    record(path)
    zarr.open_array(str(path / "epoch"), mode="r+").resize((7,))  # metadata damaged: 10 committed, 7 epochs
    (path / "params/c/5/1").unlink()  # a shard file lost
    report = repair(path, dry_run=True)
    assert not report.ok and report.committed_after == 5 and "epoch array's 7 rows" in report.store_problems[0]
    assert {d.index: d.bad for d in report.dropped} == {5: True, 6: False, 7: True, 8: True, 9: True}
    assert "params shard files missing: params/c/5/1" in report.dropped[0].reasons
    assert repair(path, drop_bad_only=True).committed_after == 6 and verify(path).ok
    assert contents(path)["step"].tolist() == [0, 10, 20, 30, 40, 60]


@pytest.mark.parametrize("codec,buffers", [("lossless", False), ("xor-delta:4", False), ("lossless", True)])
def test_drop_bad_only_keeps_the_later_good_snapshots_bit_identical(tmp_path, codec, buffers):
    from pipeline import extract_subspace

    path = tmp_path / "run.zarr"
    if buffers:
        torch.manual_seed(0)
        model = MixedNet()
        store = TrajectoryStore.create(path, model, buffers=True, chunk_size=256, shard_size=512)
        store.append(model, step=0, metrics={"loss": 2.0})
        for k, loss in enumerate(sgd_steps(model, 9), start=1):  # BN statistics change with every step
            store.append(model, step=7 * k, epoch=k, metrics={"loss": loss})
        store.close()
    else:
        record(path, codec)
    extract_subspace(path, dim=2, name="before")
    before = contents(path)
    with TrajectoryStore.open(path) as store:
        fixed = {k: store.attrs[k] for k in ("layout", "buffer_layout", "codec", "dtype", "metadata", "run_id")}
        fixed["grid"] = (store.group["params"].chunks, store.group["params"].shards)
    flip(path, "params/c/5/0")
    report = repair(path, drop_bad_only=True)
    bad = [5, 6, 7] if codec.startswith("xor") else [5]  # xor: the rest of row 5's keyframe group 4..7
    keep = [i for i in range(10) if i not in bad]
    assert report.ok and report.action == "compact" and report.committed_after == len(keep)
    assert [d.index for d in report.dropped] == bad and all(d.bad for d in report.dropped)
    assert [(m.index, m.new_index, m.step) for m in report.moved] == [
        (i, keep.index(i), int(before["step"][i])) for i in keep if i > 5]
    assert report.derived_discarded == ["subspaces/before", "gram"]
    assert verify(path).ok
    assert_same(contents(path), select(before, keep))
    assert siblings(path) == ["run.zarr"], "no leftovers next to the store"
    with TrajectoryStore.open(path) as store:
        assert "subspaces" not in store.group and "gram" not in store.group
        assert fixed == {**{k: store.attrs[k] for k in ("layout", "buffer_layout", "codec", "dtype", "metadata",
                                                        "run_id")},
                         "grid": (store.group["params"].chunks, store.group["params"].shards)}
    with TrajectoryStore.open(path, "a") as store:  # the rebuilt store takes appends as usual
        if buffers:
            store.append(model, step=1000)
        else:
            store.append(row(50, N), step=1000)
    assert contents(path)["step"][-1] == 1000 and verify(path).ok


@pytest.mark.parametrize("drop_bad_only", [False, True])
def test_dry_run_changes_nothing(tmp_path, drop_bad_only):
    path = tmp_path / "run.zarr"
    record(path, "xor-delta:4")
    flip(path, "params/c/2/1")
    temp = path / "params/c/0" / f"1.{uuid.uuid4().hex}.partial"  # an orphan for gc to list
    temp.write_bytes(b"x" * 10)
    files, listing = tree(path), siblings(path)
    report = repair(path, dry_run=True, drop_bad_only=drop_bad_only)
    assert not report.ok and [d.index for d in report.dropped if d.bad] == [2, 3]
    assert report.committed_after == (8 if drop_bad_only else 2)
    result = CliRunner().invoke(app, ["repair", str(path), "--dry-run"] + ["--drop-bad-only"] * drop_bad_only)
    assert result.exit_code == 1, result.output
    assert "dry run" in " ".join(result.output.split()) and "bad" in " ".join(result.output.split())
    assert [i.path for i in gc(path, dry_run=True).removed] == [str(temp.relative_to(path))]
    assert tree(path) == files and siblings(path) == listing, "a dry run must not change a byte"


def kill_before_commit(path, n, at):
    """A writer process that SIGKILLs itself after writing every file of row ``at``, before its commit."""
    code = (
        "import os, signal, sys\n"
        "from trajstore import TrajectoryStore\n"
        "from tests.writer_proc import layout, row\n"
        f"s = TrajectoryStore.create({str(path)!r}, layout({n}), chunk_size=1 << 12, shard_size=1 << 13)\n"
        "commit = s._commit_meta\n"
        f"s._commit_meta = lambda meta: os.kill(os.getpid(), signal.SIGKILL) if meta['committed'] == {at + 1} "
        "else commit(meta)\n"
        f"for i in range({at + 3}):\n"
        f"    s.append(row(i, {n}), step=i, epoch=i, metrics={{'i': float(i)}})\n"
        "s.flush()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc


def test_gc_after_kill_9_removes_rows_beyond_committed_and_temp_files_only(tmp_path):
    path = tmp_path / "run.zarr"
    kill_before_commit(path, N, at=3)
    orphans = sorted(p.name for p in (path / "params/c/3").iterdir())
    assert orphans == ["0", "1", "2"], "row 3 was written but never committed"
    temp = path / "params/c/1" / f"0.{uuid.uuid4().hex}.partial"  # as zarr's LocalStore names a write in flight
    temp.write_bytes(b"x" * 1000)
    with TrajectoryStore.open(path) as store:
        assert len(store) == 3
    dry = gc(path, dry_run=True)
    assert (path / "params/c/3/0").exists() and temp.exists()
    assert any("stale lock" in note for note in dry.notes), dry.notes  # the dead writer's lock, reported
    report = gc(path)
    want = {"params/c/3/0", "params/c/3/1", "params/c/3/2", str(temp.relative_to(path))}
    assert {i.path for i in report.removed} == {i.path for i in dry.removed} == want
    assert report.bytes_freed == sum(i.bytes for i in dry.removed) > 1000 + 3 * 4096
    assert not (path / "params/c/3").exists() and not temp.exists() and (path / "params/c/1/0").exists()
    assert verify(path).ok
    with TrajectoryStore.open(path, "a") as store:
        for i in (3, 4):
            store.append(row(i, N), step=i, epoch=i, metrics={"i": float(i)})
    got = contents(path)
    assert got["step"].tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(got["rows"], np.stack([row(i, N) for i in range(5)]).view(np.uint32))
    assert gc(path).bytes_freed == 0


@pytest.mark.filterwarnings("ignore:Object at gone is not recognized")
def test_gc_subspaces_and_gram_update_never_touches_committed_rows(tmp_path):
    from pipeline import extract_subspace, open_subspace
    from pipeline.compute import Interrupted, StopFlag
    from pipeline.gram import update_gram

    path = tmp_path / "run.zarr"
    record(path, t=12, n=50_003, chunk=1 << 14, shard=1 << 14)
    extract_subspace(path, dim=2, name="a")
    kept_basis = extract_subspace(path, dim=3, name="b").to_numpy()
    stop = StopFlag()
    with pytest.raises(Interrupted):  # stopped before any basis block: an unfinished subspace
        extract_subspace(path, dim=2, name="c", snapshots=slice(0, 6), stop=stop,
                         progress=lambda done, total: stop.set() if done * 2 >= total else None)
    with TrajectoryStore.open(path, "a") as store:
        store.append(row(12, 50_003), step=120)
    stop = StopFlag()
    with TrajectoryStore.open(path) as store, store.derived() as root, pytest.raises(Interrupted):
        update_gram(store, root, stop=stop, progress=lambda done, total: stop.set() if done >= 1 else None)
    before = contents(path)
    report = gc(path)
    assert report.removed == [] and (path / "gram/update").exists() and (path / "subspaces/c").exists()
    assert any("gram/update" in k and "resumable" in k for k in report.kept), report.kept
    assert any("subspaces/c" in k and "resumable" in k for k in report.kept), report.kept
    with pytest.raises(SubspaceNotFoundError, match="available"):
        gc(path, subspace="nope")
    report = gc(path, subspace="a")
    assert [i.path for i in report.removed] == ["subspaces/a"] and report.bytes_freed > 50_003 * 2 * 4 * 0.5
    with pytest.raises(SubspaceNotFoundError):
        open_subspace(path, "a")
    assert np.array_equal(open_subspace(path, "b").to_numpy(), kept_basis)
    assert [i.path for i in gc(path, incomplete=True).removed] == ["subspaces/c"]
    partial = path / "subspaces/b/basis.f32.npy.partial"  # pipeline.basis's memory-map copy, maybe in progress
    partial.write_bytes(b"p" * 100)
    own = path / "subspaces/b/basis-0123abcd.f32.npy.4242-89abcdef.partial"  # today's: one file per writer
    own.write_bytes(b"p" * 100)
    os.utime(own, (time.time() - 2 * 3600,) * 2)
    (path / "subspaces/gone").mkdir()  # the cache folder of a subspace deleted by hand
    (path / "subspaces/gone/basis.f32.npy").write_bytes(b"q" * 100)
    report = gc(path)
    assert sorted(i.path for i in report.removed) == [
        "subspaces/b/basis-0123abcd.f32.npy.4242-89abcdef.partial", "subspaces/gone"] and partial.exists()
    assert any("basis.f32.npy.partial" in k and "in progress" in k for k in report.kept), report.kept
    os.utime(partial, (time.time() - 2 * 3600,) * 2)  # idle for two hours: abandoned
    assert [i.path for i in gc(path).removed] == ["subspaces/b/basis.f32.npy.partial"] and not partial.exists()
    with TrajectoryStore.open(path, "a") as store:
        store.truncate(12)  # the update covered 13 rows; row 12 may now be replaced
    report = gc(path)
    removed = {i.path for i in report.removed}  # and row 12's files, now beyond committed
    assert removed == {"gram/update"} | {f"params/c/12/{j}" for j in range(4)} and not (path / "gram/update").exists()
    assert (path / "gram/value").exists() and (path / "subspaces/b").exists()
    assert_same(contents(path), select(before, list(range(12))))
    assert verify(path).ok and not (path / ".trajstore-trash").exists()
    (path / ".trajstore-trash/0123").mkdir(parents=True)  # a gc killed between its rename and its delete
    (path / ".trajstore-trash/0123/zarr.json").write_text("{}")
    assert [(i.path, i.kind) for i in gc(path).removed] == [(".trajstore-trash", "trash")]
    with TrajectoryStore.open(path) as other, other.derived():  # an extraction is running
        assert any("left alone" in k for k in gc(path).kept)
        with pytest.raises(StoreLockedError):
            gc(path, subspace="b")
    assert (path / "subspaces/b").exists()


def test_interrupted_swaps_are_recognised_and_finished(tmp_path):
    """The four states a kill can leave, made from real stores: each opens, verifies as old or new,
    and the next repair (or gc) removes the leftover according to the marker."""
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    record(old)
    flip(old, "params/c/6/0")
    shutil.copytree(old, new)
    repair(new, drop_bad_only=True)
    want = contents(new)
    cases = {"built, not swapped": ("old", "tmp", "tmp"), "swapped": ("new", "tmp", "run"),
             "swapped, renamed": ("new", "old", "run"), "building": ("old", "tmp", None)}
    for k, (run_is, leftover, marker_in) in enumerate(cases.values()):
        path = tmp_path / f"case{k}" / "run.zarr"
        shutil.copytree(old if run_is == "old" else new, path)
        other = path.with_name(f"run.zarr.repair-{leftover}")
        shutil.copytree(new if run_is == "old" else old, other)
        if marker_in:
            ((path if marker_in == "run" else other) / MARKER).write_text("{}")
        assert verify(path).ok == (run_is == "new")
        report = repair(path, drop_bad_only=True) if k % 2 else gc(path)
        items = report.leftovers if k % 2 else report.removed
        assert [i.path for i in items] == [str(other)]
        assert ("pre-repair" in items[0].reason) == (run_is == "new"), items[0].reason
        assert siblings(path) == ["run.zarr"] and not (path / MARKER).exists()
        if run_is == "new" or k % 2:
            assert_same(contents(path), want)


# One process imports everything once, then forks a child per repair, so each trial costs the
# repair, not an interpreter start; the test SIGKILLs the child (a real repair process) mid-way.
REPAIR_SERVER = """
import os, sys, time
import torch  # create() imports it: keep that out of the timed part
from trajstore.maintenance import repair
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        t0 = time.perf_counter()
        repair(line.strip(), drop_bad_only=True)
        print("done", time.perf_counter() - t0, flush=True)
        os._exit(0)
    print("pid", pid, flush=True)
    print("status", os.waitpid(pid, 0)[1], flush=True)
"""


def test_kill_9_during_drop_bad_only_leaves_the_old_or_the_new_store(tmp_path):
    kill_trials(tmp_path, [(0, .5), (.5, 1), (.9, 1.3), (.95, 1.3)])


@pytest.mark.slow
@pytest.mark.timeout(3600)  # at volume, on a loaded 2-core machine
def test_kill_9_during_drop_bad_only_many_instants(tmp_path):
    kill_trials(tmp_path, [(i / 10, (i + 1) / 10) for i in range(13)] + [(.9, 1.1)] * 7)


def kill_trials(tmp_path, strata: list[tuple[float, float]]) -> None:
    """SIGKILL a repair --drop-bad-only at instants drawn from ``strata`` (fractions of its duration)."""
    template = tmp_path / "template.zarr"
    record(template, "xor-delta:4", t=12, n=40_003, chunk=1 << 14, shard=1 << 15)
    old = contents(template)
    flip(template, "params/c/5/1")
    old_bad = verify(template).to_json()["bad_snapshots"].keys()
    keep = [i for i in range(12) if i not in (5, 6, 7)]
    server = subprocess.Popen([sys.executable, "-c", REPAIR_SERVER], cwd=ROOT, text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)

    def run(path, kill_after=None) -> dict:
        server.stdin.write(f"{path}\n")
        server.stdin.flush()
        lines = {}
        while "status" not in lines:
            key, value = server.stdout.readline().split()
            lines[key] = float(value)
            if key == "pid" and kill_after is not None:
                time.sleep(kill_after)
                try:
                    os.kill(int(value), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return lines

    try:
        first = tmp_path / "first" / "run.zarr"
        shutil.copytree(template, first)
        measured = run(first)
        assert measured["status"] == 0 and "done" in measured
        new = contents(first)
        assert_same(new, select(old, keep))
        rng = random.Random(8)
        outcomes = []
        for trial, (lo, hi) in enumerate(strata):
            path = tmp_path / f"trial{trial}" / "run.zarr"
            shutil.copytree(template, path)
            result = run(path, rng.uniform(lo, hi) * measured["done"])
            report = verify(path)
            outcomes.append(("new" if report.ok else "old") + ("" if "done" in result else " (killed)"))
            if report.ok:
                assert_same(contents(path), new)
            else:
                assert report.to_json()["bad_snapshots"].keys() == old_bad
                with TrajectoryStore.open(path) as store:
                    for i in keep:
                        assert np.array_equal(store.read(i).view(np.uint32), old["rows"][i]), i
            assert repair(path, drop_bad_only=True).ok  # the next run finishes the job from either state
            assert_same(contents(path), new)
            assert siblings(path) == ["run.zarr"]
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    print("kill outcomes:", outcomes, f"repair took {measured['done']:.2f} s")


def test_cli_repair_and_gc_json(tmp_path):
    path = tmp_path / "run.zarr"
    record(path)
    runner = CliRunner()
    result = runner.invoke(app, ["repair", str(path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["action"] == "none"
    flip(path, "params/c/8/0")
    result = runner.invoke(app, ["repair", str(path)])
    assert result.exit_code == 0 and "repaired" in " ".join(result.output.split()) and "8 -> " not in " ".join(result.output.split())
    assert "committed 10 -> 8" in " ".join(result.output.split()) and "good" in " ".join(result.output.split())
    result = runner.invoke(app, ["gc", str(path), "--json"])
    data = json.loads(result.stdout)
    assert result.exit_code == 0 and data["bytes_freed"] > 0
    assert {i["path"] for i in data["removed"]} >= {"params/c/8/0", "params/c/9/0"}
    result = runner.invoke(app, ["gc", str(path), "--subspace", "missing"])
    assert result.exit_code == 2 and "no subspace 'missing'" in " ".join(result.output.split())
    with TrajectoryStore.open(path, "a"):  # a live writer: neither command races it
        for command in ("repair", "gc"):
            result = runner.invoke(app, [command, str(path)])
            assert result.exit_code == 2 and "being written by" in " ".join(result.output.split()), result.output


@pytest.mark.filterwarnings("ignore::trajstore.lock.NonAtomicLockWarning")
def test_object_store_truncates_and_refuses_compaction_with_a_typed_error():
    url = f"memory://maint-{uuid.uuid4().hex}/run.zarr"
    store = TrajectoryStore.create(url, layout(5000), chunk_size=1024, shard_size=2048)
    for i in range(6):
        store.append(row(i, 5000), step=i)
    store.close()
    fs, root = fsspec.core.url_to_fs(url)
    key = f"{root}/params/c/3/1"
    data = bytearray(fs.cat_file(key))
    data[50] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    with pytest.raises(LocalPathRequiredError, match="local path"):
        repair(url, drop_bad_only=True)
    report = repair(url)
    assert report.ok and report.committed_after == 3 and [d.index for d in report.dropped] == [3, 4, 5]
    assert verify(url).ok
    removed = {i.path for i in gc(url).removed}
    assert "params/c/5/0" in removed and not any(k.startswith("params/c/2/") for k in removed)
    assert not fs.exists(f"{root}/params/c/4/0") and fs.exists(f"{root}/params/c/2/0")


def test_drop_bad_only_on_a_bfloat16_xor_store_keeps_the_good_rows_bit_identical(tmp_path):
    path = tmp_path / "run.zarr"
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    with TrajectoryStore.create(path, model, codec="xor-delta:4", chunk_size=1 << 10, shard_size=1 << 11) as store:
        for i in range(12):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
            store.append(model, step=i)
    before = contents(path)
    flip(path, "params/c/5/0")  # rows 6, 7 decode through it; 8 is a keyframe, 9-11 decode through the chain
    report = repair(path, drop_bad_only=True)
    keep = [0, 1, 2, 3, 4, 8, 9, 10, 11]
    assert report.ok and report.action == "compact" and report.committed_after == len(keep)
    assert_same(contents(path), select(before, keep))


def test_drop_bad_only_refuses_a_store_with_optimizer_state_and_changes_nothing(tmp_path):
    from trajstore.errors import RepairError

    path = tmp_path / "run.zarr"
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with TrajectoryStore.create(path, model, optimizer_state=True, chunk_size=1 << 10, shard_size=1 << 11) as store:
        for i in range(6):
            model(torch.randn(4, 64)).sum().backward()
            opt.step()
            store.append(model, step=i, optimizer=opt)
    flip(path, "params/c/2/0")
    files = tree(path)
    with pytest.raises(RepairError, match="optimizer state"):
        repair(path, drop_bad_only=True)
    assert tree(path) == files
    report = repair(path)  # truncating keeps the state of the snapshots it keeps
    assert report.ok and report.committed_after == 2
    with TrajectoryStore.open(path) as store:
        assert store.optimizer_state(1)


def test_drop_bad_only_keeps_an_old_bf16_stores_dtype_and_format(tmp_path):
    """A bf16 model recorded widened to float32 by a trajstore before format 3: compaction keeps its
    float32 rows and format version (older trajstores still read it), never an upgrade to native bf16."""
    path = tmp_path / "old.zarr"
    model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    with torch.no_grad():
        for q in model.parameters():
            q.copy_(q.bfloat16().float())
    rows = []
    with TrajectoryStore.create(path, model, codec="lossless-zstd") as store:
        for step in range(5):
            with torch.no_grad():
                for q in model.parameters():
                    q.copy_((q + 0.25).bfloat16().float())
            store.append(model, step=step)
            rows.append(torch.cat([q.detach().reshape(-1) for q in model.parameters()]).numpy().copy())
    root = json.loads((path / "zarr.json").read_text())
    meta = root["attributes"]["trajstore"]
    for spec in meta["layout"]:
        spec["dtype"] = "bfloat16"  # what an older trajstore wrote for a bf16 model
    assert meta["format_version"] == 1 and meta["dtype"] == "float32"
    (path / "zarr.json").write_text(json.dumps(root))
    shard = path / "params" / "c" / "2" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    report = repair(path, drop_bad_only=True)
    assert report.ok and report.action == "compact" and report.committed_after == 4
    meta = json.loads((path / "zarr.json").read_text())["attributes"]["trajstore"]
    assert meta["format_version"] == 1 and meta["dtype"] == "float32"
    with TrajectoryStore.open(path) as store:
        assert store.values == "float32"
        for j, i in enumerate([0, 1, 3, 4]):
            np.testing.assert_array_equal(store.reader().read_block(j, j + 1)[0], rows[i])
    assert verify(path).ok


def test_dry_runs_leave_a_killed_writers_lock_as_it_lies_and_refuse_a_live_writer(tmp_path):
    """A dry run changes nothing: not even the lock file a killed writer left (the real run takes it over),
    and it refuses, as the real run does, while a writer holds the lock."""
    path = tmp_path / "run.zarr"
    kill_before_commit(path, N, at=3)
    lock = path / ".trajstore.lock"
    before = lock.read_bytes()
    assert json.loads(before)["pid"]  # the killed writer's record
    result = CliRunner().invoke(app, ["repair", str(path), "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "stale lock" in result.output and "left as it lies" in result.output and "broke" not in result.output
    assert gc(path, dry_run=True).removed and repair(path, dry_run=True).ok
    assert lock.read_bytes() == before, "a dry run rewrote or emptied the lock file"
    assert (path / "params/c/3/0").exists()
    with pytest.warns(StaleLockWarning, match="broke a stale lock"):  # the real opening takes it over
        writer = TrajectoryStore.open(path, "a")  # a live writer (this process)
    with writer:
        for dry in (lambda: repair(path, dry_run=True), lambda: gc(path, dry_run=True)):
            with pytest.raises(StoreLockedError, match="repair and gc need the store to themselves: wait"):
                dry()
        writer.append(row(3, N), step=3, epoch=3, metrics={"i": 3.0})
    assert repair(path).ok and len(TrajectoryStore.open(path)) == 4


def test_repair_and_gc_refuse_a_live_writer_in_another_process_with_their_own_advice(tmp_path):
    path = tmp_path / "run.zarr"
    record(path, t=3)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom trajstore import TrajectoryStore\n"
                               f"s = TrajectoryStore.open({str(path)!r}, 'a')\nprint('open', flush=True)\n"
                               "time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        for run in (lambda: repair(path), lambda: gc(path), lambda: repair(path, dry_run=True)):
            with pytest.raises(StoreLockedError, match=f"pid {holder.pid} .*need the store to themselves") as caught:
                run()
            assert "mode='r'" not in str(caught.value)  # the Python API's advice is not for maintenance
    finally:
        holder.kill()
        holder.wait()
    assert repair(path).ok


def test_dry_run_plans_what_the_real_run_does_for_a_metric_killed_before_its_backfill(tmp_path, monkeypatch):
    """A metric created just before a kill has no chunk files for its rows before the first value (NaN by
    design): the real run's writer opening backfills them, so the dry run must not plan to drop those rows."""
    import trajstore._creating
    from trajstore._creating import BACKFILL, create_row_array

    monkeypatch.setattr(trajstore._creating, "ROW_CHUNK", 4)  # the backfill spans two chunk files
    path = tmp_path / "run.zarr"
    with TrajectoryStore.create(path, layout(N)) as store:
        for i in range(6):
            store.append(row(i, N), step=i, metrics={"loss": 1.0})
    with TrajectoryStore.open(path, "a") as store:  # a writer killed after creating "acc", before backfilling
        create_row_array(store.group["metrics"], "acc", 16, "float64", float("nan"), {BACKFILL: 6})
    assert not (path / "metrics/acc/c/0").exists()
    files = tree(path)
    planned = repair(path, dry_run=True)
    assert tree(path) == files, "a dry run must not change a byte"
    done = repair(path)
    assert (planned.action, planned.committed_after, planned.ok) == (done.action, done.committed_after, done.ok)
    assert planned.ok and planned.committed_after == 6 and not planned.dropped
    assert len(TrajectoryStore.open(path)) == 6 and verify(path).ok


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)  # a pid that no longer runs


def test_a_dry_run_goes_by_the_flock_so_a_lock_nothing_holds_is_stale_wherever_its_record_is_from(tmp_path):
    """Locally flock is the truth: a record from another container or host that no process holds is stale, and
    the real run takes it over; the dry run must say so, not refuse (its record alone cannot be checked here).
    A flock held by a live writer is refused whatever the record says."""
    from trajstore.format import LOCK_NAME
    from trajstore.holders import new_holder

    path = tmp_path / "run.zarr"
    record(path, t=3)
    lock = path / LOCK_NAME
    this = new_holder("a writer (recording, import, repair or gc)")
    for fields in ({"pidns": 4026531836 if this.get("pidns") != 4026531836 else 1}, {"host": "elsewhere"}):
        lock.write_text(json.dumps({**this, "pid": dead_pid(), **fields}))
        before, files = lock.read_bytes(), tree(path)
        report = repair(path, dry_run=True)
        assert report.ok and any("stale lock" in n and "take it over" in n for n in report.notes), report.notes
        assert gc(path, dry_run=True) is not None and lock.read_bytes() == before and tree(path) == files
    done = repair(path)  # the real run takes it over
    assert done.ok and any("broke a stale lock" in n for n in done.notes), done.notes
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(lock)!r}, os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('held', flush=True)\ntime.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:  # a live flock whose record is empty (a writer between taking the lock and writing its record)
        assert holder.stdout.readline().strip() == "held"
        lock.write_text("")
        with pytest.raises(StoreLockedError, match="has not written its record yet"):
            repair(path, dry_run=True)
    finally:
        holder.kill()
        holder.wait()
    assert repair(path, dry_run=True).ok


@pytest.mark.filterwarnings("ignore::trajstore.lock.NonAtomicLockWarning")
def test_an_object_stores_stale_lock_refuses_repair_with_the_flag_to_break_it():
    from trajstore.errors import StaleLockError
    from trajstore.format import LOCK_NAME
    from trajstore.holders import new_holder

    url = f"memory://maint-{uuid.uuid4().hex}/run.zarr"
    with TrajectoryStore.create(url, layout(5000), chunk_size=1024, shard_size=2048) as store:
        store.append(row(0, 5000), step=0)
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/{LOCK_NAME}", json.dumps({**new_holder("a writer"), "pid": dead_pid()}).encode())
    for run in (lambda: repair(url), lambda: gc(url)):
        with pytest.raises(StaleLockError, match="rerun with --break-lock") as caught:
            run()
        assert "TrajectoryStore.open" not in str(caught.value)
    report = repair(url, dry_run=True)
    assert report.ok and any("stale lock" in n and "break it (with --break-lock)" in n for n in report.notes)
    assert repair(url, break_lock=True).ok and not fs.exists(f"{root}/{LOCK_NAME}")


def test_a_dry_run_refuses_its_plan_when_a_writer_commits_or_takes_the_lock_while_it_reads(tmp_path):
    """A dry run reads without the lock; a writer that appended meanwhile (or holds the lock now) makes its plan
    describe a store that is gone, so it is refused instead of reported."""
    path = tmp_path / "run.zarr"
    record(path, t=4)

    def append_meanwhile(done: int, total: int) -> None:
        with TrajectoryStore.open(path, "a") as writer:
            writer.append(row(len(writer), N), step=100 + len(writer))

    with pytest.raises(StoreLockedError, match=r"changed while the dry run read it \(appended to\).*rerun the dry"):
        repair(path, dry_run=True, progress=append_meanwhile)
    held = []

    def take_the_lock(done: int, total: int) -> None:
        if not held:
            held.append(TrajectoryStore.open(path, "a"))

    try:
        with pytest.raises(StoreLockedError, match="a writer took the lock"):
            repair(path, dry_run=True, progress=take_the_lock)
    finally:
        held[0].close()
    assert repair(path, dry_run=True).ok and len(TrajectoryStore.open(path)) > 4  # those appends committed


def test_a_writer_refused_by_a_running_repair_is_told_it_is_a_repair(tmp_path):
    """The trial: the holder was always "a writer (recording, import, repair or gc)"."""
    from trajstore._scan import open_locked

    path = tmp_path / "run.zarr"
    record(path, t=2)
    store, _ = open_locked(str(path), None)
    try:
        with pytest.raises(StoreLockedError, match=r"trajstore repair or gc \(maintenance\)"):
            TrajectoryStore.open(path, "a")
    finally:
        store.close()
    with TrajectoryStore.open(path, "a"):
        assert "recording" in json.loads((path / ".trajstore.lock").read_text())["purpose"]


def test_a_writer_opening_while_a_dry_run_probes_the_lock_waits_the_probe_out(tmp_path):
    """The review: a probe held a little longer (a paused dry-run process) made a training job fail at open,
    naming "pid None". A writer lock held with no live holder on record is a probe: the writer waits it out."""
    import fcntl
    import threading

    path = tmp_path / "run.zarr"
    record(path, t=2)
    fd = os.open(path / ".trajstore.lock", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the probe, paused for 0.5 s
    threading.Timer(0.5, lambda: os.close(fd)).start()
    began = time.monotonic()
    with TrajectoryStore.open(path, "a") as writer:
        writer.append(row(2, N), step=1000)
    assert time.monotonic() - began >= 0.4 and len(TrajectoryStore.open(path)) == 3
