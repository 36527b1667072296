"""Pure argument checks shared by the pipeline's entry points and the CLI.

Each raises :class:`~trajstore.errors.InvalidArgumentError` naming the argument as
``python_name (--cli-flag)``, what it got and what it accepts; nothing here touches a store.
``flag`` overrides the flag derived from the name (``""``: the argument has none).
"""
from __future__ import annotations

import math
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
