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
    version; an unfinished extraction); ``note``: neither (replaced while it was read: verify again), or with
    ``ok`` what to know (it does not span the snapshots committed after it).
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
        chosen = sub.attrs.get("snapshots_requested")  # a list is a fixed selection: nothing newer belongs to it
        rows = (range(len(store))[slice(*chosen["slice"])] if isinstance(chosen, dict) and chosen.get("slice")
                else [] if isinstance(chosen, list) else range(len(store)))
        newer = sum(1 for i in rows if used and i > max(used))  # committed since, and taken by its selection
        note = (f"was extracted from {len(used)} snapshots; the store has committed {newer} more since: "
                f"`{sub.extract_command()}` includes them") if newer else None
        return SubspaceCheck(True, has_digest, note=note, snapshots=len(used), newer=newer)
    except SubspaceChangedError:
        return SubspaceCheck(False, has_digest, note="replaced while it was read (an extraction is writing it): run "
                             "verify again once it is done")
    except SubspaceNotFoundError as exc:
        return SubspaceCheck(False, has_digest, problem=f"unfinished: {exc}")
    except TrajstoreError as exc:  # typed: it says what to do
        return SubspaceCheck(False, has_digest, problem=str(exc))
    except Exception as exc:  # noqa: BLE001 -- unreadable metadata and the like, reported as it is
        return SubspaceCheck(False, has_digest, problem=f"cannot be read ({type(exc).__name__}: {exc})")
