"""Check every extracted subspace of a store: its basis read whole against the digest its extraction recorded.

`trajstore verify` runs it after the snapshots (trajstore.inspect.verify knows nothing of subspaces).
"""
from __future__ import annotations

import os

from trajstore import TrajectoryStore
from trajstore.errors import TrajstoreError

from .subspace import SubspaceChangedError, SubspaceNotFoundError, list_subspaces, open_subspace


def verify_subspaces(path: "str | os.PathLike", storage_options: dict | None = None) -> dict[str, str | None]:
    """``{name: None}`` for each subspace whose basis reads back whole, finite and equal to its recorded digest,
    ``{name: what is wrong}`` for the others: damaged files (with the command that extracts it again), a digest
    from a newer version, or an extraction still running or killed (unfinished). Reads P in blocks of ~8 MiB."""
    store = TrajectoryStore.open(path, "r", storage_options=storage_options)
    found: dict[str, str | None] = {}
    for name in list_subspaces(store):  # (not extract --follow's next version, staged under another name)
        try:
            open_subspace(store, name).read(sink=lambda r0, rows: None)
            found[name] = None
        except SubspaceChangedError:
            found[name] = "replaced while it was read (an extraction is writing it): run verify again once it is done"
        except SubspaceNotFoundError as exc:
            found[name] = f"unfinished: {exc}"
        except TrajstoreError as exc:  # CorruptSnapshotError, FormatVersionError, NonFiniteError
            found[name] = str(exc)
    return found
