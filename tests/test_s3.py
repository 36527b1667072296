"""Stores on a real S3 API (moto's server over HTTP, see conftest.py): the whole flow, the lock, kill -9."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from botocore.exceptions import EndpointConnectionError
from torch import nn

from pipeline import extract_subspace
from pipeline.basis import Basis
from pipeline.optim import SubspaceSGD
from trajstore import TrajectoryStore
from trajstore.errors import CorruptSnapshotError, StaleLockError, StoreLockedError
from trajstore.format import DERIVED_LOCK_NAME, LOCK_NAME
from trajstore.inspect import verify
from trajstore.lock import NonAtomicLockWarning, StaleLockWarning, WriterLock
from trajstore.recorder import Recorder

from .conftest import ROOT
from .helpers import MixedNet
from .s3_writer_proc import row

D = 3
STEPS, EVERY = 18, 3  # real SGD steps, recorded every 3: 7 snapshots


def batches(k, seed=1, n=32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(k)]


def record(url):
    """Real SGD on MixedNet recorded every EVERY steps into ``url``; returns the snapshots kept in memory."""
    torch.manual_seed(0)
    model = MixedNet()
    store = TrajectoryStore.create(url, model, chunk_size=256, shard_size=512)
    rec = Recorder(store, model, every_n_steps=EVERY)
    rec.start()
    kept = [torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in batches(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if rec.step():
            kept.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy())
    store.close()
    return np.stack(kept)


def projector_distance(p, q):
    """Spectral norm of P Pᵀ − Q Qᵀ for orthonormalised bases: sin of the largest principal angle."""
    po, _ = np.linalg.qr(p.astype(np.float64))
    qo, _ = np.linalg.qr(q.astype(np.float64))
    return float(np.linalg.norm(po - qo @ (qo.T @ po), 2))


def test_record_verify_extract_on_threads_and_cluster_then_train(s3, tmp_path):
    url = s3.url("run.zarr")
    snaps = record(url)  # (7, n)
    assert s3.fs().exists(f"{s3.bucket}/run.zarr/params/zarr.json")  # really on the server
    with TrajectoryStore.open(url) as store:
        assert store.steps.tolist() == list(range(0, STEPS + 1, EVERY))
        assert np.array_equal(store.read(slice(None)).view(np.uint32), snaps.view(np.uint32))
    report = verify(url)
    assert report.ok and report.snapshots == len(snaps), report.to_json()

    x64 = snaps.astype(np.float64)
    _, s_ref, vt = np.linalg.svd(x64 - x64.mean(0), full_matrices=False)
    assert s_ref[D - 1] > 1.5 * s_ref[D], "the reference subspace must be well separated for the comparison"
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        endpoints = client.run(lambda: os.environ.get("AWS_ENDPOINT_URL"))  # inherited from this process
        assert set(endpoints.values()) == {s3.endpoint} and len(endpoints) == 2
        cluster_sub = extract_subspace(url, dim=D, name="cluster", scheduler=client)  # Gram and basis on workers
    assert len(range(0, cluster_sub.n_params, 256)) == 3, "several column blocks, so the cluster splits the work"
    assert projector_distance(cluster_sub.to_numpy(), vt[:D].T) <= 1e-5
    np.testing.assert_allclose(cluster_sub.singular_values, s_ref[:D], rtol=1e-6)
    threads = extract_subspace(url, dim=D, name="threads")  # the threaded scheduler, from the cached Gram
    assert projector_distance(threads.to_numpy(), vt[:D].T) <= 1e-5
    np.testing.assert_allclose(cluster_sub.to_numpy(), threads.to_numpy(), rtol=0, atol=1e-6)

    for host in ("pinned", "mmap"):
        basis = Basis.from_store(url, "threads", host=host, cache_dir=tmp_path / host)
        np.testing.assert_array_equal(basis.to_numpy(), threads.to_numpy())
    data = batches(STEPS)
    x_all, y_all = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    model = MixedNet()
    with TrajectoryStore.open(url) as store, torch.no_grad():
        reached = nn.functional.cross_entropy(store.load_into(model, len(snaps) - 1)(x_all), y_all).item()
        before = nn.functional.cross_entropy(store.load_into(model, 0)(x_all), y_all).item()
    opt = SubspaceSGD(model.parameters(), basis, lr=0.05, momentum=0.9)
    for x, y in data:  # the recorded run's batches again, now in w_0 + span(P)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(x_all), y_all).item()
    # the loss falls, to where full-space SGD got with the same batches
    assert after < before - 0.03 and after <= reached + 0.005, (before, after, reached)


def test_a_missing_per_snapshot_chunk_on_s3_is_a_typed_error(s3):
    url = s3.url("rows.zarr")
    record(url)
    s3.fs().rm(f"{s3.bucket}/rows.zarr/step/c/0")
    with TrajectoryStore.open(url) as store, pytest.raises(CorruptSnapshotError, match=r"step/c/0.*missing"):
        store.steps
    assert not verify(url).ok


def test_storage_options_alone_configure_reads_and_locks(s3, monkeypatch):
    """The environment points at a dead endpoint; storage_options carry the real one, and win."""
    url = s3.url("opts.zarr")
    snaps = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32)
    with TrajectoryStore.create(url, torch.nn.Linear(99, 10), chunk_size=256, shard_size=512) as store:
        for i, snap in enumerate(snaps):
            store.append(snap, step=i)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    opts = s3.storage_options
    with TrajectoryStore.open(url, storage_options=opts) as store:
        assert np.array_equal(store.read(slice(None)), snaps)
        assert np.array_equal(store.to_dask().compute(scheduler="threads"), snaps)
    lock = WriterLock(url, LOCK_NAME, storage_options=opts).acquire()
    with pytest.raises(StoreLockedError, match=str(os.getpid())):
        WriterLock(url, LOCK_NAME, storage_options=opts).acquire()
    lock.release()
    WriterLock(url, LOCK_NAME, storage_options=opts).acquire().release()


def test_storage_options_alone_configure_writes(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast where the dead endpoint is used
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    url = s3.url("write-opts.zarr")
    with TrajectoryStore.create(url, MixedNet(), storage_options=s3.storage_options) as store:
        store.append(MixedNet(), step=0)
    with TrajectoryStore.open(url, "a", storage_options=s3.storage_options) as store:
        store.append(MixedNet(), step=1)
    with TrajectoryStore.open(url, storage_options=s3.storage_options) as store:
        assert len(store) == 2


def test_racing_acquirers_exactly_one_wins(s3):
    url, name, racers, races = s3.url("race.zarr"), LOCK_NAME, 4, 20
    for race in range(races):
        barrier = threading.Barrier(racers)
        won, lost = [], []

        def contend():
            lock = WriterLock(url, name)
            barrier.wait()
            try:
                won.append(lock.acquire())
            except StoreLockedError as exc:
                lost.append(exc)

        threads = [threading.Thread(target=contend) for _ in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == racers - 1, f"race {race}: {len(won)} writers took the lock"
        assert all(not isinstance(e, StaleLockError) and str(os.getpid()) in str(e) for e in lost)
        holder = json.loads(s3.fs().cat_file(f"{s3.bucket}/race.zarr/{name}"))
        assert holder["token"] == won[0]._token
        won[0].release()
    assert not s3.fs().exists(f"{s3.bucket}/race.zarr/{name}")


def take_lock_and_die(url, name):
    """A real process takes the lock and is killed -9 while holding it; returns its pid."""
    code = ("import sys, time; from trajstore.lock import WriterLock; "
            f"WriterLock({url!r}, {name!r}).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("name, hint", [(LOCK_NAME, "open it with break_lock=True"),
                                        (DERIVED_LOCK_NAME, "trajstore extract --break-lock")])
def test_stale_lock_of_a_dead_process_is_reported_then_broken(s3, name, hint):
    url = s3.url("stale.zarr")
    pid = take_lock_and_die(url, name)
    with pytest.raises(StaleLockError, match=f"pid {pid}") as info:
        WriterLock(url, name).acquire()
    assert hint in str(info.value) and info.value.holder["pid"] == pid
    with pytest.warns(StaleLockWarning, match=f"pid {pid}"):
        mine = WriterLock(url, name, break_lock=True).acquire()
    with pytest.raises(StoreLockedError, match=str(os.getpid())) as live:
        WriterLock(url, name).acquire()  # now held by a live process: not stale
    assert not isinstance(live.value, StaleLockError)
    with pytest.warns(StaleLockWarning):
        other = WriterLock(url, name, break_lock=True).acquire()  # forced take-over of a live lock
    mine.release()  # no longer ours: must not delete the new holder's lock
    with pytest.raises(StoreLockedError):
        WriterLock(url, name).acquire()
    other.release()
    WriterLock(url, name).acquire().release()


def test_filesystem_without_conditional_create_warns_and_says_so():
    url = f"memory://nonatomic-{os.getpid()}/run.zarr"
    with pytest.warns(NonAtomicLockWarning, match="check-then-put"):
        lock = WriterLock(url).acquire()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonAtomicLockWarning)
        with pytest.raises(StoreLockedError, match="not atomic"):
            WriterLock(url).acquire()
    lock.release()


# -- kill -9 ------------------------------------------------------------------------------
N = 10_003  # two shards a row


def start_writer(url, *flags):
    return subprocess.Popen([sys.executable, "-m", "tests.s3_writer_proc", url, str(N), *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # at volume, on a loaded 2-core machine
def test_kill_9_on_s3_loses_nothing_committed_and_resumes(s3):
    url, rng, seen = s3.url("kill.zarr"), random.Random(4321), []
    for trial in range(20):
        proc = start_writer(url, *(["--break-lock"] if trial else []))
        first = proc.stdout.readline()
        assert first, proc.stderr.read()
        start = json.loads(first)["start"]
        assert start == (seen[-1] if seen else 0), "a resumed writer must continue right after the last commit"
        time.sleep(rng.uniform(0.2, 4.0))
        assert proc.poll() is None, f"trial {trial}: the writer died on its own: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        report = verify(url)
        assert report.ok, report.to_json()
        with TrajectoryStore.open(url) as store:
            t = len(store)
            got = store.read(slice(None))
            assert store.steps.tolist() == list(range(t))
            assert not t or store.metrics("i").tolist() == [float(i) for i in range(t)]
        for i in range(t):
            assert np.array_equal(got[i].view(np.uint32), row(i, N).view(np.uint32)), f"trial {trial}: row {i}"
        seen.append(t)
        with pytest.raises(StaleLockError, match=f"pid {proc.pid}.*break_lock=True"):
            TrajectoryStore.open(url, "a")  # the dead writer's lock object stays behind on S3
    assert seen[-1] >= 5 and len(set(seen)) >= 5, f"the writer must make progress across restarts: {seen}"
    print(f"committed snapshots after each kill -9: {seen}")
