"""The per-snapshot arrays written a whole chunk at a time (trajstore/chunkwrite.py, issue 13): the
chunk files are the ones zarr writes, rows survive truncations into earlier chunks and reopens in
the middle of a chunk, a chain it does not know goes through zarr, and a failed chunk write
commits nothing. Real zarr stores on disk."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import zarr

from tests.synthetic import layout, trajectory
from trajstore import StoreWriteError, TrajectoryStore, _creating
from trajstore.chunkwrite import ChunkWriter


@pytest.mark.parametrize("dtype,fill,values", [
    ("int64", -1, [3, 0, -7, 2**40, 5, 6, 7, 8, 9, 10, 11]),
    ("float64", float("nan"), [0.5, -1e300, float("inf"), 2.0, float("nan"), 1e-310, 7.0, 8.0, 9.0, 10.0, 11.0]),
    ("bool", False, [True, False, True, True, False, True, False, False, True, True, False]),
])
def test_chunk_files_are_the_ones_zarr_writes(tmp_path, dtype, fill, values):
    """Row by row, every chunk file is byte for byte the file zarr writes for the same elements, and
    zarr reads the values back (the last chunk partly past the array's end, as a store grows)."""
    theirs = _creating.create_row_array(zarr.open_group(tmp_path / "a", mode="w"), "x", 16, dtype, fill)
    _creating.create_row_array(zarr.open_group(tmp_path / "b", mode="w"), "x", 16, dtype, fill)
    ours = zarr.open_array(tmp_path / "b" / "x", mode="r+")
    writer = ChunkWriter.for_array(tmp_path / "b" / "x")
    assert writer is not None and writer.chunk == _creating.ROW_CHUNK
    for i, v in enumerate(values):
        theirs[i] = v
        writer.set(i, v, lambda lo, hi: ours[lo:hi], ours.fill_value)
        assert (tmp_path / "b" / "x" / "c" / "0").read_bytes() == (tmp_path / "a" / "x" / "c" / "0").read_bytes(), i
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "b" / "x", mode="r")[:len(values)],
                                  np.array(values, dtype))


@pytest.fixture
def small_row_chunks(monkeypatch):
    """Stores created now have 4 rows per chunk of their per-snapshot arrays (4096 in real stores)."""
    monkeypatch.setattr(_creating, "ROW_CHUNK", 4)


def test_rows_survive_truncation_into_an_earlier_chunk_and_reopen_mid_chunk(tmp_path, small_row_chunks):
    x = trajectory(14, 300)
    path = tmp_path / "s.zarr"
    store = TrajectoryStore.create(path, layout(300))
    assert store.group["step"].chunks == (4,)
    for i in range(10):  # chunks 0, 1, 2; a metric from row 5 on
        store.append(x[i], step=10 * i, epoch=i, metrics={"loss": float(i)} if i >= 5 else None)
    store.truncate(6)  # back into chunk 1, whose rows 4, 5 must stay
    store.append(x[6], step=61, epoch=60, metrics={"loss": 6.5})
    store.truncate(2)  # back into chunk 0
    for i, s in enumerate([21, 31, 41]):
        store.append(x[10 + i], step=s, epoch=100 + i)
    store.close()
    with TrajectoryStore.open(path, "a") as again:  # a new writer, in the middle of chunk 1
        again.append(x[13], step=51, epoch=103, metrics={"acc": 0.25})
    with TrajectoryStore.open(path) as r:
        np.testing.assert_array_equal(r.steps, [0, 10, 21, 31, 41, 51])
        np.testing.assert_array_equal(r.epochs, [0, 1, 100, 101, 102, 103])
        np.testing.assert_array_equal(r.metrics("loss"), [np.nan] * 6)  # its rows were all truncated
        np.testing.assert_array_equal(r.metrics("acc"), [np.nan] * 5 + [0.25])
        np.testing.assert_array_equal(r.read(slice(None)), x[[0, 1, 10, 11, 12, 13]])
        assert not r.group["nonfinite"][:6].any()


def test_a_chain_it_does_not_know_gets_no_writer(tmp_path):
    """Any other codec chain (the unchecked bytes -> zstd of early stores), dtype, chunk grid or key
    encoding, or a remote store: no writer (the caller writes through zarr)."""
    _creating.create_row_array(zarr.open_group(tmp_path / "g", mode="w"), "x", 16, "int64", -1)
    folder = tmp_path / "g" / "x"
    meta = json.loads((folder / "zarr.json").read_text())
    assert ChunkWriter.for_array(folder) is not None
    for change in [lambda m: m["codecs"][1].update(name="gzip"), lambda m: m["codecs"].pop(2),
                   lambda m: m["codecs"][1]["configuration"].update(level=True),
                   lambda m: m["codecs"][1]["configuration"].pop("checksum"),
                   lambda m: m["codecs"][0]["configuration"].update(endian="big"),
                   lambda m: m["chunk_key_encoding"].update(name="v2"), lambda m: m.update(data_type="complex128"),
                   lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[4, 4])]:
        changed = json.loads(json.dumps(meta))
        change(changed)
        (folder / "zarr.json").write_text(json.dumps(changed))
        assert ChunkWriter.for_array(folder) is None, changed
    assert ChunkWriter.for_array(None) is None  # a remote store


def _three_rows_flushed(tmp_path, t: int) -> tuple:
    """(trajectory (t, 300), path, the open store with its first 3 rows committed)."""
    x = trajectory(t, 300)
    path = tmp_path / "s.zarr"
    store = TrajectoryStore.create(path, layout(300))
    for i in range(3):
        store.append(x[i], step=i)
    store.flush()
    return x, path, store


def test_a_failed_chunk_write_commits_nothing(tmp_path):
    """The step array's chunk folder replaced by a file: the row's write fails with a typed error, the
    rows committed before stay, and once fixed a reopened writer records on."""
    x, path, store = _three_rows_flushed(tmp_path, 6)
    chunks = path / "step" / "c"
    shutil.move(chunks, tmp_path / "saved")
    chunks.write_text("not a folder")
    store.append(x[3], step=3)
    with pytest.raises(StoreWriteError, match="step 3"):
        store.flush()
    with pytest.raises(StoreWriteError):
        store.close()
    chunks.unlink()
    shutil.move(tmp_path / "saved", chunks)
    with TrajectoryStore.open(path, "a") as again:
        assert len(again) == 3
        np.testing.assert_array_equal(again.steps, [0, 1, 2])
        again.append(x[4], step=4)
    with TrajectoryStore.open(path) as r:
        np.testing.assert_array_equal(r.steps, [0, 1, 2, 4])
        np.testing.assert_array_equal(r.read(slice(None)), x[[0, 1, 2, 4]])


def test_a_chunk_written_through_zarr_meanwhile_is_read_again(tmp_path):
    """Values written into a per-snapshot array through zarr on the open store (as compaction does with
    wall times) survive the next append: the writer reads a chunk file replaced since it wrote it."""
    x, path, store = _three_rows_flushed(tmp_path, 4)
    store.group["wall_time"].with_config({"write_empty_chunks": True})[:3] = [1.0, 2.0, 3.0]
    store.append(x[3], step=3)
    store.close()
    with TrajectoryStore.open(path) as r:
        np.testing.assert_array_equal(r.wall_times[:3], [1.0, 2.0, 3.0])
        assert r.wall_times[3] > 1e9  # its own wall time


def test_durable_mode_syncs_the_chunk_files_of_the_arrays_own_chunking(tmp_path, small_row_chunks):
    """The fsync list names the chunk each array's zarr.json says a row lands in (4 rows here, not 4096)."""
    from trajstore.durability import row_files

    path = tmp_path / "s.zarr"
    with TrajectoryStore.create(path, layout(300), durable=True) as store:
        for i in range(6):
            store.append(trajectory(6, 300)[i], step=i, metrics={"loss": 1.0} if i >= 5 else None)
    files = row_files(path, 5, ["loss"])
    for name in ("step", "epoch", "wall_time", "nonfinite"):
        assert path / name / "c" / "1" in files and (path / name / "c" / "1").is_file()
    assert {path / "metrics" / "loss" / "c" / "0", path / "metrics" / "loss" / "c" / "1"} <= set(files)
