"""The basis digest taken while the basis pass runs: P read back block by block as each task finishes."""
from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import zarr

from trajstore import TrajectoryStore
from trajstore.errors import NonFiniteError

from .subspace import BasisDigest


class ReadBackDigest:
    """:func:`~pipeline.subspace_write.digest_of` (P read back in row order; NaN or Inf, a block never written,
    refused) computed while the basis pass runs: a thread reads each block back as soon as its task has
    finished and hashes the blocks in row order, instead of one serial pass over P at the end."""

    def __init__(self, basis: zarr.Array, blocks: Sequence[tuple[int, int]], done: np.ndarray, name: str,
                 store: TrajectoryStore) -> None:
        self._basis, self._blocks, self._name, self._path = basis, list(blocks), name, store.path
        self._ready = [threading.Event() for _ in self._blocks]
        for b in np.flatnonzero(done):  # written by an earlier, interrupted run
            self._ready[b].set()
        self._cancelled = False
        self._hexdigest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="basis-digest", daemon=True)
        self._thread.start()

    def finished(self, block: int) -> None:
        """Block ``block``'s task has written its rows of P."""
        self._ready[block].set()

    def _run(self) -> None:
        digest = BasisDigest()
        try:
            for b, (r0, r1) in enumerate(self._blocks):
                self._ready[b].wait()
                if self._cancelled:
                    return
                rows = self._basis[r0:r1, :]  # (r1 - r0, d) float32, as stored
                if not np.isfinite(rows).all():
                    raise NonFiniteError(
                        f"the basis written for subspace {self._name!r} of {self._path} holds NaN or Inf in rows "
                        f"{r0}..{r1 - 1} (a lost write?); extract it again with overwrite=True (--overwrite)")
                digest.update(rows)
            self._hexdigest = digest.hexdigest()
        except BaseException as exc:  # noqa: BLE001 (raised in the caller's thread by result())
            self._error = exc

    def result(self) -> str:
        """The digest, once every block is read back (raises what reading them raised)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hexdigest

    def cancel(self) -> None:
        """Stop reading (the pass failed or was stopped)."""
        self._cancelled = True
        for event in self._ready:
            event.set()
        self._thread.join()
