"""Native bfloat16 / float16 rows and optimizer state per snapshot, each against a baseline in the same run.

1. A bfloat16 (and a float16) MLP: T snapshots of a random walk recorded natively vs the same values
   widened to float32 (what trajstore stored before format 3): append throughput, bytes on disk,
   a full decoding pass (the reader extraction uses), and the staging buffers' bytes.
2. Adam state per snapshot (optimizer_state=True) vs weights only, float32 MLP: append time and bytes.
3. Peak RSS.

usage: python benchmarks/bench_native_dtype.py [--params N] [--snapshots T] [--out FILE]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.compute import peak_rss_mib
from trajstore import TrajectoryStore
from trajstore.inspect import info


def mlp(n_params: int, dtype: torch.dtype) -> nn.Module:
    width = int((n_params / 2) ** 0.5)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width)).to(dtype)


def walk(model: nn.Module, step: int) -> None:
    """One step of a random walk (a stand-in for training: small, dense changes)."""
    gen = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype), alpha=1e-3)


def record(path: Path, model: nn.Module, snapshots: int, widen: bool = False, optimizer=None,
           codec: str = "lossless") -> float:
    """Seconds to append ``snapshots`` snapshots and flush them."""
    source = mlp(sum(p.numel() for p in model.parameters()), torch.float32) if widen else model  # same layout
    began = time.perf_counter()
    with TrajectoryStore.create(path, source, codec=codec, optimizer_state=optimizer is not None) as store:
        for step in range(snapshots):
            walk(model, step)
            if optimizer is not None:
                model(torch.randn(8, model[0].in_features)).pow(2).mean().backward()
                optimizer.step()
                optimizer.zero_grad()
            snap = {k: v.float() for k, v in model.state_dict().items()} if widen else model
            store.append(snap, step=step, **({"optimizer": optimizer} if optimizer is not None else {}))
    return time.perf_counter() - began


def read_pass(path: Path) -> float:
    """Seconds for one decoding pass over every row (column blocks, as extraction reads)."""
    with TrajectoryStore.open(path) as store:
        reader = store.reader()
        began = time.perf_counter()
        width = 1 << 20
        for c0 in range(0, store.n_columns, width):
            reader.read_block(0, len(store), c0, min(store.n_columns, c0 + width))
        return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=4_000_000)
    parser.add_argument("--snapshots", type=int, default=12)
    parser.add_argument("--out", default="benchmarks/results/bench_native_dtype.txt")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    lines = [f"bench_native_dtype: {args.params:,} parameters (requested), {args.snapshots} snapshots, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads"]
    try:
        for dtype in (torch.bfloat16, torch.float16):
            name = str(dtype).removeprefix("torch.")
            for codec in ("lossless", "xor-delta:8"):
                native = record(tmp / f"{name}-{codec}", mlp(args.params, dtype), args.snapshots, codec=codec)
                wide = record(tmp / f"{name}-{codec}-wide", mlp(args.params, dtype), args.snapshots, widen=True,
                              codec=codec)
                a, b = info(tmp / f"{name}-{codec}"), info(tmp / f"{name}-{codec}-wide")
                read_native, read_wide = read_pass(tmp / f"{name}-{codec}"), read_pass(tmp / f"{name}-{codec}-wide")
                lines.append(
                    f"{name:8s} {codec:11s} n={a['parameters']:,}: append {args.snapshots / native:6.2f} snap/s vs "
                    f"widened {args.snapshots / wide:6.2f} ({wide / native:.2f}x); disk {a['snapshot_bytes'] / 2**20:7.1f}"
                    f" MiB vs {b['snapshot_bytes'] / 2**20:7.1f} ({b['snapshot_bytes'] / a['snapshot_bytes']:.3f}x); raw "
                    f"{a['raw_bytes'] / 2**20:.1f} vs {b['raw_bytes'] / 2**20:.1f} MiB; decode pass {read_native:.2f} s vs "
                    f"{read_wide:.2f} s ({read_wide / read_native:.2f}x)")
        model = mlp(args.params, torch.float32)
        plain = record(tmp / "plain", model, args.snapshots)
        model = mlp(args.params, torch.float32)
        with_state = record(tmp / "adam", model, args.snapshots, optimizer=torch.optim.Adam(model.parameters()))
        a, b = info(tmp / "plain"), info(tmp / "adam")
        lines.append(
            f"adam state float32 n={a['parameters']:,}: {args.snapshots} snapshots in {with_state:.2f} s vs weights only "
            f"{plain:.2f} s (includes the Adam steps; {with_state / plain:.2f}x); stored {b['stored_bytes'] / 2**20:.1f} "
            f"MiB vs {a['stored_bytes'] / 2**20:.1f} MiB ({b['stored_bytes'] / a['stored_bytes']:.2f}x), optimizer "
            f"state {b['optimizer_state']['bytes'] / 2**20:.1f} MiB ({', '.join(b['optimizer_state']['keys'])})")
        lines.append(f"peak RSS {peak_rss_mib():.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
