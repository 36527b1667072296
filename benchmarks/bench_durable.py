"""What durable mode (fsync before and after each commit) costs, against the default, in the same run.

Back-to-back lossless snapshots of an n-parameter vector (real weights are not needed: the
cost is the fsyncs), default mode vs ``durable=True``, interleaved repeats, same disk.
Prints sustained MB/s, the loop's wait per snapshot, the ratio, and peak RSS.

usage: python benchmarks/bench_durable.py [--params 10000000] [--snapshots 20] [--repeats 3] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.compute import peak_rss_mib
from trajstore import TrajectoryStore
from trajstore.layout import ParamLayout, TensorSpec


def run(path: Path, rows: np.ndarray, durable: bool) -> tuple[float, float]:
    """(seconds for all snapshots including the final flush, mean seconds append() blocked)."""
    shutil.rmtree(path, ignore_errors=True)
    layout = ParamLayout([TensorSpec("w", (rows.shape[1],), "float32")])
    waits = []
    t0 = time.perf_counter()
    with TrajectoryStore.create(path, layout, durable=durable) as store:
        for i, row in enumerate(rows):
            a = time.perf_counter()
            store.append(row, step=i)
            waits.append(time.perf_counter() - a)
    return time.perf_counter() - t0, float(np.mean(waits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--snapshots", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where the stores go (default: a temp dir)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    base = rng.standard_normal(args.params, dtype=np.float32)
    rows = np.stack([base + 0.01 * i * rng.standard_normal(args.params, dtype=np.float32)
                     for i in range(args.snapshots)])  # (t, n)
    mb = rows.nbytes / 1e6
    workdir = Path(tempfile.mkdtemp(dir=args.dir))
    results: dict[str, list[tuple[float, float]]] = {"default": [], "durable": []}
    try:
        for _ in range(args.repeats):  # interleaved: both modes see the same disk state
            for mode in results:
                results[mode].append(run(workdir / f"{mode}.zarr", rows, mode == "durable"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = {}
    for mode, runs in results.items():
        seconds = statistics.median(r[0] for r in runs)
        summary[mode] = {"MB_per_s": mb / seconds, "seconds": seconds,
                         "wait_ms_per_snapshot": 1e3 * statistics.median(r[1] for r in runs)}
    summary["durable_over_default_time"] = summary["durable"]["seconds"] / summary["default"]["seconds"]
    summary["params"], summary["snapshots"], summary["peak_rss_MiB"] = args.params, args.snapshots, peak_rss_mib()
    print(f"{args.snapshots} snapshots x {args.params:,} float32 ({mb:,.0f} MB), median of {args.repeats}")
    for mode in results:
        s = summary[mode]
        print(f"  {mode:8s} {s['MB_per_s']:8.0f} MB/s sustained, {s['seconds']:6.2f} s, "
              f"append() waits {s['wait_ms_per_snapshot']:.1f} ms")
    print(f"  durable / default time: {summary['durable_over_default_time']:.2f}x; "
          f"peak RSS {summary['peak_rss_MiB']:.0f} MiB")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
