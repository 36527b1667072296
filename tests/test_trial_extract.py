"""Found by a new user's trial (helper-43, 2026-11-28): each test fails on the code before its fix."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import Basis, open_subspace
from pipeline.optim import SubspaceBFGS, SubspaceSGD
from trajstore.errors import CorruptSnapshotError, InvalidArgumentError

from .test_digest_versions import extracted  # noqa: F401 -- the fixture
from .test_review_basis import strip_digest, train

def test_a_state_of_one_subspace_optimizer_is_refused_by_the_other(extracted):  # noqa: F811
    """A SubspaceSGD state loaded into SubspaceBFGS (or back) went on silently with fresh state."""
    path, model = extracted
    basis = Basis.from_store(path, "a")
    sgd = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
    train(model, sgd, 2)
    bfgs = SubspaceBFGS(model.parameters(), basis)
    with pytest.raises(InvalidArgumentError, match="saved by another optimizer.*momentum"):
        bfgs.load_state_dict(sgd.state_dict())
    with pytest.raises(InvalidArgumentError, match="saved by another optimizer"):
        SubspaceSGD(model.parameters(), basis, lr=0.1).load_state_dict(bfgs.state_dict())
    older = sgd.state_dict()
    del older["param_groups"][0]["dampening"]  # a state saved before that hyperparameter existed: still loads
    fresh = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
    fresh.load_state_dict(older)
    assert fresh.param_groups[0]["dampening"] == 0.0


@pytest.mark.parametrize("load", ["open_subspace", "pinned", "resident", "mmap"])
def test_a_basis_chunk_cut_short_is_a_damaged_subspace_with_what_to_do(extracted, load, tmp_path):  # noqa: F811
    """A truncated chunk of P raised zarr's ValueError (reshape), or through host="mmap" a StoreWriteError
    saying to free space."""
    path, _ = extracted
    chunk = path / "subspaces" / "a" / "basis" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(CorruptSnapshotError, match=r"does not decode.*extract .* --overwrite"):
        if load == "open_subspace":
            open_subspace(path, "a").to_numpy()
        else:
            options = {"pinned": {"host": "pinned"}, "resident": {"mode": "resident"},
                       "mmap": {"host": "mmap", "mode": "streamed", "cache_dir": tmp_path / "cache"}}[load]
            Basis.from_store(path, "a", **options)


def test_a_recipe_shuffling_with_the_global_generator_is_refused_before_training(tmp_path):
    """It crashed after the first sampling epoch (AttributeError in the checkpoint), leaving an unfinished run."""
    from typer.testing import CliRunner

    from cli.main import app

    run = tmp_path / "g"
    r = CliRunner().invoke(app, ["train", "tests.user_recipe:build_global_shuffle", "--run", str(run),
                                 "--sample-epochs", "2", "--dim", "1", "--subspace-epochs", "1", "--baseline", "none"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and "global random generator" in text and "generator=torch.Generator()" in text, text
    assert not (run / "trajectory.zarr").exists()


def test_a_recipe_that_does_not_shuffle_trains(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    args = ["train", "tests.user_recipe:build_in_order", "--run", str(tmp_path / "o"), "--sample-epochs", "2",
            "--dim", "1", "--subspace-epochs", "1", "--baseline", "none"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "already finished" in " ".join(again.output.split())


def test_verify_reads_every_subspace_against_its_digest(extracted):  # noqa: F811
    """`trajstore verify` said "ok" for a store whose basis was damaged."""
    import json

    import zarr
    from typer.testing import CliRunner

    from cli.main import app

    path, _ = extracted
    r = CliRunner().invoke(app, ["verify", str(path)])
    assert r.exit_code == 0 and "ok: subspace a" in " ".join(r.output.split()), r.output
    basis = zarr.open_group(str(path), mode="r+")["subspaces/b/basis"]
    row = basis[3, :]
    row[1] = row[1] + 1e-4  # finite, plausible: only the digest tells
    basis[3, :] = row
    r = CliRunner().invoke(app, ["verify", str(path)])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "ok: subspace a" in text and "subspace b: the basis of subspace 'b'" in text, text
    assert "--name b --overwrite" in text and "bad subspaces: b" in text
    report = json.loads(CliRunner().invoke(app, ["verify", str(path), "--json"]).stdout)
    assert report["ok"] is False and report["subspaces"]["a"]["ok"] and "digest" in report["subspaces"]["b"]["problem"]
    strip_digest(path, "b")  # extracted before digests: only finiteness can be checked, and is said so
    text = " ".join(CliRunner().invoke(app, ["verify", str(path)]).output.split())
    assert "ok: subspace b (no digest recorded" in text
    (path / "subspaces" / "a" / "basis" / "zarr.json").write_text("{")  # not zarr's error: one line naming it
    r = CliRunner().invoke(app, ["verify", str(path)])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "subspace a:" in text and "Traceback" not in r.output, text


def test_project_json_needs_no_plot(extracted):  # noqa: F811
    """`project --json` refused to run without --plot."""
    import json

    from typer.testing import CliRunner

    from cli.main import app

    path, _ = extracted
    r = CliRunner().invoke(app, ["project", str(path), "--name", "a", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["plot"] is None and len(report["coordinates"]) == len(report["snapshots"])
    r = CliRunner().invoke(app, ["project", str(path), "--name", "a"])
    assert r.exit_code == 2 and "--plot" in r.output and "--json" in r.output


def test_a_run_folder_given_for_a_store_points_to_the_store_inside(tmp_path):
    """`trajstore info RUNFOLDER` said only "not a trajstore store"."""
    from typer.testing import CliRunner

    from cli.main import app

    from .synthetic import trajectory, write_store

    write_store(tmp_path / "run" / "trajectory.zarr", trajectory(3, 50, rank=1))
    for command in ("info", "verify", "spectrum"):
        r = CliRunner().invoke(app, [command, str(tmp_path / "run")])
        text = " ".join(r.output.split())
        assert r.exit_code != 0 and "trajectory.zarr" in text and "give that path" in text, (command, text)


def test_plots_show_only_the_components_the_centred_rows_span(tmp_path):
    """The spectrum figure drew t components (the last a ~1e-17 rounding of the centring's zero); the table t − 1."""
    from pipeline import extract_subspace

    from .synthetic import trajectory, write_store

    path = write_store(tmp_path / "run.zarr", trajectory(9, 400, rank=3))
    sub = extract_subspace(path, dim=2)
    assert len(sub.explained_variance_ratio) == 9 and len(sub.spanned_variance_ratio()) == 8
    assert sub.spanned_variance_ratio()[0] == sub.explained_variance_ratio[0]
    fast = extract_subspace(path, dim=2, method="randomized", name="r")
    assert len(fast.spanned_variance_ratio()) == int((~np.isnan(fast.explained_variance_ratio)).sum()) < 9


def test_a_state_saved_with_an_lr_scheduler_still_loads(extracted):  # noqa: F811
    """Schedulers add initial_lr (OneCycleLR max_lr, min_lr) to the param groups: no sign of another optimizer."""
    import torch

    path, model = extracted
    basis = Basis.from_store(path, "a")
    for make, sched in ((lambda: SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9),
                         lambda o: torch.optim.lr_scheduler.StepLR(o, 2)),
                        (lambda: SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9),
                         lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=10))):
        opt = make()
        scheduler = sched(opt)
        train(model, opt, 2)
        scheduler.step()
        fresh = make()
        sched(fresh)
        fresh.load_state_dict(opt.state_dict())
        assert fresh.param_groups[0]["initial_lr"] == opt.param_groups[0]["initial_lr"]
    sgd = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(sgd, 2)
    with pytest.raises(InvalidArgumentError, match="saved by another optimizer"):
        SubspaceBFGS(model.parameters(), basis).load_state_dict(sgd.state_dict())


def test_a_loader_whose_sampler_has_its_own_generator_checkpoints_that_one():
    """DataLoader(sampler=RandomSampler(ds, generator=g)) has no loader generator: a fresh one was given, and the
    checkpoint saved it instead of g (a resumed run would repeat the first batch orders)."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    from pipeline.experiments.recipes import Recipe, with_generator

    data = TensorDataset(torch.arange(20.0))
    g = torch.Generator().manual_seed(3)
    recipe = Recipe(torch.nn.Linear(1, 1), DataLoader(data, sampler=RandomSampler(data, generator=g)), None, None)
    assert with_generator(recipe, "r", seed=0).train.generator is g
    shuffled = Recipe(torch.nn.Linear(1, 1), DataLoader(data, shuffle=True), None, None)
    with pytest.raises(InvalidArgumentError, match="global random generator"):
        with_generator(shuffled, "r", seed=0)


def test_verify_notes_a_subspace_that_does_not_span_the_snapshots_committed_after_it(tmp_path):
    """The trial: a subspace extracted before the recording went on was reported plainly "ok"."""
    import json

    from typer.testing import CliRunner

    from cli.main import app
    from pipeline import extract_subspace, open_subspace
    from pipeline.settings import selection_json
    from trajstore import TrajectoryStore

    from .synthetic import trajectory, write_store

    path = tmp_path / "run.zarr"
    x = trajectory(9, 400, rank=3)
    store = write_store(path, x[:6], close=False)
    extract_subspace(path, dim=2)
    assert "more since" not in " ".join(CliRunner().invoke(app, ["verify", str(path)]).output.split())
    for i in range(6, 9):
        store.append(x[i], step=10 * i)
    store.close()
    r = CliRunner().invoke(app, ["verify", str(path)])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "subspace default was extracted from 6 snapshots; the store has committed 3 more" \
        in text, text
    report = json.loads(CliRunner().invoke(app, ["verify", str(path), "--json"]).stdout)
    assert report["subspaces"]["default"]["newer_snapshots"] == 3 and report["subspaces"]["default"]["snapshots"] == 6
    assert "3 more since" in report["subspaces"]["default"]["note"]  # (the trial: null in the JSON)
    # the command it gives extracts that subspace (its name, its settings), not the default one
    extract_subspace(path, dim=2, name="late", snapshots=slice(1, None, 2), smooth=0.5)
    for i in range(9, 12):
        with TrajectoryStore.open(path, "a") as store:
            store.append(x[i - 9], step=10 * i)
    text = " ".join(CliRunner().invoke(app, ["verify", str(path)]).output.split())
    command = text.split("subspace late was extracted")[1].split("`")[1]
    assert command.endswith("--snapshots 1::2 --smooth 0.5 --name late --overwrite"), command
    from pipeline.settings import parse_snapshots

    sub = open_subspace(path, "late")  # the review: "2:" came out as "2" (one snapshot), 0.9999999 as 1
    for chosen in (slice(2, None), slice(0, None), slice(None, 5), slice(1, None, 2), [0, 3]):
        sub.attrs = {**sub.attrs, "snapshots_requested": selection_json(chosen), "variance_requested": 0.9999999}
        said = sub.extract_command().split()
        assert parse_snapshots(said[said.index("--snapshots") + 1]) == chosen, said
        assert said[said.index("--variance") + 1] == "0.9999999"
    r = CliRunner().invoke(app, command.split()[1:])
    assert r.exit_code == 0, r.output
    late = open_subspace(path, "late")
    assert late.snapshots == list(range(1, 12, 2)) and late.attrs["sampling"]["smooth"] == 0.5
    with TrajectoryStore.open(path, "a") as store:  # snapshot 12: not in the stride 1::2, so nothing it misses
        store.append(x[0], step=120)
    assert "subspace late was extracted" not in " ".join(CliRunner().invoke(app, ["verify", str(path)]).output.split())
