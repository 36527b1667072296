"""CUDA paths (run by benchmarks/gpu_check.sh on a lent GPU): skip cleanly on CPU-only machines."""
import numpy as np
import pytest
import torch

from pipeline.basis import Basis
from pipeline.optim import SubspaceSGD
from trajstore import TrajectoryStore

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.sh)")]


def _model(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10)).to(device)


def _basis_rows(model: torch.nn.Module, d: int) -> np.ndarray:
    n = sum(p.numel() for p in model.parameters())
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((n, d)))
    return q.astype(np.float32)  # (n, d)


@pytest.mark.parametrize("mode", ["resident", "streamed"])
def test_psgd_on_cuda_matches_the_cpu_steps(mode):
    """The streamed basis (two device buffers, copies on a side stream) gives the CPU result."""
    x, y = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)), torch.randint(0, 10, (32,))
    weights = {}
    for device in ("cpu", "cuda"):
        model = _model(device)
        p = _basis_rows(model, 8)
        basis = Basis.from_array(p, model, device=device, mode=mode if device == "cuda" else "resident",
                                 block_rows=1000)
        opt = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        weights[device] = torch.cat([q.detach().cpu().reshape(-1) for q in model.parameters()])
    assert torch.allclose(weights["cuda"], weights["cpu"], rtol=1e-4, atol=1e-6)


def test_snapshots_of_cuda_weights_equal_their_host_copy(tmp_path):
    model = _model("cuda")
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        for step in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.01)
            store.append(model, step=step)
            want = torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()]).numpy()
            store.flush()
            assert np.array_equal(store.read(step), want)


# -- snapshots of CUDA weights copied without stalling training (trajstore/devicecopy.py, issue 10) --------


def _flat(model: torch.nn.Module) -> np.ndarray:
    """The weights as float32 on the host (bfloat16/float16 widened exactly): a synchronizing copy."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).float().cpu().numpy()


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _cycles_per_ms() -> float:
    """GPU clock cycles per millisecond, for torch.cuda._sleep (which spins the given cycles)."""
    torch.cuda._sleep(1000)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / start.elapsed_time(end)


def _busy(ms: float, cycles_per_ms: float) -> None:
    """Keep the current (training) stream busy for about ``ms`` milliseconds."""
    torch.cuda._sleep(int(ms * cycles_per_ms))


@pytest.mark.parametrize("asynchronous", [True, False])
def test_append_of_cuda_weights_returns_while_the_gpu_is_still_busy(tmp_path, asynchronous):
    """The asynchronous path returns at once; the synchronous one (the old path, kept for the contrast)
    waits for the GPU. Either way the snapshot is bit for bit the weights at the call."""
    import time

    cpm, model = _cycles_per_ms(), _model("cuda")
    with TrajectoryStore.create(tmp_path / "run.zarr", model, async_device_copy=asynchronous) as store:
        store.append(model, step=0)  # first use: page-locked buffers, device staging buffer, stream
        store.flush()
        assert (getattr(store, "_device_copier", None) is not None) == asynchronous
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)
        want = _flat(model)
        _busy(300, cpm)
        t0 = time.perf_counter()
        store.append(model, step=1)
        took = time.perf_counter() - t0
        still_busy = not torch.cuda.current_stream().query()
        store.flush()
        assert _same_bits(store.read(1), want)
    if asynchronous:
        assert still_busy and took < 0.075, f"append took {took * 1e3:.1f} ms while the GPU slept 300 ms"
    else:
        assert took > 0.2  # the blocking copy waited for the sleeping GPU


def test_weights_changed_right_after_append_do_not_tear_the_snapshot(tmp_path):
    cpm, model = _cycles_per_ms(), _model("cuda")
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        store.append(model, step=0)
        store.flush()
        for step in (1, 2, 3):
            want = _flat(model)
            _busy(100, cpm)  # the copy is still queued when the next update is enqueued
            store.append(model, step=step)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(2)  # in place, on the training stream, right after the append
            store.flush()
            assert _same_bits(store.read(step), want), step
        assert store._device_copier is not None and not store._device_copier.direct


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_into_its_own_dtype_bit_for_bit(tmp_path, dtype):
    cpm, model = _cycles_per_ms(), _model("cuda").to(dtype)
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        assert store.values == str(dtype).removeprefix("torch.")
        for step in range(3):
            want = _flat(model)
            _busy(50, cpm)
            store.append(model, step=step)
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(3)
            store.flush()
            assert _same_bits(store.read(step).astype(np.float32), want), step  # float16 reads as float16
        assert store._device_copier is not None


def test_nan_in_cuda_weights_is_refused_at_the_next_call(tmp_path):
    from trajstore.errors import NonFiniteError, TrajstoreError

    cpm, model = _cycles_per_ms(), _model("cuda")
    path = tmp_path / "run.zarr"
    store = TrajectoryStore.create(path, model)
    store.append(model, step=0)
    store.flush()
    good = _flat(model)
    with torch.no_grad():
        model[2].weight[1, 2] = float("nan")
    _busy(300, cpm)  # the writer is still waiting for the NaN row when the next append comes
    store.append(model, step=1)  # returns: the NaN is seen once the copy has landed
    assert not torch.cuda.current_stream().query(), "append waited for the GPU"
    with torch.no_grad():
        model[2].weight[1, 2].fill_(0.0)  # not ``= 0.0``: that copies a host scalar and waits for the GPU
    # the NaN row has not landed (fill_ queues a kernel and returns): this append cannot know yet
    assert not torch.cuda.current_stream().query(), "fill_ waited for the GPU"
    store.append(model, step=2)
    with pytest.raises(NonFiniteError, match=r"step 1 .*'2\.weight'.*asynchronously from CUDA.*1 snapshot"):
        store.flush()  # the flush waits for the row and reports it
    assert len(store) == 1 and _same_bits(store.read(0), good)
    with pytest.raises(TrajstoreError):
        store.append(model, step=3)  # the writer stopped: reopen to go on
    with pytest.raises(TrajstoreError):
        store.close()
    with TrajectoryStore.open(path, "a") as store:
        assert len(store) == 1 and list(store.steps) == [0] and _same_bits(store.read(0), good)
        with torch.no_grad():
            model[2].weight[1, 2] = float("inf")
        store.append(model, step=1, allow_nonfinite=True)  # recorded, and flagged
        store.append(model, step=2, allow_nonfinite=True)
        store.flush()
        assert len(store) == 3 and list(store._row_values("nonfinite")) == [False, True, True]
        assert np.isinf(store.read(1)).sum() == 1
    store = TrajectoryStore.open(path, "a")
    store.append(model, step=3)  # Inf, not allowed: refused once the copy has landed
    store._writer._jobs.join()  # (the writer has seen it; flush would raise it)
    with pytest.raises(NonFiniteError, match="step 3"):
        store.append(model, step=4)  # the deferred error at the next append, not only at flush
    with pytest.raises(TrajstoreError):
        store.close()
    with TrajectoryStore.open(path) as store:
        assert len(store) == 3


def test_buffers_recorded_asynchronously_equal_the_synchronous_path(tmp_path):
    cpm = _cycles_per_ms()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4)).cuda()
    stores = {mode: TrajectoryStore.create(tmp_path / f"{mode}.zarr", model, buffers=True, async_device_copy=mode)
              for mode in (True, False)}
    x = torch.randn(16, 8, device="cuda")
    for step in range(3):
        model(x * (step + 1))  # training mode: the running statistics change
        _busy(50, cpm)
        for store in stores.values():
            store.append(model, step=step)
        model(x - step)  # changed right after: the snapshots keep the values of the append
        with torch.no_grad():
            model[0].weight.mul_(1.1)
    for store in stores.values():
        store.flush()
    a, s = stores[True], stores[False]
    assert a._device_copier is not None and getattr(s, "_device_copier", None) is None
    for step in range(3):
        assert _same_bits(a.read(step), s.read(step))
        for name, tensor in s.read_buffers(step).items():
            assert torch.equal(a.read_buffers(step)[name], tensor), name
    for store in stores.values():
        store.close()


def test_an_int64_buffer_float64_cannot_hold_is_refused_as_on_the_host(tmp_path):
    """The buffers row is float64: the asynchronous path rounded an int64 buffer above 2^53 silently, where the
    synchronous path refuses it (InexactValuesError); now both refuse, and 2^53 + 2 (exact) passes both."""
    from trajstore.errors import InexactValuesError, TrajstoreError

    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.BatchNorm1d(32)).cuda()
    tracked = model[1].num_batches_tracked
    for mode in (True, False):
        path = tmp_path / f"{mode}.zarr"
        store = TrajectoryStore.create(path, model, buffers=True, async_device_copy=mode)
        tracked.fill_(2**53 + 2)  # even: float64 holds it exactly
        store.append(model, step=0)
        store.flush()
        assert store.read_buffers(0)["1.num_batches_tracked"].item() == 2**53 + 2
        if mode:  # the copy of these weights does take the asynchronous path
            from trajstore.devicecopy import Plan, examine
            assert isinstance(examine(store, model, None), Plan)
        tracked.fill_(2**53 + 1 if mode else 2**63 - 1)  # rounds to 2^53; INT64_MAX rounds to 2^63 (CUDA clamps back)
        with pytest.raises(InexactValuesError, match="num_batches_tracked"):
            store.append(model, step=1)
            store.flush()  # the asynchronous path reports it once the copy has landed
        assert len(store) == 1
        if mode:  # the writer stopped at the refused row: reopen to go on
            with pytest.raises(TrajstoreError):
                store.close()
        else:  # refused before anything was queued
            store.close()
        with TrajectoryStore.open(path) as reopened:
            assert len(reopened) == 1


def test_the_synchronous_fallback_on_cuda(tmp_path):
    from trajstore import devicecopy

    model = _model("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64, device="cuda")).sum().backward()
    opt.step()
    with TrajectoryStore.create(tmp_path / "opt.zarr", model, optimizer_state=True) as store:
        assert "optimizer" in devicecopy.examine(store, model, opt)
        store.append(model, step=0, optimizer=opt)
        store.flush()
        assert _same_bits(store.read(0), _flat(model)) and getattr(store, "_device_copier", None) is None
        assert torch.equal(store.optimizer_state(0)["0.weight"]["exp_avg"], opt.state[model[0].weight]["exp_avg"].cpu())
    with TrajectoryStore.create(tmp_path / "dtype.zarr", model) as store:  # float32 store, bfloat16 weights
        half = _model("cuda").to(torch.bfloat16)
        assert "dtype" in devicecopy.examine(store, half, None)
        store.append(half, step=0)  # widened exactly on the host
        store.flush()
        assert _same_bits(store.read(0), _flat(half)) and getattr(store, "_device_copier", None) is None
    with TrajectoryStore.create(tmp_path / "mixed.zarr", model) as store:
        mixed = _model("cuda")
        mixed[2].cpu()
        assert "several devices" in devicecopy.examine(store, mixed, None)
        store.append(mixed, step=0)
        store.flush()
        assert _same_bits(store.read(0), torch.cat([p.detach().cpu().reshape(-1) for p in mixed.parameters()]).numpy())
