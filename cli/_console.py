"""Shared printing helpers: rich for people on stderr, JSON for programs on stdout."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from trajstore.errors import TrajstoreError

# emoji=False: a message holding ``:-1:`` (``--snapshots 3:-1:-1``) is printed as it is, not as an emoji
err = Console(stderr=True, emoji=False)
out = Console(emoji=False)


def print_json(obj: object) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=_default) + "\n")


def _default(o: object):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print ``error: message`` as one line on stderr (never wrapped, no markup, no emoji) and return the exit."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, emoji=False)
    return typer.Exit(code)


def note(message: str) -> None:
    """A notice from the library (a resumed or waiting extraction) as one yellow line on stderr."""
    err.print(f"[yellow]{escape(message)}[/]", highlight=False, soft_wrap=True, emoji=False)


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn trajstore errors into one clear line on stderr and exit code 2."""
    try:
        yield
    except (TrajstoreError, FileExistsError, FileNotFoundError, IndexError) as exc:
        raise fail(str(exc), 2) from None


@contextmanager
def progress_bar(description: str, quiet: bool = False):
    """A rich progress bar on stderr; yields ``update(done, total)``.

    The bar is drawn from the first ``update`` on: an error raised before the work starts
    (a bad argument, a locked store) is printed alone.
    """
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=False, disable=quiet)
    task = progress.add_task(description, total=None)
    started = False

    def update(done: int, total: int) -> None:
        nonlocal started
        if not started:
            progress.start()
            started = True
        progress.update(task, completed=done, total=total)

    try:
        yield update
    finally:
        if started:
            progress.stop()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
