"""The resumable runner, `trajstore train` / `demo`: end to end, kill -9 resume bit for bit, bad options."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipeline.experiments.paths import recorded_paths
from pipeline.experiments.runner import Run, RunConfig
from trajstore import TrajectoryStore
from trajstore.lock import StaleLockWarning

from .run_proc import CONFIG

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_quick_end_to_end_run_writes_report_and_plots(tmp_path):
    result = runner.invoke(app, ["train", "mnist1d-cnn", "--run", str(tmp_path / "run"), "--sample-epochs", "8",
                                 "--dim", "6", "--subspace-epochs", "3", "--baseline", "sgd",
                                 "--baseline", "random-subspace", "--json"])
    assert result.exit_code == 0, result.output
    methods = json.loads(result.stdout)
    assert methods["psgd"]["final_test_acc"] > 0.6  # chance is 0.1
    assert methods["sgd"]["final_test_acc"] > 0.6
    assert methods["random-subspace"]["epochs"] == 3
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["subspace"]["dim"] == 6 and report["config"]["recipe"] == "mnist1d-cnn"
    for name in ("accuracy", "loss", "spectrum", "trajectory"):
        assert (tmp_path / "run" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "run" / "report.md").read_text()
    assert "DLDR P-SGD" in md and "![spectrum](spectrum.png)" in md
    with TrajectoryStore.open(tmp_path / "run" / "trajectory.zarr") as store:
        assert len(store) == 9  # initial weights + one snapshot per sampling epoch
    again = runner.invoke(app, ["train", "mnist1d-cnn", "--run", str(tmp_path / "run"), "--sample-epochs", "8",
                                "--dim", "6", "--subspace-epochs", "3", "--baseline", "sgd",
                                "--baseline", "random-subspace"])
    assert again.exit_code == 0 and "already finished" in " ".join(again.output.split())


def test_user_recipe_module_function(tmp_path):
    result = runner.invoke(app, ["train", "tests.user_recipe:build", "--run", str(tmp_path / "u"), "--sample-epochs",
                                 "5", "--dim", "3", "--subspace-epochs", "2", "--baseline", "none", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["psgd"]["final_test_acc"] > 0.5


def test_bad_options_get_clear_errors(tmp_path):
    r = runner.invoke(app, ["train", "no-such-recipe", "--run", str(tmp_path / "a")])
    assert r.exit_code == 2 and "unknown recipe" in " ".join(r.output.split())
    r = runner.invoke(app, ["train", "digits-mlp", "--run", str(tmp_path / "b"), "--sample-epochs", "3", "--dim", "5"])
    assert r.exit_code == 2 and "sampling epochs record 4" in " ".join(r.output.split())
    runner.invoke(app, ["train", "digits-mlp", "--run", str(tmp_path / "c"), "--sample-epochs", "3", "--dim", "2",
                        "--subspace-epochs", "1"])
    r = runner.invoke(app, ["train", "digits-mlp", "--run", str(tmp_path / "c"), "--sample-epochs", "4", "--dim", "2",
                            "--subspace-epochs", "1"])
    assert r.exit_code == 2 and "different configuration" in " ".join(r.output.split()) and "sample_epochs" in r.output


def final_state(directory: Path) -> tuple[dict, dict]:
    ckpt = {f.name: torch.load(f, weights_only=True) for f in sorted(directory.glob("final-*.pt"))}
    ckpt["sample_end.pt"] = torch.load(directory / "sample_end.pt", weights_only=True)["model"]
    report = json.loads((directory / "report.json").read_text())
    history = {m: [{k: v for k, v in e.items() if k != "seconds"} for e in epochs]
               for m, epochs in report["history"].items()}
    return ckpt, history


def paths_of(directory: Path) -> dict:
    """Every recorded subspace-training path: method -> (steps, epochs, weights (t, n), metrics)."""
    out = {}
    for method, path in recorded_paths(directory).items():
        with TrajectoryStore.open(path) as s:
            out[method] = (s.steps.tolist(), s.epochs.tolist(), s.read(slice(None)),
                           {m: s.metrics(m).tolist() for m in s.metric_names()})
    return out


def assert_same_paths(directory: Path, reference: Path) -> None:
    """The paths of ``directory`` equal those of ``reference`` bit for bit (weights, steps, epochs, metrics),
    and each ends at its method's final weights."""
    got, want = paths_of(directory), paths_of(reference)
    assert sorted(got) == sorted(want) and want, (sorted(got), sorted(want))
    for method, (steps, epochs, weights, metrics) in want.items():
        assert got[method][:2] == (steps, epochs), method
        assert np.array_equal(got[method][2], weights), method
        assert json.dumps(got[method][3]) == json.dumps(metrics), method  # NaN at the start compares equal
        final = torch.load(directory / f"final-{method}.pt", weights_only=True)
        assert np.array_equal(got[method][2][-1], np.concatenate([v.reshape(-1).numpy() for v in final.values()]))


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ref") / "run"
    Run(directory, CONFIG).execute()
    return directory


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return final_state(uninterrupted_run)


def test_a_run_killed_between_its_last_phase_and_its_report_writes_the_report_on_resume(tmp_path, uninterrupted_run):
    """Found by the fault campaign: the checkpoint said "done" before report.json existed."""
    import shutil

    directory = tmp_path / "run"
    shutil.copytree(uninterrupted_run, directory)
    (directory / "report.json").unlink()  # the kill came after the final checkpoint, before the report
    done = subprocess.run([sys.executable, "-m", "tests.run_proc", str(directory), "--resume"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert final_state(directory)[1] == final_state(uninterrupted_run)[1]  # the same report, from the same run


def test_a_run_killed_after_its_first_snapshot_before_its_first_checkpoint_resumes(tmp_path, uninterrupted):
    """Found by the fault campaign: the store held the run's own step-0 snapshot, and the Recorder took the
    resume at step 0 for a fresh run into another run's store."""
    from trajstore import TrajectoryStore

    directory = tmp_path / "run"
    run = Run(directory, CONFIG)
    run._start(resume=False)  # config and the phase-"sample" checkpoint, as a new run writes them first
    with TrajectoryStore.create(run.store_path, run._recipe("sgd").model) as store:
        store.append(run._recipe("sgd").model, step=0)  # the initial snapshot; then the kill
    done = subprocess.run([sys.executable, "-m", "tests.run_proc", str(directory), "--resume"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert final_state(directory)[1] == uninterrupted[1]


@pytest.mark.parametrize("kill_at", [pytest.param("sample epoch   3", marks=pytest.mark.slow), "extracting",
                                     pytest.param("pbfgs epoch   2", marks=pytest.mark.slow),  # CI: one kill point
                                     pytest.param("psgd epoch   1", marks=pytest.mark.slow),
                                     pytest.param("sgd epoch   8", marks=pytest.mark.slow)])
def test_kill_9_then_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, uninterrupted, uninterrupted_run,
                                                                    kill_at):
    directory = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tests.run_proc", str(directory)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if kill_at in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before {kill_at!r}"
    done = subprocess.run([sys.executable, "-m", "tests.run_proc", str(directory), "--resume"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "finished" in done.stdout
    ckpt, history = final_state(directory)
    ref_ckpt, ref_history = uninterrupted
    assert history == ref_history
    assert sorted(ckpt) == sorted(ref_ckpt) == ["final-pbfgs.pt", "final-psgd.pt", "final-sgd.pt", "sample_end.pt"]
    for name, weights in ref_ckpt.items():
        for key in weights:
            assert torch.equal(ckpt[name][key], weights[key]), (name, key)
    assert_same_paths(directory, uninterrupted_run)  # the P-BFGS and P-SGD paths too


def test_label_noise_flips_the_requested_fraction_of_training_labels():
    import numpy as np

    from pipeline.experiments.data import loaders, mnist1d_arrays

    arrays = mnist1d_arrays()
    clean, _ = loaders(arrays, batch_size=4000, seed=0)
    noisy, test = loaders(arrays, batch_size=4000, seed=0, label_noise=0.4)
    y_clean = clean.dataset.tensors[1].numpy()
    y_noisy = noisy.dataset.tensors[1].numpy()
    changed = (y_clean != y_noisy).mean()
    assert 0.3 < changed < 0.4  # 40 % resampled, a tenth of those land on the same label
    assert np.array_equal(test.dataset.tensors[1].numpy(), arrays[3])  # the test set stays clean


# a run small enough to be killed twice and resumed in a few seconds: P-SGD (3 epochs), then P-BFGS (2)
TINY = RunConfig(recipe="digits-mlp", sample_epochs=3, dim=2, subspace_epochs=3, baselines=["pbfgs"],
                 bfgs_epochs=2, batch_size=512, bfgs_batch_size=512)
_KILL = """
import os, signal, sys
from pipeline.experiments.runner import Run
from tests.test_experiments import TINY

phase, epoch, where = sys.argv[2], int(sys.argv[3]), sys.argv[4]
checkpoint = Run._checkpoint
def kill_before_checkpoint(self, state, *args):  # the epoch's path snapshot is committed, its checkpoint not
    if where == "checkpoint" and (state["phase"], state["epoch"]) == (phase, epoch):
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint(self, state, *args)
def kill_at_first_step(label, i, total):  # the phase's start snapshot is queued, nothing is checkpointed
    if where == "step" and label == f"{phase} epoch {epoch}" and i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
Run._checkpoint = kill_before_checkpoint
Run(sys.argv[1], TINY, progress=kill_at_first_step).execute(resume=True)
"""


@pytest.mark.slow  # ~25 s of CPU: three runs; CI: test_kill_9_then_resume_... compares the paths too
def test_recorded_paths_survive_kill_9_at_their_two_edges_bit_for_bit(tmp_path):
    """kill -9 (1) right after an epoch's path snapshot is committed, before the checkpoint that covers it,
    (2) at a phase's first step, after its start snapshot and before any checkpoint: the resumed run's
    paths/psgd.zarr and paths/pbfgs.zarr equal an uninterrupted run's."""
    reference = tmp_path / "ref"
    Run(reference, TINY).execute()
    assert {m: len(p[0]) for m, p in paths_of(reference).items()} == {"psgd": 4, "pbfgs": 3}  # start + epochs
    directory = tmp_path / "run"
    for phase, epoch, where in (("psgd", 2, "checkpoint"), ("pbfgs", 1, "step")):
        proc = subprocess.run([sys.executable, "-c", _KILL, str(directory), phase, str(epoch), where], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        if where == "checkpoint":  # the window was hit: 3 snapshots committed, the checkpoint says epoch 1
            assert torch.load(directory / "checkpoint.pt", weights_only=True)["epoch"] == 1
            with TrajectoryStore.open(directory / "paths" / "psgd.zarr") as s:
                assert len(s) == 3
    with pytest.warns(StaleLockWarning):  # the killed writer's lock on paths/pbfgs.zarr
        Run(directory, TINY).execute(resume=True)
    assert_same_paths(directory, reference)
    assert "`paths/psgd.zarr` (DLDR P-SGD)" in (directory / "report.md").read_text()
    assert json.loads((directory / "report.json").read_text())["paths"] == {"psgd": "paths/psgd.zarr",
                                                                            "pbfgs": "paths/pbfgs.zarr"}
    for store in ("trajectory.zarr", "paths/psgd.zarr", "paths/pbfgs.zarr"):
        verified = runner.invoke(app, ["verify", str(directory / store), "--json"])
        assert verified.exit_code == 0 and json.loads(verified.stdout)["ok"], store
