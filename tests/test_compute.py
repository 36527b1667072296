"""pipeline.compute.run_tasks on the threaded scheduler: a failed pass stops writing before it raises."""
import time

import pytest

from pipeline.compute import run_tasks


def test_a_failed_pass_starts_no_task_after_the_failure_and_has_none_running_when_it_raises():
    events: list[tuple[str, float]] = []

    def slow():
        events.append(("start", time.monotonic()))
        time.sleep(0.2)
        events.append(("end", time.monotonic()))  # stands for a write into gram/ or subspaces/

    def failing():
        time.sleep(0.05)
        events.append(("failed", time.monotonic()))
        raise RuntimeError("disk full")

    tasks = [slow] * 6 + [failing] + [slow] * 6  # dask's order is its own: the failure lands mid-pass
    with pytest.raises(RuntimeError, match="disk full"):
        run_tasks(tasks, num_workers=2)
    raised_at = time.monotonic()
    time.sleep(0.5)
    failed_at = next(t for kind, t in events if kind == "failed")
    assert not [t for kind, t in events if kind == "start" and t > failed_at], "tasks started after the failure"
    assert not [t for kind, t in events if kind == "end" and t > raised_at], "a task went on after the pass raised"
    assert sum(kind == "start" for kind, _ in events) < 12
