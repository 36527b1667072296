"""Commands that run experiments: ``train`` and ``demo``."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ._choices import Baseline, Optimizer, values
from ._console import err, errors_to_exit, print_json


def _progress(quiet: bool):
    progress = Progress(TextColumn("[bold]{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=True, disable=quiet)
    tasks: dict[str, int] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            for old in tasks.values():
                progress.update(old, visible=False)
            tasks[label] = progress.add_task(label, total=total)
        progress.update(tasks[label], completed=done, total=total)

    return progress, update


def _recipes_from_cwd() -> None:
    """Let ``module:function`` recipes in the current directory import, as under ``python -m`` (the
    ``trajstore`` console script puts only its own folder on the path)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _subspace_lrs(optimizer: str, lr: float | None) -> dict:
    if lr is None:
        return {}
    return {"bfgs_lr": lr} if optimizer == "pbfgs" else {"subspace_lr": lr}


def train(recipe: str = typer.Argument(..., metavar="RECIPE",
                                      help="mnist1d-cnn, mnist1d-mlp, digits-mlp, gpt-tiny, gpt-small (byte-level "
                                      "GPT-2, needs transformers), or module:function"),
          run: Path = typer.Option(..., "--run", help="run directory (resumable)"),
          sample_epochs: int = typer.Option(15, "--sample-epochs", help="epochs of SGD that sample the trajectory"),
          sample_every: Optional[int] = typer.Option(
              None, "--sample-every", help="snapshot every N steps; default: one per epoch and the initial weights"),
          dim: Optional[int] = typer.Option(None, "--dim", help="subspace dimension d (default 15)"),
          variance: Optional[float] = typer.Option(
              None, "--variance", help="instead of --dim: the smallest d reaching this explained variance"),
          snapshots: Optional[str] = typer.Option(
              None, "--snapshots", help="the sampled snapshots to extract from: indices A:B or A:B:S; default: all"),
          subspace_epochs: int = typer.Option(10, "--subspace-epochs", help="epochs of training in the subspace"),
          optimizer: Optimizer = typer.Option(Optimizer.psgd, "--optimizer", help="psgd: P-SGD; pbfgs: P-BFGS"),
          lr: float = typer.Option(0.05, "--lr", help="SGD learning rate of the sampling phase"),
          subspace_lr: Optional[float] = typer.Option(
              None, "--subspace-lr", help="P-SGD learning rate (default 0.1) or P-BFGS initial step (default 1)"),
          batch_size: int = typer.Option(64, "--batch-size", help="mini-batch size"),
          seed: int = typer.Option(0, "--seed", help="seed of the model, the data order and the subspace runs"),
          label_noise: float = typer.Option(
              0.0, "--label-noise", help="fraction of training labels replaced by a random class"),
          device: str = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1, mps"),
          baseline: list[Baseline] = typer.Option(
              [Baseline.sgd], "--baseline", help="methods also run for comparison (repeatable); none: only "
              "--optimizer"),
          resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in --run"),
          json: bool = typer.Option(False, "--json", help="the methods' results on stdout")) -> None:
    """Sample with SGD, extract the DLDR subspace, train in it, evaluate each epoch; resumable."""
    from pipeline.experiments.runner import Run, RunConfig

    _recipes_from_cwd()
    optimizer, baseline = values(optimizer), values(baseline)
    with errors_to_exit():
        config = RunConfig(recipe=recipe, sample_epochs=sample_epochs, sample_every=sample_every,
                           dim=dim if (dim is not None or variance is not None) else 15, variance=variance,
                           snapshots=snapshots, subspace_epochs=subspace_epochs, optimizer=optimizer, lr=lr,
                           **_subspace_lrs(optimizer, subspace_lr), batch_size=batch_size, seed=seed,
                           label_noise=label_noise,
                           device=device, baselines=list(baseline))
        progress, update = _progress(json)
        job = Run(run, config, log=lambda s: progress.console.print(s, highlight=False), progress=update)  # validates
        with progress:
            report = job.execute(resume=resume)
    if json:
        print_json(report["methods"])
        return
    for m in report["methods"].values():
        err.print(f"{m['label']:>24}: final test acc {m['final_test_acc']:.2%} after {m['epochs']} epochs "
                  f"({m['seconds']:.1f} s)", highlight=False)
    err.print(f"report: {run / 'report.md'}")



def demo(out: Path = typer.Option(Path("trajstore-demo"), "--out", help="output directory (resumable)"),
         quick: bool = typer.Option(False, "--quick", help="3 seeds and fewer subspace epochs: about 30 s on 2 CPU "
                                    "cores (the full demo: about 1 minute)"),
         json: bool = typer.Option(False, "--json", help="the tables on stdout")) -> None:
    """The main job: DLDR vs full SGD vs a random subspace, and P-BFGS vs SGD, on MNIST-1D (5 seeds; --quick 3).

    Each seed's run directory (OUT/seed-S) holds its subspace `dldr` and final weights
    (`trajstore export OUT/seed-0 final-psgd model.safetensors`)."""
    from rich.table import Table

    from pipeline.experiments.demo import _pm, run_demo

    with errors_to_exit():
        progress, update = _progress(json)
        with progress:
            tables = run_demo(out, quick=quick, log=lambda s: progress.console.print(s, highlight=False),
                              progress=update)
    if json:
        print_json(tables)
        return
    a = Table(title=f"A. Dimension: {tables['recipe']}, test accuracy over {len(tables['seeds'])} seeds")
    for col in ("method", "dimension", "test accuracy (%)"):
        a.add_column(col, justify="left" if col == "method" else "right")
    for row in tables["A"]:
        a.add_row(row["method"], f"{row['dimension']:,}", _pm(row["test_acc"]))
    b = Table(title="B. Second order: accuracy and wall-clock time")
    for col in ("method", "test accuracy (%)", "wall-clock (s)"):
        b.add_column(col, justify="left" if col == "method" else "right")
    for row in tables["B"]:
        b.add_row(row["method"], _pm(row["test_acc"]), _pm(row["seconds"], 1.0, 1))
    err.print(a)
    err.print(b)
    err.print(f"tables: {out / 'demo.md'}; per-seed reports and plots: {out}/seed-*/report.md")


def register(app: typer.Typer) -> None:
    app.command("train", short_help="sample with SGD, extract, train in the subspace; resumable")(train)
    app.command("demo", short_help="the paper's two comparisons on MNIST-1D (the main job)")(demo)
