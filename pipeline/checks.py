"""Pure argument checks shared by the pipeline's entry points and the CLI.

Each raises :class:`~trajstore.errors.InvalidArgumentError` naming the argument as
``python_name (--cli-flag)``, what it got and what it accepts; nothing here touches a store.
``flag`` overrides the flag derived from the name (``""``: the argument has none).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable

from trajstore.errors import InvalidArgumentError


def _label(name: str, flag: str | None = None) -> str:
    flag = f"--{name.replace('_', '-')}" if flag is None else flag
    return f"{name} ({flag})" if flag else name


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int, *, flag: str | None = None) -> None:
    """``value`` is an integer ``>= minimum`` (None is left to the caller)."""
    if not _is_int(value) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InvalidArgumentError(f"{_label(name, flag)} must be {what}, got {value!r}")


def check_positive(name: str, value: object, *, flag: str | None = None) -> None:
    """``value`` is a finite number ``> 0``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise InvalidArgumentError(f"{_label(name, flag)} must be a finite number > 0, got {value!r}")


def check_fraction(name: str, value: object, *, zero_ok: bool = False, flag: str | None = None) -> None:
    """``value`` is in (0, 1], or in [0, 1] with ``zero_ok``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (0 <= value if zero_ok else 0 < value) and value <= 1
    if not ok:
        raise InvalidArgumentError(
            f"{_label(name, flag)} must be in {'[0, 1]' if zero_ok else '(0, 1]'}, got {value!r}")


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    """``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise InvalidArgumentError(f"{_label(name)} must be one of {', '.join(choices)}, got {value!r}")


def check_node_name(name: str, value: object) -> None:
    """``value`` can name a zarr node (a subspace): non-empty, no ``/``, not ``.``/``..``, no ``__`` prefix."""
    if not isinstance(value, str) or not value or "/" in value or value in (".", "..") or value.startswith("__") \
            or len(value) > 200 or not value.isprintable():
        raise InvalidArgumentError(
            f"{_label(name)} must be a plain name (no '/', not empty, '.' or '..', no leading '__', at most 200 "
            f"printable characters), got {value!r}")


_SCHEDULER_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")


def check_scheduler(address: object, *, flag: str | None = None) -> "tuple[str, str, int] | None":
    """``address`` is a dask.distributed scheduler address ``[PROTOCOL://]HOST:PORT`` (``inproc://...``
    is taken as it is); returns ``(protocol, host, port)``, or None for ``inproc``. Nothing is contacted."""
    label = _label("scheduler", flag)
    usage = f"{label} must be a dask.distributed scheduler address [tcp://]HOST:PORT, got {address!r}"
    if not isinstance(address, str) or not address.strip():
        raise InvalidArgumentError(usage)
    scheme, sep, rest = address.strip().partition("://")
    if not sep:
        scheme, rest = "tcp", address.strip()
    if scheme == "inproc" and rest:
        return None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^\s:/\[\]@]+):(\d{1,5})", rest.rstrip("/"))
    if scheme not in _SCHEDULER_SCHEMES or not m:
        raise InvalidArgumentError(usage)
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 1 <= int(port) <= 65535:
        raise InvalidArgumentError(f"{label}: port {port} of {address!r} is not in 1..65535")
    return scheme, host, int(port)


def check_output_file(name: str, path: "str | os.PathLike", *, flag: str | None = None) -> None:
    """``path`` can be written as a new or replaced file: its folder exists and it is not a folder itself."""
    target = Path(path)
    if target.is_dir():
        raise InvalidArgumentError(f"{_label(name, flag)} {str(target)!r} is a folder; give a file name in it")
    folder = target.parent
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "does not exist"
        raise InvalidArgumentError(f"{_label(name, flag)} {str(target)!r}: the folder {str(folder)!r} {why}; "
                                   "create it first or write the file elsewhere")


def selection_size(selection: "slice | list[int] | None", total: int | None) -> "int | None":
    """How many snapshots ``selection`` (from ``parse_snapshots``) picks out of ``total`` (None:
    not known yet): exact where ``total`` is known, else an upper bound where the selection itself
    bounds it (``A:B`` with A, B >= 0, a list), else None. InvalidArgumentError when it reaches
    beyond a known ``total``."""
    if selection is None:
        return total
    if isinstance(selection, slice):
        start, stop = selection.start, selection.stop
        if total is not None:
            if (start is not None and start >= total) or (stop is not None and stop > total):
                raise InvalidArgumentError(
                    f"snapshots (--snapshots) {start}:{stop} reach beyond the {total} snapshots the run records "
                    f"(0..{total - 1})")
            return len(range(total)[selection])
        if start is not None and start < 0 or stop is None or stop < 0:
            return None
        return len(range(start or 0, stop, selection.step or 1))
    rows = set(selection)
    if total is not None and max(rows) >= total:
        raise InvalidArgumentError(f"snapshots (--snapshots) {sorted(i for i in rows if i >= total)} are beyond "
                                   f"the {total} snapshots the run records (0..{total - 1})")
    return len(rows)
