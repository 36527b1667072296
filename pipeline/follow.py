"""Keep the cached Gram and a subspace current while another process is still recording."""
from __future__ import annotations

import os
import time
from typing import Callable

from trajstore import TrajectoryStore

from .checks import check_int, check_positive
from .compute import Interrupted, StopFlag
from trajstore._creating import may_be_created
from trajstore.errors import InvalidArgumentError, NotAStoreError, SubspaceExistsError
from trajstore.format import local_dir, normalize
from trajstore.holders import holder_unverifiable
from trajstore.lock import writer_holder

from .dldr import extract_subspace, promote_subspace, staging_name
from .gram import update_gram
from .locking import extraction_access
from .settings import ExtractionSettings, describe_differences, request_differences
from .subspace import SUBSPACES, Subspace, open_subspace


MIN_CREATE_WAIT = 60.0  # seconds that follow(until_done=True) waits at least for a store to be created


def follow(path: "str | os.PathLike", *, every: int, dim: int | None = None, variance: float | None = None,
           name: str = "default", method: str = "gram", snapshots: slice | None = None, smooth: float | None = None,
           window: int | None = None, settings: ExtractionSettings | None = None, scheduler: object = None,
           poll: float = 1.0, stop: StopFlag | None = None, max_updates: int | None = None,
           on_gram: Callable[[int], None] | None = None, on_subspace: Callable[[Subspace], None] | None = None,
           until_done: bool = False, idle: float = 30.0,
           on_stalled: Callable[[dict, float], None] | None = None, overwrite: bool = False,
           on_waiting: Callable[[str], None] | None = None, wait: float | None = None) -> int:
    """Poll the store's committed count; update the Gram as rows arrive, re-extract every ``every`` rows.

    Each refresh is an extraction with the same settings (keyword arguments or ``settings``) over the
    snapshots committed by then: sampling (``smooth``, ``window``) is applied every time, and
    ``snapshots`` may skip a burn-in and take a stride (``slice(A, None, S)``, ``--snapshots A::S``) but
    must stay open-ended (a list or a stop would freeze the selection: use a plain extract for that).
    Reads committed rows only and takes only the extraction locks (pipeline/locking.py), so the
    writer is never blocked, nor are extractions into other subspace names. Returns the number of
    subspace refreshes; stops when ``stop`` is set (the cache stays intact: an interrupted update
    resumes on the next run) or after ``max_updates``. ``until_done=True`` also stops when the recording
    has ended: for ``idle`` seconds no writer has held the store and no snapshot was committed (a writer that
    reopens the store per epoch, or a job restarting, within that time keeps it following), after a last
    refresh over every committed snapshot, so the subspace then covers the whole run. A store whose recording
    ended before following started is refreshed once and left after ``idle`` seconds. A lock left behind by a
    killed writer on this host does not count. One whose holder cannot be checked from here (another host or
    container, :func:`trajstore.holders.holder_unverifiable`) does, until it is released or broken; while no
    snapshot arrives, ``on_stalled(holder record, seconds since the last new snapshot or since following
    began)`` is called ``idle`` seconds after that, then after 2, 4, 8, ... times ``idle`` more (from
    ``idle`` again for a new holder). A live holder on this host is a writer between snapshots and is never
    reported.

    A subspace ``name`` extracted with other settings is refused (:class:`SubspaceExistsError`) unless
    ``overwrite``: each refresh replaces it. A store not created yet (no such path, an empty folder, or a
    creation under way) is waited for, ``on_waiting(message)`` called once: for ``wait`` seconds at most,
    then its :class:`NotAStoreError` is raised saying so (default: with ``until_done`` max(``idle``, 60 s),
    since a training script takes a while to build its model and create the store; else until ``stop``).
    """
    check_follow_args(every=every, poll=poll)
    check_positive("idle", idle)
    if settings is not None and not isinstance(settings, ExtractionSettings):
        raise InvalidArgumentError(f"settings must be an ExtractionSettings, got {settings!r}")
    if settings is not None and (any(v is not None for v in (dim, variance, snapshots, smooth, window))
                                 or (name, method) != ("default", "gram")):
        raise InvalidArgumentError("give the extraction's settings either as settings=ExtractionSettings(...) or as "
                                   "keyword arguments, not both")
    if settings is None:
        settings = ExtractionSettings(dim=dim, variance=variance, name=name, method=method, snapshots=snapshots,
                                      smooth=smooth, window=window)
    settings = check_follow_settings(settings)
    stop = StopFlag() if stop is None else stop
    if wait is not None:
        check_positive("wait", wait)
    patience = wait if wait is not None else max(idle, MIN_CREATE_WAIT) if until_done else None
    store = _open_when_created(path, poll, stop, patience, on_waiting)
    if store is None:  # stopped while waiting
        return 0
    try:
        if not overwrite:
            _check_same_request(store, settings)
    except BaseException:
        store.close()
        raise
    refreshed_at, updates = 0, 0
    last_t, last_activity = -1, time.monotonic()  # (until_done) when a writer or a new snapshot was last seen
    last_new = stalled_since = last_activity  # when a snapshot was last committed; the last stall report
    stall_gap = idle  # the wait before the next stall report: doubles after each one, back to idle on a snapshot
    stalled_by = None  # the token of the lock holder last seen
    try:
        while not stop:
            holder = writer_holder(store.path, store.storage_options) if until_done else None
            if holder is not None:
                last_activity = time.monotonic()
                if holder.get("token") != stalled_by:  # another writer took the lock: report it from idle on
                    stalled_by, stall_gap = holder.get("token"), idle
            store.refresh()
            t = len(store)
            if t != last_t:
                last_t, last_activity, last_new, stall_gap = t, time.monotonic(), time.monotonic(), idle
            if (on_stalled and holder is not None and time.monotonic() - max(last_new, stalled_since) >= stall_gap
                    and holder_unverifiable(store.path, holder)):
                stalled_since = time.monotonic()
                stall_gap *= 2
                on_stalled(holder, stalled_since - last_new)
            done = until_done and time.monotonic() - last_activity >= idle
            if t >= 2 and settings.method == "gram":
                with extraction_access(store, None, stop=stop) as access, access.gram() as root:
                    _, stats = update_gram(store, root, scheduler=scheduler, stop=stop)
                if stats.new_rows and on_gram:
                    on_gram(t)
            if _enough(settings, t) and (t - refreshed_at >= every or (done and t > refreshed_at)):
                if updates or not overwrite:  # another extraction into this name meanwhile is not replaced
                    _check_same_request(store, settings)
                # local stores: the next version is written under a staging name and then replaces the old one
                # whole, so readers never see it unfinished and a kill leaves the old one (object stores: in place)
                staged = local_dir(store.path) is not None
                sub = extract_subspace(store, settings.replace(name=staging_name(settings.name), staging=True)
                                       if staged else settings, scheduler=scheduler, overwrite=True, stop=stop)
                if staged:
                    promote_subspace(store, settings.name)
                    sub = open_subspace(store, settings.name)
                refreshed_at, updates = t, updates + 1
                if on_subspace:
                    on_subspace(sub)
                if max_updates is not None and updates >= max_updates:
                    break
            if done and (t == refreshed_at or not _enough(settings, t)):  # the recording ended; all of it is in
                break
            deadline = time.monotonic() + poll
            while not stop and time.monotonic() < deadline:
                time.sleep(min(0.1, poll))
    except Interrupted:
        pass
    finally:
        store.close()
    return updates


def _open_when_created(path: "str | os.PathLike", poll: float, stop: StopFlag, patience: float | None,
                       on_waiting: Callable[[str], None] | None) -> TrajectoryStore | None:
    """The store at ``path`` read-only, once it exists; None if ``stop`` is set first. Waits only while the
    path holds nothing, or only what a creator writes (:func:`may_be_created`; local folders and object-store
    prefixes alike); gives up after ``patience`` seconds, saying so."""
    began, told = time.monotonic(), False
    while True:
        try:
            return TrajectoryStore.open(path, "r")
        except NotAStoreError as exc:
            try:
                coming = may_be_created(normalize(path))
            except Exception:  # noqa: BLE001 -- cannot list it (permissions, credentials): not waited for
                coming = False
            if not coming:
                raise
            if patience is not None and time.monotonic() - began >= patience:
                raise NotAStoreError(f"{exc}; no writer created it within {patience:g} s (--wait): check the "
                                     "path, or wait longer (--wait SECONDS)") from None
            if on_waiting and not told:
                on_waiting(f"{exc}; waiting for a writer to create it"
                           + (f" (for {patience:g} s at most)" if patience is not None else ""))
                told = True
        deadline = time.monotonic() + poll
        while time.monotonic() < deadline:
            if stop:
                return None
            time.sleep(min(0.1, poll))


def _check_same_request(store: TrajectoryStore, settings: ExtractionSettings) -> None:
    """Refuse to follow into a subspace extracted with other settings (each refresh would replace it)."""
    key = f"{SUBSPACES}/{settings.name}"
    if key not in store.group:
        return
    differ = request_differences(store.group[key].attrs.asdict(), settings)
    if differ:
        said = describe_differences(differ)
        raise SubspaceExistsError(
            f"subspace {settings.name!r} in {store.path} was extracted with other settings: {said}. Following "
            "refreshes it with these settings and would replace it: pass overwrite=True (--overwrite), or "
            "follow into another name (--name)")


def _enough(settings: ExtractionSettings, t: int) -> bool:
    """Whether ``t`` committed snapshots give the extraction enough sampled rows (d + 1, at least 2)."""
    selected = len(range(t)[settings.snapshots]) if settings.snapshots is not None else t
    return settings.sampling.rows_out(selected) >= max(2, (settings.dim or 1) + 1)


def check_follow_settings(settings: ExtractionSettings) -> ExtractionSettings:
    """Validate ``settings`` for ``extract --follow``: a snapshot selection must be an open-ended slice."""
    settings.validate()
    chosen = settings.snapshots
    if chosen is not None and not (isinstance(chosen, slice) and chosen.stop is None
                                   and (chosen.start or 0) >= 0):
        raise InvalidArgumentError(
            "snapshots (--snapshots) with --follow must be open-ended, START: or START::STEP (a burn-in and a "
            f"stride), so that each refresh takes the new snapshots; got {chosen!r}. Use a plain extract for a "
            "fixed selection")
    return settings


def check_follow_args(*, every: int, poll: float) -> None:
    """``every`` >= 1 snapshots and ``poll`` > 0 seconds (InvalidArgumentError otherwise)."""
    check_int("every", every, 1)
    check_positive("poll", poll)
