"""``file://`` URLs are local stores: atomic LocalStore writes, the flock lock and the fast reader."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from zarr.storage import LocalStore

from trajstore import TrajectoryStore
from trajstore.errors import NotAStoreError, StoreLockedError
from trajstore.format import local_dir, normalize, zarr_store
from trajstore.inspect import verify
from trajstore.lock import StaleLockWarning

from .conftest import ROOT
from .writer_proc import layout, row

N = 3000


def test_file_url_is_a_local_store(tmp_path):
    url = f"file://{tmp_path}/run.zarr"
    assert normalize(url) == str(tmp_path / "run.zarr")
    assert normalize(f"file://localhost{tmp_path}/run.zarr") == str(tmp_path / "run.zarr")
    assert local_dir(url) == tmp_path / "run.zarr"
    assert isinstance(zarr_store(url, False), LocalStore) and isinstance(zarr_store(url, True), LocalStore)
    assert zarr_store(url, True).root == tmp_path / "run.zarr"
    assert normalize("s3://bucket/run.zarr") == "s3://bucket/run.zarr" and local_dir("s3://bucket/run.zarr") is None


def test_create_append_read_through_a_file_url(tmp_path):
    url = f"file://{tmp_path}/run.zarr"
    with TrajectoryStore.create(url, layout(N), chunk_size=512, shard_size=1024) as store:
        assert store.path == str(tmp_path / "run.zarr")
        for i in range(5):
            store.append(row(i, N), step=i)
    assert (tmp_path / "run.zarr" / "params" / "c" / "4" / "0").is_file()  # really on disk, in the shard layout
    with TrajectoryStore.open(url, "a") as store:
        store.append(row(5, N), step=5)
    with TrajectoryStore.open(url) as store:
        reader = store.reader()
        got = reader.read_block(0, 6)
        assert reader._fast is not None and reader._fast.fs is None, "file:// stores must use the local pread reader"
        assert np.array_equal(got, np.stack([row(i, N) for i in range(6)]))
        assert np.array_equal(store.read(slice(None)), got)
    assert verify(url).ok
    with pytest.raises(NotAStoreError):
        TrajectoryStore.open(f"file://{tmp_path}/missing.zarr")


def test_file_url_writer_lock_is_flock(tmp_path):
    url = f"file://{tmp_path}/run.zarr"
    TrajectoryStore.create(url, layout(N), chunk_size=512, shard_size=1024).close()
    code = ("import sys, time; from trajstore import TrajectoryStore; "
            f"s = TrajectoryStore.open({url!r}, 'a'); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}"):
            TrajectoryStore.open(str(tmp_path / "run.zarr"), "a")  # the same lock as the plain path's
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with pytest.warns(StaleLockWarning, match=f"pid {proc.pid}"):  # the kernel dropped it: no break_lock needed
        TrajectoryStore.open(url, "a").close()


FULL_DISK = """
import resource, signal, sys
from trajstore import TrajectoryStore
from tests.writer_proc import row
store = TrajectoryStore.open(sys.argv[1], "a")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # no file may grow past `limit` bytes
try:
    store.append(row(1, 40), step=1)
    store.flush()
except Exception as exc:
    print(type(exc).__name__)
"""


def test_a_failed_commit_write_leaves_the_store_readable(tmp_path):
    """The commit (root zarr.json) is replaced atomically, never rewritten in place, also for file:// URLs.

    The disk fills up while the commit is being written: the row's small data files fit under the
    limit, the large root metadata does not. Written in place, zarr.json would be cut short and the
    store unreadable; replaced atomically, the old commit stays whole.
    """
    url = f"file://{tmp_path}/run.zarr"
    with TrajectoryStore.create(url, layout(40), metadata={"note": "x" * 20_000}) as store:
        store.append(row(0, 40), step=0)
    size = (tmp_path / "run.zarr" / "zarr.json").stat().st_size
    assert size > 20_000
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, url, str(size // 2)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.strip() == "StoreWriteError", (proc.stdout, proc.stderr)
    assert json.loads((tmp_path / "run.zarr" / "zarr.json").read_text())  # whole, valid JSON
    with TrajectoryStore.open(url) as store:
        assert len(store) == 1 and np.array_equal(store.read(0), row(0, 40))
    assert verify(url).ok
