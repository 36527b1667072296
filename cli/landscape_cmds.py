"""``trajstore landscape``: loss and accuracy contours in the plane of the first two principal directions."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from ._console import err, errors_to_exit, fail, note, print_json, progress_bar

class DataSet(str, Enum):
    """``landscape --data``: which of the recipe's loaders the cells are evaluated on."""

    train = "train"
    test = "test"


_SPAN_HELP = ("grid extent along u1, u2 in parameter-space distance: S (a, b in [-S, S]), A0:A1 (both axes) or "
              "A0:A1,B0:B1 (write --span=-1:2,-1:1); default: the projected trajectory and P-SGD path with a 25% "
              "margin")


def landscape(run: str = typer.Argument(..., metavar="RUN",
                                        help="store path or URL, or a `trajstore train` run directory"),
              recipe: Optional[str] = typer.Option(
                  None, "--recipe", help="the model, data and loss: a built-in recipe (digits-mlp, mnist1d-cnn, mnist1d-mlp, gpt-tiny, "
                  "gpt-small) or module:function; default for a run directory: its own"),
              plot: Path = typer.Option(..., "--plot", help="PNG file to write"),
              name: Optional[str] = typer.Option(
                  None, "--name", help="subspace to read; default: the store's only subspace (several: name one)"),
              grid: int = typer.Option(41, "--grid", help="points per axis (3 to 501): grid x grid forward passes"),
              span: Optional[str] = typer.Option(None, "--span", help=_SPAN_HELP, metavar="SPAN"),
              snapshot: str = typer.Option("-1", "--snapshot", help="centre: a snapshot index (-1 is the last) or "
                                           "step=N"),
              data: DataSet = typer.Option(DataSet.train, "--data", help="evaluation set: the recipe's train "
                                           "loader (its first batches in the seed's order) or its test loader"),
              batches: int = typer.Option(8, "--batches", help="evaluate on the first N batches of that loader"),
              all_batches: bool = typer.Option(False, "--all-batches", help="evaluate on the whole loader"),
              batch_size: int = typer.Option(256, "--batch-size", help="batch size the recipe is built with (its train "
                                            "loader's; a recipe's test loader may keep its own)"),
              seed: Optional[int] = typer.Option(
                  None, "--seed", help="recipe seed (the train subset's order); default 0, or a run directory's"),
              path: List[str] = typer.Option([], "--path", metavar="STORE", help="a store of the same model recorded during subspace "
                                             "training (P-SGD): its snapshots are overlaid; repeatable"),
              device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or mps"),
              threads: Optional[int] = typer.Option(
                  None, "--threads", help="torch CPU threads while evaluating; default: torch's. 1 is often "
                  "fastest for small models on a busy machine"),
              json: bool = typer.Option(False, "--json", help="axes, loss, accuracy, projections and errors on stdout")
              ) -> None:
    """Loss and accuracy contours around a snapshot in the plane of the first two principal directions
    (u1, u2 of the subspace), with the trajectory, the P-SGD / P-BFGS paths (a run directory's paths/*.zarr, one
    point per epoch; older runs: start -> final segment; or --path)
    and each snapshot's projection error. Cells are cached in RUN/landscapes/: a rerun, or a run killed
    midway, evaluates only what is missing."""
    from pipeline.checks import check_int, check_output_file
    from pipeline.compute import Interrupted
    from pipeline.landscape import check_landscape_args, compute_landscape
    from pipeline.experiments.runner import check_device
    from pipeline.landscape_plot import landscape_plot

    from .extract_cmds import _plot_errors, stop_on_signals
    from .run_cmds import _recipes_from_cwd

    _recipes_from_cwd()  # a module:function recipe in the current directory imports, as for train

    data = data.value
    with errors_to_exit():  # every argument, before any work or progress display
        check_output_file("plot", plot)
        check_landscape_args(grid=grid, span=span, data=data, batches=batches, batch_size=batch_size)
        check_device(device)
        if threads is not None:
            check_int("threads", threads, 1)
    with errors_to_exit(), stop_on_signals() as stop, progress_bar("landscape", quiet=json) as update:
        try:
            land = compute_landscape(run, recipe, name=name, snapshot=snapshot, grid=grid, span=span, data=data,
                                     batches=None if all_batches else batches, batch_size=batch_size, seed=seed,
                                     device=device, threads=threads, paths=path, progress=update, stop=stop, log=note)
        except Interrupted:
            raise fail("interrupted; the finished rows are kept in the store: rerun the same command to resume", 130)
    with _plot_errors(plot):
        landscape_plot(land, plot)
    if json:
        print_json({**land.to_json(), "plot": str(plot)})
        return
    done = f"{land.evaluated} cells evaluated, {land.reused} reused from {land.store}/landscapes/{land.key}"
    err.print(f"wrote {escape(str(plot))}: {len(land.a)} x {len(land.b)} grid around snapshot {land.plane.snapshot}; "
              f"{escape(done)}; largest relative residual of a snapshot: "
              f"{land.trajectory.relative_residual.max():.1%}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("landscape", short_help="loss and accuracy contours on the plane of the first two directions")(
        landscape)
