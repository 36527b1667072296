"""Multi-process recording and subspace training (2 ranks, gloo, FSDP2), each against its baseline.

1. Snapshot write throughput: one process recording the model against 2 FSDP2 ranks recording it
   sharded (each rank encodes and writes its own half, no gather), GB of float32 snapshot per second.
2. P-SGD step time under FSDP2 (2 ranks, each holding only its rows of P, g̃ all-reduced) against a
   plain FSDP2 SGD step on the same model and batch.
Peak RSS of every process. On 2 cores the 2 ranks share the cores the single process had alone.

usage: python benchmarks/bench_distributed.py [--params 50M] [--snapshots 16] [--dim 15] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WIDTH = 2048


def make_model(n_params: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = max(1, round(n_params / (WIDTH * WIDTH + WIDTH)))
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh())
                                 for _ in range(layers)])


def shard(model: torch.nn.Module, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in model:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def record(model: torch.nn.Module, path: Path, snapshots: int) -> float:
    """Seconds to append ``snapshots`` snapshots and commit them (weights nudged between them)."""
    from trajstore import TrajectoryStore

    store = TrajectoryStore.create(path, model, overwrite=True)
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    t0 = time.perf_counter()
    for step in range(snapshots):
        with torch.no_grad():
            for p in params:
                p.mul_(1.0001)
        store.append(model, step=step)
    store.close()  # every rank's part committed
    return time.perf_counter() - t0


def step_times(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, rank: int) -> float:
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(64, WIDTH, generator=gen)
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[2:]))


def ranks_worker(rank: int, world: int, port: int, args: argparse.Namespace, work: str, phase: str) -> None:
    from pipeline.basis import Basis
    from pipeline.compute import peak_rss_mib
    from pipeline.optim import SubspaceSGD

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(max(1, os.cpu_count() // world)))
    torch.set_num_threads(max(1, os.cpu_count() // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = shard(make_model(args.params), world)
    result: dict = {"rank": rank}
    if phase == "record":
        result["seconds"] = record(model, Path(work) / "sharded.zarr", args.snapshots)
    else:
        plain = step_times(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), args.steps, rank)
        basis = Basis.from_store(Path(work) / "sharded.zarr", model=model)
        opt = SubspaceSGD(model.parameters(), basis, lr=1e-3, momentum=0.9)
        result.update(plain_s=plain, psgd_s=step_times(model, opt, args.steps, rank), local_rows=basis.n)
    result["peak_rss_mib"] = peak_rss_mib()
    Path(work, f"{phase}-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(args: argparse.Namespace, work: str, phase: str, world: int = 2) -> list[dict]:
    mp.spawn(ranks_worker, args=(world, _port(), args, work, phase), nprocs=world, join=True)
    return [json.loads(Path(work, f"{phase}-{r}.json").read_text()) for r in range(world)]


def _single_worker(args: argparse.Namespace, work: str) -> None:
    from pipeline.compute import peak_rss_mib

    seconds = record(make_model(args.params), Path(work) / "single.zarr", args.snapshots)
    Path(work, "single.json").write_text(json.dumps({"seconds": seconds, "peak_rss_mib": peak_rss_mib()}))


def rss(results: list[dict]) -> str:
    return " / ".join(f"{r['peak_rss_mib']:.0f}" for r in results)


def _parse_count(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1].upper(), 1)
    return int(float(text.rstrip("KkMmGg")) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=_parse_count, default=_parse_count("50M"))
    parser.add_argument("--snapshots", type=int, default=16)
    parser.add_argument("--dim", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workdir", default=None, help="folder for the stores (default: a temporary one)")
    args = parser.parse_args()
    from pipeline import extract_subspace

    work = tempfile.mkdtemp(prefix="bench-dist-", dir=args.workdir)
    try:
        n = sum(p.numel() for p in make_model(args.params).parameters())
        gb = n * 4 * args.snapshots / 1e9
        print(f"model: {n / 1e6:.1f}M parameters ({n * 4 / 2**20:.0f} MiB a snapshot), {args.snapshots} snapshots, "
              f"{os.cpu_count()} cores")
        proc = mp.get_context("spawn").Process(target=_single_worker, args=(args, work))
        proc.start()
        proc.join()
        single = json.loads(Path(work, "single.json").read_text())
        ranks = _ranks(args, work, "record")
        two = max(r["seconds"] for r in ranks)
        print(f"{'recording':34s} {'seconds':>8s} {'GB/s':>6s} {'peak RSS MiB':>14s}")
        print(f"{'1 process':34s} {single['seconds']:8.2f} {gb / single['seconds']:6.2f} {single['peak_rss_mib']:14.0f}")
        print(f"{'2 FSDP2 ranks, each its shards':34s} {two:8.2f} {gb / two:6.2f} "
              f"{rss(ranks):>14s}")
        print(f"write throughput, 2 ranks / 1 process: {single['seconds'] / two:.2f}x")
        t0 = time.perf_counter()
        extract_subspace(Path(work) / "sharded.zarr", dim=min(args.dim, args.snapshots - 1))
        print(f"extraction of the sharded store (d={min(args.dim, args.snapshots - 1)}): {time.perf_counter() - t0:.1f} s")
        steps = _ranks(args, work, "train")
        plain, psgd = max(r["plain_s"] for r in steps), max(r["psgd_s"] for r in steps)
        print(f"{'FSDP2 step, 2 ranks':34s} {'ms':>8s}")
        print(f"{'SGD (momentum 0.9)':34s} {plain * 1e3:8.1f}")
        print(f"{'P-SGD (local rows of P)':34s} {psgd * 1e3:8.1f}   rows per rank: "
              f"{' / '.join(str(r['local_rows']) for r in steps)}; peak RSS MiB "
              f"{rss(steps)}")
        print(f"P-SGD / SGD step: {psgd / plain:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
