"""Sampling policies of an extraction (EMA smoothing, window means, burn-in and stride), exact against a
dense numpy float64 reference; the randomized method with them; resume keys; --follow; typed errors."""
import json
import shutil

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from cli.main import app
from pipeline import extract_subspace, open_subspace
from pipeline.compute import Interrupted, StopFlag
from pipeline.settings import ExtractionSettings
from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError, NonFiniteError, SubspaceExistsError

from .synthetic import max_angle, trajectory, write_store

T, N, D = 24, 20_003, 4
runner = CliRunner()


@pytest.fixture(scope="module")
def data():
    return trajectory(T, N, rank=6, noise=1e-3)


@pytest.fixture(scope="module")
def written(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("sampling") / "run.zarr"
    write_store(path, data, chunk=1 << 12, shard=1 << 14)  # 5 column blocks
    return path


@pytest.fixture()
def store(tmp_path, written):
    shutil.copytree(written, tmp_path / "run.zarr")  # each test its own store, written once
    return tmp_path / "run.zarr"


def sampled(x: np.ndarray, smooth: float | None, window: int | None) -> np.ndarray:
    """The paper's W built row by row in plain numpy (no shared code with pipeline/sampling.py)."""
    x = x.astype(np.float64)
    if window is None:
        if not smooth:
            return x
        out, y = [], x[0].copy()
        for i, row in enumerate(x):
            y = row.copy() if i == 0 else smooth * y + (1 - smooth) * row
            out.append(y)
        return np.array(out)
    out = []
    for lo in range(0, len(x) - window + 1, window):
        group = x[lo:lo + window]
        if smooth is None:
            out.append(group.mean(axis=0))
        else:
            y = group[0].copy()
            for row in group[1:]:
                y = smooth * y + (1 - smooth) * row
            out.append(y)
    return np.array(out)


def reference(w: np.ndarray, d: int):
    """(eigenvalues of the centred Gram, descending; P (n, d); mean) of the sampled rows W (t', n)."""
    mean = w.mean(axis=0)
    c = w - mean
    lam, vec = np.linalg.eigh(c @ c.T)
    order = np.argsort(lam)[::-1]
    lam, vec = np.clip(lam[order], 0, None), vec[:, order]
    return lam, c.T @ vec[:, :d] / np.sqrt(lam[:d]), mean


def check_exact(sub, x, smooth, window, d=D):
    w = sampled(x, smooth, window)
    lam, p, mean = reference(w, d)
    got = np.asarray(sub.attrs["eigenvalues"])
    assert got.shape == lam.shape == (len(w),)
    assert np.linalg.norm(got - lam) <= 1e-10 * np.linalg.norm(lam)  # the whole spectrum
    np.testing.assert_allclose(got[:d], lam[:d], rtol=1e-10)
    np.testing.assert_allclose(sub.singular_values, np.sqrt(lam[:d]), rtol=1e-10)
    assert max_angle(sub.to_numpy(), p) <= 1e-5
    assert sub.orthonormality_error < 1e-5
    np.testing.assert_allclose(sub.mean[:], mean, rtol=0, atol=1e-5)
    np.testing.assert_allclose(sub.explained_variance_ratio, lam / lam.sum(), rtol=0, atol=1e-12)
    assert sub.eigenvectors.shape == (len(w), d) and sub.attrs["sampled_rows"] == len(w)


@pytest.mark.parametrize("smooth, window", [(0.8, None), (None, 4), (0.8, 4), (None, 5), (0.5, 7), (0.999, None),
                                            (0.999, 3)])
def test_sampling_is_exact_against_a_dense_reference(store, data, smooth, window):
    d = min(D, T // (window or 1) - 1)
    sub = extract_subspace(store, dim=d, smooth=smooth, window=window)
    check_exact(sub, data, smooth, window, d)
    assert sub.attrs["sampling"] == {"smooth": smooth, "window": window}
    if window:  # one step per sampled row: the window's last snapshot; a short last window is left out
        assert sub.attrs["steps"] == [10 * (lo + window - 1) for lo in range(0, T - window + 1, window)]
        assert sub.attrs["sampling_left_out"] == list(range(T - T % window, T))
    else:
        assert sub.attrs["steps"] == [10 * i for i in range(T)]


def test_sampling_edge_values_equal_the_plain_extraction(store, data):
    plain = extract_subspace(store, dim=D, name="plain")
    for name, kwargs in {"beta0": dict(smooth=0.0), "k1": dict(window=1), "k1beta": dict(window=1, smooth=0.9)}.items():
        sub = extract_subspace(store, dim=D, name=name, **kwargs)
        np.testing.assert_allclose(sub.attrs["eigenvalues"], plain.attrs["eigenvalues"], rtol=1e-12, atol=0)
        assert max_angle(sub.to_numpy(), plain.to_numpy()) <= 1e-6
    last = extract_subspace(store, dim=2, name="last", smooth=0.0, window=3)  # β = 0: each window's last snapshot
    check_exact(last, data, 0.0, 3, d=2)
    strided = extract_subspace(store, dim=2, name="strided", snapshots=slice(2, None, 3))
    check_exact(strided, data[2::3], None, None, d=2)
    assert last.attrs["steps"] == [10 * i for i in range(2, T, 3)]


def test_burn_in_stride_and_window_compose(store, data):
    sub = extract_subspace(store, dim=2, snapshots=slice(3, None, 2), window=3, smooth=0.7)
    check_exact(sub, data[3::2], 0.7, 3, d=2)
    assert sub.snapshots == list(range(3, T, 2))


def test_sampling_reuses_the_cached_gram_and_its_own_resume_key(store, data):
    extract_subspace(store, dim=D, name="plain")
    sub = extract_subspace(store, dim=D, name="w4", window=4)
    assert sub.attrs["gram_blocks_computed"] == 0 and sub.attrs["gram_rows_reused"] == T  # no second pass
    stop = StopFlag()
    with pytest.raises(Interrupted):  # killed in its basis pass
        extract_subspace(store, dim=D, name="part", window=4, block_size=1 << 12, stop=stop,
                         progress=lambda done, total: stop.set() if done > total // 2 else None)
    with pytest.raises(SubspaceExistsError, match="other settings"):  # another window never resumes it
        extract_subspace(store, dim=D, name="part", window=3, block_size=1 << 12)
    with pytest.raises(SubspaceExistsError, match="other settings"):
        extract_subspace(store, dim=D, name="part", block_size=1 << 12)
    resumed = extract_subspace(store, dim=D, name="part", window=4, block_size=1 << 12)
    assert resumed.attrs["basis_blocks_resumed"] > 0
    assert np.array_equal(resumed.to_numpy(), sub.to_numpy())
    check_exact(resumed, data, None, 4)


def test_invalid_sampling_values_get_typed_errors(store):
    for kwargs, match in [(dict(smooth=1.0), r"\[0, 1\)"), (dict(smooth=-0.1), r"\[0, 1\)"),
                          (dict(smooth=float("nan")), "smooth"), (dict(smooth=True), "smooth"),
                          (dict(window=0), "positive integer"), (dict(window=-2), "positive integer"),
                          (dict(window=2.5), "positive integer"), (dict(window=True), "positive integer"),
                          (dict(window=T), "1 row of the 24"), (dict(window=T + 1), "0 rows"),
                          (dict(window=13), "1 row")]:
        with pytest.raises(InvalidArgumentError, match=match):
            extract_subspace(store, dim=1, **kwargs)
    with pytest.raises(InvalidArgumentError, match=r"t - 1 = 3 for 4 rows \(--window 6 over 24"):
        extract_subspace(store, dim=4, window=6)
    with pytest.raises(InvalidArgumentError, match="not both"):
        extract_subspace(store, ExtractionSettings(dim=2), window=3)
    with TrajectoryStore.open(store) as s:
        assert "subspaces" not in s.group  # refused before anything was written
    result = runner.invoke(app, ["extract", str(store), "--dim", "2", "--smooth", "1"])
    assert result.exit_code == 2 and "--smooth" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["extract", str(store), "--dim", "2", "--window", "0"])
    assert result.exit_code == 2 and "--window" in result.output


def test_randomized_with_sampling_matches_the_exact_method(tmp_path):
    x = trajectory(40, 30_000, rank=4, noise=1e-5)
    write_store(tmp_path / "run.zarr", x, chunk=1 << 12, shard=1 << 14)
    exact = extract_subspace(tmp_path / "run.zarr", dim=3, name="exact", window=2, smooth=0.6)
    approx = extract_subspace(tmp_path / "run.zarr", dim=3, name="rand", window=2, smooth=0.6, method="randomized")
    np.testing.assert_allclose(approx.singular_values, exact.singular_values, rtol=1e-6)
    assert max_angle(approx.to_numpy(), exact.to_numpy()) < 1e-4
    np.testing.assert_allclose(approx.mean[:], exact.mean[:], rtol=0, atol=1e-6)
    # the whole spectrum's length, its first 3 ratios exact fractions of the whole, the rest not computed
    evr = approx.explained_variance_ratio
    assert evr.shape == (20,) and np.isnan(evr[3:]).all()
    np.testing.assert_allclose(evr[:3], exact.explained_variance_ratio[:3], rtol=1e-6)
    assert approx.attrs["uncomputed_variance_ratio"] == pytest.approx(1 - evr[:3].sum(), abs=1e-12)
    spec = runner.invoke(app, ["spectrum", str(tmp_path / "run.zarr"), "--name", "rand", "--json"])
    assert spec.exit_code == 0, spec.output
    parsed = json.loads(spec.stdout)  # strict JSON: no NaN
    assert parsed["explained_variance_ratio"][3] is None and parsed["sampling"] == {"smooth": 0.6, "window": 2}


def test_randomized_resumes_its_spectrum_passes_identically(tmp_path):
    x = trajectory(30, 30_000, rank=4, noise=1e-4)
    path = tmp_path / "run.zarr"
    write_store(path, x, chunk=1 << 12, shard=1 << 14)
    whole = extract_subspace(path, dim=3, name="whole", method="randomized", window=2)
    stop = StopFlag()
    with pytest.raises(Interrupted):  # stopped in the second of its four passes (the first half of the bar)
        extract_subspace(path, dim=3, method="randomized", window=2, stop=stop,
                         progress=lambda done, total: stop.set() if done > total // 8 else None)
    with TrajectoryStore.open(path) as s:
        assert s.group["subspaces/default/_spectrum"].attrs["done"] == 1
    other = extract_subspace(path, dim=3, name="other", method="randomized", window=3)  # another key
    assert other.attrs["randomized_passes_resumed"] == 0
    resumed = extract_subspace(path, dim=3, method="randomized", window=2)
    assert resumed.attrs["randomized_passes_resumed"] == 1
    assert np.array_equal(resumed.singular_values, whole.singular_values)
    assert np.array_equal(resumed.to_numpy(), whole.to_numpy())
    with TrajectoryStore.open(path) as s:
        assert "_spectrum" not in s.group["subspaces/default"]  # dropped once the basis pass starts


def test_randomized_refuses_damaged_nonfinite_data(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(12, 20_000, rank=3), chunk=1 << 12, shard=1 << 14)
    zarr.open_array(str(path / "params"), mode="r+")[7, 15_000] = np.nan  # damage that passes the checksums
    with pytest.raises(NonFiniteError, match="snapshot 7 .* damaged"):
        extract_subspace(path, dim=2, method="randomized")
    with pytest.raises(NonFiniteError, match="snapshot 7 .* damaged"):
        extract_subspace(path, dim=2, method="randomized", window=2, name="w")


def test_follow_applies_the_sampling_and_refuses_a_fixed_selection(store, data):
    from pipeline.follow import follow

    assert follow(store, every=1, dim=2, window=3, smooth=0.5, snapshots=slice(2, None), poll=0.01,
                  max_updates=1) == 1
    sub = open_subspace(store)
    check_exact(sub, data[2:], 0.5, 3, d=2)
    with pytest.raises(InvalidArgumentError, match="open-ended"):
        follow(store, every=1, dim=2, snapshots=slice(0, 10), max_updates=1)
    result = runner.invoke(app, ["extract", str(store), "--follow", "--dim", "2", "--snapshots", "0,1,2"])
    assert result.exit_code == 2 and "open-ended" in result.output


def test_cli_records_and_shows_the_sampling(store, data):
    result = runner.invoke(app, ["extract", str(store), "--dim", "2", "--window", "5", "--smooth", "0.8",
                                 "--snapshots", "1:", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["sampling"] == {"smooth": 0.8, "window": 5} and summary["snapshots"] == list(range(1, T))
    check_exact(open_subspace(store), data[1:], 0.8, 5, d=2)
    human = runner.invoke(app, ["spectrum", str(store)])
    assert human.exit_code == 0
    assert "4 rows (EMA (β = 0.8) over each 5 consecutive snapshots) of 23" in " ".join(human.output.split())
    info = runner.invoke(app, ["info", str(store), "--json"])
    assert json.loads(info.stdout)["subspace_sampling"] == {"default": {"smooth": 0.8, "window": 5}}


# --- the hostile review of the sampling commit (8039d86): one test per finding ---------------------------------


def drifting(t: int = 60, n: int = 9001, amp: float = 50.0) -> np.ndarray:
    """A trajectory drifting far from snapshot 0 with small fluctuations (the review's /tmp/r2/drift.py)."""
    rng = np.random.default_rng(1)
    base, drift, fl = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal((3, n))
    return (base + amp * np.linspace(0, 1, t)[:, None] * drift[None]
            + 1e-3 * rng.standard_normal((t, 3)) @ fl).astype(np.float32)


def measured_error(sub) -> float:
    p = sub.to_numpy().astype(np.float64)
    return float(np.linalg.norm(p.T @ p - np.eye(sub.dim)))


@pytest.mark.parametrize("smooth, window", [(None, None), (0.8, None), (None, 5)])
def test_burn_in_on_a_drifting_trajectory_gives_an_orthonormal_basis(tmp_path, smooth, window):
    # the cached Gram is shifted by snapshot 0, far from the selected rows: V's columns carried ~1e-7 along the
    # centring direction 1 and P picked it up times the drift (‖PᵀP − I‖ 9e-5 plain, 5e-3 with --smooth 0.8)
    x = drifting()
    write_store(tmp_path / "run.zarr", x, chunk=1 << 11, shard=1 << 13)
    sub = extract_subspace(tmp_path / "run.zarr", dim=2, snapshots=slice(40, None), smooth=smooth, window=window)
    assert sub.orthonormality_error < 1e-6 and measured_error(sub) < 1e-6
    assert np.abs(sub.eigenvectors.sum(axis=0)).max() < 1e-12  # exactly ⊥ 1
    lam, p, _ = reference(sampled(x[40:], smooth, window), 2)
    np.testing.assert_allclose(sub.attrs["eigenvalues"][:2], lam[:2], rtol=1e-6)
    assert max_angle(sub.to_numpy(), p) <= 1e-5


def test_a_basis_still_off_orthonormal_is_re_orthonormalised_and_resumes_identically(tmp_path):
    x = drifting(amp=1000.0)  # the Gram's cancellation leaves ‖PᵀP − I‖ ≈ 3e-4 after the first basis pass
    path = tmp_path / "run.zarr"
    write_store(path, x, chunk=1 << 11, shard=1 << 13)  # 5 column blocks
    logs: list[str] = []
    whole = extract_subspace(path, dim=2, name="whole", snapshots=slice(40, None), smooth=0.95, log=logs.append)
    assert whole.attrs["orthonormality_error_before"] > 1e-5 and any("re-orthonormalising" in m for m in logs)
    assert whole.orthonormality_error < 1e-6 and measured_error(whole) < 1e-6
    _, p, mean = reference(sampled(x[40:], 0.95, None), 2)
    # the span is as good as the x_0-shifted Gram's V allows at this drift (1.2e-4 rad measured; the
    # re-orthonormalising only removes the leak between P's columns, it cannot add accuracy to V)
    assert max_angle(whole.to_numpy(), p) <= 1e-3
    np.testing.assert_allclose(whole.mean[:], mean, rtol=0, atol=1e-3)
    assert whole.attrs["stage"] == "orthonormalise" and whole.digest  # the digest of the final P (read checks it)
    calls, stop = [0], StopFlag()

    def stop_in_second_pass(done, total):  # the basis pass reports 0 then each block: stop 2 blocks into pass 2
        calls[0] += 1
        if calls[0] > 6 + 3:
            stop.set()
    with pytest.raises(Interrupted):
        extract_subspace(path, dim=2, snapshots=slice(40, None), smooth=0.95, stop=stop,
                         progress=stop_in_second_pass)
    with TrajectoryStore.open(path) as s:
        group = s.group["subspaces/default"]
        assert group.attrs["stage"] == "orthonormalise" and 0 < group["_done"][:].sum() < 5
    resumed = extract_subspace(path, dim=2, snapshots=slice(40, None), smooth=0.95)
    assert resumed.attrs["basis_blocks_resumed"] > 0
    assert np.array_equal(resumed.to_numpy(), whole.to_numpy())
    assert resumed.orthonormality_error == whole.orthonormality_error


def test_a_nonfinite_snapshot_in_a_window_is_left_out_with_its_whole_window(tmp_path):
    x = trajectory(16, 6000, rank=3, noise=1e-3)
    path = tmp_path / "run.zarr"
    st = write_store(path, x[:5], chunk=1 << 11, shard=1 << 13, close=False)  # epochs of 4: 0-3, 4-7, ...
    for i in range(5, 16):
        row = x[i].copy()
        if i == 5:
            row[3] = np.inf
        st.append(row, step=10 * i, epoch=i // 4, allow_nonfinite=i == 5)
    st.close()
    with pytest.raises(NonFiniteError, match="whole window") as raised:
        extract_subspace(path, dim=2, window=4)
    advice = "0,1,2,3,8,9,10,11,12,13,14,15"  # the window 4..7 goes, the later ones keep their snapshots
    assert f"--snapshots {advice} " in str(raised.value)
    sub = extract_subspace(path, dim=1, window=4, snapshots=[int(i) for i in advice.split(",")])
    assert sub.attrs["steps"] == [30, 110, 150] and sub.attrs["sampling_left_out"] == []
    with pytest.raises(NonFiniteError, match=r"--snapshots 0,1,2,3,4,6,7"):  # no window: the snapshot alone
        extract_subspace(path, dim=2, smooth=0.5, name="ema")


def test_a_refused_randomized_extraction_leaves_nothing_behind(tmp_path):
    from trajstore.errors import SubspaceNotFoundError

    path = tmp_path / "run.zarr"
    write_store(path, trajectory(12, 4096, rank=2, noise=0.0), chunk=1 << 11, shard=1 << 13)
    with pytest.raises(InvalidArgumentError, match="span only"):  # choose_dim refuses after the spectrum passes
        extract_subspace(path, dim=5, method="randomized", window=2)  # (the variance check: /tmp/r2/rand_leftover.py)
    with TrajectoryStore.open(path) as s:
        assert "default" not in s.group["subspaces"]
    with pytest.raises(SubspaceNotFoundError, match="no subspace") as raised:  # at once, not "replaced" 5 times
        open_subspace(path)
    assert type(raised.value) is SubspaceNotFoundError


def test_an_unfinished_subspace_is_reported_as_such(store):
    from trajstore.errors import SubspaceNotFoundError

    stop = StopFlag()
    with pytest.raises(Interrupted):
        extract_subspace(store, dim=2, window=2, block_size=1 << 12, stop=stop,
                         progress=lambda done, total: stop.set() if done > total // 2 else None)
    with pytest.raises(SubspaceNotFoundError, match="unfinished") as raised:
        open_subspace(store)
    assert type(raised.value) is SubspaceNotFoundError  # was SubspaceChangedError after five retries


def test_discarding_another_requests_randomized_passes_is_logged(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(30, 20_000, rank=4, noise=1e-4), chunk=1 << 12, shard=1 << 14)
    stop = StopFlag()
    with pytest.raises(Interrupted):  # stopped in its spectrum passes
        extract_subspace(path, dim=3, method="randomized", window=2, stop=stop,
                         progress=lambda done, total: stop.set() if done > total // 8 else None)
    logs: list[str] = []
    extract_subspace(path, dim=3, method="randomized", window=3, log=logs.append)
    assert any("discarded the unfinished randomized passes" in m and "window" in m for m in logs), logs


def test_block_transforms_equal_the_dense_map_without_forming_it():
    from pipeline.blocks import wide_blocks
    from pipeline.sampling import Sampling

    rng = np.random.default_rng(3)
    x = rng.standard_normal((23, 50)).astype(np.float32)
    for sampling in (Sampling(0.8), Sampling(0.999), Sampling(None, 4), Sampling(0.7, 3), Sampling(0.0, 5)):
        a = sampling.matrix(23)  # (23, t') the dense reference
        w = rng.standard_normal((a.shape[1], 3))
        g = x.astype(np.float64) @ x.T
        np.testing.assert_allclose(sampling.apply_to_block(x), a.T @ x.astype(np.float64), rtol=0, atol=1e-12)
        np.testing.assert_allclose(sampling.to_snapshots(w, 23), a @ w, rtol=0, atol=1e-12)
        np.testing.assert_allclose(sampling.to_snapshots(w[:, 0], 23), a @ w[:, 0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(sampling.apply_to_gram(g), a.T @ g @ a, rtol=1e-12, atol=1e-9)
        (_, d), = wide_blocks(x, transform=sampling)  # the block path: x − x_0, then Aᵀ
        np.testing.assert_allclose(d, a.T @ (x.astype(np.float64) - x[0]), rtol=0, atol=1e-12)
    # the randomized passes' tasks carry (β, K), not a (t, t') matrix: a few hundred bytes at t = 3000
    import functools
    import pickle

    from pipeline.randomized import _sketch_task
    task = functools.partial(_sketch_task, None, list(range(3000)), Sampling(0.8), 20, 0, None)
    assert len(pickle.dumps(task)) < 20_000


def test_api_misuse_gets_typed_errors(store):
    from pipeline.follow import follow

    with pytest.raises(InvalidArgumentError, match="dim=3"):
        extract_subspace(store, 3)
    with pytest.raises(InvalidArgumentError, match="not both"):
        follow(store, every=1, settings=ExtractionSettings(dim=2), dim=5, window=4, poll=0.01, max_updates=1)
    with pytest.raises(InvalidArgumentError, match="not both"):
        follow(store, every=1, settings=ExtractionSettings(dim=2), name="other", max_updates=1)
    with pytest.raises(InvalidArgumentError, match="increasing order"):
        extract_subspace(store, dim=1, snapshots=[0, 5, 3, 9], window=2)
    with pytest.raises(InvalidArgumentError, match="increasing order"):
        extract_subspace(store, dim=1, snapshots=[9, 5, 3, 0], smooth=0.5)
    assert extract_subspace(store, dim=1, snapshots=[9, 5, 3, 0], name="plain").dim == 1  # no sampling: any order
    with TrajectoryStore.open(store) as s:
        assert list(s.group["subspaces"].group_keys()) == ["plain"]


def test_project_json_pairs_each_row_with_its_snapshots(store, tmp_path):
    result = runner.invoke(app, ["extract", str(store), "--dim", "2", "--window", "3", "--snapshots", "1:",
                                 "--name", "w3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["project", str(store), "--name", "w3", "--plot", str(tmp_path / "t.png"), "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["snapshots"] == list(range(1, T))  # the selection, as before
    assert found["row_snapshots"] == [list(range(lo, lo + 3)) for lo in range(1, T - 2, 3)]
    assert len(found["row_snapshots"]) == len(found["coordinates"]) == len(found["steps"]) == 7
    assert found["steps"] == [10 * rows[-1] for rows in found["row_snapshots"]]


def test_randomized_with_all_but_the_null_direction_has_no_nan(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(20, 5000, rank=4, noise=1e-3), chunk=1 << 11, shard=1 << 13)
    sub = extract_subspace(path, variance=0.5, method="randomized")
    assert sub.attrs["randomized_components"] == 19
    evr = sub.explained_variance_ratio
    assert evr.shape == (20,) and evr[-1] == 0.0 and not np.isnan(evr).any()
    assert sub.cumulative_variance()[-1] == pytest.approx(1.0, abs=1e-9) and sub.attrs["uncomputed_variance_ratio"] == 0
    spectrum = runner.invoke(app, ["spectrum", str(path)])
    assert spectrum.exit_code == 0 and "other" not in spectrum.output
