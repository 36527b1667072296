"""The one typed error hierarchy of trajstore (store and pipeline alike).

Every error says what happened and what to do about it. Catch ``TrajstoreError`` to
catch them all; each also subclasses the closest builtin so idiomatic handlers work.
"""
from __future__ import annotations


class TrajstoreError(Exception):
    """Base class of every error trajstore raises on purpose."""


class NotAStoreError(TrajstoreError, FileNotFoundError):
    """The path does not hold a trajstore store."""


class FormatVersionError(TrajstoreError):
    """The store was written by a newer (or unknown) format version."""


class StoreLockedError(TrajstoreError):
    """Another live writer holds the store's lock."""

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}


class StaleLockError(StoreLockedError):
    """A lock left by a writer that is no longer running; pass ``break_lock=True`` to take it."""


class StoreExistsError(TrajstoreError, FileExistsError):
    """A store (or another run's snapshots) is already at that path; use a new path or ``overwrite=True``."""


class LayoutMismatchError(TrajstoreError, ValueError):
    """A snapshot or model does not match the store's parameter layout (names, shapes, length)."""


class InexactValuesError(LayoutMismatchError):
    """A snapshot holds values the store's dtype cannot represent exactly (it is never rounded silently)."""


class NonFiniteError(TrajstoreError, ValueError):
    """A snapshot holds NaN or Inf values."""


class SnapshotIndexError(TrajstoreError, IndexError):
    """A snapshot index outside the committed snapshots."""


class StoreChangedError(TrajstoreError):
    """The store was truncated or re-created while it was being read: the rows read may mix versions."""


class CorruptSnapshotError(TrajstoreError):
    """Stored bytes failed their checksum or could not be decoded."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class CorruptMetadataError(CorruptSnapshotError, ValueError):
    """A metadata document of the store (a ``zarr.json``, or the ``trajstore`` attributes in the root
    one) is unreadable or inconsistent with the rest of the store; the message names the file."""


class StoreWriteError(TrajstoreError, OSError):
    """The background writer failed (disk full, permission, ...); committed data is intact."""


class RankFailedError(TrajstoreError):
    """Another rank of a torch.distributed job failed in a collective store operation; the message
    quotes its error (a trajstore error of another rank is raised as its own type instead)."""


class InvalidArgumentError(TrajstoreError, ValueError):
    """An argument is out of range or inconsistent with the store's contents."""


class SubspaceExistsError(TrajstoreError, FileExistsError):
    """A subspace of that name already exists; pass ``overwrite=True`` to replace it."""


class SubspaceNotFoundError(TrajstoreError, KeyError):
    """No subspace of that name is stored."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class SubspaceChangedError(SubspaceNotFoundError):
    """The subspace was deleted or replaced (``extract --overwrite`` / ``--follow``) while it was being
    read, and kept changing over a few retries; load it again once that extraction has finished."""


class RepairError(TrajstoreError):
    """``trajstore repair`` could not bring the store to a consistent state; the store is unchanged."""


class LocalPathRequiredError(TrajstoreError, ValueError):
    """The operation needs a store on a local filesystem (it swaps directories); object stores cannot."""


class OutputExistsError(TrajstoreError, FileExistsError):
    """The output file already exists; choose another name or pass ``overwrite=True`` (``--overwrite``)."""


class MissingDependencyError(TrajstoreError, ImportError):
    """An optional dependency (an extra of the ``trajstore`` package) is not installed; the message
    gives the pip command that installs it."""
