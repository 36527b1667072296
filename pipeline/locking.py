"""The locks of an extraction: extractions into different subspace names run side by side.

On a local store (flock) an extraction holds, from its first check to its last write:

1. the derived-data lock ``.trajstore.derived.lock``, *shared*. gc, repair, re-creating the store
   and ``store.derived()`` take it exclusively, so they never delete or swap ``gram/`` or a
   subspace under a running extraction (they are refused and told which extractions run);
2. its subspace's lock (:func:`~trajstore.lock.subspace_lock_name`), exclusive: one extraction per
   name, as only it creates, resumes, deletes and writes ``subspaces/<name>/``;

and, only while it brings the shared Gram cache ``gram/`` up to date and reads it (or creates the
``subspaces/`` group itself), 3. the Gram lock, exclusive. A second extraction that needs it
*waits* (saying for whom), then finds the cache current and reuses it: the Gram pass is never
run twice at once, and the basis passes, each writing only its own subspace, run concurrently.
The order is always 1, 2, 3 and the Gram lock is never held while waiting for another, so
there is no deadlock.

Object stores have no shared locks: there the derived-data lock is exclusive (one extraction at a
time) and the other two are not needed.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import zarr

from trajstore import TrajectoryStore
from trajstore.errors import StoreLockedError
from trajstore.format import DERIVED_LOCK_NAME, zarr_store
from trajstore.holders import describe_holder, is_this_process
from trajstore.lock import GRAM_LOCK_NAME, WriterLock, subspace_lock_name

from .compute import Interrupted, StopFlag

POLL_S = 0.2  # seconds between tries for a Gram lock held by another extraction


class DerivedAccess:
    """Write access to derived data for one extraction: ``root`` (the writable root group) and
    :meth:`gram` (the critical section around the shared Gram cache)."""

    def __init__(self, store: TrajectoryStore, root: zarr.Group, purpose: str, local: bool,
                 stop: StopFlag | None, log: Callable[[str], None] | None):
        self.store, self.root, self._purpose, self._local = store, root, purpose, local
        self._stop, self._log = stop, log

    @contextlib.contextmanager
    def gram(self) -> Iterator[zarr.Group]:
        """Hold the Gram lock (waiting for another process's Gram pass to end); yields ``root``."""
        if not self._local:  # the exclusive derived-data lock already covers gram/
            yield self.root
            return
        lock = WriterLock(self.store.path, GRAM_LOCK_NAME, purpose=f"the Gram pass of {self._purpose}",
                          what=f"the Gram cache (gram/) of store {self.store.path}")
        told = False
        while True:
            try:
                lock.acquire()
                break
            except StoreLockedError as exc:
                if is_this_process(exc.holder):
                    raise  # never wait on ourselves
                if self._stop:
                    raise Interrupted from None
                if not told and self._log:
                    who = (f"{describe_holder(exc.holder)}, {exc.holder.get('purpose')}" if exc.holder.get("pid")
                           else "another extraction")  # its record is not written yet
                    self._log(f"waiting for the Gram pass of {who} to finish; its cached Gram will be reused")
                    told = True
                time.sleep(POLL_S)
        with lock.held():
            yield self.root


@contextlib.contextmanager
def extraction_access(store: TrajectoryStore, name: str | None, *, break_lock: bool = False,
                      stop: StopFlag | None = None,
                      log: Callable[[str], None] | None = None) -> Iterator[DerivedAccess]:
    """The locks of an extraction into subspace ``name`` (None: a Gram update only), held for the block.

    Raises StoreLockedError naming the holder when gc or repair runs, or (``name``) when another
    extraction writes the same subspace; see the module docstring.
    """
    purpose = f"an extraction into subspace {name!r}" if name is not None else "a Gram update (extract --follow)"
    derived = WriterLock(store.path, DERIVED_LOCK_NAME, break_lock=break_lock,
                         storage_options=store.storage_options, purpose=purpose, shared=True)
    local = not derived.remote
    with contextlib.ExitStack() as held:
        held.enter_context(derived.acquire().held())
        if local and name is not None:
            own = WriterLock(store.path, subspace_lock_name(name), purpose=purpose,
                             what=f"subspace {name!r} of store {store.path}")
            held.enter_context(own.acquire().held())
        root = zarr.open_group(zarr_store(store.path, False, store.storage_options), mode="r+")
        yield DerivedAccess(store, root, purpose, local, stop, log)
