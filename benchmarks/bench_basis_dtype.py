"""What P in bfloat16 / float16 costs, against float32 P measured in the same run.

1. The demo recipe (``trajstore demo``: MNIST-1D 1D-CNN, SGD lr 0.05 momentum 0.9 batch 64 for 15 sampled
   epochs, a 15-dim DLDR subspace, P-SGD lr 0.1 momentum 0.9 for 15 epochs from snapshot 0), per seed: the
   stored basis rounded to each dtype, its ‖P̂ᵀP̂ − I‖_F (float64), its largest principal angle against the
   float32 P, and the P-SGD test accuracy with that basis.
2. The products alone on a larger basis (an MLP of ~1M parameters, d = 40, random orthonormal P): time of
   one P-SGD step's products (g̃ = P̂ᵀg, then w += P̂ c), resident and streamed, and P's device bytes.
3. Peak RSS.

usage: python benchmarks/bench_basis_dtype.py [--seeds 0,1,2] [--epochs 15] [--quick] [--device cpu]
Writes benchmarks/results/bench_basis_dtype.txt (``--quick``: bench_basis_dtype_quick.txt): the JSON report
and a summary.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.basis import Basis
from pipeline.compute import peak_rss_mib
from pipeline.experiments.models import mlp
from pipeline.experiments.recipes import build_recipe
from pipeline.experiments.runner import Run, RunConfig, evaluate
from pipeline.optim import SubspaceSGD
from trajstore import TrajectoryStore
from trajstore.layout import ParamLayout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results" / "bench_basis_dtype.txt"


def basis_error(p32: np.ndarray, dtype: torch.dtype) -> dict:
    """‖P̂ᵀP̂ − I‖_F and the largest principal angle (degrees) between span(P̂) and span(P), in float64."""
    p_hat = torch.from_numpy(p32).to(dtype).double().numpy()  # (n, d)
    d = p_hat.shape[1]
    ortho = float(np.linalg.norm(p_hat.T @ p_hat - np.eye(d)))
    q_hat, _ = np.linalg.qr(p_hat)
    q, _ = np.linalg.qr(p32.astype(np.float64))
    cosines = np.linalg.svd(q.T @ q_hat, compute_uv=False)
    angle = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
    return {"orthonormality_error": ortho, "max_principal_angle_deg": angle,
            "max_rel_rounding": float(np.max(np.abs(p_hat - p32) / np.maximum(np.abs(p32), 1e-30)))}


def psgd_accuracy(store: Path, dtype: torch.dtype, seed: int, epochs: int, device: str) -> dict:
    """P-SGD as the demo's runner trains it (snapshot 0, lr 0.1, momentum 0.9, batch 64), with P in ``dtype``."""
    recipe = build_recipe("mnist1d-cnn", seed=seed, batch_size=64)
    model = recipe.model.to(device)
    with TrajectoryStore.open(store) as s:
        s.load_into(model, 0)
    basis = Basis.from_store(store, "dldr", device=device, dtype=dtype)
    opt = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9)
    torch.manual_seed(seed + 1)
    recipe.train.generator.manual_seed(seed + 1)
    step_s = []
    for _ in range(epochs):
        for x, y in recipe.train:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            recipe.loss(model(x), y).backward()
            t0 = time.perf_counter()
            opt.step()
            step_s.append(time.perf_counter() - t0)
    _, acc = evaluate(model, recipe, device)
    return {"test_acc": acc, "optimizer_step_ms": 1e3 * float(np.median(step_s)), "device_bytes": basis.device_bytes()}


def demo_part(out: Path, seeds: list[int], epochs: int, sample_epochs: int, device: str) -> dict:
    per_seed = {}
    for seed in seeds:
        config = RunConfig(recipe="mnist1d-cnn", sample_epochs=sample_epochs, dim=15, subspace_epochs=0, lr=0.05,
                           subspace_lr=0.1, seed=seed, baselines=["none"], device=device)
        run_dir = out / f"seed-{seed}"
        Run(run_dir, config).execute(resume=True)
        store = run_dir / "trajectory.zarr"
        p32 = Basis.from_store(store, "dldr").to_numpy()  # (n, d) float32 as stored
        per_seed[seed] = {name: {**basis_error(p32, dt), **psgd_accuracy(store, dt, seed, epochs, device)}
                          for name, dt in DTYPES.items()}
        print(f"seed {seed}: " + ", ".join(f"{k} {v['test_acc']:.2%}" for k, v in per_seed[seed].items()), flush=True)
    summary = {}
    for name in DTYPES:
        rows = [per_seed[s][name] for s in seeds]
        summary[name] = {key: {"mean": float(np.mean([r[key] for r in rows])), "std": float(np.std([r[key] for r in rows]))}
                         for key in rows[0]}
    return {"recipe": "mnist1d-cnn", "dim": 15, "sample_epochs": sample_epochs, "psgd_epochs": epochs, "seeds": seeds,
            "per_seed": per_seed, "summary": summary}


def products_part(device: str, steps: int) -> dict:
    """Median time of one P-SGD step's products on ~1M parameters, d = 40, per dtype and mode."""
    torch.manual_seed(0)
    model = mlp([1000, 1000, 10]).to(device)
    layout = ParamLayout.from_module(model)
    q, _ = torch.linalg.qr(torch.randn(layout.n, 40, dtype=torch.float64))
    p = q.float()
    grads = [torch.randn_like(w) for w in model.parameters()]
    weights = [w.detach().clone() for w in model.parameters()]
    result = {"n_params": layout.n, "d": 40, "device": device}
    for mode in ("resident", "streamed"):
        for name, dt in DTYPES.items():
            basis = Basis.from_array(p, layout, device=device, dtype=dt, mode=mode, block_rows=1 << 18)
            times = []
            for i in range(steps + 1):
                t0 = time.perf_counter()
                c = basis.project(grads)
                basis.add_lifted_(weights, c, alpha=-1e-6)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
            result[f"{mode}_{name}"] = {"step_ms": 1e3 * float(np.median(times)), "device_bytes": basis.device_bytes()}
        base = result[f"{mode}_float32"]["step_ms"]
        for name in DTYPES:
            result[f"{mode}_{name}"]["ratio_vs_float32"] = result[f"{mode}_{name}"]["step_ms"] / base
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=15, help="P-SGD epochs (the demo's 15)")
    parser.add_argument("--sample-epochs", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10, help="timed product steps per dtype and mode")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="one seed, 16 sampled + 2 P-SGD epochs (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    epochs, sample = (2, 16) if args.quick else (args.epochs, args.sample_epochs)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_basis_dtype_"))
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "demo": demo_part(out, seeds, epochs, sample, args.device),
              "products": products_part(args.device, 3 if args.quick else args.steps)}
    report["peak_rss_MiB"] = peak_rss_mib()
    lines = [json.dumps(report, indent=2), ""]
    s, pr = report["demo"]["summary"], report["products"]
    for name in DTYPES:
        lines.append(
            f"{name:>8}: ||P^T P - I||_F {s[name]['orthonormality_error']['mean']:.2e}, max principal angle vs "
            f"float32 {s[name]['max_principal_angle_deg']['mean']:.4f} deg, P-SGD test acc "
            f"{100 * s[name]['test_acc']['mean']:.2f} +- {100 * s[name]['test_acc']['std']:.2f} % "
            f"({len(seeds)} seeds), optimizer step {s[name]['optimizer_step_ms']['mean']:.2f} ms")
    for mode in ("resident", "streamed"):
        lines.append(f"products n={pr['n_params']:,} d=40 {mode}: " + ", ".join(
            f"{name} {pr[f'{mode}_{name}']['step_ms']:.1f} ms ({pr[f'{mode}_{name}']['ratio_vs_float32']:.2f}x), "
            f"{pr[f'{mode}_{name}']['device_bytes'] / 2 ** 20:.1f} MiB on the device" for name in DTYPES))
    lines.append(f"peak RSS: {report['peak_rss_MiB']:.0f} MiB")
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS.with_name(RESULTS.stem + "_quick.txt") if args.quick else RESULTS).write_text(text)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
