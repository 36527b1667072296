"""Check every extracted subspace of a store: its basis read whole against the digest its extraction recorded.

`trajstore verify` runs it after the snapshots (trajstore.inspect.verify knows nothing of subspaces).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from trajstore import TrajectoryStore
from trajstore.errors import TrajstoreError

from .subspace import SubspaceChangedError, SubspaceNotFoundError, list_subspaces, open_subspace


@dataclass
class SubspaceCheck:
    """What verifying one subspace found. ``ok``: its basis read back whole and finite, and equal to its recorded
    digest when it has one (``digest`` False: extracted before digests, so finiteness is all that was checked);
    ``problem``: what is wrong (damaged files, with the command that extracts it again; a digest from a newer
    version; an unfinished extraction); ``note``: neither (replaced while it was read: verify again).
    ``snapshots``: how many snapshots it was extracted from, and ``newer``: how many the store committed after
    the last of them (a subspace extracted before the recording went on does not span the rest)."""

    ok: bool
    digest: bool
    problem: str | None = None
    note: str | None = None
    snapshots: int | None = None
    newer: int = 0

    def to_json(self) -> dict:
        return {"ok": self.ok, "digest": self.digest, "problem": self.problem, "note": self.note,
                "snapshots": self.snapshots, "newer_snapshots": self.newer}


def verify_subspaces(path: "str | os.PathLike", storage_options: dict | None = None) -> dict[str, SubspaceCheck]:
    """Each subspace of the store (not ``extract --follow``'s staged next version) read whole, ~8 MiB at a time,
    and checked as :meth:`Subspace.read` checks it."""
    with TrajectoryStore.open(path, "r", storage_options=storage_options) as store:
        return {name: _check(store, name) for name in list_subspaces(store)}


def _check(store: TrajectoryStore, name: str) -> SubspaceCheck:
    has_digest = False
    try:
        sub = open_subspace(store, name)
        has_digest = sub.digest is not None
        sub.read(sink=lambda r0, rows: None)
        used = list(sub.snapshots)
        return SubspaceCheck(True, has_digest, snapshots=len(used), newer=len(store) - 1 - max(used) if used else 0)
    except SubspaceChangedError:
        return SubspaceCheck(False, has_digest, note="replaced while it was read (an extraction is writing it): run "
                             "verify again once it is done")
    except SubspaceNotFoundError as exc:
        return SubspaceCheck(False, has_digest, problem=f"unfinished: {exc}")
    except TrajstoreError as exc:  # typed: it says what to do
        return SubspaceCheck(False, has_digest, problem=str(exc))
    except Exception as exc:  # noqa: BLE001 -- unreadable metadata and the like, reported as it is
        return SubspaceCheck(False, has_digest, problem=f"cannot be read ({type(exc).__name__}: {exc})")
