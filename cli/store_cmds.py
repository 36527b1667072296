"""Commands over the store: ``info``, ``verify``, ``import``."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from trajstore import inspect
from trajstore.errors import InvalidArgumentError
from trajstore.importers import import_checkpoints

from ._console import err, errors_to_exit, human_bytes, print_json, progress_bar
from .run_cmds import _recipes_from_cwd


def info(run: str = typer.Argument(..., help="store path or URL"),
         json: bool = typer.Option(False, "--json", help="machine-readable output on stdout")) -> None:
    """Snapshots, parameters, steps, sizes, compression ratio, codec and format version of RUN."""
    with errors_to_exit():
        data = inspect.info(run)
    if json:
        print_json(data)
        return
    table = Table(show_header=False, title=f"trajstore {data['path']}")
    steps = data["steps"]
    step_text = (f"{data['first_step']} .. {data['last_step']}" if steps else "none")
    rows = [
        ("snapshots", str(data["snapshots"])),
        ("parameters", f"{data['parameters']:,} in {data['tensors']} tensors"),
        ("steps", step_text),
        ("stored", human_bytes(data["stored_bytes"])),
        ("raw", human_bytes(data["raw_bytes"])),
        ("compression", f"{data['compression_ratio']:.3f}x" if data["compression_ratio"] else "-"),
        ("codec", f"{data['codec']} ({'lossless' if data['lossless'] else 'lossy: ' + data['error_bound']})"),
        ("dtype", data["dtype"]),
        ("format version", str(data["format_version"])),
        ("metrics", ", ".join(data["metrics"]) or "-"),
        ("subspaces", ", ".join(data["subspaces"]) or "-"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    err.print(table)


def verify(run: str = typer.Argument(..., help="store path or URL"),
           json: bool = typer.Option(False, "--json")) -> None:
    """Read every chunk; check checksums, finiteness and the committed count. Exit 1 naming bad snapshots."""
    with errors_to_exit(), progress_bar("verifying", quiet=json) as update:
        report = inspect.verify(run, progress=update)
    if json:
        print_json(report.to_json())
    else:
        for problem in report.store_problems:
            err.print(f"[red]store:[/] {escape(problem)}", highlight=False)
        for note in report.notes:
            err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        for index, problems in sorted(report.problems.items()):
            err.print(f"[red]snapshot {index}:[/] {escape('; '.join(problems))}", highlight=False)
        if report.ok:
            err.print(f"[green]ok[/]: {report.snapshots} snapshots verified")
    if not report.ok:
        bad = ", ".join(str(i) for i in sorted(report.problems))
        err.print(f"[bold red]verify failed[/]: bad snapshots: {bad or 'none'}", highlight=False)
        raise typer.Exit(1)


def import_(folder: Path = typer.Argument(..., exists=True, file_okay=False, help="folder of checkpoints"),
            run: str = typer.Argument(..., help="new store path or URL"),
            pattern: Optional[str] = typer.Option(
                None, "--pattern", help="glob of checkpoint files or DCP folders, e.g. '*.safetensors', 'step_*'; "
                "default: '*.pt', else the DCP checkpoint folders (holding .metadata) in FOLDER"),
            codec: str = typer.Option("lossless", "--codec"),
            overwrite: bool = typer.Option(False, "--overwrite"),
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
            json: bool = typer.Option(False, "--json")) -> None:
    """Convert a folder of state_dicts (natural order of their paths; HF checkpoint-*/ folders and
    torch.distributed.checkpoint folders too) into a store."""
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
    app.command("info")(info)
    app.command("verify")(verify)
    app.command("import")(import_)
