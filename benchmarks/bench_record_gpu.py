"""Training-loop overhead of recording CUDA weights (issue 10), against a baseline measured in the same run.

A ~101M-parameter MLP trains with AdamW on synthetic batches on the GPU, timed with torch.cuda.synchronize
only at the ends of each run. Runs, in this order: no recording; a snapshot every ``--every`` steps copied
asynchronously (trajstore/devicecopy.py, the default); the same with the synchronous copy forced
(``async_device_copy=False``, the path before issue 10); no recording again. The baseline is the mean of
the two unrecorded runs (their difference is the drift). Each recorded run first appends once untimed
(page-locked buffers and the device staging buffer are allocated then), and its last snapshot is checked
bit for bit against the weights. Target: async overhead <= 1% at one snapshot per 100 steps.

usage: python benchmarks/bench_record_gpu.py [--steps 300] [--every 100] [--batch 4096] [--out DIR]
Without CUDA it says so and exits 0. The steps shrink (never below 3 snapshots' worth) so that the four runs
fit in ``--budget`` seconds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.compute import peak_rss_mib  # noqa: E402
from pipeline.experiments.models import mlp  # noqa: E402
from trajstore import TrajectoryStore  # noqa: E402


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
          every: int, store: TrajectoryStore | None, first: int) -> dict:
    """``steps`` training steps from step ``first``; a snapshot every ``every`` steps into ``store``."""
    appends = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step in range(first, first + steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if store is not None and (step - first + 1) % every == 0:
            a = time.perf_counter()
            store.append(model, step=step)
            appends.append(time.perf_counter() - a)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    flush = 0.0
    if store is not None:
        f = time.perf_counter()
        store.flush()  # the writer's work after the loop: not training time
        flush = time.perf_counter() - f
    return {"seconds": seconds, "step_ms": 1e3 * seconds / steps, "snapshots": len(appends),
            "append_ms_mean": 1e3 * float(np.mean(appends)) if appends else 0.0,
            "append_ms_max": 1e3 * float(np.max(appends)) if appends else 0.0, "flush_after_s": flush}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=80.0, help="seconds for the four timed runs")
    ap.add_argument("--out", default="benchmarks/results/gpu")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_record_gpu: no CUDA device, nothing to measure")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = mlp([2048, 8192, 8192, 2048, 10]).to(device)  # 100.7M parameters, float32
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(args.batch, 2048, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    warm = train(model, opt, x, y, 10, 10**9, None, 0)  # kernels, allocator, clocks
    step_s = warm["seconds"] / 10
    steps = args.steps
    if 4 * steps * step_s > args.budget:  # keep at least three snapshots per recorded run
        steps = max(3 * args.every, int(args.budget / (4 * step_s)) // args.every * args.every)
    print(f"device {torch.cuda.get_device_name(device)}; model {n / 1e6:.1f}M parameters (float32), batch "
          f"{args.batch}; {steps} steps per run, a snapshot every {args.every}; warm step {1e3 * step_s:.1f} ms")
    tmp = Path(tempfile.mkdtemp(prefix="bench_record_gpu-"))
    results, step, extra = {}, 10, {}
    try:
        for name in ("none", "async", "sync", "none_again"):
            store = None
            if name in ("async", "sync"):
                store = TrajectoryStore.create(tmp / f"{name}.zarr", model, async_device_copy=name == "async")
                t = time.perf_counter()
                store.append(model, step=step)  # untimed: allocates what every later snapshot reuses
                store.flush()
                extra[f"{name}_first_append_s"] = time.perf_counter() - t
                step += 1
            results[name] = train(model, opt, x, y, steps, args.every, store, step)
            step += steps
            if store is not None:
                want = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu().numpy()
                results[name]["last_snapshot_exact"] = bool(np.array_equal(store.read(-1).view(np.uint32),
                                                                           want.view(np.uint32)))
                copier = getattr(store, "_device_copier", None)
                if copier is not None:
                    pinned = [s.row.numel() * s.row.element_size() for s in copier.slots.values()]
                    extra["pinned_host_bytes"] = sum(pinned)
                    extra["pinned_host_bytes_rounded"] = sum(1 << (b - 1).bit_length() for b in pinned)
                    extra["device_staging_bytes"] = (0 if copier.staging is None
                                                     else copier.staging.numel() * copier.staging.element_size())
                    extra["direct_copy"] = copier.direct
                store.close()
                shutil.rmtree(tmp / f"{name}.zarr", ignore_errors=True)
            print(f"  {name:10s} {results[name]['step_ms']:8.2f} ms/step  ({results[name]['seconds']:.1f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = (results["none"]["seconds"] + results["none_again"]["seconds"]) / 2
    report = {"device": torch.cuda.get_device_name(device), "params": n, "batch": args.batch, "steps": steps,
              "every": args.every, "runs": results, **extra, "baseline_s": base,
              "drift": results["none_again"]["seconds"] / results["none"]["seconds"] - 1,
              "overhead_async": results["async"]["seconds"] / base - 1,
              "overhead_sync": results["sync"]["seconds"] / base - 1,
              "peak_rss_MiB": peak_rss_mib(), "max_device_memory_MiB": torch.cuda.max_memory_allocated() / 2**20}
    stamp = time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime())
    (out / f"bench_record_gpu-{stamp}.json").write_text(json.dumps(report, indent=2))
    a, s = results["async"], results["sync"]
    print(f"step time: none {1e3 * base / steps:.2f} ms (drift between the two unrecorded runs "
          f"{100 * report['drift']:+.2f}%)")
    print(f"snapshot every {args.every} steps, async: {a['step_ms']:.2f} ms/step, overhead "
          f"{100 * report['overhead_async']:+.2f}% (target <= 1%), append returns in {a['append_ms_mean']:.2f} ms "
          f"(max {a['append_ms_max']:.2f}), first append {extra.get('async_first_append_s', 0):.2f} s")
    print(f"snapshot every {args.every} steps, sync:  {s['step_ms']:.2f} ms/step, overhead "
          f"{100 * report['overhead_sync']:+.2f}%, append blocks {s['append_ms_mean']:.2f} ms")
    ratio = (f"{report['overhead_sync'] / report['overhead_async']:.1f}x" if report["overhead_async"] > 0
             else "async within noise of the baseline")
    print(f"ratio of overheads sync/async: {ratio}; "
          f"last snapshots exact: async {a['last_snapshot_exact']}, sync {s['last_snapshot_exact']}")
    print(f"pinned host memory {extra.get('pinned_host_bytes', 0) / 2**20:.0f} MiB requested "
          f"({extra.get('pinned_host_bytes_rounded', 0) / 2**20:.0f} MiB after power-of-two rounding); device "
          f"staging buffer {extra.get('device_staging_bytes', 0) / 2**20:.0f} MiB (direct copy: "
          f"{extra.get('direct_copy')}); peak RSS {report['peak_rss_MiB']:.0f} MiB")
    print(f"results in {out}/bench_record_gpu-{stamp}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
