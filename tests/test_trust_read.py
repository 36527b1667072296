"""Reads never return silently wrong data (issue 8, holes 4 and 11)."""
import tracemalloc

import crc32c
import numpy as np
import pytest

import trajstore.reader
from pipeline import extract_subspace
from trajstore import CorruptSnapshotError, TrajectoryStore
from trajstore.inspect import verify
from trajstore.layout import ParamLayout, TensorSpec

N = 40_000


def make(path, rows=6, codec="lossless", n=N):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((rows, n)) * 0.1 + np.arange(rows)[:, None]).astype(np.float32)
    with TrajectoryStore.create(path, ParamLayout([TensorSpec("w", (n,), "float32")]), codec=codec,
                                chunk_size=4096, shard_size=16384) as store:
        for i, row in enumerate(data):
            store.append(row, step=i)
    return data


def empty_index_entry(shard_file, entry: int) -> None:
    """Mark inner chunk ``entry`` as absent in the shard index, with a valid index checksum."""
    raw = bytearray(shard_file.read_bytes())
    per_shard = 4
    start = len(raw) - (16 * per_shard + 4)
    index = np.frombuffer(bytes(raw[start:-4]), "<u8").copy().reshape(per_shard, 2)
    index[entry] = 2**64 - 1
    body = index.tobytes()
    raw[start:] = body + np.uint32(crc32c.crc32c(body)).tobytes()
    shard_file.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["missing shard file", "empty index entry"])
def test_a_hole_in_a_committed_row_raises_naming_the_snapshot(tmp_path, damage):
    path = tmp_path / "run.zarr"
    data = make(path)
    shard = path / "params" / "c" / "3" / "1"
    if damage == "missing shard file":
        shard.unlink()
    else:
        empty_index_entry(shard, 2)
    with TrajectoryStore.open(path) as store:
        with pytest.raises(CorruptSnapshotError, match="snapshot 3") as info:
            store.read(3)
        assert info.value.index == 3
        with pytest.raises(CorruptSnapshotError, match="snapshot 3"):
            store.read(slice(None))
        assert np.array_equal(store.read(2), data[2]) and np.array_equal(store.read(4), data[4])
    with pytest.raises(CorruptSnapshotError, match="snapshot 3"):
        extract_subspace(path, dim=2)
    report = verify(path)
    assert list(report.problems) == [3]


def test_xor_rows_stored_after_a_damaged_one_are_reported_as_undecodable(tmp_path):
    path = tmp_path / "run.zarr"
    make(path, rows=8, codec="xor-delta:4")
    (path / "params" / "c" / "5" / "0").unlink()
    report = verify(path)
    assert sorted(report.problems) == [5, 6, 7]  # 4 is the keyframe before it, still fine
    assert "relative to corrupt snapshot 5" in report.problems[6][0]


def test_reopening_and_verifying_an_xor_store_holds_no_k_full_rows(tmp_path, monkeypatch):
    n, k = 1_000_000, 16
    path = tmp_path / "run.zarr"
    make(path, rows=k, codec=f"xor-delta:{k}", n=n)  # rows 1..15 all decode from keyframe 0
    row_bytes = n * 4
    monkeypatch.setattr(trajstore.reader, "CONTEXT_BYTES", 1 << 20)  # a small budget shows the bound
    tracemalloc.start()
    try:
        store = TrajectoryStore.open(path, "a", queue_depth=1)  # decodes the last row for the next xor
        opened = tracemalloc.get_traced_memory()[1]
        store.close()
        del store
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        assert verify(path).ok
        verified = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    # the decoded last row and one staging buffer are n each; K rows of context would be 16 n or more
    assert opened < 4 * row_bytes, opened / row_bytes
    assert verified < 2 * row_bytes, verified / row_bytes


@pytest.mark.parametrize("codec", ["xor-delta:4", "lossless"])
def test_chunks_equal_to_the_fill_value_are_written_and_read_back(tmp_path, codec):
    """A frozen layer's xor chunk is all zero bits (the fill value); an all-NaN chunk equals a float
    fill. Both must be written, so that a missing chunk can be reported as damage."""
    path = tmp_path / "run.zarr"
    rows = np.random.default_rng(0).standard_normal((6, N)).astype(np.float32)
    rows[:, :8192] = rows[0, :8192]  # frozen: identical in every snapshot
    rows[3, 8192:12288] = np.nan  # one whole chunk of NaN, recorded on purpose
    with TrajectoryStore.create(path, ParamLayout([TensorSpec("w", (N,), "float32")]), codec=codec,
                                chunk_size=4096, shard_size=16384) as store:
        for i, row in enumerate(rows):
            store.append(row, step=i, allow_nonfinite=(i == 3))
    for store in [TrajectoryStore.open(path), TrajectoryStore.open(path, "a")]:  # reopened: same config
        with store:
            assert np.array_equal(store.read(slice(None)), rows, equal_nan=True)
    assert verify(path).ok
