"""Commands over the store: ``info``, ``verify``, ``import``.

``info`` and ``verify`` load neither torch nor dask: ``import`` imports its machinery when it runs.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from trajstore import inspect
from trajstore.errors import InvalidArgumentError

from ._console import err, errors_to_exit, human_bytes, out, print_json, progress_bar
from .run_cmds import _recipes_from_cwd


def info(run: str = typer.Argument(..., metavar="RUN", help="store path or URL"),
         json: bool = typer.Option(False, "--json", help="machine-readable output on stdout")) -> None:
    """Snapshots, parameters, steps, the trajectory's own bytes and compression ratio, derived data
    (Gram cache, subspaces, temporary files) apart, codec and format version of RUN."""
    with errors_to_exit():
        data = inspect.info(run)
    if json:
        print_json(data)
        return
    out.print(_info_table(data))


def _info_table(data: dict) -> Table:
    table = Table(show_header=False, title=escape(f"trajstore {data['path']}"))
    steps = data["steps"]
    step_text = (f"{data['first_step']} .. {data['last_step']}" if steps else "none")
    derived = data["derived_bytes"]
    per = ", ".join(f"{name} {human_bytes(derived['per_subspace'].get(name, 0))}" for name in data["subspaces"])
    rows = [
        ("snapshots", str(data["snapshots"])),
        ("parameters", f"{data['parameters']:,} in {data['tensors']} tensors"),
        ("steps", step_text),
        ("stored (trajectory)", f"{human_bytes(data['stored_bytes'])} (snapshots "
                                f"{human_bytes(data['snapshot_bytes'])})"),
        ("raw", human_bytes(data["raw_bytes"])),
        ("compression", f"{data['compression_ratio']:.3f}x (raw / snapshots)" if data["compression_ratio"] else "-"),
        ("gram cache", human_bytes(derived["gram"])),
        ("subspaces", human_bytes(derived["subspaces"]) + (f" ({per})" if per else "")),
        ("landscapes", human_bytes(derived.get("landscapes", 0))),
        ("temporary", human_bytes(derived["temporary"]) + (" (`trajstore gc` frees it)" if derived["temporary"]
                                                           else "")),
        ("total on disk", human_bytes(data["total_bytes"])),
        ("codec", data["codec"] if data["lossless"] and "lossless" in data["codec"]
         else f"{data['codec']} ({'lossless' if data['lossless'] else 'lossy: ' + data['error_bound']})"),
        ("chunk codecs", data.get("chunk_codecs", {}).get("params", "")),
        ("dtype", data["dtype"] + (f" (widened: {data['widened']})" if data.get("widened") else "")),
        ("optimizer state", (f"{human_bytes(data['optimizer_state']['bytes'])} of the stored bytes ("
                             f"{', '.join(data['optimizer_state']['keys']) or 'no state yet'})")
         if data.get("optimizer_state") else "not recorded"),
        ("format version", str(data["format_version"])),
        ("metrics", ", ".join(data["metrics"]) or "-"),
    ]
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def verify(run: str = typer.Argument(..., metavar="RUN", help="store path or URL"),
           json: bool = typer.Option(False, "--json", help="machine-readable report on stdout")) -> None:
    """Read every chunk; check checksums, finiteness and the committed count; then read each extracted
    subspace's basis against its recorded digest. Exit 1 naming bad snapshots or subspaces.

    The findings go to stdout; the progress bar and the final failure line to stderr."""
    with errors_to_exit(), progress_bar("verifying", quiet=json) as update:
        report = inspect.verify(run, progress=update)
    subspaces: dict = {}
    with errors_to_exit():
        if report.ok and inspect.subspace_names(run):  # (a store with bad snapshots: fix those first)
            from pipeline.verify import verify_subspaces  # (imports torch and dask: only when there is one)

            subspaces = verify_subspaces(run)
    bad_subspaces = sorted(name for name, check in subspaces.items() if check.problem is not None)
    if json:
        print_json({**report.to_json(), "ok": report.ok and not bad_subspaces,
                    "subspaces": {name: check.to_json() for name, check in subspaces.items()}})
    else:
        for problem in report.store_problems:
            out.print(f"[red]store:[/] {escape(problem)}", highlight=False, soft_wrap=True)
        for note in report.notes:
            out.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
        for index, problems in sorted(report.problems.items()):
            out.print(f"[red]snapshot {index}:[/] {escape('; '.join(problems))}", highlight=False, soft_wrap=True)
        if report.ok:
            out.print(f"[green]ok[/]: {report.snapshots} snapshots verified")
        for name, check in subspaces.items():
            if check.note is not None:
                out.print(f"[yellow]note:[/] subspace {escape(name)} {escape(check.note)}", highlight=False,
                          soft_wrap=True)
            if check.ok and check.digest:
                out.print(f"[green]ok[/]: subspace {escape(name)} (its basis matches the digest its extraction recorded)",
                          highlight=False)
            elif check.ok:
                out.print(f"[green]ok[/]: subspace {escape(name)} [yellow](no digest recorded: extracted before "
                          "digests, so only read whole and found finite)[/]", highlight=False)
            elif check.problem is not None:
                out.print(f"[red]subspace {escape(name)}:[/] {escape(check.problem)}", highlight=False, soft_wrap=True)
    if not report.ok:
        bad = ", ".join(str(i) for i in sorted(report.problems))
        err.print(f"[bold red]verify failed[/]: bad snapshots: {bad or 'none'}", highlight=False)
        raise typer.Exit(1)
    if bad_subspaces:
        err.print(f"[bold red]verify failed[/]: bad subspaces: {', '.join(bad_subspaces)}", highlight=False)
        raise typer.Exit(1)


def import_(folder: Path = typer.Argument(..., metavar="FOLDER", exists=True, file_okay=False,
                                          help="folder of checkpoints"),
            run: str = typer.Argument(..., metavar="RUN", help="new store path or URL"),
            pattern: Optional[str] = typer.Option(
                None, "--pattern", help="glob of checkpoint files or DCP folders, e.g. '*.safetensors', 'step_*'; "
                "default: '*.pt', else the DCP checkpoint folders (holding .metadata) in FOLDER"),
            codec: str = typer.Option(
                "lossless", "--codec", help="lossless, xor-delta[:K] (lossless), bitround-delta[:k], float16-delta"),
            overwrite: bool = typer.Option(False, "--overwrite", help="replace a store already at RUN"),
            resume: bool = typer.Option(False, "--resume", help="continue an interrupted import into RUN"),
            like: Optional[str] = typer.Option(
                None, "--like", help="take the parameters (tied weights once, buffers apart) from a STORE of the "
                "same model, or from the model a recipe builds (digits-mlp, module:function, as for train)"),
            steps: Optional[str] = typer.Option(
                None, "--steps", help="the files' steps, one per file in natural order (0,100,200), or 'position' "
                "(0, 1, 2, ...); default: trainer_state.json, else the step the file names label (step100, "
                "checkpoint-100, iter_100, epoch=3) or their only number"),
            key: Optional[str] = typer.Option(
                None, "--key", help="where the model's weights are in a nested state dict: the tensors under this "
                "dotted prefix (model, app.model); default for DCP: 'model', else the top level"),
            json: bool = typer.Option(False, "--json", help="the new store's info on stdout")) -> None:
    """Convert a folder of state_dicts (natural order of their paths; HF checkpoint-*/ folders and
    torch.distributed.checkpoint folders too) into a store."""
    from trajstore.importers import import_checkpoints

    _recipes_from_cwd()
    with errors_to_exit():
        given = _steps(steps)
    with errors_to_exit(), progress_bar("importing", quiet=json) as update:
        import_checkpoints(folder, run, pattern, like=_like(like), codec=codec, overwrite=overwrite, resume=resume,
                           steps=given, key=key, progress=update)
    with errors_to_exit():
        data = inspect.info(run)
    if json:
        print_json(data)
    else:
        err.print(f"imported {data['snapshots']} snapshots of {data['parameters']:,} parameters into {data['path']}")


def _steps(value: str | None) -> "list[int] | str | None":
    """``--steps``: ``position`` or a comma-separated list of steps."""
    if value is None or value.strip() == "position":
        return None if value is None else "position"
    try:
        return [int(s) for s in value.split(",")]
    except ValueError:
        raise InvalidArgumentError(f"steps (--steps) must be 'position' or integers separated by commas "
                                   f"(0,100,200), got {value!r}") from None


def _like(value: str | None) -> object:
    """``--like``: a recipe name or ``module:function`` builds the model; anything else is a store path or URL."""
    if value is None or Path(value).exists():
        return value
    from pipeline.experiments.recipes import BUILTIN, build_recipe

    if value in BUILTIN or re.fullmatch(r"[\w.]+:\w+", value):
        return build_recipe(value, seed=0, batch_size=64).model
    return value


def register(app: typer.Typer) -> None:
    app.command("info", short_help="snapshots, steps, sizes and compression of a store")(info)
    app.command("verify", short_help="read every chunk; exit 1 naming bad snapshots")(verify)
    app.command("import", short_help="a folder of checkpoints (.pt, .safetensors, DCP) into a store")(import_)
