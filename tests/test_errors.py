"""Bad input and damaged stores: one clear typed error each, nothing committed lost."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from trajstore import (CorruptSnapshotError, FormatVersionError, LayoutMismatchError, NonFiniteError,
                       NotAStoreError, StoreLockedError, TrajectoryStore)
from trajstore.inspect import verify

from .helpers import MixedNet, flat

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store3(tmp_path):
    torch.manual_seed(0)
    model = MixedNet()
    path = tmp_path / "run.zarr"
    store = TrajectoryStore.create(path, model, chunk_size=64, shard_size=128)
    rows = []
    for i in range(3):
        with torch.no_grad():
            model.fc.weight.add_(0.1)
        rows.append(flat(model))
        store.append(model, step=i)
    store.flush()
    yield path, store, model, np.stack(rows)
    store.close()


def test_wrong_length_layout_mismatch_and_nan_are_refused_and_nothing_is_lost(store3):
    path, store, model, rows = store3
    with pytest.raises(LayoutMismatchError, match=f"length {store.n_params}"):
        store.append(np.zeros(store.n_params + 1, np.float32), step=9)
    with pytest.raises(LayoutMismatchError, match="conv.weight"):
        store.append(MixedNet(width=4), step=9)
    sd = model.state_dict()
    del sd["fc.bias"]
    with pytest.raises(LayoutMismatchError, match="fc.bias"):
        store.append(sd, step=9)
    with torch.no_grad():
        model.fc.bias[3] = float("nan")
    with pytest.raises(NonFiniteError, match="'fc.bias'"):
        store.append(model, step=9)
    store.append(model, step=3, allow_nonfinite=True)  # recorded on purpose
    store.flush()
    assert len(store) == 4
    assert np.array_equal(store.read(slice(0, 3)), rows)
    assert np.isnan(store.read(3)).sum() == 1
    assert verify(path).ok  # a row recorded with allow_nonfinite is not a defect


def test_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError, match="does not exist"):
        TrajectoryStore.open(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotAStoreError, match="not a trajstore store"):
        TrajectoryStore.open(tmp_path / "empty")
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(NotAStoreError, match="no 'trajstore' attributes"):
        TrajectoryStore.open(tmp_path / "plain.zarr")


def test_store_from_a_newer_format_is_refused(store3):
    path, store, _, _ = store3
    store.close()
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["attributes"]["trajstore"]["format_version"] = 99
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match="format version 99.*pip install -U trajstore"):
        TrajectoryStore.open(path)


def test_second_writer_in_process_and_in_another_process(store3):
    path, store, _, _ = store3
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        TrajectoryStore.open(path, "a")
    TrajectoryStore.open(path, "r").close()  # readers are never blocked
    store.close()
    code = ("import sys,time; from trajstore import TrajectoryStore; "
            "s=TrajectoryStore.open(sys.argv[1],'a'); print('locked',flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match=f"pid {proc.pid}") as info:
            TrajectoryStore.open(path, "a")
        assert info.value.holder["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_corrupt_chunk_names_the_snapshot(store3):
    path, store, _, rows = store3
    store.close()
    shard = path / "params" / "c" / "1" / "1"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with TrajectoryStore.open(path) as reader:
        assert np.array_equal(reader.read(0), rows[0]) and np.array_equal(reader.read(2), rows[2])
        with pytest.raises(CorruptSnapshotError, match="snapshot 1 ") as info:
            reader.read(1)
        assert info.value.index == 1
        with pytest.raises(CorruptSnapshotError, match="snapshot 1 "):
            reader.read(slice(None))
        with pytest.raises(CorruptSnapshotError, match="snapshot 1 "):
            reader.to_dask().compute()
    report = verify(path)
    assert list(report.problems) == [1]
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1
    assert "snapshot 1" in result.output and "bad snapshots: 1" in result.output


def test_missing_chunk_file_is_reported_by_verify(store3):
    path, store, _, _ = store3
    store.close()
    (path / "params" / "c" / "2" / "0").unlink()
    report = verify(path)
    assert list(report.problems) == [2]
    assert "missing" in report.problems[2][0]


def test_background_error_surfaces_at_next_call_and_is_not_swallowed(tmp_path):
    model = MixedNet()
    store = TrajectoryStore.create(tmp_path / "r.zarr", model)
    store.append(model, step=0)
    store.flush()
    # a plain file where snapshot 1's chunk folder must go: the background write fails with an OSError
    (tmp_path / "r.zarr" / "params" / "c" / "1").write_text("not a directory")
    store.append(model, step=1)  # returns at once; the failure happens on the writer thread
    with pytest.raises(OSError, match="snapshot 1 .*reopen with mode='a'"):
        store.flush()
    with pytest.raises(OSError, match="failed earlier"):
        store.append(model, step=2)
    with pytest.raises(OSError, match="failed earlier"):
        store.close()
    (tmp_path / "r.zarr" / "params" / "c" / "1").unlink()
    with TrajectoryStore.open(tmp_path / "r.zarr", "a") as again:  # the lock was released by close()
        assert len(again) == 1
        again.append(model, step=1)
    with TrajectoryStore.open(tmp_path / "r.zarr") as reader:
        assert len(reader) == 2 and np.array_equal(reader.read(1), flat(model))


def test_append_copies_the_source_at_once(tmp_path):
    """Training may change the weights right after append; the queued snapshot must not change."""
    store = TrajectoryStore.create(tmp_path / "big.zarr", torch.nn.Linear(1000, 2000))
    x = torch.randn(2_002_000)
    expected = []
    for step in range(3):
        expected.append(x.clone())
        store.append(x, step=step)
        x.add_(1.0)  # the "next optimizer step", while the writer is still busy
    store.close()
    with TrajectoryStore.open(tmp_path / "big.zarr") as r:
        for step in range(3):
            assert torch.equal(torch.from_numpy(r.read(step)), expected[step])
