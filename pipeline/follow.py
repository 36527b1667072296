"""Keep the cached Gram and a subspace current while another process is still recording."""
from __future__ import annotations

import os
import time
from typing import Callable

from trajstore import TrajectoryStore

from .checks import check_int, check_positive
from .compute import Interrupted, StopFlag
from trajstore.format import local_dir

from .dldr import check_extract_args, extract_subspace, promote_subspace, staging_name
from .gram import update_gram
from .locking import extraction_access
from .subspace import Subspace, open_subspace


def follow(path: "str | os.PathLike", *, every: int, dim: int | None = None, variance: float | None = None,
           name: str = "default", method: str = "gram", scheduler: object = None, poll: float = 1.0,
           stop: StopFlag | None = None, max_updates: int | None = None,
           on_gram: Callable[[int], None] | None = None, on_subspace: Callable[[Subspace], None] | None = None) -> int:
    """Poll the store's committed count; update the Gram as rows arrive, re-extract every ``every`` rows.

    Reads committed rows only and takes only the extraction locks (pipeline/locking.py), so the
    writer is never blocked, nor are extractions into other subspace names. Returns the number of
    subspace refreshes; stops when ``stop`` is set (the cache stays intact: an interrupted update
    resumes on the next run) or after ``max_updates``.
    """
    check_follow_args(every=every, poll=poll)
    check_extract_args(dim=dim, variance=variance, method=method, name=name)
    stop = StopFlag() if stop is None else stop
    store = TrajectoryStore.open(path, "r")
    refreshed_at, updates = 0, 0
    needed = (dim + 1) if dim else 2
    try:
        while not stop:
            store.refresh()
            t = len(store)
            if t >= 2 and method == "gram":
                with extraction_access(store, None, stop=stop) as access, access.gram() as root:
                    _, stats = update_gram(store, root, scheduler=scheduler, stop=stop)
                if stats.new_rows and on_gram:
                    on_gram(t)
            if t >= needed and t - refreshed_at >= every:
                # local stores: the next version is written under a staging name and then replaces the old one
                # whole, so readers never see it unfinished and a kill leaves the old one (object stores: in place)
                staged = local_dir(store.path) is not None
                sub = extract_subspace(store, dim=dim, variance=variance, name=staging_name(name) if staged else name,
                                       method=method, scheduler=scheduler, overwrite=True, stop=stop, _staging=staged)
                if staged:
                    promote_subspace(store, name)
                    sub = open_subspace(store, name)
                refreshed_at, updates = t, updates + 1
                if on_subspace:
                    on_subspace(sub)
                if max_updates is not None and updates >= max_updates:
                    break
            deadline = time.monotonic() + poll
            while not stop and time.monotonic() < deadline:
                time.sleep(min(0.1, poll))
    except Interrupted:
        pass
    finally:
        store.close()
    return updates


def check_follow_args(*, every: int, poll: float) -> None:
    """``every`` >= 1 snapshots and ``poll`` > 0 seconds (InvalidArgumentError otherwise)."""
    check_int("every", every, 1)
    check_positive("poll", poll)
