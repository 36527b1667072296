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


def test_a_float_outside_the_integer_range_never_matches_on_any_machine():
    """Converting a float64 outside int64's range back is undefined: x86 gives INT64_MIN for 2^63, 2^64, Inf
    and NaN, aarch64 clamps. Such a value never counts as holding an integer, whatever the conversion gives."""
    from trajstore.layout import first_inexact

    int64_min, int64_max = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    for held, want in [(2.0**64, int64_min), (float("inf"), int64_min), (float("nan"), int64_min),
                       (2.0**63, int64_max), (-(2.0**64), int64_min), (float("-inf"), int64_min)]:
        assert first_inexact(torch.tensor([0.0, held], dtype=torch.float64), torch.tensor([0, want]))[0] == 1, held
    assert first_inexact(torch.tensor([-(2.0**63), 2.0**62], dtype=torch.float64),
                         torch.tensor([int64_min, 2**62]))[0] is None


def test_integers_beyond_what_the_store_holds_are_refused(tmp_path):
    """int64 above 2^53 would round alike on both sides of a float64 comparison: they are compared as
    integers. numpy ints, big-endian floats and unsigned ints go in value for value; longdouble is refused."""
    from trajstore import InexactValuesError

    store = TrajectoryStore.create(tmp_path / "s.zarr", ParamLayout([TensorSpec("w", (2,), "float64")]))
    for bad in (torch.tensor([2**53 + 1, 3]), np.array([2**53 + 1, 3], np.int64),
                np.array([2**64 - 1, 0], np.uint64), torch.tensor([2**63 - 1, 0])):  # INT64_MAX rounds to 2^63
        # (INT64_MAX got through on aarch64 only, where 2^63 converts back clamped: see the next test)
        with pytest.raises(InexactValuesError):
            store.append(bad, step=0)
    with pytest.raises(LayoutMismatchError, match="longdouble|float128|cannot record exactly"):
        store.append(np.array([0.5, 1.5], np.longdouble), step=0)
    store.append(np.array([2**53, 3], np.int64), step=1)
    store.append(np.array([0.25, -2.0], ">f8"), step=2)
    store.append(np.array([7, 9], np.uint32), step=3)
    store.append(torch.tensor([-2**63, 0]), step=4)  # INT64_MIN is a power of two: float64 holds it
    store.close()
    with TrajectoryStore.open(tmp_path / "s.zarr") as r:
        np.testing.assert_array_equal(r.read(slice(None)), [[2**53, 3], [0.25, -2.0], [7, 9], [-2.0**63, 0]])

    model = nn.BatchNorm1d(2)
    store = TrajectoryStore.create(tmp_path / "b.zarr", model, buffers=True)
    model.num_batches_tracked.fill_(2**60 + 1)
    with pytest.raises(InexactValuesError, match="num_batches_tracked"):
        store.append(model, step=0)
    model.num_batches_tracked.fill_(12)
    store.append(model, step=1)
    store.close()


def test_holds_says_false_for_values_the_store_cannot_hold(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    with TrajectoryStore.create(tmp_path / "s.zarr", model) as store:
        store.append(model, step=0)
        store.flush()
        assert store.holds(model, 0)
        wide = nn.Linear(3, 2).double()
        wide.load_state_dict(model.state_dict())
        assert store.holds(wide, 0)  # float64 copies of the same float32 values
        with torch.no_grad():
            wide.weight.add_(1e-12)
        assert not store.holds(wide, 0)  # not raised: it simply is not the snapshot


@pytest.mark.timeout(60)  # a deadlock fails here, not at the suite's 300 s
def test_append_from_inside_an_append_is_refused_not_deadlocked(tmp_path):
    """A signal handler (here: a hook run inside append) that appends on the same thread gets a typed
    error at once; the interrupted append completes and another thread still appends."""
    import signal

    model = nn.Linear(3, 2)
    store = TrajectoryStore.create(tmp_path / "s.zarr", model)
    errors = []

    def handler(signum, frame):
        try:
            store.append(model, step=99)
        except InvalidArgumentError as exc:
            errors.append(str(exc))

    previous = signal.signal(signal.SIGUSR1, handler)
    real = store._append

    def interrupted(*args):
        signal.raise_signal(signal.SIGUSR1)  # arrives while the append runs
        return real(*args)

    store._append = interrupted
    try:
        store.append(model, step=0)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        del store._append
    assert errors and "while an append of this store was running on the same thread" in errors[0]
    thread = threading.Thread(target=lambda: store.append(model, step=1))
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    store.truncate_after_step(0)
    store.close()
    with TrajectoryStore.open(tmp_path / "s.zarr") as r:
        np.testing.assert_array_equal(r.steps, [0])


def test_metric_tensors_that_are_not_numbers_are_typed_errors(tmp_path):
    store = TrajectoryStore.create(tmp_path / "s.zarr", _flat(4))
    for bad in (torch.empty((), device="meta"), torch.tensor([0.5]).to_sparse()):
        with pytest.raises(InvalidArgumentError, match="must be one number"):
            store.append(np.zeros(4, np.float32), step=0, metrics={"x": bad})
    store.close()


def test_an_epoch_step_that_does_not_advance_is_warned_about_as_such(tmp_path):
    model = nn.Linear(3, 1)
    store = TrajectoryStore.create(tmp_path / "s.zarr", model)
    rec = Recorder(store, model, every_n_epochs=1)
    rec.start()
    assert rec.epoch_end(0, step=5)
    with pytest.warns(UserWarning, match="step 5 does not come after step 5"):
        assert not rec.epoch_end(1, step=5)
    store.close()
