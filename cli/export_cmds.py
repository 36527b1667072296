"""``trajstore export``: a snapshot, or a ``trajstore train`` run's final weights, to a state_dict file."""
from __future__ import annotations

import typer
from rich.markup import escape

from ._console import err, errors_to_exit, human_bytes, print_json

_SNAPSHOT_HELP = ("an index (0, 3; -1 is the last), step=N (the snapshot of training step N), or for a "
                  "`trajstore train` run directory final-METHOD (final-psgd, final-pbfgs, final-sgd: the weights "
                  "that method ended with)")


def export(run: str = typer.Argument(..., metavar="RUN",
                                     help="store path or URL, or a `trajstore train` run directory"),
           snapshot: str = typer.Argument(..., help=_SNAPSHOT_HELP, metavar="SNAPSHOT"),
           out: str = typer.Argument(..., help="file to write: .pt or .pth (torch.save), .safetensors (needs the "
                                     "safetensors package)", metavar="OUT"),
           overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
           json: bool = typer.Option(False, "--json", help="what was written, on stdout")) -> None:
    """Write a snapshot of RUN as a state_dict that model.load_state_dict accepts: original shapes and
    dtypes, tied tensors under each of their names, buffers when they were recorded. The file is
    written atomically; an existing OUT is kept unless --overwrite."""
    from pipeline.experiments.export import export as export_any

    with errors_to_exit():
        written = export_any(run, snapshot, out, overwrite=overwrite)
    if json:
        print_json(written.to_json())
        return
    what = f"snapshot {written.index} (step {written.step})" if written.index is not None else escape(snapshot)
    err.print(f"wrote {escape(written.out)}: {what}, {written.tensors} tensors, {human_bytes(written.bytes)}",
              highlight=False, soft_wrap=True)
    if written.buffers is False:
        err.print("[yellow]note:[/] the store records no buffers: for a model that has some (BN running "
                  "statistics), load it with model.load_state_dict(sd, strict=False) to keep the model's own",
                  highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    # a negative index (-1) is an argument, not an unknown option
    app.command("export", short_help="a snapshot or a run's final weights to .pt / .safetensors",
                context_settings={"ignore_unknown_options": True})(export)
