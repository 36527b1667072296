"""The subspace products on P's column tiles: accuracy against float64, and the same bits whatever
holds P (resident, streamed, memory-mapped) and however many threads share the tiles out."""
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.basis import Basis
from pipeline.tiles import padded_rows, rows_of, tile_in_place, tiles_of
from trajstore.layout import ParamLayout, TensorSpec


def _problem(n: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen) / n ** 0.5  # (n, d)
    g = torch.randn(n, generator=gen) * 1e-3 + 1e-3  # an offset: the terms do not cancel
    return q, g


def test_projection_of_a_large_tensor_is_accurate_to_float32_pieces():
    """One float32 gemv over a 1M-parameter tensor erred by 2e-5 (relative); pieces folded in float64: ~4e-6."""
    n, d = 1_000_000, 8
    q, g = _problem(n, d)
    basis = Basis(q, ParamLayout([TensorSpec("w", (n,), "float32")]), mode="resident")
    ref = q.double().T @ g.double()  # (d,)
    got = basis.project([g])
    assert got.dtype == torch.float64
    assert float((got - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_resident_streamed_mapped_and_any_thread_count(tmp_path, dtype):
    """A 16-bit basis and gradients too: their upcasts run inside the products' one-core BLAS setting,
    in pool threads whose first torch op that is (torch would re-apply its own MKL thread count there)."""
    n, d = 300_001, 5
    q, g = _problem(n, d, seed=1)
    q, g = q.to(dtype).float(), g.to(dtype)  # P representable in dtype: the float32 copies hold the same values
    name = str(dtype).removeprefix("torch.")
    layout = ParamLayout([TensorSpec("a", (1000, 200), name), TensorSpec("b", (n - 200_000,), name)])
    grads = [g[:200_000].reshape(1000, 200), g[200_000:]]
    np.save(tmp_path / "p.npy", q.numpy())
    mapped = np.load(tmp_path / "p.npy", mmap_mode="r")  # read-only: tiles made as they are read
    bases = [Basis(q, layout, mode="resident", block_rows=65_536, dtype=dtype),
             Basis(q, layout, mode="streamed", block_rows=65_536, dtype=dtype),
             Basis(mapped, layout, mode="streamed", block_rows=65_536, dtype=dtype)]
    assert bases[0]._tiles is not None
    c = torch.randn(d, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for basis in bases:
                lifted = [torch.zeros(1000, 200, dtype=dtype), torch.zeros(n - 200_000, dtype=dtype)]
                basis.add_lifted_(lifted, c, alpha=-0.5)
                results.append((basis.project(grads), torch.cat([t.reshape(-1) for t in lifted])))
    finally:
        torch.set_num_threads(threads)
    for i, (g_tilde, w) in enumerate(results[1:]):
        assert torch.equal(g_tilde, results[0][0]) and torch.equal(w, results[0][1]), i + 1
    ref = q.double().T @ g.double()
    assert float((results[0][0] - ref).norm() / ref.norm()) < 1e-5
    want = -0.5 * (q.double() @ c)
    assert float((results[0][1].double() - want).norm() / want.norm()) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("n, cols", [(10, 4), (12, 4), (1, 1), (7, 100)])
def test_tiles_hold_p_transposed_and_give_its_rows_back(n, cols):
    d = 3
    p = np.arange(n * d, dtype=np.float32).reshape(n, d) + 0.5
    tiles = tiles_of(p, min(cols, n), torch.float32)
    assert tiles.shape == (-(-n // min(cols, n)), d, min(cols, n))
    np.testing.assert_array_equal(rows_of(tiles, n, 0, n), p)
    np.testing.assert_array_equal(rows_of(tiles, n, 1, n), p[1:])
    buf = padded_rows(n, d, min(cols, n))
    buf[:n] = p
    in_place = tile_in_place(buf, n, min(cols, n))
    assert torch.equal(in_place, tiles)
    assert in_place.data_ptr() == buf.ctypes.data  # P is held once


def test_grad_mode_is_off_in_every_product_thread():
    """Grad mode is per thread: a product thread that recorded a graph made the optimizer step fail."""
    n, d = 600_000, 4
    q, _ = _problem(n, d)
    w = torch.nn.Parameter(torch.zeros(n))
    basis = Basis(q, ParamLayout([TensorSpec("w", (n,), "float32")]), mode="resident")
    assert len(basis._blocks) > 1
    with torch.no_grad():
        basis.add_lifted_([w], torch.ones(d))
    assert w.grad_fn is None and not torch.equal(w.detach(), torch.zeros(n))


def test_one_basis_used_from_two_threads_at_once_gives_each_its_own_result():
    """Review finding: the products' buffers were shared by every caller of one basis (wrong weights)."""
    import threading

    n, d = 1_600_000, 8
    q, _ = _problem(n, d)
    basis = Basis(q, ParamLayout([TensorSpec("w", (n,), "float32")]), mode="resident", block_rows=16_384)
    coeffs = [torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    want = [basis.lift(c)[0].clone() for c in coeffs]
    worst = [0.0, 0.0]

    def run(i: int) -> None:
        for _ in range(10):
            worst[i] = max(worst[i], float((basis.lift(coeffs[i])[0] - want[i]).abs().max()))

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_under_inference_mode_then_outside_it(dtype):
    """Review finding: buffers made under inference_mode could not be written outside it (RuntimeError)."""
    n, d = 1000, 3
    q, g = _problem(n, d)
    basis = Basis(q, ParamLayout([TensorSpec("w", (n,), "float32")]), dtype=dtype)
    with torch.inference_mode():
        inside = basis.lift(torch.ones(d))[0].clone()
        g_inside = basis.project([g])
    assert torch.equal(basis.lift(torch.ones(d))[0], inside)
    assert torch.equal(basis.project([g]), g_inside)


def test_a_basis_without_rows_projects_to_zero_and_lifts_nothing():
    """An FSDP2 rank whose shards are all empty holds no rows: g̃ = 0 (its share of the all-reduce), no crash."""
    layout = ParamLayout([TensorSpec("w", (0,), "float32")])
    basis = Basis(np.zeros((0, 4), np.float32), layout)
    assert torch.equal(basis.project([torch.zeros(0)]), torch.zeros(4, dtype=torch.float64))
    w = torch.zeros(0)
    basis.add_lifted_([w], torch.ones(4))
    assert w.numel() == 0


def test_the_product_pool_works_in_a_forked_child():
    """Review finding: after fork the pool's threads are gone and a product waited forever."""
    import os

    n, d = 1_200_000, 2
    q, g = _problem(n, d)
    basis = Basis(q, ParamLayout([TensorSpec("w", (n,), "float32")]), mode="resident", block_rows=65_536)
    want = basis.project([g])  # the parent's pool has started
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only when the product finishes and agrees
        code = 1
        try:
            torch.set_num_threads(2)
            code = 0 if torch.equal(basis.project([g]), want) else 3
        finally:
            os._exit(code)
    import time

    deadline = time.time() + 60
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the product in the forked child did not finish in 60 s")


# -- the memory-mapped copy in tiles ------------------------------------------------------------------------
def _extracted(tmp_path, n=20_000, d=4):
    from pipeline import extract_subspace

    from .synthetic import trajectory, write_store

    path = tmp_path / "run.zarr"
    write_store(path, trajectory(12, n), chunk=1024, shard=4096)
    extract_subspace(path, dim=d)
    return path


def test_a_tiled_copy_that_does_not_hold_the_rows_read_is_never_renamed_into_use(tmp_path, monkeypatch):
    """Review finding: the file hash in the name was taken of whatever the tiling wrote; a tiling bug
    would have been used. The tiles are now checked against the extraction's digest before the rename."""
    import pipeline.basis_cache as cache
    from pipeline.tiles import put_rows
    from trajstore.errors import StoreWriteError

    path = _extracted(tmp_path)

    def off_by_one(tiles, r0, rows):
        put_rows(tiles, r0, rows * (1 + 1e-6 * (r0 == 0)))  # the first block slightly wrong

    monkeypatch.setattr(cache, "put_rows", off_by_one)
    with pytest.raises(StoreWriteError, match="does not hold the basis"):
        Basis.from_store(path, host="mmap")
    assert not list((path / "subspaces" / "default").glob("basis-*.f32.npy"))
    monkeypatch.undo()
    from pipeline import open_subspace

    np.testing.assert_array_equal(Basis.from_store(path, host="mmap").to_numpy(), open_subspace(path).to_numpy())


def test_copies_of_two_tile_widths_live_side_by_side(tmp_path):
    """Review finding: loaders with different tile widths deleted each other's copy (a rebuild every load)."""
    path = _extracted(tmp_path)
    folder = path / "subspaces" / "default"
    a = Basis.from_store(path, host="mmap", mode="streamed", block_rows=4096)
    b = Basis.from_store(path, host="mmap", mode="streamed", block_rows=8192)
    assert a.mapped_file != b.mapped_file and len(list(folder.glob("basis-*.f32.npy"))) == 2
    before = Path(a.mapped_file).stat().st_mtime_ns
    again = Basis.from_store(path, host="mmap", mode="streamed", block_rows=4096)
    assert again.mapped_file == a.mapped_file and Path(a.mapped_file).stat().st_mtime_ns == before  # reused
    assert np.array_equal(again.to_numpy(), b.to_numpy())


def test_lift_under_inference_mode_with_several_threads_writes_inference_tensors():
    """New-user finding: the pool's threads were outside the caller's inference mode, and could not write
    the inference tensors it passed (RuntimeError)."""
    n, d = 1_100_000, 3
    q, _ = _problem(n, d)
    basis = Basis(q, ParamLayout([TensorSpec("w", (n,), "float32")]), mode="resident", block_rows=65_536)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            got = basis.lift(torch.ones(d))[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(got.double(), q.double().sum(1), atol=1e-6)


def test_an_empty_cache_file_is_rebuilt(tmp_path):
    """New-user finding: a 0-byte copy (a crash before its data reached the disk) raised EOFError on every load."""
    from pipeline import open_subspace

    path = _extracted(tmp_path)
    first = Basis.from_store(path, host="mmap", mode="streamed")
    Path(first.mapped_file).write_bytes(b"")
    again = Basis.from_store(path, host="mmap", mode="streamed")
    np.testing.assert_array_equal(again.to_numpy(), open_subspace(path).to_numpy())


@pytest.mark.parametrize("bad", [0, -5, 3.5, True, "abc"])
def test_block_rows_must_be_a_positive_integer(bad):
    from trajstore.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="block_rows"):
        Basis(np.zeros((100, 2), np.float32), ParamLayout([TensorSpec("w", (100,), "float32")]), block_rows=bad)


def test_a_bad_product_thread_setting_warns_and_is_not_used(monkeypatch):
    import pipeline.placement as placement

    monkeypatch.setenv("TRAJSTORE_PRODUCT_THREADS", "abc")
    monkeypatch.setattr(placement, "_warned", set())
    with pytest.warns(RuntimeWarning, match="TRAJSTORE_PRODUCT_THREADS") as caught:
        assert placement.product_threads() == torch.get_num_threads()
    assert caught[0].filename == __file__  # pointed at the user's line, not at trajstore's
    monkeypatch.setenv("TRAJSTORE_PRODUCT_THREADS", "1")
    assert placement.product_threads() == 1


def test_cuda_device_without_cuda_is_a_typed_error():
    from trajstore.errors import InvalidArgumentError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidArgumentError, match="no CUDA device"):
        Basis(np.zeros((100, 2), np.float32), ParamLayout([TensorSpec("w", (100,), "float32")]), device="cuda")


def test_a_run_directory_is_named_with_its_store_and_bad_numbers_are_typed(tmp_path):
    """New-user findings: Basis.from_store on a `trajstore train` run directory gave no hint; fraction=0 and
    plan(bandwidth="10") were taken silently or raised a raw TypeError."""
    from pipeline.plan import plan
    from trajstore.errors import InvalidArgumentError, NotAStoreError

    run = tmp_path / "run"
    run.mkdir()
    _extracted(run)  # run/run.zarr
    (run / "run.zarr").rename(run / "trajectory.zarr")
    with pytest.raises(NotAStoreError, match="trajectory.zarr"):
        Basis.from_store(run)
    assert Basis.from_store(run / "trajectory.zarr").d == 4
    with pytest.raises(InvalidArgumentError, match="fraction"):
        Basis(np.zeros((100, 2), np.float32), ParamLayout([TensorSpec("w", (100,), "float32")]), fraction=0)
    with pytest.raises(InvalidArgumentError, match="bandwidth"):
        plan("1M", 4, device="cpu", bandwidth="10")


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch built without MKL: nothing to set")
def test_one_blas_thread_holds_in_a_new_thread_whose_first_torch_op_runs_inside_it():
    """torch sets MKL's thread-local count on a thread's first parallel op; inside the block that would undo
    the one-core setting, and Pᵀg's sum would split again."""
    import sys
    import threading

    from pipeline.placement import _mkl_local_threads, mkl_function, one_blas_thread

    if sys.platform.startswith("linux"):
        assert _mkl_local_threads() is not None, "no MKL_Set_Num_Threads_Local found in torch's MKL"
    mkl_threads = mkl_function("MKL_Get_Max_Threads")
    if _mkl_local_threads() is None or mkl_threads is None:
        pytest.skip("this torch's MKL has no thread-local setting trajstore can reach")
    mkl_threads.argtypes = []
    seen = []

    def fresh_thread():
        with one_blas_thread():
            torch.ones(1 << 20).to(torch.float64)  # this thread's first parallel op
            seen.append(mkl_threads())
        seen.append(mkl_threads())

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        worker = threading.Thread(target=fresh_thread)
        worker.start()
        worker.join()
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2]
