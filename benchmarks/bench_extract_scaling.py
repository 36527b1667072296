"""Synthetic extraction scaling: time linear in n, peak RSS flat (issue 10).

For each n (default 50M, 100M, 250M parameters; t = 60 snapshots, d = 15) it records a synthetic
low-rank-plus-noise trajectory into a lossless store, then extracts the DLDR subspace out of core
(``pipeline.extract_subspace``, threaded scheduler, cold: no cached Gram) in a fresh process, so
each phase's peak RSS is its own. Stores are deleted after each size (250M x 60 is 60 GB float32).

The rows are built from small random pools (1M values each) shifted per 1M-block and per snapshot:
the trajectory has the same low-rank-plus-noise structure as ``bench_extract.py``'s, without holding
rank x n directions in memory (10 GB at 250M) or drawing n normals per snapshot.

The baseline of the same run is the first size: each larger size prints its time ratio against
the ratio of sizes (1.00 = exactly linear) and its peak RSS against the first size's.

usage: python benchmarks/bench_extract_scaling.py [--sizes 50M 100M 250M] [--t 60] [--dim 15] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
POOL = 1 << 20  # values per pool and per block
RANK = 10


def parse_size(text: str) -> int:
    """'250M' -> 250_000_000."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def synthetic_rows(t: int, n: int, seed: int = 0):
    """Yield t float32 rows (n,): base + low-rank drift + noise, built block by block from pools."""
    rng = np.random.default_rng(seed)
    base_pool = rng.standard_normal(2 * POOL, dtype=np.float32)
    dir_pool = rng.standard_normal((RANK, 2 * POOL), dtype=np.float32)
    noise_pool = rng.standard_normal(2 * POOL, dtype=np.float32)
    blocks = -(-n // POOL)
    block_shift = rng.integers(0, POOL, size=blocks)  # each block its own window of the pools
    scales = (10.0 / 1.5 ** np.arange(RANK)).astype(np.float32)
    row = np.empty(n, np.float32)
    for _ in range(t):
        coeff = rng.standard_normal(RANK).astype(np.float32) * scales * 1e-2  # (RANK,)
        noise_shift = int(rng.integers(0, POOL))
        for b in range(blocks):
            lo, hi = b * POOL, min(n, (b + 1) * POOL)
            s = int(block_shift[b])
            view = row[lo:hi]
            np.copyto(view, base_pool[s:s + hi - lo])
            view += coeff @ dir_pool[:, s:s + hi - lo]
            ns = (s + noise_shift) % POOL
            view += 1e-3 * noise_pool[ns:ns + hi - lo]
        yield row


def part_generate(path: Path, t: int, n: int) -> dict:
    from pipeline.compute import peak_rss_mib
    from trajstore import TrajectoryStore
    from trajstore.layout import ParamLayout, TensorSpec

    store = TrajectoryStore.create(path, ParamLayout([TensorSpec("w", (n,), "float32")]), overwrite=True)
    began = time.perf_counter()
    for i, row in enumerate(synthetic_rows(t, n)):
        store.append(row, step=i)
    store.close()
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"seconds": time.perf_counter() - began, "peak_rss_MiB": peak_rss_mib(), "stored_bytes": stored}


def part_extract(path: Path, dim: int) -> dict:
    from pipeline import extract_subspace
    from pipeline.compute import peak_rss_mib

    with open("/proc/self/io") as f:
        read_before = int(next(line for line in f if line.startswith("rchar:")).split()[1])
    began = time.perf_counter()
    sub = extract_subspace(path, dim=dim)
    seconds = time.perf_counter() - began
    with open("/proc/self/io") as f:
        read_after = int(next(line for line in f if line.startswith("rchar:")).split()[1])
    return {"seconds": seconds, "peak_rss_MiB": peak_rss_mib(), "bytes_read": read_after - read_before,
            "orthonormality_error": float(sub.orthonormality_error),
            "top_singular_values": [float(s) for s in sub.singular_values[:3]]}


def run_part(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--part", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"part {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["50M", "100M", "250M"])
    parser.add_argument("--t", type=int, default=60)
    parser.add_argument("--dim", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None, help="folder for the stores (default: a temp folder)")
    parser.add_argument("--part", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        name, path, *rest = args.part
        result = part_generate(Path(path), int(rest[0]), int(rest[1])) if name == "generate" \
            else part_extract(Path(path), int(rest[0]))
        print(json.dumps(result))
        return

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_extract_scaling_"))
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for text in args.sizes:
        n = parse_size(text)
        path = out / f"traj-{n}.zarr"
        gb = args.t * n * 4 / 1e9
        print(f"n = {n:,}: recording t = {args.t} ({gb:.1f} GB float32) ...", file=sys.stderr, flush=True)
        gen = run_part("generate", str(path), str(args.t), str(n))
        print(f"  recorded in {gen['seconds']:.0f} s; extracting d = {args.dim} ...", file=sys.stderr, flush=True)
        ext = run_part("extract", str(path), str(args.dim))
        shutil.rmtree(path, ignore_errors=True)
        row = {"n": n, "t": args.t, "dim": args.dim, "trajectory_GB": gb, "stored_GB": gen["stored_bytes"] / 1e9,
               "record_seconds": gen["seconds"], "record_peak_rss_MiB": gen["peak_rss_MiB"],
               "extract_seconds": ext["seconds"], "extract_peak_rss_MiB": ext["peak_rss_MiB"],
               "extract_seconds_per_GB": ext["seconds"] / gb, "bytes_read_GB": ext["bytes_read"] / 1e9,
               "orthonormality_error": ext["orthonormality_error"]}
        table.append(row)
        print(json.dumps(row), flush=True)
    first = table[0]
    print("\n| n | trajectory | stored | record | extract | s per GB | time ratio / size ratio | bytes read "
          "| extract peak RSS | RSS vs first | ‖PᵀP−I‖ |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        linear = (r["extract_seconds"] / first["extract_seconds"]) / (r["n"] / first["n"])
        print(f"| {r['n'] / 1e6:.0f}M | {r['trajectory_GB']:.1f} GB | {r['stored_GB']:.1f} GB "
              f"| {r['record_seconds']:.0f} s | {r['extract_seconds']:.0f} s | {r['extract_seconds_per_GB']:.2f} "
              f"| {linear:.2f}x | {r['bytes_read_GB']:.1f} GB | {r['extract_peak_rss_MiB']:.0f} MiB "
              f"| {r['extract_peak_rss_MiB'] / first['extract_peak_rss_MiB']:.2f}x | {r['orthonormality_error']:.1e} |")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
