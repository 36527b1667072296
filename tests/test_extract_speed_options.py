"""The extraction hot path (issue 13): exact widening, the float32 basis product option, the digest read back
during the basis pass, one read pass when the Gram is current. Real stores, real dask."""
import numpy as np
import pytest
import zarr

from pipeline import extract_subspace
from pipeline.blocks import SUB_BLOCK, wide_blocks
from pipeline.compute import Interrupted, StopFlag, run_tasks
from pipeline.gram import update_gram
from pipeline.subspace_write import digest_of
from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError, NonFiniteError, SubspaceExistsError
from trajstore.reader import RowReader

from .synthetic import dense_reference, max_angle, trajectory, write_store

T, N, D = 20, 6 * (1 << 14) + 5, 4  # 7 column blocks of the default chunk


@pytest.fixture(scope="module")
def data():
    return trajectory(T, N, rank=D)


def test_widening_is_the_float64_difference_of_the_float32_values_bit_for_bit():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, SUB_BLOCK + 123)) * 10.0 ** rng.integers(-30, 30, (7, SUB_BLOCK + 123)))
    x = x.astype(np.float32)  # (t, C): values over 60 decades, so a float32 difference would round
    for shift in (0, 4):
        got = np.concatenate([d.copy() for _, d in wide_blocks(x, shift=shift)], axis=1)
        want = x.astype(np.float64) - x[shift].astype(np.float64)
        assert got.dtype == np.float64 and np.array_equal(got, want)


def test_float32_basis_product_is_an_option_recorded_with_the_subspace(tmp_path, data):
    path = tmp_path / "run.zarr"
    write_store(path, data)
    exact = extract_subspace(path, dim=D, name="f64")
    fast = extract_subspace(path, dim=D, name="f32", basis_precision="float32")
    _, p_ref, _ = dense_reference(data, D)
    assert exact.attrs["basis_precision"] == "float64" and fast.attrs["basis_precision"] == "float32"
    assert max_angle(exact.to_numpy(), p_ref) <= 1e-6
    assert max_angle(fast.to_numpy(), p_ref) <= 1e-4  # measured 1.3e-7 here (float64: 2.5e-8); see bench_extract
    assert not np.array_equal(fast.to_numpy(), exact.to_numpy())  # it really multiplied in float32
    assert fast.orthonormality_error < 1e-4
    np.testing.assert_allclose(fast.mean[:], data.astype(np.float64).mean(0), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(fast.singular_values, exact.singular_values)  # the Gram is float64 either way
    with pytest.raises(InvalidArgumentError, match="must be one of float64, float32, got .float16."):
        extract_subspace(path, dim=D, name="bad", basis_precision="float16")


def _interrupt_basis_pass(path, **kwargs):
    stop = StopFlag()

    def stop_in_basis_pass(done, total):
        if done > total // 2 + 1:  # the Gram pass is the first half of the bar
            stop.set()

    with pytest.raises(Interrupted):
        extract_subspace(path, dim=3, block_size=1 << 14, progress=stop_in_basis_pass, stop=stop, **kwargs)


def test_an_interrupted_float32_extraction_resumes_only_in_float32(tmp_path, data):
    path = tmp_path / "run.zarr"
    write_store(path, data)
    _interrupt_basis_pass(path, basis_precision="float32")
    with pytest.raises(SubspaceExistsError, match="unfinished extraction"):
        extract_subspace(path, dim=3, block_size=1 << 14)  # float64 blocks must never join float32 ones
    resumed = extract_subspace(path, dim=3, block_size=1 << 14, basis_precision="float32")
    assert resumed.attrs["basis_blocks_resumed"] > 0
    whole = extract_subspace(path, dim=3, block_size=1 << 14, basis_precision="float32", name="whole")
    assert np.array_equal(resumed.to_numpy(), whole.to_numpy()) and resumed.digest == whole.digest


def test_the_digest_taken_during_the_pass_is_the_digest_of_the_basis_read_back(tmp_path, data):
    path = tmp_path / "run.zarr"
    write_store(path, data)
    sub = extract_subspace(path, dim=D, block_size=1 << 14)
    with TrajectoryStore.open(path) as store:
        basis = zarr.open_group(str(path), mode="r")["subspaces/default/basis"]
        assert basis.nchunks > 2 and sub.digest == digest_of(basis, "default", store)
    assert sub.read()[1] == sub.digest


def test_a_block_lost_after_its_done_flag_is_refused_not_marked_complete(tmp_path, data):
    path = tmp_path / "run.zarr"
    write_store(path, data)
    _interrupt_basis_pass(path)
    group = zarr.open_group(str(path), mode="r+")["subspaces/default"]
    first_done = int(np.flatnonzero(group["_done"][:])[0])
    rows = int(group["basis"].chunks[0])
    group["basis"][first_done * rows:(first_done + 1) * rows] = np.nan  # its write never reached the disk
    with pytest.raises(NonFiniteError, match="holds NaN or Inf in rows .* lost write"):
        extract_subspace(path, dim=3, block_size=1 << 14)
    assert not zarr.open_group(str(path), mode="r")["subspaces/default"].attrs["complete"]


def test_with_the_gram_current_the_extraction_reads_the_snapshots_once(tmp_path, data, monkeypatch):
    """What ``extract --follow`` leaves behind: the final extraction is the basis pass alone."""
    path = tmp_path / "run.zarr"
    write_store(path, data)
    read = []
    original = RowReader.read_block

    def counting(self, r0, r1, c0=0, c1=None, out=None):
        result = original(self, r0, r1, c0, c1, out)
        read.append((r1 - r0) * result.shape[1])
        return result

    monkeypatch.setattr(RowReader, "read_block", counting)
    extract_subspace(path, dim=D, name="cold")
    assert sum(read) == 2 * T * N  # the Gram pass and the basis pass
    with TrajectoryStore.open(path) as store:
        root = zarr.open_group(str(path), mode="r+")
        update_gram(store, root)  # nothing new: reads nothing
    read.clear()
    sub = extract_subspace(path, dim=D, name="after-follow")
    assert sum(read) == T * N and sub.attrs["gram_blocks_computed"] == 0


def test_run_tasks_reports_each_finished_task_once_in_the_calling_thread():
    import threading

    caller = threading.get_ident()
    seen = []
    results = run_tasks([lambda i=i: i * i for i in range(9)], finished=lambda i: seen.append((i, threading.get_ident())))
    assert results == [i * i for i in range(9)]
    assert sorted(i for i, _ in seen) == list(range(9)) and {ident for _, ident in seen} == {caller}


def test_cli_basis_precision_reaches_the_subspace(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app
    from pipeline.subspace import open_subspace
    from trajstore import TrajectoryStore

    path = tmp_path / "run.zarr"
    rng = np.random.default_rng(0)
    from trajstore.layout import ParamLayout, TensorSpec

    with TrajectoryStore.create(path, ParamLayout([TensorSpec("w", (3000,), "float32")])) as store:
        for i in range(8):
            store.append(rng.standard_normal(3000).astype(np.float32), step=i)
    runner = CliRunner()
    assert runner.invoke(app, ["extract", str(path), "--dim", "3", "--basis-precision", "float32"]).exit_code == 0
    with TrajectoryStore.open(path) as store:
        assert open_subspace(store, "default").attrs["basis_precision"] == "float32"
    bad = runner.invoke(app, ["extract", str(path), "--dim", "3", "--basis-precision", "float16", "--name", "x"])
    assert bad.exit_code == 2
