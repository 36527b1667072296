"""The fault campaign: kill -9 at random instants, a real full disk, and live readers; prints a table.

Every trial checks what the README's Reliability section claims:

* **kill -9 while recording** (each codec preset, the background writer mid-shard): the store
  opens, ``verify`` passes, every committed snapshot equals what was appended (bit for bit
  for lossless presets; for lossy ones, what the preset's own encode/decode gives), and the next
  writer resumes right after the last commit.
* **kill -9 during extraction** (Gram pass and basis pass): rerunning resumes and writes a basis
  identical, byte for byte, to an uninterrupted extraction.
* **kill -9 during ``trajstore train``** (any phase): ``--resume`` finishes with final weights
  and history identical to an uninterrupted run.
* **kill -9 during ``trajstore import``**: the store verifies, holds the first files exactly,
  and ``import --resume`` completes it.
* **ENOSPC** on a size-limited tmpfs (RLIMIT_FSIZE where mounting is refused): a typed error
  in the loop, nothing committed lost, recording continues once space is freed.
* **concurrent readers**: while a writer appends, reader processes and ``extract --follow``
  never see an uncommitted, torn or wrong row.

usage: python benchmarks/fault_campaign.py [--quick] [--seed S] [--json FILE]
(fuzzing and the lossy bounds are property tests: tests/test_fuzz.py, tests/test_lossy_bounds.py)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.writer_proc import row  # noqa: E402
from trajstore import TrajectoryStore, get_preset  # noqa: E402
from trajstore.errors import NotAStoreError  # noqa: E402
from trajstore.inspect import verify  # noqa: E402

N = 300_007  # several shards a row, a partial last chunk
PY = sys.executable


def _popen(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _kill_after(proc: subprocess.Popen, seconds: float) -> bool:
    """kill -9 ``proc`` after ``seconds`` unless it ended; True when it was killed."""
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def expected_rows(codec: str, t: int) -> np.ndarray:
    """What a reader must get back for rows 0..t-1 of the writer_proc trajectory under ``codec``."""
    preset = get_preset(codec)
    rows = np.stack([row(i, N) for i in range(t)]) if t else np.empty((0, N), np.float32)
    if preset.lossless or not t:
        return rows
    reference = rows[0]
    stored = np.stack([preset.encode(r, i, None, reference) for i, r in enumerate(rows)])
    return preset.decode(stored, 0, reference, np.float32)


def check_store(path: Path, codec: str) -> int:
    """verify passes and every committed row is what was appended; returns the committed count."""
    report = verify(path)
    assert report.ok, report.to_json()
    with TrajectoryStore.open(path) as store:
        t = len(store)
        want = expected_rows(codec, t)
        got = store.read(slice(None))
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), f"{codec}: committed rows differ"
        assert store.steps.tolist() == list(range(t))
    return t


def recording_kills(work: Path, codec: str, kills: int, rng: random.Random) -> dict:
    path = work / f"rec-{codec.replace(':', '_')}.zarr"
    committed = []
    for k in range(kills):
        proc = _popen([PY, "-m", "tests.writer_proc", str(path), codec, str(N)])
        first = json.loads(proc.stdout.readline())
        if committed:  # the new writer starts right after the last commit
            assert first["start"] == committed[-1], (first, committed[-1])
        assert _kill_after(proc, rng.uniform(0.02, 1.0)), "the writer never ends on its own"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the dead writer's stale lock is reported, then taken
            TrajectoryStore.open(path, "a").close()
        committed.append(check_store(path, codec))
    assert kills < 10 or committed[-1] > committed[0], f"no progress across restarts: {committed}"
    return {"kills": kills, "committed_at_end": committed[-1], "lost": 0}


def make_extraction_store(path: Path, t: int = 24, n: int = 1_500_000) -> None:
    from trajstore.layout import ParamLayout, TensorSpec

    rng = np.random.default_rng(3)
    base, drift = rng.standard_normal(n, dtype=np.float32), rng.standard_normal((4, n), dtype=np.float32)
    with TrajectoryStore.create(path, ParamLayout([TensorSpec("w", (n,), "float32")]), chunk_size=1 << 16) as store:
        for i in range(t):
            coeffs = np.array([i, np.sin(i), np.cos(i / 3), (i % 5) / 5], np.float32)
            store.append(base + 0.01 * coeffs @ drift + 1e-3 * rng.standard_normal(n, dtype=np.float32), step=i)


EXTRACT = ["-m", "cli.main", "extract", "--dim", "5", "--json", "--block-size", str(1 << 16)]


def extraction_kills(work: Path, kills: int, rng: random.Random) -> dict:
    pristine = work / "extract-pristine.zarr"
    make_extraction_store(pristine)
    reference = work / "extract-reference.zarr"
    shutil.copytree(pristine, reference)
    began = time.perf_counter()
    subprocess.run([PY, *EXTRACT[:3], str(reference), *EXTRACT[3:]], cwd=ROOT, check=True, capture_output=True)
    full = time.perf_counter() - began
    with TrajectoryStore.open(reference) as store:
        want = store.group["subspaces/default/basis"][:]
    phases = {"gram": 0, "basis": 0, "complete, exiting": 0, "finished first": 0}
    for k in range(kills):
        path = work / "extract.zarr"
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(pristine, path)
        proc = _popen([PY, *EXTRACT[:3], str(path), *EXTRACT[3:]])
        if not _kill_after(proc, rng.uniform(0.3, 0.8 * full)):
            phase = "finished first"
        else:
            with TrajectoryStore.open(path) as store:
                sub = store.group["subspaces/default"] if "subspaces/default" in store.group else None
                phase = "gram" if sub is None else "complete, exiting" if sub.attrs.get("complete") else "basis"
        phases[phase] += 1
        if phase in ("gram", "basis"):  # rerunning the same command resumes
            done = subprocess.run([PY, *EXTRACT[:3], str(path), *EXTRACT[3:]], cwd=ROOT, capture_output=True,
                                  text=True)
            assert done.returncode == 0, f"the resumed extraction failed: {done.stderr[-1500:]}"
        with TrajectoryStore.open(path) as store:
            got = store.group["subspaces/default/basis"][:]
        assert np.array_equal(got, want), "a resumed extraction differs from the uninterrupted one"
        assert verify(path).ok
    return {"kills": kills - phases["finished first"], **phases, "seconds_uninterrupted": round(full, 1)}


def train_kills(work: Path, kills: int, rng: random.Random) -> dict:
    from tests.test_experiments import final_state

    reference = work / "train-reference"
    began = time.perf_counter()
    subprocess.run([PY, "-m", "tests.run_proc", str(reference)], cwd=ROOT, check=True, capture_output=True)
    full = time.perf_counter() - began
    want_ckpt, want_history = final_state(reference)
    phases: dict[str, int] = {}
    for k in range(kills):
        path = work / f"train-{k}"
        proc = _popen([PY, "-m", "tests.run_proc", str(path)])
        killed = _kill_after(proc, rng.uniform(3.0, max(3.5, 0.8 * full)))
        lines = [line for line in proc.stdout.read().splitlines() if line.strip()] if killed else []
        phase = lines[-1].split()[0] if lines else ("finished" if not killed else "start")
        phases[phase] = phases.get(phase, 0) + 1
        done = subprocess.run([PY, "-m", "tests.run_proc", str(path), "--resume"], cwd=ROOT, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        ckpt, history = final_state(path)
        assert history == want_history, "a resumed training run differs from the uninterrupted one"
        for name, weights in want_ckpt.items():
            for key in weights:
                assert np.array_equal(ckpt[name][key].numpy(), weights[key].numpy()), (name, key)
        shutil.rmtree(path)
    return {"kills": kills - phases.get("finished", 0), "phases": phases, "seconds_uninterrupted": round(full, 1)}


def import_kills(work: Path, kills: int, rng: random.Random) -> dict:
    import torch

    folder = work / "ckpts"
    folder.mkdir()
    for i in range(40):
        torch.save({"w": torch.from_numpy(row(i, N)), "b": torch.full((7,), float(i))}, folder / f"epoch{i}.pt")
    cmd = [PY, "-m", "cli.main", "import", str(folder), "--json"]
    began = time.perf_counter()
    subprocess.run([*cmd[:5], str(work / "import-reference.zarr"), "--json"], cwd=ROOT, check=True, capture_output=True)
    full = time.perf_counter() - began
    killed_total, interrupted_creates = 0, 0
    for k in range(kills):
        path = work / "import.zarr"
        shutil.rmtree(path, ignore_errors=True)
        proc = _popen([*cmd[:5], str(path), "--json"])
        killed_total += _kill_after(proc, rng.uniform(0.5, full))
        if (path / "zarr.json").exists():
            try:
                report = verify(path)
            except NotAStoreError as exc:  # killed inside create, before its attributes: nothing committed
                assert "creation was interrupted" in str(exc), exc
                interrupted_creates += 1
            else:
                assert report.ok
                with TrajectoryStore.open(path) as store:
                    for i in range(len(store)):
                        assert np.array_equal(store.state_dict(i)["w"].numpy(), row(i, N)), f"imported row {i} differs"
        resume = [] if not (path / "zarr.json").exists() else ["--resume"]
        subprocess.run([*cmd[:5], str(path), *resume, "--json"], cwd=ROOT, check=True, capture_output=True)
        with TrajectoryStore.open(path) as store:
            assert len(store) == 40 and store.steps.tolist() == list(range(40))
            assert np.array_equal(store.state_dict(39)["w"].numpy(), row(39, N))
    return {"kills": killed_total, "interrupted_creates": interrupted_creates, "seconds_uninterrupted": round(full, 1)}


ENOSPC_WRITER = """
import json, sys
import numpy as np
from tests.writer_proc import layout, row
from trajstore import TrajectoryStore, TrajstoreError
path, n, start, count, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if limit != "none":
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
store = (TrajectoryStore.open(path, "a") if start else
         TrajectoryStore.create(path, layout(n), chunk_size=1 << 14, shard_size=1 << 16))
out = {"start": len(store), "error": None}
try:
    for i in range(len(store), len(store) + count):
        store.append(row(i, n), step=i, metrics={"i": float(i)})
    store.flush()
except TrajstoreError as exc:
    out.update(error=type(exc).__name__, message=str(exc)[:300])
try:
    store.close()
except TrajstoreError as exc:
    out["close_error"] = type(exc).__name__
print(json.dumps(out))
"""


def enospc_trials(work: Path, trials: int, rng: random.Random) -> dict:
    """Fill a small real filesystem while recording; free space; recording continues."""
    mount = work / "smallfs"
    mount.mkdir()
    size_mib = 24
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0
    kind = f"tmpfs of {size_mib} MiB" if mounted else "RLIMIT_FSIZE (mounting was refused)"
    try:
        for k in range(trials):
            path = mount / f"run{k}.zarr"
            filler = mount / "filler"
            if mounted:  # leave room for a random number of snapshots, then the disk is full
                filler.write_bytes(b"\0" * rng.randint(4 << 20, 14 << 20))
            limit = "none" if mounted else str(rng.randint(200_000, 900_000))
            first = _enospc_run(path, 0, 500, limit)
            assert first["error"] == "StoreWriteError", first
            committed = check_store(path, "lossless")
            if mounted:
                filler.unlink()
            second = _enospc_run(path, committed, 2, "none")
            assert second["error"] is None and second["start"] == committed, second
            assert check_store(path, "lossless") == committed + 2
            shutil.rmtree(path)
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], capture_output=True)
    return {"trials": trials, "filesystem": kind, "lost": 0}


def _enospc_run(path: Path, start: int, count: int, limit: str) -> dict:
    done = subprocess.run([PY, "-c", ENOSPC_WRITER, str(path), str(N), str(start), str(count), limit], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def concurrent_readers(work: Path, snapshots: int, readers: int) -> dict:
    path = work / "live.zarr"
    writer = _popen([PY, "-m", "tests.writer_proc", str(path), "lossless", str(N)])
    seconds = 150.0  # the writer must reach `snapshots` within it, on a loaded 2-core machine too
    procs = [_popen([PY, "-m", "tests.reader_proc", str(path), str(N), str(seconds)]) for _ in range(readers)]
    while True:  # the store exists once it opens (a reader may see it half-created before)
        try:
            TrajectoryStore.open(path).close()
            break
        except NotAStoreError:
            time.sleep(0.05)
    follow = _popen([PY, "-m", "cli.main", "extract", str(path), "--dim", "3", "--follow", "--every", "40",
                     "--poll", "0.5", "--json"])
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with TrajectoryStore.open(path) as store:
                if len(store) >= snapshots:
                    break
        except NotAStoreError:
            pass  # still being created
        time.sleep(0.5)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    os.kill(follow.pid, signal.SIGINT)
    follow_out, follow_err = follow.communicate(timeout=120)
    assert follow.returncode in (0, 130), follow_err[-2000:]
    refreshes = follow_out.count('"orthonormality_error"')  # one JSON document per refresh
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        TrajectoryStore.open(path, "a").close()
    total = check_store(path, "lossless")
    bad = [b for r in results for b in r["bad"]]
    assert not bad, bad
    assert total >= snapshots, f"the writer reached only {total} snapshots"
    return {"snapshots": total, "reader_processes": readers, "reads": sum(r["reads"] for r in results),
            "rows_checked": sum(r["rows"] for r in results), "follow_refreshes": refreshes, "wrong_rows": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few trials of each kind (minutes, not tens)")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    q = args.quick
    plan = {"record": 3 if q else 35, "extract": 3 if q else 35, "train": 2 if q else 8, "import": 3 if q else 25,
            "enospc": 2 if q else 5, "live_snapshots": 40 if q else 200}
    work = Path(tempfile.mkdtemp(prefix="fault-campaign-"))
    results: dict[str, dict] = {}
    began = time.perf_counter()
    try:
        for codec in ("lossless", "xor-delta:4", "bitround-delta:8", "float16-delta"):
            results[f"kill -9 recording ({codec})"] = recording_kills(work, codec, plan["record"], rng)
        results["kill -9 extraction"] = extraction_kills(work, plan["extract"], rng)
        results["kill -9 trajstore train"] = train_kills(work, plan["train"], rng)
        results["kill -9 trajstore import"] = import_kills(work, plan["import"], rng)
        results["ENOSPC"] = enospc_trials(work, plan["enospc"], rng)
        results["concurrent readers"] = concurrent_readers(work, plan["live_snapshots"], readers=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    kills = sum(r.get("kills", 0) for r in results.values())
    print(f"{'trial':38s} result")
    for name, result in results.items():
        print(f"{name:38s} {json.dumps(result)}")
    print(f"TOTAL: {kills} kills, {results['ENOSPC']['trials']} ENOSPC trials ({results['ENOSPC']['filesystem']}), "
          f"{results['concurrent readers']['rows_checked']} live rows read: 0 committed snapshots lost, "
          f"0 silent errors ({time.perf_counter() - began:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"kills": kills, "results": results}, indent=2))


if __name__ == "__main__":
    main()
