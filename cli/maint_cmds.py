"""Maintenance commands: ``repair`` (back to a consistent store) and ``gc`` (orphans, stale caches)."""
from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from trajstore import maintenance

from ._console import err, errors_to_exit, human_bytes, print_json, progress_bar

_BREAK_LOCK = "take over an object store's writer lock left behind by a killed writer"


def repair(run: str = typer.Argument(..., metavar="RUN", help="store path or URL"),
           dry_run: bool = typer.Option(False, "--dry-run", help="only print the plan; change nothing"),
           drop_bad_only: bool = typer.Option(
               False, "--drop-bad-only",
               help="drop only the bad snapshots and move the later good ones down (local stores; rebuilds the "
                    "store beside itself and swaps it in atomically; subspaces and the Gram cache are not kept)"),
           break_lock: bool = typer.Option(False, "--break-lock", help=_BREAK_LOCK),
           json: bool = typer.Option(False, "--json", help="machine-readable report on stdout")) -> None:
    """Bring RUN to its largest consistent committed prefix, printing every snapshot it drops and why.

    Exit 0 when the store is (now) consistent, 1 when a dry run found it damaged, 2 on an error.
    """
    with errors_to_exit(), progress_bar("checking", quiet=json) as update:
        report = maintenance.repair(run, dry_run=dry_run, drop_bad_only=drop_bad_only, break_lock=break_lock,
                                    progress=update)
    if json:
        print_json(report.to_json())
    else:
        _print_repair(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_repair(report: maintenance.RepairReport) -> None:
    for note in report.notes:
        err.print(f"[yellow]note:[/] {escape(str(note))}", highlight=False, soft_wrap=True)
    for item in report.leftovers:
        verb = "found" if report.dry_run else "removed"
        err.print(f"[yellow]{verb} leftover[/] {escape(str(item.path))} ({human_bytes(item.bytes)}): "
                  f"{escape(str(item.reason))}", highlight=False)
    for problem in report.store_problems:
        err.print(f"[red]store:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    if report.action == "none":
        err.print(f"[green]ok[/]: {report.committed_before} snapshots, all consistent; nothing to repair")
        return
    if report.dropped:
        table = Table(title="snapshots to drop" if report.dry_run else "snapshots dropped", title_justify="left")
        for col in ("index", "step", "status", "why"):
            table.add_column(col, overflow="fold")
        for note in report.dropped:
            table.add_row(str(note.index), "?" if note.step is None else str(note.step),
                          "[red]bad[/]" if note.bad else "[yellow]good[/]", escape("; ".join(note.reasons)))
        err.print(table)
    if report.moved:
        moves = ", ".join(f"{m.index}->{m.new_index} (step {m.step})" for m in report.moved)
        err.print(f"good snapshots {'to keep and move' if report.dry_run else 'kept and moved'} down: {moves}",
                  highlight=False)
    for node in report.derived_discarded:
        err.print(f"[yellow]{'would not be' if report.dry_run else 'not'} carried over:[/] {escape(str(node))} "
                  "(re-extract after the repair)", highlight=False)
    how = ("rebuilt without the bad snapshots" if report.action == "compact"
           else f"truncated to the first bad snapshot {report.committed_after}")
    if report.dry_run:
        err.print(f"[bold]dry run[/]: nothing changed. The store would be {how}: committed "
                  f"{report.committed_before} -> {report.committed_after}", highlight=False)
    else:
        err.print(f"[green]repaired[/]: {how}; committed {report.committed_before} -> {report.committed_after}",
                  highlight=False)


def gc(run: str = typer.Argument(..., metavar="RUN", help="store path or URL"),
       subspace: str = typer.Option(None, "--subspace", help="also remove this subspace (complete or not)"),
       incomplete: bool = typer.Option(False, "--incomplete", help="also remove every unfinished subspace"),
       dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be removed"),
       break_lock: bool = typer.Option(False, "--break-lock", help=_BREAK_LOCK),
       json: bool = typer.Option(False, "--json", help="machine-readable report on stdout")) -> None:
    """Remove orphaned files (rows beyond committed, zarr temp files, repair leftovers) and stale caches."""
    with errors_to_exit():
        report = maintenance.gc(run, subspace=subspace, incomplete=incomplete, dry_run=dry_run, break_lock=break_lock)
    if json:
        print_json(report.to_json())
        return
    for note in report.notes:
        err.print(f"[yellow]note:[/] {escape(str(note))}", highlight=False, soft_wrap=True)
    if report.removed:
        table = Table(title="would remove" if dry_run else "removed", title_justify="left")
        for col in ("path", "size", "why"):
            table.add_column(col, overflow="fold")
        for item in report.removed:
            table.add_row(escape(str(item.path)), human_bytes(item.bytes), escape(str(item.reason)))
        err.print(table)
    for kept in report.kept:
        err.print(f"[cyan]kept:[/] {escape(str(kept))}", highlight=False, soft_wrap=True)
    freed = human_bytes(report.bytes_freed)
    err.print(f"[bold]dry run[/]: would free {freed}" if dry_run else f"[green]freed[/] {freed}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("repair", short_help="back to the largest consistent committed prefix")(repair)
    app.command("gc", short_help="remove orphaned files, temporary files and stale caches")(gc)
