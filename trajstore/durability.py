"""Durable mode: fsync a snapshot's files before its commit, and the commit after.

By default a store survives a killed process: every file is replaced atomically (temp file +
rename) and ``committed`` is written last, but the data may still sit in the page cache. A
power loss can then lose, or reorder, writes the kernel had not flushed. In durable mode the
writer makes the order hold on disk too:

1. fsync every file of the new row (shards, per-snapshot array chunks, array metadata) and the
   directories whose entries changed (a rename is a directory write);
2. write ``committed`` (the root ``zarr.json``, replaced by rename);
3. fsync the root ``zarr.json`` and the root directory.

Object stores acknowledge a PUT once it is durable, so there is nothing to add for them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .format import BUFFERS, METRICS, PARAMS, REFERENCE, ROW_ARRAYS, ROW_CHUNK


def fsync_paths(paths: Iterable[Path]) -> int:
    """fsync each existing file or directory once; returns how many were synced."""
    done = 0
    for path in dict.fromkeys(paths):  # ordered, without repeats
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
            done += 1
        finally:
            os.close(fd)
    return done


def row_files(root: Path, index: int, metric_names: Iterable[str]) -> list[Path]:
    """Every file and directory that writing snapshot ``index`` created or replaced, data first."""
    paths: list[Path] = []
    for name in (PARAMS, BUFFERS) + ((REFERENCE,) if index == 0 else ()):
        row_dir = root / name / "c" / str(0 if name == REFERENCE else index)
        if row_dir.is_dir():
            paths += sorted(row_dir.iterdir()) + [row_dir, row_dir.parent, root / name / "zarr.json", root / name]
    for name in ROW_ARRAYS:
        chunk = index // _row_chunk(root / name)
        paths += [root / name / "c" / str(chunk), root / name / "c", root / name / "zarr.json", root / name]
    for name in (f"{METRICS}/{m}" for m in metric_names):  # a new metric's backfill wrote earlier chunks too
        paths += [root / name / "c" / str(c) for c in range(index // _row_chunk(root / name) + 1)]
        paths += [root / name / "c", root / name / "zarr.json", root / name]
    paths += [root / METRICS]
    return paths


def _row_chunk(folder: Path) -> int:
    """Rows per chunk of the per-snapshot array in ``folder`` (its ``zarr.json``; ROW_CHUNK if unreadable)."""
    try:
        rows = json.loads((folder / "zarr.json").read_bytes())["chunk_grid"]["configuration"]["chunk_shape"][0]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return ROW_CHUNK
    return rows if isinstance(rows, int) and rows > 0 else ROW_CHUNK


def commit_files(root: Path) -> list[Path]:
    """What the commit replaced: the root ``zarr.json`` and, for its rename, the root directory."""
    return [root / "zarr.json", root]
