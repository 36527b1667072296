"""``trajstore demo``: the paper's two headline comparisons, scaled down to MNIST-1D on a laptop CPU.

A. Dimension: full-space SGD (all n parameters) vs a random d-dim subspace (Li et al. 2018)
   vs DLDR P-SGD in d dims extracted from the first k epochs; test accuracy mean ± std over seeds.
B. Second order: SGD for E = k + m epochs vs P-BFGS after the same k sampling epochs plus a
   few subspace epochs; accuracy and wall-clock time (sampling and extraction included).

Each seed is one resumable run directory (``OUT/seed-S``); rerunning the demo resumes.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .runner import Run, RunConfig


@dataclass
class DemoSettings:
    recipe: str = "mnist1d-cnn"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    sample_epochs: int = 15
    subspace_epochs: int = 15
    bfgs_epochs: int = 3
    dim: int = 15
    lr: float = 0.05
    subspace_lr: float = 0.1


QUICK = DemoSettings(seeds=(0, 1, 2), sample_epochs=16, subspace_epochs=6, bfgs_epochs=2)


def run_demo(out: "str | os.PathLike", quick: bool = False, log: Callable[[str], None] = print,
             progress: Callable[[str, int, int], None] | None = None, settings: DemoSettings | None = None) -> dict:
    """Run (or resume) every seed, then write ``OUT/demo.json`` and ``OUT/demo.md``; returns the tables."""
    s = settings or (QUICK if quick else DemoSettings())
    out = Path(out)
    reports = {}
    for seed in s.seeds:
        config = RunConfig(recipe=s.recipe, sample_epochs=s.sample_epochs, dim=s.dim, subspace_epochs=s.subspace_epochs,
                           optimizer="psgd", lr=s.lr, subspace_lr=s.subspace_lr, seed=seed,
                           baselines=["sgd", "random-subspace", "pbfgs"], bfgs_epochs=s.bfgs_epochs)
        log(f"seed {seed}: run directory {out / f'seed-{seed}'}")
        reports[seed] = Run(out / f"seed-{seed}", config, log=log, progress=progress).execute(resume=True)
    tables = build_tables(reports, s)
    (out / "demo.json").write_text(json.dumps(tables, indent=2))
    (out / "demo.md").write_text(tables_markdown(tables))
    return tables


def _stats(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def build_tables(reports: dict, s: DemoSettings) -> dict:
    """Table A (dimension) and Table B (second order) from the per-seed reports."""
    any_report = next(iter(reports.values()))
    n_params = int(any_report["subspace"]["n_params"])

    def acc(method):
        return _stats([r["methods"][method]["final_test_acc"] for r in reports.values()])

    def seconds(*methods):
        return _stats([sum(r["timing"].get(m, 0.0) for m in methods) for r in reports.values()])

    total_epochs = s.sample_epochs + s.subspace_epochs
    table_a = [
        {"method": f"SGD, full space ({total_epochs} epochs)", "dimension": n_params, "test_acc": acc("sgd")},
        {"method": f"random subspace, Li et al. ({s.subspace_epochs} epochs)", "dimension": s.dim,
         "test_acc": acc("random-subspace")},
        {"method": f"DLDR P-SGD (sampled {s.sample_epochs} epochs + {s.subspace_epochs})", "dimension": s.dim,
         "test_acc": acc("psgd")},
    ]
    table_b = [
        {"method": f"SGD ({total_epochs} epochs)", "test_acc": acc("sgd"), "seconds": seconds("sample", "sgd")},
        {"method": f"P-BFGS ({s.sample_epochs} sampling + {s.bfgs_epochs} epochs)", "test_acc": acc("pbfgs"),
         "seconds": seconds("sample", "extract", "pbfgs")},
    ]
    return {"recipe": s.recipe, "seeds": list(reports), "n_params": n_params, "A": table_a, "B": table_b,
            "settings": s.__dict__ | {"seeds": list(s.seeds)}}


def _pm(stat: dict, scale: float = 100.0, digits: int = 2) -> str:
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def tables_markdown(tables: dict) -> str:
    lines = [f"## A. Dimension ({tables['recipe']}, {len(tables['seeds'])} seeds)", "",
             "| method | dimension | test accuracy (%) |", "|---|---:|---:|"]
    for row in tables["A"]:
        lines.append(f"| {row['method']} | {row['dimension']:,} | {_pm(row['test_acc'])} |")
    lines += ["", "## B. Second order", "", "| method | test accuracy (%) | wall-clock (s) |", "|---|---:|---:|"]
    for row in tables["B"]:
        lines.append(f"| {row['method']} | {_pm(row['test_acc'])} | {_pm(row['seconds'], 1.0, 1)} |")
    return "\n".join(lines) + "\n"
