"""Parallel encode/decode (issue 13): the shard writer writes exactly zarr's bytes, stores of the old
default codec chain still read, verify and take appends, reads in parallel raise the first corrupt
snapshot, and a failed parallel write commits nothing. Real zarr stores on disk, real threads."""
from __future__ import annotations

import json
import threading
import time

import numcodecs.blosc
import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from tests.synthetic import layout, trajectory, write_store
from trajstore import (CodecPreset, CorruptSnapshotError, InvalidArgumentError, StoreWriteError, TrajectoryStore,
                       get_preset, parallel, shardwrite)
from trajstore.inspect import info, verify
from trajstore.maintenance import repair
from trajstore.writer import Job


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    parallel.set_threads(request.param)
    yield request.param
    parallel.set_threads(None)


@pytest.mark.parametrize("dtype", ["float32", "uint32", "float64", "uint16"])
@pytest.mark.parametrize("n,chunk,shard", [(1200, 100, 400), (1250, 100, 400), (50, 64, 64), (300_000, 1 << 16, 1 << 18)])
def test_shard_writer_writes_the_files_zarr_writes(tmp_path, threads, dtype, n, chunk, shard):
    """Every shard file, the padded last chunk and the index entries of chunks past n included, is
    byte for byte the one zarr writes for the same row, for each codec chain trajstore creates."""
    rng = np.random.default_rng(n)
    values = (rng.standard_normal(n) * 100).astype(dtype)
    for k, (cname, shuffle) in enumerate([("lz4", "bitshuffle"), ("zstd", "bitshuffle"), ("lz4", "noshuffle")]):
        group = zarr.open_group(tmp_path / f"g{k}", mode="w")
        blocksize = 1 << 18 if chunk * np.dtype(dtype).itemsize >= 1 << 20 else 0
        arr = group.create_array("a", shape=(2, n), chunks=(1, chunk), shards=(1, shard), dtype=dtype,
                                 fill_value=float("nan") if dtype.startswith("float") else 0,
                                 compressors=[BloscCodec(cname=cname, clevel=1, shuffle=shuffle, blocksize=blocksize),
                                              Crc32cCodec()], config={"write_empty_chunks": True})
        arr[0, :] = values  # zarr writes row 0
        folder = tmp_path / f"g{k}" / "a"
        assert shardwrite.write_row(folder, 1, 0, values)  # trajstore writes row 1
        theirs, ours = folder / "c" / "0", folder / "c" / "1"
        assert sorted(p.name for p in theirs.iterdir()) == sorted(p.name for p in ours.iterdir())
        for f in theirs.iterdir():
            assert (ours / f.name).read_bytes() == f.read_bytes(), (cname, shuffle, f.name)
        np.testing.assert_array_equal(arr[1, :], values)


def test_shard_writer_declines_what_it_cannot_write(tmp_path):
    store = write_store(tmp_path / "s.zarr", trajectory(2, 5000), chunk=1024, shard=2048)
    folder = tmp_path / "s.zarr" / "params"
    row = np.zeros(5000, np.float32)
    assert not shardwrite.write_row(None, 0, 0, row)  # a remote store
    assert not shardwrite.write_row(folder, 0, 1024, row[1024:])  # not on a shard boundary
    assert not shardwrite.write_row(folder, 0, 0, row[:3000])  # ends inside a shard
    assert not shardwrite.write_row(folder, store.group["params"].shape[0], 0, row)  # past the array's rows
    assert shardwrite.write_row(folder, 0, 2048, row[2048:])  # whole shards to the end: written


def test_store_of_the_old_default_chain_reads_verifies_and_appends(tmp_path, threads):
    """A store created by the old default ("lossless" was Blosc zstd + bitshuffle) and written through
    zarr (the old write path) reads and verifies, and rows appended now keep its zstd chain."""
    x = trajectory(6, 9000)
    old = CodecPreset("lossless", "plain", True)  # what get_preset("lossless") returned before: zstd
    assert (old.cname, old.shuffle) == ("zstd", "bitshuffle") != (get_preset("lossless").cname, "noshuffle")
    store = TrajectoryStore.create(tmp_path / "old.zarr", layout(9000), codec=old, chunk_size=1024, shard_size=4096)
    for i, row in enumerate(x[:4]):  # as trajstore wrote rows before: params through zarr, then the commit
        store._ensure_capacity(i + 1)
        store.group["params"].with_config({"write_empty_chunks": True})[i, :] = row
        store._write_row_arrays(Job(i, row, i, 0, 0.0))
        store._commit_meta({**store._meta, "committed": i + 1})
    store.close()
    with TrajectoryStore.open(tmp_path / "old.zarr", "a") as store:
        assert store.codec.spec == "lossless" and store.codec.cname == "zstd"
        np.testing.assert_array_equal(store.read(slice(None)), x[:4])
        for i in (4, 5):
            store.append(x[i], step=i)
    with TrajectoryStore.open(tmp_path / "old.zarr") as store:
        np.testing.assert_array_equal(store.read(slice(None)), x)
    for row in (0, 5):  # old rows and new ones hold zstd chunks
        raw = (tmp_path / "old.zarr" / "params" / "c" / str(row) / "0").read_bytes()
        assert numcodecs.blosc.cbuffer_complib(raw[:64]) == "Zstd"
    assert json.loads((tmp_path / "old.zarr" / "params" / "zarr.json").read_text())["codecs"][0][
        "configuration"]["codecs"][1]["configuration"]["cname"] == "zstd"
    assert verify(tmp_path / "old.zarr").ok


@pytest.mark.parametrize("codec", ["lossless", "lossless-zstd", "lossless-fast", "xor-delta:4"])
def test_presets_round_trip_and_record_their_chain(tmp_path, threads, codec):
    x = trajectory(5, 7000)
    write_store(tmp_path / "s.zarr", x, codec=codec, chunk=1024, shard=2048)
    with TrajectoryStore.open(tmp_path / "s.zarr") as store:
        np.testing.assert_array_equal(store.read(slice(None)), x)
        assert store.codec.spec == codec
    meta = json.loads((tmp_path / "s.zarr" / "params" / "zarr.json").read_text())
    blosc = meta["codecs"][0]["configuration"]["codecs"][1]["configuration"]
    preset = get_preset(codec)
    assert (blosc["cname"], blosc["shuffle"]) == (preset.cname, preset.shuffle)
    assert verify(tmp_path / "s.zarr").ok


def test_default_lossless_preset_is_lz4_bitshuffle():
    assert (get_preset("lossless").cname, get_preset("lossless").shuffle) == ("lz4", "bitshuffle")
    assert get_preset("lossless-zstd").cname == "zstd" and get_preset("lossless-fast").shuffle == "noshuffle"
    with pytest.raises(InvalidArgumentError):
        get_preset("lossless-zstd:3")


def _flip(path, offset=40):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_parallel_read_raises_the_first_corrupt_snapshot(tmp_path, threads):
    """Rows 3 and 5 damaged: a read across both names snapshot 3 (the first), after every decode
    finished; verify lists both; the intact rows still read."""
    x = trajectory(8, 6000)
    write_store(tmp_path / "s.zarr", x, chunk=512, shard=1024)
    for row in (5, 3):
        _flip(tmp_path / "s.zarr" / "params" / "c" / str(row) / "2")
    with TrajectoryStore.open(tmp_path / "s.zarr") as store:
        with pytest.raises(CorruptSnapshotError) as info:
            store.read(slice(None))
        assert info.value.index == 3
        np.testing.assert_array_equal(store.read(slice(0, 3)), x[:3])
        np.testing.assert_array_equal(store.read(6), x[6])
    report = verify(tmp_path / "s.zarr")
    assert sorted(report.problems) == [3, 5]


def test_parallel_read_of_one_shard_splits_its_chunks(tmp_path, threads):
    """A single row of a single shard (one task) is split by chunks across threads and still reads
    every column range exactly, including ranges that start and end inside chunks."""
    x = trajectory(2, 4096)
    write_store(tmp_path / "s.zarr", x, chunk=256, shard=4096)
    with TrajectoryStore.open(tmp_path / "s.zarr") as store:
        reader = store.reader()
        for c0, c1 in [(0, 4096), (100, 3000), (255, 257), (4000, 4096)]:
            np.testing.assert_array_equal(reader.read_block(0, 2, c0, c1), x[:, c0:c1])


def test_failed_parallel_write_commits_nothing_and_leaves_no_temp_file(tmp_path, threads):
    """Row 2's shard folder cannot be created (a file is in the way): the append fails with
    StoreWriteError, rows 0-1 stay committed and intact, and no .partial file is left."""
    x = trajectory(3, 5000)
    store = write_store(tmp_path / "s.zarr", x[:2], chunk=1024, shard=2048, close=False)
    (tmp_path / "s.zarr" / "params" / "c" / "2").write_bytes(b"in the way")
    store.append(x[2], step=100)
    with pytest.raises(StoreWriteError):
        store.flush()
    with pytest.raises(StoreWriteError):
        store.close()
    with TrajectoryStore.open(tmp_path / "s.zarr") as reread:
        assert len(reread) == 2
        np.testing.assert_array_equal(reread.read(slice(None)), x[:2])
    assert not list((tmp_path / "s.zarr").rglob("*.partial"))


def test_a_with_block_left_on_a_writer_error_raises_that_error_not_a_reminder(tmp_path):
    """Review finding: leaving ``with store:`` on the writer's error, close() replaced it by its
    "failed earlier" reminder (an ``except NonFiniteError`` around the block missed a deferred NaN)."""
    x = trajectory(3, 5000)
    store = write_store(tmp_path / "s.zarr", x[:2], chunk=1024, shard=2048, close=False)
    (tmp_path / "s.zarr" / "params" / "c" / "2").write_bytes(b"in the way")
    with pytest.raises(StoreWriteError) as raised:
        with store:
            store.append(x[2], step=100)
            store.flush()
    assert "failed earlier" not in str(raised.value) and "snapshot 2" in str(raised.value)
    with TrajectoryStore.open(tmp_path / "s.zarr") as reread:
        assert len(reread) == 2


def test_thread_setting(monkeypatch):
    monkeypatch.delenv(parallel.ENV, raising=False)
    assert parallel.threads() == parallel.cores() >= 1
    monkeypatch.setenv(parallel.ENV, "3")
    assert parallel.threads() == 3
    monkeypatch.setattr(parallel, "_parsed", {})
    for bad in ("0", "two", "-1"):  # warned once each, then the cores: a bad setting never fails a read
        monkeypatch.setenv(parallel.ENV, bad)
        with pytest.warns(RuntimeWarning, match=parallel.ENV):
            assert parallel.threads() == parallel.cores()
        assert parallel.threads() == parallel.cores()
    parallel.set_threads(1)
    try:
        assert parallel.threads() == 1
        assert parallel.pmap(lambda v: v * 2, range(5)) == [0, 2, 4, 6, 8]
    finally:
        parallel.set_threads(None)
    with pytest.raises(InvalidArgumentError):
        parallel.set_threads(0)


def test_pmap_waits_for_every_item_then_raises_the_first_error():
    parallel.set_threads(2)
    done = []

    def work(v):
        if v in (1, 3):
            raise ValueError(v)
        done.append(v)
        return v

    try:
        with pytest.raises(ValueError, match="1"):
            parallel.pmap(work, range(6))
        assert sorted(done) == [0, 2, 4, 5]
    finally:
        parallel.set_threads(None)


# -- review fixes (issue 13 review): empty reads, non-data errors, pool swaps, bounded writes, presets ----------

def test_empty_ranges_read_as_empty_blocks(tmp_path, threads):
    """No rows, or no columns (a rank holding no elements, a range on a shard boundary): an empty
    block, never a division by zero reported as a corrupt snapshot."""
    write_store(tmp_path / "s.zarr", trajectory(3, 5000), chunk=1024, shard=2048)
    with TrajectoryStore.open(tmp_path / "s.zarr") as store:
        reader = store.reader()
        for r0, r1, c0, c1 in [(0, 0, 0, 5000), (1, 1, 0, 100), (0, 1, 2048, 2048), (0, 2, 0, 0), (2, 3, 5000, 5000)]:
            assert reader.read_block(r0, r1, c0, c1).shape == (r1 - r0, c1 - c0)
        assert reader._fast.read(0, 2, 4096, 4096).shape == (2, 0)


def _store_and_rows(tmp_path, t=4, n=5000):
    x = trajectory(t, n)
    write_store(tmp_path / "s.zarr", x, chunk=1024, shard=2048)
    return tmp_path / "s.zarr", x


def test_bad_thread_variable_loses_no_data(tmp_path, monkeypatch):
    """TRAJSTORE_THREADS=0 set in a job: a warning, then every core. Reads, verify and repair see
    intact rows (before: every row flagged, repair truncated to 0) and appends commit."""
    path, x = _store_and_rows(tmp_path)
    monkeypatch.setattr(parallel, "_parsed", {})
    monkeypatch.setenv(parallel.ENV, "0")
    with pytest.warns(RuntimeWarning, match="TRAJSTORE_THREADS='0'"):
        with TrajectoryStore.open(path, "a") as store:
            np.testing.assert_array_equal(store.read(slice(None)), x)
            store.append(x[0], step=99)
    assert verify(path).ok
    report = repair(path, dry_run=True)
    assert (report.action, report.committed_after) == ("none", 5)
    with TrajectoryStore.open(path) as store:
        np.testing.assert_array_equal(store.read(4), x[0])


def test_no_thread_to_be_had_reads_inline_not_as_corruption(tmp_path):
    """The pool cannot start a thread ("can't start new thread": a real failure, threads given a
    stack no mmap can hold): the chunks decode on the calling thread; nothing is reported corrupt."""
    path, x = _store_and_rows(tmp_path)
    with TrajectoryStore.open(path) as store:
        store.read(0)  # zarr's own threads exist before thread creation is made to fail
        reader = store.reader()
        reader.read_block(0, 1)
        parallel.set_threads(3)  # a new pool: it has no thread yet
        before = threading.stack_size(1 << 40)
        try:
            np.testing.assert_array_equal(reader.read_block(0, 4), x)
        finally:
            threading.stack_size(before)
            parallel.set_threads(None)


def test_shut_down_pool_is_not_corruption(tmp_path):
    """The pool shut down under a reader (what a concurrent set_threads could do between taking the
    pool and submitting to it): the read still returns the rows, and verify finds nothing."""
    path, x = _store_and_rows(tmp_path)
    parallel.set_threads(2)
    try:
        parallel.submit(int).result()  # the pool exists
        parallel._pool.shutdown(wait=True)
        with TrajectoryStore.open(path) as store:
            np.testing.assert_array_equal(store.read(slice(None)), x)
        assert verify(path).ok
    finally:
        parallel._pool = None
        parallel.set_threads(None)


def test_thread_setting_changes_during_reads_are_not_corruption(tmp_path):
    """Two threads read while a third flips the thread count (a new pool each time): every read
    returns the rows, none raises."""
    x = trajectory(4, 40000)
    write_store(tmp_path / "s.zarr", x, chunk=512, shard=1024)
    errors, reads, stop = [], [0], threading.Event()
    with TrajectoryStore.open(tmp_path / "s.zarr") as store:
        reader = store.reader()

        def read():
            while not stop.is_set():
                try:
                    if not np.array_equal(reader.read_block(0, 4), x):
                        errors.append("wrong data")
                    reads[0] += 1
                except Exception as exc:  # noqa: BLE001 -- collected, asserted below
                    errors.append(f"{type(exc).__name__}: {exc}")

        workers = [threading.Thread(target=read) for _ in range(2)]
        for w in workers:
            w.start()
        try:
            end, k = time.monotonic() + 2.0, 0
            while time.monotonic() < end:
                parallel.set_threads(2 + k % 2)
                k += 1
                time.sleep(0.0005)
        finally:
            stop.set()
            for w in workers:
                w.join()
            parallel.set_threads(None)
    assert not errors, errors[:3]
    assert reads[0] > 0


def test_non_data_read_error_is_raised_as_itself(tmp_path, threads):
    """A failure zarr does not reproduce row by row (here a caller's ``out`` of the wrong shape) is
    raised as what it is, not as a corrupt snapshot."""
    path, x = _store_and_rows(tmp_path)
    with TrajectoryStore.open(path) as store:
        with pytest.raises(InvalidArgumentError, match=r"out must be a \(4, 5000\) array") as info_:
            store.reader().read_block(0, 4, 0, 5000, out=np.empty((4, 100), np.float32))
        assert not isinstance(info_.value, CorruptSnapshotError)
        np.testing.assert_array_equal(store.reader().read_block(0, 4), x)


class _CountingWriter(shardwrite.ShardWriter):
    """A real shard writer on a slow disk, counting the encoded chunks it holds at once."""

    def __init__(self, *args):
        super().__init__(*args)
        self.lock, self.held, self.peak = threading.Lock(), 0, 0

    def _encode(self, values, start):
        data = super()._encode(values, start)
        with self.lock:
            self.held += 1
            self.peak = max(self.peak, self.held)
        return data

    def _write_file(self, path, parts):
        time.sleep(0.01)  # a slow disk: encoding runs ahead of the writes
        super()._write_file(path, parts)
        with self.lock:
            self.held -= sum(p is not None for p in parts)


def test_shard_writer_holds_a_bounded_window_of_encoded_shards(tmp_path):
    """40 shards of 4 chunks on a slow disk, 2 threads: at most 2 x threads shards' chunks are
    encoded and unwritten at once (before: every chunk of the row), and the row is written right."""
    n, chunk, shard = 40 * 4096, 1024, 4096
    group = zarr.open_group(tmp_path / "g", mode="w")
    arr = group.create_array("a", shape=(1, n), chunks=(1, chunk), shards=(1, shard), dtype="float32",
                             fill_value=float("nan"), compressors=get_preset("lossless").zarr_compressors(),
                             config={"write_empty_chunks": True})
    values = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    meta = json.loads((tmp_path / "g" / "a" / "zarr.json").read_text())
    parallel.set_threads(2)
    try:
        writer = _CountingWriter(tmp_path / "g" / "a", meta)
        writer.write(0, 0, values)
    finally:
        parallel.set_threads(None)
    assert writer.peak <= 2 * 2 * 4, writer.peak
    np.testing.assert_array_equal(arr[0, :], values)


def test_few_shards_are_split_over_the_threads_and_written_as_zarr_writes_them(tmp_path, monkeypatch):
    """A row of fewer shards than threads: each shard's chunks are encoded by several tasks (more tasks
    than shards), the files are still byte for byte zarr's, and a chunk that fails to encode leaves its
    shard unwritten (no file, no temp file) and raises."""
    tasks = []
    real_submit = parallel.submit
    monkeypatch.setattr(parallel, "submit", lambda fn, *args: tasks.append(fn) or real_submit(fn, *args))
    parallel.set_threads(4)
    try:
        for k, (n, chunk, shard) in enumerate([(700, 100, 800), (1250, 100, 800)]):
            values = np.random.default_rng(k).standard_normal(n).astype(np.float32)
            group = zarr.open_group(tmp_path / f"g{k}", mode="w")
            arr = group.create_array("a", shape=(2, n), chunks=(1, chunk), shards=(1, shard), dtype="float32",
                                     fill_value=float("nan"), compressors=get_preset("lossless").zarr_compressors(),
                                     config={"write_empty_chunks": True})
            arr[0, :] = values
            folder = tmp_path / f"g{k}" / "a"
            tasks.clear()
            assert shardwrite.write_row(folder, 1, 0, values)
            shards = -(-n // shard)
            assert len(tasks) > shards, (len(tasks), shards)
            for f in (folder / "c" / "0").iterdir():
                assert (folder / "c" / "1" / f.name).read_bytes() == f.read_bytes()
            np.testing.assert_array_equal(arr[1, :], values)

        class Failing(shardwrite.ShardWriter):
            def _encode(self, values, start):
                if start == 300:
                    raise OSError("no space left on device (simulated in one chunk's encode)")
                return super()._encode(values, start)

        meta = json.loads((tmp_path / "g0" / "a" / "zarr.json").read_text())
        with pytest.raises(OSError, match="no space"):
            Failing(tmp_path / "g0" / "a", meta).write(0, 0, np.zeros(700, np.float32))
        assert sorted(p.name for p in (tmp_path / "g0" / "a" / "c" / "0").iterdir()) == ["0"]  # the old file
        np.testing.assert_array_equal(zarr.open_array(tmp_path / "g0" / "a", mode="r")[0, :],
                                      np.random.default_rng(0).standard_normal(700).astype(np.float32))
    finally:
        parallel.set_threads(None)


def test_shard_writer_refuses_another_dtype(tmp_path):
    """float64 values for a float32 array are refused, not cast silently; nothing is written."""
    store = write_store(tmp_path / "s.zarr", trajectory(1, 5000), chunk=1024, shard=2048)
    folder = tmp_path / "s.zarr" / "params"
    before = (folder / "c" / "0" / "0").read_bytes()
    with pytest.raises(InvalidArgumentError, match="float64"):
        shardwrite.write_row(folder, 0, 0, np.ones(5000, np.float64))
    assert (folder / "c" / "0" / "0").read_bytes() == before
    assert store.group["params"].shape[1] == 5000


def test_shard_writer_declines_blosc_settings_it_does_not_know(tmp_path):
    """Any Blosc key missing, an unknown compressor or shuffle, a level out of range: no writer
    (zarr writes the row) rather than a guess at the missing setting."""
    write_store(tmp_path / "s.zarr", trajectory(1, 5000), chunk=1024, shard=2048)
    folder = tmp_path / "s.zarr" / "params"
    meta = json.loads((folder / "zarr.json").read_text())
    assert shardwrite.ShardWriter.for_array(folder, meta) is not None
    for key, value in [("cname", None), ("clevel", None), ("shuffle", None), ("blocksize", None), ("typesize", None),
                       ("cname", "snappy"), ("shuffle", "byteshuffle"), ("clevel", 12), ("typesize", "4")]:
        changed = json.loads(json.dumps(meta))
        blosc = changed["codecs"][0]["configuration"]["codecs"][1]["configuration"]
        if value is None:
            del blosc[key]
        else:
            blosc[key] = value
        assert shardwrite.ShardWriter.for_array(folder, changed) is None, (key, value)


def test_lossless_preset_with_a_parameter_says_what_to_use():
    for spec in ("lossless:3", "lossless-zstd:3", "lossless-fast:1"):
        with pytest.raises(InvalidArgumentError, match="take no parameter.*'lossless-zstd'"):
            get_preset(spec)


@pytest.mark.parametrize("codec,cname", [("lossless", "lz4"), ("lossless-zstd", "zstd")])
def test_info_shows_the_chain_and_buffers_follow_the_preset(tmp_path, codec, cname):
    """info names the stored chain read from the arrays' metadata, and the buffers array is
    compressed with the preset's compressor (before: lz4 in every store)."""
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    with TrajectoryStore.create(tmp_path / "s.zarr", model, codec=codec, buffers=True) as store:
        store.append(model, step=0)
    chains = info(tmp_path / "s.zarr")["chunk_codecs"]
    assert chains["params"] == f"blosc({cname}, level 1, bitshuffle) + crc32c"
    assert chains["buffers"] == f"blosc({cname}, level 1, bitshuffle) + crc32c"


def test_delta_reference_keeps_the_presets_compressor(tmp_path):
    write_store(tmp_path / "s.zarr", trajectory(2, 5000), codec="bitround-delta", chunk=1024, shard=2048)
    chains = info(tmp_path / "s.zarr")["chunk_codecs"]
    assert chains["reference"].startswith("blosc(zstd,") and chains["params"].startswith("blosc(zstd,")
