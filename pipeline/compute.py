"""Run independent block tasks on dask: the threaded scheduler, or a dask.distributed cluster.

Every pass of the pipeline is a list of independent, idempotent tasks (one per column
block) that write their result into the store and return something small. That keeps
memory bounded by one block per worker thread, lets a killed pass resume by skipping
finished blocks, and runs unchanged on threads or on cluster workers.
"""
from __future__ import annotations

import threading
from typing import Callable, Sequence, TypeVar

import dask
import dask.threaded
from dask.callbacks import Callback
from threadpoolctl import threadpool_limits

T = TypeVar("T")
Progress = Callable[[int, int], None]
Finished = Callable[[int], None]  # called with a task's index as it finishes, in the calling thread


class Interrupted(Exception):
    """Raised when a stop was requested (Ctrl-C / SIGTERM) between tasks."""


class StopFlag:
    """Set from a signal handler; tasks that have not started yet are skipped."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


def get_client(scheduler: object):
    """(client, owned): ``None`` -> threads; a ``distributed.Client``; or a scheduler address string."""
    if scheduler is None:
        return None, False
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler, False
    if isinstance(scheduler, str):
        return Client(scheduler), True
    raise TypeError(f"scheduler must be None, a distributed.Client or an address, got {type(scheduler).__name__}")


_ARENAS_LIMITED = False


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's per-thread malloc arenas (as MALLOC_ARENA_MAX=2 would).

    Every thread that frees a block-sized buffer otherwise keeps its own arena of freed
    memory: measured at n = 10M, t = 100 this alone took peak RSS from 475 to 567 MiB.
    A no-op off glibc.
    """
    global _ARENAS_LIMITED
    if _ARENAS_LIMITED:
        return
    _ARENAS_LIMITED = True
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def run_tasks(tasks: Sequence[Callable[[], T]], scheduler: object = None, progress: Progress | None = None,
              stop: StopFlag | None = None, num_workers: int | None = None,
              finished: Finished | None = None) -> list[T]:
    """Run ``tasks`` (picklable zero-argument callables) and return their results in order.

    ``finished(i)`` (optional) is called in the calling thread as task ``i`` finishes: work that depends on
    a task's output (reading back what it wrote) can then overlap with the tasks still running."""
    total = len(tasks)
    if progress:
        progress(0, total)
    if not tasks:
        return []
    limit_malloc_arenas()
    client, owned = get_client(scheduler)
    if client is None:
        return _run_threads(tasks, progress, stop, num_workers, finished)
    try:
        return _run_distributed(client, tasks, progress, stop, finished)
    finally:
        if owned:
            client.close()


def _run_distributed(client, tasks, progress, stop, finished=None) -> list:
    from distributed import as_completed

    total = len(tasks)
    futures = [client.submit(task, pure=False) for task in tasks]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list = [None] * total
    try:
        for done, future in enumerate(as_completed(futures), start=1):
            results[index[future.key]] = future.result()
            if finished:
                finished(index[future.key])
            if progress:
                progress(done, total)
            if stop:
                raise Interrupted("stopped on request")
    finally:
        for f in futures:
            f.cancel()
    return results


def _run_threads(tasks, progress, stop, num_workers, finished=None) -> list:
    counter = {"done": 0}
    lock = threading.Lock()
    idle = threading.Condition()
    state = {"running": 0, "failed": False}

    def guarded(task):
        # dask raises the first task error at once while its pool still runs the other tasks: a
        # failed pass must not go on writing (gram/, subspaces/) after the caller has seen the error
        with idle:
            if stop or state["failed"]:
                raise Interrupted("stopped on request" if stop else "another task of this pass failed")
            state["running"] += 1
        try:
            return task()
        except BaseException:
            state["failed"] = True  # the tasks still queued are not started
            raise
        finally:
            with idle:
                state["running"] -= 1
                idle.notify_all()

    class _Progress(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):  # dask calls it in the calling thread
            if isinstance(key, tuple) or not str(key).startswith("block-"):
                return
            if finished:
                finished(int(str(key)[len("block-"):]))
            if progress:
                with lock:
                    counter["done"] += 1
                    progress(counter["done"], len(tasks))

    delayed = [dask.delayed(guarded, pure=False)(task, dask_key_name=f"block-{i}") for i, task in enumerate(tasks)]
    # One BLAS thread per dask thread, set once for the whole pass: threadpool limits are
    # process-global, so entering them per task from several threads would race (a task's exit
    # restores the limit under another task that is still running, and the last exit can leave
    # the process at 1 thread for good).
    with threadpool_limits(1), _Progress():
        try:
            return list(dask.compute(*delayed, scheduler=dask.threaded.get, num_workers=num_workers))
        except BaseException:
            with idle:  # no new task starts; wait for the running ones to end before raising
                state["failed"] = True
                idle.wait_for(lambda: state["running"] == 0)
            raise


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (VmHWM: unlike ru_maxrss, not inherited from a parent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
