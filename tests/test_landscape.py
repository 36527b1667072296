"""``trajstore landscape``: loss/accuracy grids in the PC plane, cached and resumable in the store.

Real parts only: a `trajstore train` run of digits-mlp (real SGD sampling, real DLDR extraction, real
P-SGD), real forward passes, real zarr caches on disk, a real kill -9 of a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from cli.main import app
from pipeline import extract_subspace
from pipeline.experiments.recipes import build_recipe
from pipeline.landscape import compute_landscape
from pipeline.subspace import open_subspace
from trajstore import TrajectoryStore
from trajstore.errors import (CorruptSnapshotError, InvalidArgumentError, LayoutMismatchError, SnapshotIndexError,
                              SubspaceNotFoundError)
from trajstore.lock import StaleLockWarning

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "tests.test_landscape:counting_recipe"
FORWARDS = {"count": 0}
runner = CliRunner()


def counting_recipe(seed: int, batch_size: int):
    """digits-mlp whose model counts its forward passes (and, with LANDSCAPE_KILL_AT=N set, kill -9s its own
    process at the N-th: a kill in the middle of a row)."""
    recipe = build_recipe("digits-mlp", seed=seed, batch_size=batch_size)
    kill_at = int(os.environ.get("LANDSCAPE_KILL_AT", "0"))

    def hook(module, args):
        FORWARDS["count"] += 1
        if kill_at and FORWARDS["count"] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    recipe.model.register_forward_pre_hook(hook)
    return recipe.model, recipe.train, recipe.test, recipe.loss


def wider_recipe(seed: int, batch_size: int):
    """digits data with another model than the store's (64-32-10 instead of 64-64-10)."""
    from pipeline.experiments.models import mlp

    recipe = build_recipe("digits-mlp", seed=seed, batch_size=batch_size)
    return mlp([64, 32, 10]), recipe.train, recipe.test, recipe.loss


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished `trajstore train` run: digits-mlp, 3 SGD epochs (4 snapshots), d = 2, two P-SGD epochs
    (recorded in run/paths/psgd.zarr: the start and each epoch)."""
    from pipeline.experiments.runner import Run, RunConfig

    run = tmp_path_factory.mktemp("landscape") / "run"
    Run(run, RunConfig(recipe="digits-mlp", sample_epochs=3, dim=2, subspace_epochs=2, baselines=["none"],
                       batch_size=512)).execute()
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    """A private copy of the run (each test's landscape caches are its own)."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def store_of(run: Path) -> Path:
    return run / "trajectory.zarr"


def direct(store: Path, k: int, a: float, b: float, batches: int, batch_size: int, data: str = "train"):
    """(loss, accuracy) of w_K + a u1 + b u2, built in float64 numpy and evaluated with a plain loop."""
    with TrajectoryStore.open(store) as s:
        w = s.read(k).astype(np.float64)  # (n,)
        layout = s.layout
    u = open_subspace(store, "dldr").to_numpy()[:, :2].astype(np.float64)  # (n, 2)
    recipe = build_recipe("digits-mlp", seed=0, batch_size=batch_size)
    model = recipe.model.eval()
    model.load_state_dict(layout.unflatten((w + a * u[:, 0] + b * u[:, 1]).astype(np.float32)))
    loss, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for i, (x, y) in enumerate(recipe.train if data == "train" else recipe.test):
            if i == batches:
                break
            out = model(x)
            loss += float(recipe.loss(out, y)) * len(y)
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return loss / total, correct / total


def test_cells_equal_a_direct_evaluation(run):
    land = compute_landscape(run, grid=3, span="-0.4:0.2,-0.02:0.03", batches=2, batch_size=128)
    assert land.loss.shape == land.accuracy.shape == (3, 3) and land.evaluated == 9 and land.reused == 0
    np.testing.assert_allclose(land.a, [-0.4, -0.1, 0.2])
    np.testing.assert_allclose(land.b, [-0.02, 0.005, 0.03])
    for i, j in [(0, 0), (2, 1), (1, 2)]:  # loss[i, j] is at a[j], b[i]
        loss, acc = direct(store_of(run), 3, land.a[j], land.b[i], batches=2, batch_size=128)
        assert land.loss[i, j] == pytest.approx(loss, rel=1e-5)
        assert land.accuracy[i, j] == acc
    assert len(np.unique(land.loss)) == 9  # the cells really differ
    centred = compute_landscape(run, grid=3, span=0.1, snapshot=1, data="test", batches=1, batch_size=100)
    loss, acc = direct(store_of(run), 1, 0.0, 0.0, batches=1, batch_size=100, data="test")  # the centre: w_1
    assert centred.loss[1, 1] == pytest.approx(loss, rel=1e-5) and centred.accuracy[1, 1] == acc
    assert centred.settings["data"]["samples"] == 450  # the recipe's test loader: one batch of 1000 (all 450)


def test_projections_equal_a_dense_reference(run):
    land = compute_landscape(run, grid=3, batches=1, batch_size=64)
    with TrajectoryStore.open(store_of(run)) as s:
        x = s.read(slice(None)).astype(np.float64)  # (t, n)
        layout, steps = s.layout, s.steps.tolist()
    p = open_subspace(store_of(run), "dldr").to_numpy()[:, :2].astype(np.float64)  # (n, 2)

    def reference(w: np.ndarray):  # (m, n) -> a, b, relative residual
        d = w - x[-1]  # centred at the last snapshot, the default
        ab = d @ p  # (m, 2)
        dist = np.linalg.norm(d, axis=1)
        rel = np.divide(np.linalg.norm(d - ab @ p.T, axis=1), dist, out=np.zeros(len(d)), where=dist > 0)
        return ab[:, 0], ab[:, 1], rel

    a, b, rel = reference(x)
    t = land.trajectory
    np.testing.assert_allclose(t.a, a, atol=1e-6)
    np.testing.assert_allclose(t.b, b, atol=1e-6)
    np.testing.assert_allclose(t.relative_residual, rel, atol=1e-6)
    assert t.steps == steps and t.relative_residual[-1] == 0
    # P-SGD: the path the run recorded, from its start snapshot (0) to its final weights, projected the same way
    final = torch.load(run / "final-psgd.pt", weights_only=True)
    w_final = np.concatenate([final[name].reshape(-1).double().numpy() for name in layout.names])
    with TrajectoryStore.open(run / "paths" / "psgd.zarr") as s:
        path, path_steps = s.read(slice(None)).astype(np.float64), s.steps.tolist()  # (3, n)
    assert len(path) == 3 and np.array_equal(path[0], x[0]) and np.array_equal(path[-1], w_final)
    a, b, rel = reference(path)
    psgd = land.overlays["P-SGD"]
    assert psgd.steps == path_steps and land.overlay_sources["P-SGD"] == str(run / "paths" / "psgd.zarr")
    np.testing.assert_allclose(psgd.a, a, atol=1e-6)
    np.testing.assert_allclose(psgd.b, b, atol=1e-6)
    np.testing.assert_allclose(psgd.relative_residual, rel, atol=1e-6)
    lo_a, hi_a, lo_b, hi_b = land.settings["span"]  # the default span: every projected point, with a margin
    all_a, all_b = np.concatenate([t.a, psgd.a]), np.concatenate([t.b, psgd.b])
    assert lo_a < all_a.min() <= all_a.max() < hi_a and lo_b < all_b.min() <= all_b.max() < hi_b


def test_a_recorded_psgd_path_is_overlaid(run, tmp_path):
    """--path: a store recorded during real P-SGD steps from snapshot 0. With d = 2 the path stays in
    w_0 + span(u1, u2), so every point hides exactly what w_0 hides: ‖residual‖ is constant along it."""
    from pipeline.basis import Basis
    from pipeline.optim import SubspaceSGD
    from trajstore.recorder import Recorder

    recipe = build_recipe("digits-mlp", seed=0, batch_size=128)
    model = recipe.model
    with TrajectoryStore.open(store_of(run)) as s:
        s.load_into(model, 0)
    opt = SubspaceSGD(model.parameters(), Basis.from_store(store_of(run), "dldr"), lr=0.5, momentum=0.9)
    path = tmp_path / "psgd.zarr"
    store = TrajectoryStore.create(path, model)
    rec = Recorder(store, model, every_n_steps=2)
    rec.start()
    for _, (x, y) in zip(range(8), recipe.train):
        opt.zero_grad()
        recipe.loss(model(x), y).backward()
        opt.step()
        rec.step()
    store.close()
    plot = tmp_path / "p.png"
    result = runner.invoke(app, ["landscape", str(run), "--grid", "3", "--batches", "1", "--path", str(path),
                                 "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    overlay = data["overlays"]["path psgd.zarr"]
    assert overlay["steps"] == [0, 2, 4, 6, 8] and plot.stat().st_size > 0
    np.testing.assert_allclose(overlay["residual"], data["trajectory"]["residual"][0], rtol=1e-4)
    assert np.ptp(overlay["a"]) > 1e-3  # it moved, in the plane
    assert data["overlays"]["P-SGD"]["residual"][0] == pytest.approx(data["trajectory"]["residual"][0])
    from pipeline.experiments.models import mlp

    with TrajectoryStore.create(tmp_path / "other.zarr", mlp([64, 32, 10])) as other:  # another model's store
        other.append(mlp([64, 32, 10]), step=0)
    with pytest.raises(LayoutMismatchError, match="--path"):
        compute_landscape(run, grid=3, batches=1, paths=[tmp_path / "other.zarr"])


def test_a_run_directory_draws_its_recorded_path_else_the_segment(run, tmp_path):
    """paths/psgd.zarr drawn point per epoch; a path that does not end at final-psgd.pt is reported and the
    segment drawn; an unfinished method's path is drawn as it stands; an older run directory (no paths/)
    gets the start -> final segment."""
    store = run / "paths" / "psgd.zarr"
    plot = tmp_path / "p.png"
    result = runner.invoke(app, ["landscape", str(run), "--grid", "3", "--batches", "1", "--plot", str(plot), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    with TrajectoryStore.open(store) as s:
        steps = s.steps.tolist()
    assert len(steps) == 3 and data["overlays"]["P-SGD"]["steps"] == steps and len(data["overlays"]["P-SGD"]["a"]) == 3
    assert data["overlay_sources"] == {"P-SGD": str(store)} and plot.read_bytes()[:4] == b"\x89PNG"
    segment = dict(grid=3, span=0.2, batches=1)
    shutil.copytree(store, tmp_path / "kept.zarr")
    with TrajectoryStore.open(store, "a") as s:  # the path now ends at epoch 1, not at the final weights
        s.truncate_after_step(steps[1])
    with pytest.warns(UserWarning, match="does not end at .*final-psgd.pt"):
        land = compute_landscape(run, **segment)
    assert land.overlays["P-SGD"].steps is None and len(land.overlays["P-SGD"].a) == 2
    (run / "final-psgd.pt").rename(tmp_path / "final-psgd.pt")  # P-SGD still running: its path so far
    land = compute_landscape(run, **segment)
    assert land.overlays["P-SGD"].steps == steps[:2] and "in progress" in land.overlay_sources["P-SGD"]
    (tmp_path / "final-psgd.pt").rename(run / "final-psgd.pt")
    shutil.rmtree(run / "paths")  # a run directory from before paths were recorded
    old = compute_landscape(run, **segment)
    assert old.overlays["P-SGD"].steps is None and old.overlay_sources["P-SGD"] == (
        f"snapshot 0 -> {run / 'final-psgd.pt'}")
    ends = compute_landscape(run, **segment, paths=[tmp_path / "kept.zarr"]).overlays["path kept.zarr"]
    np.testing.assert_allclose(old.overlays["P-SGD"].a, ends.a[[0, -1]], atol=1e-6)  # the segment: its two ends
    np.testing.assert_allclose(old.overlays["P-SGD"].b, ends.b[[0, -1]], atol=1e-6)


def test_a_second_run_reads_the_cache_and_evaluates_nothing(run):
    settings = dict(grid=4, span=0.2, batches=2, batch_size=128)
    FORWARDS["count"] = 0
    first = compute_landscape(store_of(run), RECIPE, **settings)
    assert (first.evaluated, first.reused, FORWARDS["count"]) == (16, 0, 16 * 2)
    FORWARDS["count"] = 0
    again = compute_landscape(store_of(run), RECIPE, **settings)
    assert (again.evaluated, again.reused, FORWARDS["count"]) == (0, 16, 0)
    assert again.key == first.key
    np.testing.assert_array_equal(again.loss, first.loss)
    np.testing.assert_array_equal(again.accuracy, first.accuracy)
    assert zarr.open_group(str(store_of(run) / "landscapes" / first.key), mode="r").attrs["complete"] is True


def test_killed_mid_row_resumes_with_only_the_missing_cells(run):
    store = store_of(run)
    args = dict(grid=5, span=0.2, batches=1, batch_size=128)
    code = (f"from pipeline.landscape import compute_landscape; "
            f"compute_landscape({str(store)!r}, {RECIPE!r}, **{args!r})")
    env = {**os.environ, "LANDSCAPE_KILL_AT": "13"}  # rows 0 and 1 committed (10 cells), row 2 at its 3rd cell
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    (folder,) = [p for p in (store / "landscapes").iterdir() if p.is_dir()]
    cache = zarr.open_group(str(folder), mode="r")
    done = cache["done"][:] != 0
    assert done.tolist() == [True, True, False, False, False]
    before = cache["loss"][:2], cache["accuracy"][:2]
    FORWARDS["count"] = 0
    with pytest.warns(StaleLockWarning, match="no longer running"):  # the killed evaluation's lock
        land = compute_landscape(store, RECIPE, **args)
    assert land.key == folder.name
    assert (land.evaluated, land.reused, FORWARDS["count"]) == (15, 10, 15)
    np.testing.assert_array_equal(land.loss[:2], before[0])  # finished cells unchanged, bit for bit
    np.testing.assert_array_equal(land.accuracy[:2], before[1])
    loss, acc = direct(store, 3, land.a[2], land.b[2], batches=1, batch_size=128)  # the row that was in flight
    assert land.loss[2, 2] == pytest.approx(loss, rel=1e-5) and land.accuracy[2, 2] == acc
    assert np.isfinite(land.loss).all()


def test_another_setting_never_reuses_cells(run):
    base = dict(grid=3, span=0.2, batches=1, batch_size=128)
    first = compute_landscape(store_of(run), RECIPE, **base)
    keys = {first.key}
    for change in ({"span": 0.3}, {"grid": 4}, {"snapshot": 2}, {"data": "test"}, {"batches": 2},
                   {"batch_size": 64}, {"seed": 1}):
        other = compute_landscape(store_of(run), RECIPE, **{**base, **change})
        assert other.reused == 0 and other.evaluated == other.loss.size, change
        keys.add(other.key)
    assert len(keys) == 8
    # the plane changes with the subspace: a new extraction under the same name is a new landscape
    extract_subspace(store_of(run), dim=2, name="dldr", snapshots=slice(1, 4), overwrite=True)
    replaced = compute_landscape(store_of(run), RECIPE, **base)
    assert replaced.reused == 0 and replaced.key not in keys
    assert compute_landscape(store_of(run), RECIPE, **base).reused == 9


def test_cli_writes_a_png_and_json_and_info_verify_see_the_cache(run, tmp_path):
    plot = tmp_path / "land.png"
    result = runner.invoke(app, ["landscape", str(run), "--grid", "3", "--batches", "1", "--plot", str(plot),
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(result.stdout)
    assert data["grid"] == 3 and len(data["a"]) == len(data["b"]) == 3 and data["plot"] == str(plot)
    assert np.asarray(data["loss"]).shape == np.asarray(data["accuracy"]).shape == (3, 3)
    assert data["recipe"] == "digits-mlp" and data["snapshot"] == 3 and data["subspace"] == "dldr"
    assert len(data["trajectory"]["relative_residual"]) == 4 and "P-SGD" in data["overlays"]
    assert data["cache"] == {"key": data["cache"]["key"], "evaluated_cells": 9, "reused_cells": 0}
    human = runner.invoke(app, ["landscape", str(run), "--grid", "3", "--batches", "1", "--plot", str(plot)])
    assert human.exit_code == 0 and "0 cells evaluated, 9 reused" in human.stderr
    info = json.loads(runner.invoke(app, ["info", str(store_of(run)), "--json"]).stdout)
    folder = store_of(run) / "landscapes"
    on_disk = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert info["derived_bytes"]["landscapes"] == on_disk > 0
    assert info["total_bytes"] == info["stored_bytes"] + sum(
        info["derived_bytes"][k] for k in ("gram", "subspaces", "landscapes", "temporary"))
    verified = runner.invoke(app, ["verify", str(store_of(run)), "--json"])
    assert verified.exit_code == 0 and json.loads(verified.stdout)["ok"]


def test_typed_errors(run, tmp_path):
    store = store_of(run)
    with pytest.raises(SnapshotIndexError, match="out of range"):
        compute_landscape(run, snapshot=9, grid=3)
    for grid in (2, 0, 1000):
        with pytest.raises(InvalidArgumentError, match="--grid"):
            compute_landscape(run, grid=grid)
    for span in ("0.3:0.1", "x", "nan"):
        with pytest.raises(InvalidArgumentError, match="--span"):
            compute_landscape(run, span=span, grid=3)
    with pytest.raises(InvalidArgumentError, match="--recipe"):
        compute_landscape(store, grid=3)
    with pytest.raises(LayoutMismatchError, match="wider_recipe"):
        compute_landscape(store, "tests.test_landscape:wider_recipe", grid=3, batches=1)
    extract_subspace(store, dim=1, name="line")
    with pytest.raises(InvalidArgumentError, match="d = 1"):
        compute_landscape(run, name="line", grid=3)
    with pytest.raises(InvalidArgumentError, match="2 subspaces"):  # dldr and line: name one
        compute_landscape(run, grid=3)
    shutil.rmtree(store / "subspaces")
    with pytest.raises(SubspaceNotFoundError, match="holds no subspace"):
        compute_landscape(run, grid=3)
    plot = tmp_path / "x.png"
    for args, words in ((["--grid", "1"], "--grid"), (["--data", "val"], "--data"), (["--span=-1:-2"], "--span")):
        result = runner.invoke(app, ["landscape", str(run), "--plot", str(plot), *args])
        assert result.exit_code == 2 and words in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not plot.exists()


def test_a_damaged_cache_is_an_error_not_wrong_values(run):
    args = dict(grid=3, span=0.2, batches=1, batch_size=128)
    key = compute_landscape(store_of(run), RECIPE, **args).key
    folder = store_of(run) / "landscapes" / key
    chunk = folder / "loss" / "c" / "1" / "0"
    chunk.unlink()  # a finished row's chunk gone: zarr would read NaN
    with pytest.raises(CorruptSnapshotError, match="row 1 does not match"):
        compute_landscape(store_of(run), RECIPE, **args)
    shutil.rmtree(folder)  # it is only a cache: deleting it makes the same command evaluate again
    assert compute_landscape(store_of(run), RECIPE, **args).evaluated == 9
    raw = bytearray((folder / "accuracy" / "c" / "0" / "0").read_bytes())
    raw[3] ^= 0xFF
    (folder / "accuracy" / "c" / "0" / "0").write_bytes(bytes(raw))
    with pytest.raises(CorruptSnapshotError, match="cannot be read"):
        compute_landscape(store_of(run), RECIPE, **args)
