"""P-BFGS variants on the demo's table-B setting: curvature pairs, skip test, P(+) term, closure kind.

Per seed: SGD samples the demo recipe (mnist1d-cnn, lr 0.05, momentum 0.9, batch 64, 15 epochs, one
snapshot per epoch plus the initial weights), DLDR extracts d = 15, and every variant trains P-BFGS
from snapshot 0 for 3 epochs at batch 128 on the same basis, data order and RNG. Reported: test
accuracy, line-search failures, skipped curvature pairs, closure calls per step, P-BFGS seconds.

usage: python benchmarks/compare_pbfgs.py [--seeds 0 1 2] [--epochs 3] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import extract_subspace
from pipeline.basis import Basis
from pipeline.compute import peak_rss_mib
from pipeline.experiments.recipes import build_recipe
from pipeline.experiments.runner import evaluate
from pipeline.optim import SubspaceBFGS
from trajstore import TrajectoryStore
from trajstore.recorder import Recorder

RECIPE = "mnist1d-cnn"
VARIANTS = {  # name: (optimizer options, closure kind)
    "paper: consecutive pairs, plain closure (before)": ({}, "plain"),
    "paper: consecutive pairs, loss-only trials": ({}, "loss_only"),
    "same-batch pairs": ({"curvature_pairs": "same_batch"}, "loss_only"),
    "consecutive pairs, scale-free skip test": ({"curvature_test": "relative"}, "loss_only"),
    "same-batch pairs, scale-free skip test": ({"curvature_pairs": "same_batch", "curvature_test": "relative"},
                                               "loss_only"),
    "P(+): residual_weight 1e-3, γ 0.9": ({"residual_weight": 1e-3}, "loss_only"),
}


def sample(path: Path, seed: int, epochs: int, dim: int) -> None:
    """The demo's sampling phase into a store at ``path``, then a ``dim``-dimensional DLDR basis."""
    recipe = build_recipe(RECIPE, seed=seed, batch_size=64)
    model = recipe.model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    store = TrajectoryStore.create(path, model)
    rec = Recorder(store, model, every_n_epochs=1)
    rec.start()
    for epoch in range(epochs):
        for x, y in recipe.train:
            opt.zero_grad()
            recipe.loss(model(x), y).backward()
            opt.step()
            rec.step()
        rec.epoch_end(epoch)
    store.close()
    extract_subspace(path, dim=dim)


def train_variant(path: Path, seed: int, epochs: int, options: dict, kind: str) -> dict:
    recipe = build_recipe(RECIPE, seed=seed, batch_size=128)
    model = recipe.model
    with TrajectoryStore.open(path) as store:
        store.load_into(model, 0)
    opt = SubspaceBFGS(model.parameters(), Basis.from_store(path), **options)
    torch.manual_seed(seed + 2)  # as the runner seeds its P-BFGS phase
    recipe.train.generator.manual_seed(seed + 2)
    calls = steps = 0
    began = time.perf_counter()
    for _ in range(epochs):
        for x, y in recipe.train:
            def loss_only(backward=True):
                nonlocal calls
                calls += 1
                loss = recipe.loss(model(x), y)
                if backward:
                    opt.zero_grad()
                    loss.backward()
                return loss

            def plain():
                return loss_only(True)

            opt.step(loss_only if kind == "loss_only" else plain)
            steps += 1
    seconds = time.perf_counter() - began
    _, acc = evaluate(model, recipe, "cpu")
    state = opt.subspace_state
    return {"test_acc": acc, "ls_failures": int(state["ls_failures"]), "curvature_skips": int(state["curvature_skips"]),
            "calls_per_step": calls / steps, "steps": steps, "seconds": seconds}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    return out


def markdown(results: dict, seeds: list[int], epochs: int) -> str:
    lines = [f"P-BFGS variants, {RECIPE}, d = 15, {epochs} epochs at batch 128, seeds {seeds} (mean ± std)", "",
             "| variant | test accuracy (%) | line-search failures | skipped pairs | closure calls / step | "
             "P-BFGS time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in results.items():
        lines.append(f"| {name} | {100 * s['test_acc']['mean']:.2f} ± {100 * s['test_acc']['std']:.2f} | "
                     f"{s['ls_failures']['mean']:.1f} / {s['steps']['mean']:.0f} | "
                     f"{s['curvature_skips']['mean']:.1f} | "
                     f"{s['calls_per_step']['mean']:.2f} | {s['seconds']['mean']:.2f} ± {s['seconds']['std']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sample-epochs", type=int, default=15)
    parser.add_argument("--out", default=None, help="folder for the stores (default: a temporary one)")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        for seed in args.seeds:
            path = root / f"seed-{seed}.zarr"
            if not path.exists():
                sample(path, seed, args.sample_epochs, dim=15)
            for name, (options, kind) in VARIANTS.items():
                rows[name].append(train_variant(path, seed, args.epochs, options, kind))
                r = rows[name][-1]
                print(f"seed {seed} | {name}: acc {r['test_acc']:.2%}, ls failures {r['ls_failures']}/{r['steps']}, "
                      f"skips {r['curvature_skips']}, {r['calls_per_step']:.2f} calls/step, {r['seconds']:.2f} s",
                      flush=True)
    results = {name: summarise(r) for name, r in rows.items()}
    print(markdown(results, args.seeds, args.epochs))
    print(json.dumps({"results": results, "peak_rss_MiB": peak_rss_mib()}, indent=2))


if __name__ == "__main__":
    main()
