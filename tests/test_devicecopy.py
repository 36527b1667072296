"""The asynchronous CUDA copy (trajstore/devicecopy.py) is taken only when exactly right; on CPU the
synchronous path is unchanged. The CUDA side itself is in tests/test_cuda.py (benchmarks/gpu_check.sh)."""
import threading

import numpy as np
import pytest
import torch
from torch import nn

from trajstore import TrajectoryStore, devicecopy
from trajstore.errors import NonFiniteError, StoreWriteError
from trajstore.writer import BackgroundWriter, Job


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def test_a_cpu_model_takes_the_synchronous_path_and_records_as_before(tmp_path):
    model = _model()
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        assert store.async_device_copy  # on by default: it only applies to CUDA weights
        assert "not on a CUDA device" in devicecopy.examine(store, model, None)
        assert "not on a CUDA device" in devicecopy.examine(store, model.state_dict(), None)
        store.append(model, step=0)
        assert getattr(store, "_device_copier", None) is None  # no stream, no page-locked memory
        store.flush()
        want = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
        assert np.array_equal(store.read(0), want)


def test_store_level_refusals():
    assert devicecopy.store_reason(True, False, True, None) is None
    assert "off" in devicecopy.store_reason(False, False, True, None)
    assert "multi-process" in devicecopy.store_reason(True, True, True, None)
    assert "sharded" in devicecopy.store_reason(True, False, False, None)
    assert "optimizer" in devicecopy.store_reason(True, False, True, object())


def test_device_level_refusals():
    cpu, meta = torch.zeros(3), torch.zeros(3, device="meta")
    assert "not a cuda device" in devicecopy.device_reason([cpu])
    assert "several devices" in devicecopy.device_reason([cpu, meta], kind="cpu")
    assert "dtype" in devicecopy.device_reason([cpu, cpu.half()], kind="cpu", dtype=torch.float32)
    assert "layout" in devicecopy.device_reason([cpu, cpu.to_sparse()], kind="cpu")
    assert devicecopy.device_reason([cpu, cpu + 1], kind="cpu", dtype=torch.float32) is None
    assert devicecopy.device_reason([]) == "no tensors"


def test_a_flat_snapshot_and_a_store_recorded_sharded_take_the_synchronous_path(tmp_path):
    from trajstore import distributed
    from trajstore._creating import chunking, create_files
    from trajstore.columns import ColumnMap
    from trajstore.layout import ParamLayout

    model = _model()
    with TrajectoryStore.create(tmp_path / "flat.zarr", model) as store:
        assert devicecopy.examine(store, torch.zeros(store.n_params), None) == "a flat snapshot"
    layout = ParamLayout.from_module(model)
    pieces = distributed.rank_pieces(layout, 2)
    chunk, shard = chunking(max(sum(n for _, n in rank) for rank in pieces), 8, 16)
    path = str(tmp_path / "sharded.zarr")
    group, meta, lock = create_files(path, model, codec="lossless", metadata=None, overwrite=False, buffers=False,
                                     chunk_size=chunk, shard_size=shard, storage_options=None, durable=False,
                                     break_lock=False, columns=ColumnMap.rank_major(layout.n, pieces, shard))
    with TrajectoryStore(path, group, meta, "a", lock, None) as store:
        assert "sharded" in devicecopy.examine(store, model, None)


def test_the_option_and_the_environment_switch_it_off(tmp_path, monkeypatch):
    model = _model()
    with TrajectoryStore.create(tmp_path / "a.zarr", model, async_device_copy=False) as store:
        assert not store.async_device_copy
        assert "off" in devicecopy.examine(store, model, None)
    with TrajectoryStore.open(tmp_path / "a.zarr", "a") as store:
        assert store.async_device_copy
    with TrajectoryStore.open(tmp_path / "a.zarr", "a", async_device_copy=False) as store:
        assert not store.async_device_copy
    monkeypatch.setenv(devicecopy.ENV, "0")
    with TrajectoryStore.open(tmp_path / "a.zarr", "a") as store:
        assert not store.async_device_copy
    with TrajectoryStore.open(tmp_path / "a.zarr", "a", async_device_copy=True) as store:
        assert store.async_device_copy


def _writer(written: list, depth: int = 2) -> BackgroundWriter:
    return BackgroundWriter(4, np.float32, lambda job: written.append((job.index, job.nonfinite)), depth=depth)


def test_the_writer_waits_for_a_row_still_landing_and_takes_its_nonfinite_flag():
    written, landed = [], threading.Event()
    writer = _writer(written)
    buf = writer.acquire()

    def ready() -> bool:
        assert landed.wait(5)
        return True

    writer.submit(Job(0, buf, 0, 0, 0.0, ready=ready))
    assert written == []  # still waiting for the row
    landed.set()
    writer.flush()
    assert written == [(0, True)]
    writer.close()


def test_a_refused_row_stops_the_writer_and_surfaces_at_the_next_call():
    written, waited = [], []
    writer = _writer(written, depth=3)

    def refuse() -> bool:
        waited.append(1)
        raise NonFiniteError("snapshot at step 1 holds NaN")

    def fine() -> bool:
        waited.append(2)
        return False

    gate = threading.Event()
    writer.submit(Job(0, writer.acquire(), 0, 0, 0.0, ready=lambda: gate.wait(5) and False))
    writer.submit(Job(1, writer.acquire(), 1, 0, 0.0, ready=refuse))
    writer.submit(Job(2, writer.acquire(), 2, 0, 0.0, ready=fine))  # queued after the refused row
    gate.set()
    with pytest.raises(NonFiniteError, match="step 1"):
        writer.flush()
    assert written == [(0, False)]  # nothing of the refused row, nor of the row after it
    assert waited == [1, 2]  # the skipped row's copy was still waited for before its buffer came back
    with pytest.raises(StoreWriteError, match="failed earlier"):
        writer.acquire()
    with pytest.raises(StoreWriteError):
        writer.close()


def test_restage_replaces_free_buffers_now_and_those_in_flight_when_they_come_back():
    written, gate, made = [], threading.Event(), []

    def make() -> np.ndarray:
        made.append(np.full(4, 7, np.float32))
        return made[-1]

    writer = _writer(written)
    old = writer.acquire()
    writer.submit(Job(0, old, 0, 0, 0.0, ready=lambda: gate.wait(5) and False))  # in flight during restage
    writer.restage(make)
    assert len(made) == 2
    first = writer.acquire()
    assert any(first is m for m in made)
    gate.set()
    writer.flush()
    second = writer.acquire()  # the old buffer came back: replaced by the other made one
    assert any(second is m for m in made) and second is not first
    writer.release(first)
    writer.release(second)
    writer.close()


def test_restage_that_fails_leaves_the_pool_as_it_was():
    written = []
    writer = _writer(written)

    def fail() -> np.ndarray:
        raise RuntimeError("no page-locked memory")

    with pytest.raises(RuntimeError):
        writer.restage(fail)
    a, b = writer.acquire(), writer.acquire()
    assert a.dtype == b.dtype == np.float32 and a is not b
    writer.release(a)
    writer.release(b)
    writer.close()


@pytest.mark.parametrize("bad", ["false", 0, 1, "no"])
def test_async_device_copy_takes_a_bool_only(tmp_path, bad):
    """New-user finding: "false" turned the feature on (bool("false") is True)."""
    from trajstore import TrajectoryStore
    from trajstore.errors import InvalidArgumentError

    model = torch.nn.Linear(3, 2)
    with pytest.raises(InvalidArgumentError, match="async_device_copy"):
        TrajectoryStore.create(tmp_path / "s.zarr", model, async_device_copy=bad)
    with TrajectoryStore.create(tmp_path / "s.zarr", model, overwrite=True, async_device_copy=False) as store:
        assert store.async_device_copy is False  # the refused create released its lock
