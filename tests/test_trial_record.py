"""What a new user's trial of the recording path found (issue 13 session): float64 weights rounded into a
float32 store, appends from several threads committing steps out of order, a tensor metric crashing,
and a Recorder dropping epoch-end metrics without a word. Real stores, real torch models and threads."""
from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
from torch import nn

from trajstore import InvalidArgumentError, LayoutMismatchError, Recorder, TrajectoryStore
from trajstore.layout import ParamLayout, TensorSpec


def _flat(n: int) -> ParamLayout:
    return ParamLayout([TensorSpec("w", (n,), "float32")])


def test_wider_weights_than_the_store_holds_are_refused_not_rounded(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    store = TrajectoryStore.create(tmp_path / "s.zarr", model)  # float32
    model.double()
    store.append(model, step=0)  # float64 values that float32 holds exactly: recorded
    with torch.no_grad():
        model.weight.add_(1e-9)
    with pytest.raises(LayoutMismatchError, match="float64 values that torch.float32 cannot represent exactly"):
        store.append(model, step=1)
    with pytest.raises(LayoutMismatchError, match="would be stored as inf"):
        store.append(np.full(10, 1e300), step=2)  # not "NaN or Inf": the input has none
    with pytest.raises(LayoutMismatchError, match="cannot represent exactly"):
        store.append({k: v.double() for k, v in model.state_dict().items()}, step=3)
    store.append(np.arange(10, dtype=np.float64), step=4)  # exact
    store.close()
    with TrajectoryStore.open(tmp_path / "s.zarr") as r:
        np.testing.assert_array_equal(r.steps, [0, 4])
        np.testing.assert_array_equal(r.read(1), np.arange(10, dtype=np.float32))


def test_a_half_type_into_the_other_half_type_is_refused_unless_exact(tmp_path):
    """float16 and bfloat16 are the same width but hold different values: float16 weights appended to a
    bfloat16 store are checked like a narrowing (and refused where bfloat16 would round them)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).bfloat16()
    store = TrajectoryStore.create(tmp_path / "s.zarr", model)
    half = nn.Linear(4, 2).half()
    with torch.no_grad():
        half.weight.fill_(1.0009765625)  # 1 + 2^-10: float16 holds it, bfloat16 does not
        half.bias.fill_(0.5)
    with pytest.raises(LayoutMismatchError, match="torch.float16 values that torch.bfloat16 cannot represent"):
        store.append(half, step=0)
    with torch.no_grad():
        half.weight.fill_(1.5)
    store.append(half, step=1)  # exact in bfloat16: recorded
    store.close()
    with TrajectoryStore.open(tmp_path / "s.zarr") as r:
        np.testing.assert_array_equal(r.steps, [1])
        assert (r.read(0)[:8] == 1.5).all()


def test_appends_from_several_threads_commit_increasing_steps(tmp_path):
    """Four threads take steps from one counter and append: whoever comes late with a smaller step is
    refused (a typed error); every committed row holds its own step's values, steps strictly increase."""
    n = 1 << 18  # a copy long enough for the threads to interleave inside append
    store = TrajectoryStore.create(tmp_path / "s.zarr", _flat(n))
    counter, lock, refused = itertools.count(), threading.Lock(), []

    def work() -> None:
        for _ in range(40):
            with lock:
                step = next(counter)
            try:
                store.append(np.full(n, step, np.float32), step=step, metrics={"s": step})
            except InvalidArgumentError:
                refused.append(step)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    with TrajectoryStore.open(tmp_path / "s.zarr") as r:
        steps = r.steps
        assert len(steps) + len(refused) == 160
        assert (np.diff(steps) > 0).all(), steps
        np.testing.assert_array_equal(r.read(slice(None))[:, 0], steps)
        np.testing.assert_array_equal(r.metrics("s"), steps)


def test_tensor_metrics_are_numbers(tmp_path):
    store = TrajectoryStore.create(tmp_path / "s.zarr", _flat(8))
    store.append(np.zeros(8, np.float32), step=0, metrics={"loss": torch.tensor(0.5), "acc": torch.tensor([0.25]),
                                                          "n": torch.tensor(3)})
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor(True), torch.tensor(1j)):
        with pytest.raises(InvalidArgumentError, match="must be one number"):
            store.append(np.zeros(8, np.float32), step=1, metrics={"x": bad})
    store.close()
    with TrajectoryStore.open(tmp_path / "s.zarr") as r:
        assert (r.metrics("loss")[0], r.metrics("acc")[0], r.metrics("n")[0]) == (0.5, 0.25, 3.0)


def test_epoch_end_metrics_lost_to_a_step_snapshot_are_warned_about(tmp_path):
    model = nn.Linear(3, 1)
    store = TrajectoryStore.create(tmp_path / "s.zarr", model)
    rec = Recorder(store, model, every_n_steps=5, every_n_epochs=1)
    rec.start()
    with pytest.warns(UserWarning, match=r"step 10 already has a snapshot.*\['val_acc'\] are not recorded"):
        for epoch in range(2):
            for _ in range(10):
                rec.step()
            assert not rec.epoch_end(epoch, metrics={"val_acc": 0.9})
    store.close()
