"""Issue 12, recording edges: step order, epoch-only recording, the callbacks' spacing, metrics
and epoch labels, and a trainer that raised."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from trajstore import InvalidArgumentError, TrajectoryStore, TrajstoreError
from trajstore.recorder import Recorder, RecordingSession

from .test_recorder import HFNet, digits, lightning_fit


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


# -- item 8: steps strictly increase ----------------------------------------------------------
@pytest.mark.parametrize("bad", [10, 5])
def test_a_step_that_repeats_or_goes_back_is_refused_and_changes_nothing(tmp_path, bad):
    model, path = net(), tmp_path / "run.zarr"
    with TrajectoryStore.create(path, model) as store:
        store.append(model, step=0)
        store.append(model, step=10)
        with pytest.raises(InvalidArgumentError, match=f"step {bad} does not follow step 10"):
            store.append(model, step=bad)
        store.append(model, step=11)
    with TrajectoryStore.open(path, "a") as store:  # the rule holds across a reopen too
        with pytest.raises(InvalidArgumentError, match="strictly increase"):
            store.append(model, step=11)
        assert store.steps.tolist() == [0, 10, 11]
        store.truncate_after_step(0)  # a resume drops the later snapshots, then may repeat their steps
        store.append(model, step=5)
        store.flush()
        assert store.steps.tolist() == [0, 5]


def test_a_later_resume_keeps_everything_recorded_before_it(tmp_path):
    model = net()
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        rec = Recorder(store, model, every_n_steps=5)
        rec.start()
        for _ in range(10):
            rec.step()
        with pytest.raises(InvalidArgumentError):
            store.append(model, step=5)  # the step-5 snapshot exists: never lost to a step that goes back
        rec.start(7)
        assert store.steps.tolist() == [0, 5]


# -- item 7: every_n_epochs without counted steps --------------------------------------------------
def test_epoch_only_recording_without_counted_steps_says_how_to_count_them(tmp_path):
    model = net()
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        rec = Recorder(store, model, every_n_epochs=1)
        rec.start()
        with pytest.raises(InvalidArgumentError, match=r"rec\.step\(\).*epoch_end\(epoch, step="):
            rec.epoch_end(0)
        assert rec.epoch_end(0, step=8) and rec.epoch_end(1, step=16)
        store.flush()
        assert store.steps.tolist() == [0, 8, 16] and store.epochs.tolist() == [-1, 0, 1]


# -- item 15: the callbacks record every N steps only, unless epochs are asked for too ------------
def test_every_n_steps_alone_records_evenly_spaced_steps(tmp_path):
    assert RecordingSession(tmp_path / "a.zarr", every_n_steps=3).every_n_epochs is None
    assert RecordingSession(tmp_path / "a.zarr").every_n_epochs == 1
    assert RecordingSession(tmp_path / "a.zarr", every_n_steps=3, every_n_epochs=2).every_n_epochs == 2
    lightning_fit(tmp_path / "l", tmp_path / "l.zarr", 2, every_n_epochs=None)  # 5 steps an epoch, every 2
    with TrajectoryStore.open(tmp_path / "l.zarr") as store:
        assert store.steps.tolist() == [0, 2, 4, 6, 8, 10]


# -- items 9 and 13: the HF callback ---------------------------------------------------------------
def hf_trainer(out, store_path, fail_at=None, **callback):
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from trajstore.integrations.transformers import TrajectoryCallback

    class FailAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == fail_at:
                raise RuntimeError("out of memory")

    set_seed(0)
    x, y = digits(256)  # 4 steps an epoch
    data = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    args = TrainingArguments(output_dir=str(out), num_train_epochs=3, per_device_train_batch_size=64,
                             learning_rate=0.05, save_strategy="no", logging_steps=1, report_to=[], use_cpu=True,
                             seed=0, remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0,
                             lr_scheduler_type="constant", optim="sgd")
    return Trainer(model=HFNet(), args=args, train_dataset=data,
                   callbacks=[TrajectoryCallback(store_path, **callback), FailAt()])


def test_hf_snapshots_carry_their_own_steps_metrics_and_epoch(tmp_path):
    trainer = hf_trainer(tmp_path / "out", tmp_path / "run.zarr", every_n_steps=3, every_n_epochs=1)
    trainer.train()
    logged = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        steps, epochs, loss = store.steps.tolist(), store.epochs.tolist(), store.metrics("loss")
    assert steps == [0, 3, 4, 6, 8, 9, 12]
    assert math.isnan(loss[0])  # the initial weights: nothing logged yet
    np.testing.assert_array_equal(loss[1:], [logged[s] for s in steps[1:]])
    assert epochs[1:] == [math.ceil(s / 4) - 1 for s in steps[1:]]  # step 4 ends epoch 0, step 8 epoch 1


def test_hf_training_that_raised_frees_the_store_for_the_next_trainer(tmp_path):
    store_path = tmp_path / "run.zarr"
    with pytest.raises(RuntimeError, match="out of memory"):
        hf_trainer(tmp_path / "a", store_path, fail_at=5, every_n_steps=2).train()
    with pytest.warns(UserWarning, match="left open by an earlier trainer"):
        hf_trainer(tmp_path / "b", store_path, every_n_steps=2, overwrite=True).train()
    with TrajectoryStore.open(store_path) as store:
        assert store.steps.tolist() == [0, 2, 4, 6, 8, 10, 12]


# -- review findings: metric names, truncate arguments, a failed open ------------------------------
@pytest.mark.parametrize("name", ["train\\loss", "a b", "x\0y", "zarr.json", "c", "l" * 300, "__x", "..", ""])
def test_any_metric_name_is_stored_flat_or_refused_before_the_index_is_taken(tmp_path, name):
    model, path = net(), tmp_path / "run.zarr"
    with TrajectoryStore.create(path, model) as store:
        store.append(model, step=0)
        try:
            store.append(model, step=1, metrics={name: 1.0})
        except InvalidArgumentError:
            store.append(model, step=1)  # refused: nothing taken, the next append is row 1
        store.append(model, step=2, metrics={"ok": 2.0})
    with TrajectoryStore.open(path, "a") as store:  # opens for appending: no nested group, no lost row
        assert store.steps.tolist() == [0, 1, 2]
        assert all("/" not in n and "\\" not in n for n in store.metric_names())
        if name in ("train\\loss", "a b"):
            np.testing.assert_array_equal(store.metrics(name), [np.nan, 1.0, np.nan])


@pytest.mark.parametrize("call", ["truncate(2.0)", "truncate(True)", "truncate(2.5)", "truncate(np.int64(2))",
                                  "truncate_after_step('5')", "truncate_after_step(None)"])
def test_truncate_arguments_are_checked_before_anything_is_written(tmp_path, call):
    model, path = net(), tmp_path / "run.zarr"
    with TrajectoryStore.create(path, model) as store:
        for step in range(4):
            store.append(model, step=step)
        try:
            eval(f"store.{call}", {"store": store, "np": np})
        except InvalidArgumentError:
            pass
    with TrajectoryStore.open(path) as store:  # never bricked
        assert len(store) in (2, 4)


def test_a_store_that_fails_to_open_for_appending_is_not_left_locked(tmp_path):
    import json

    model, path = net(), tmp_path / "run.zarr"
    with TrajectoryStore.create(path, model) as store:
        store.append(model, step=0, metrics={"acc": 1.0})
    meta = path / "metrics/acc/zarr.json"
    good = meta.read_text()
    doc = json.loads(good)
    doc["attributes"] = []
    meta.write_text(json.dumps(doc))
    with pytest.raises(TrajstoreError, match="metrics/acc"):
        TrajectoryStore.open(path, "a")
    meta.write_text(good)  # restored from a copy: the same process appends again
    with TrajectoryStore.open(path, "a") as store:
        store.append(model, step=1)


def test_hf_refuses_a_checkpoint_of_a_run_recorded_elsewhere(tmp_path):
    from trajstore import StoreExistsError

    from .test_recorder import hf_train

    hf_train(tmp_path / "a", tmp_path / "a.zarr")
    hf_train(tmp_path / "b", tmp_path / "b.zarr")  # the same script, recorded to another store
    with TrajectoryStore.open(tmp_path / "a.zarr") as store:
        before = store.read(slice(None))
    with pytest.raises(StoreExistsError, match="recorded into run"):  # default TrainingArguments
        hf_train(tmp_path / "b", tmp_path / "a.zarr", resume=str(tmp_path / "b" / "checkpoint-4"))
    with TrajectoryStore.open(tmp_path / "a.zarr") as store:
        np.testing.assert_array_equal(store.read(slice(None)), before)


def test_a_resume_that_cannot_be_checked_warns(tmp_path):
    from trajstore.recorder import UnverifiedResumeWarning

    model = net()
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        rec = Recorder(store, model, every_n_steps=5)
        rec.start()
        for _ in range(10):
            rec.step()
        with pytest.warns(UnverifiedResumeWarning, match="step 7"):
            Recorder(store, model, every_n_steps=5).start(7)  # no snapshot at 7, no run id


# -- review: a reader or an extraction that overlaps a truncation never mixes two versions ---------
@pytest.mark.parametrize("codec", ["lossless", "xor-delta:4"])
def test_a_reader_opened_before_a_truncation_raises_instead_of_mixing(tmp_path, codec):
    from trajstore.errors import StoreChangedError

    model, path = net(), tmp_path / "run.zarr"
    with TrajectoryStore.create(path, model, codec=codec) as writer:
        for step in range(10):
            writer.append(torch.full((model[0].weight.numel() + 3 + 6 + 2,), float(step)), step=step)
    reader = TrajectoryStore.open(path)
    with TrajectoryStore.open(path, "a") as writer:
        writer.truncate(6)
        for step in range(6, 10):
            writer.append(torch.full((reader.n_params,), 100.0 + step), step=step)
    for read in (lambda: reader.read(8), lambda: reader.steps, lambda: reader.read(slice(None))):
        with pytest.raises(StoreChangedError, match="truncated or re-created"):
            read()
    reader.refresh()
    assert reader.read(8)[0] == 108.0 and reader.steps.tolist() == list(range(10))


def test_an_extraction_overlapping_a_truncation_fails_and_leaves_no_complete_subspace(tmp_path):
    from pipeline import extract_subspace
    from pipeline.subspace import open_subspace
    from trajstore.errors import StoreChangedError, TrajstoreError

    model, path = net(), tmp_path / "run.zarr"
    rng = np.random.default_rng(0)
    n = sum(p.numel() for p in model.parameters())
    with TrajectoryStore.create(path, model, chunk_size=8, shard_size=8) as store:
        for step in range(12):
            store.append(rng.standard_normal(n).astype(np.float32), step=step)
    writer = TrajectoryStore.open(path, "a")

    def progress(done, total):
        if done == 1 and writer.mode == "a" and len(writer) == 12:  # mid-pass: a resumed run rewrites rows 6..
            writer.truncate(6)
            for step in range(6, 12):
                writer.append(rng.standard_normal(n).astype(np.float32), step=step)
            writer.flush()

    try:
        with pytest.raises(StoreChangedError):
            extract_subspace(path, dim=3, block_size=8, progress=progress)
    finally:
        writer.close()
    with pytest.raises(TrajstoreError):
        open_subspace(path, "default")  # nothing complete was published


def test_hf_commits_every_earlier_snapshot_before_a_checkpoint_is_written(tmp_path):
    from transformers import TrainerCallback

    seen = []

    class Probe(TrainerCallback):  # runs after the trajstore callback, just before the Trainer saves
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:
                with TrajectoryStore.open(tmp_path / "run.zarr") as store:
                    seen.append((state.global_step, store.steps.tolist()))

    trainer = hf_trainer(tmp_path / "out", tmp_path / "run.zarr", every_n_steps=1)
    trainer.args.save_strategy, trainer.args.save_steps = "steps", 5
    trainer.add_callback(Probe())
    trainer.train()
    assert seen and all(steps == list(range(step)) for step, steps in seen), seen


def test_lightning_commits_every_earlier_snapshot_before_a_checkpoint_is_written(tmp_path):
    import lightning.pytorch as pl

    seen = []

    class Probe(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            with TrajectoryStore.open(tmp_path / "l.zarr") as store:
                seen.append((trainer.global_step, store.steps.tolist()))

    lightning_fit(tmp_path / "l", tmp_path / "l.zarr", 2, every_n_epochs=None, extra_callbacks=[Probe()])
    assert seen and all(steps == list(range(0, step + 1, 2)) for step, steps in seen), seen
