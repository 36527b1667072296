"""Recording cost, throughput and compression, each against a baseline measured in the same run.

1. Step-time overhead of recording every 10 steps / every epoch vs no recording
   (CPU training loop of a ~10M-parameter MLP).
2. Sustained snapshot throughput of the store (lossless, lossless-fast, durable, and the write path
   before issue 13) vs torch.save of the state_dict per snapshot, for a ~10M and a ~100M MLP, and
   the time append() blocks the loop vs a synchronous torch.save.
3. Compression ratio of each codec preset on per-iteration snapshots of a 1D-CNN trained on
   MNIST-1D, and for lossy presets the largest principal angle of the 15-D subspace against
   the lossless store's.
4. Peak RSS.

usage: python benchmarks/bench_record.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.compute import peak_rss_mib
from pipeline.experiments.data import loaders, mnist1d_arrays
from pipeline.experiments.models import CNN1D, mlp
from trajstore import TrajectoryStore, parallel, shardwrite
from trajstore.chunkwrite import ChunkWriter
from trajstore.recorder import Recorder
from trajstore.format import stored_bytes


def overhead(out: Path, epochs: int, steps_per_epoch: int, repeats: int) -> dict:
    """Mean step time with no recording, every epoch, every 10 steps (interleaved repeats)."""
    torch.manual_seed(0)
    model = mlp([1024, 2560, 2048, 1024, 10])  # ~9.97M parameters
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(128, 1024), torch.randint(0, 10, (128,))

    def run(mode: str) -> float:
        path = out / f"overhead-{mode}.zarr"
        store = TrajectoryStore.create(path, model, overwrite=True) if mode != "none" else None
        rec = Recorder(store, model, every_n_steps=10 if mode == "every10" else None,
                       every_n_epochs=1 if mode == "epoch" else None, record_initial=False) if store is not None else None
        t0 = time.perf_counter()
        for epoch in range(epochs):
            for _ in range(steps_per_epoch):
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if rec is not None:
                    rec.step()
            if rec is not None:
                rec.epoch_end(epoch)
        if store is not None:
            store.close()  # waiting for the last write counts against recording
        return (time.perf_counter() - t0) / (epochs * steps_per_epoch)

    for _ in range(3):  # warm up
        nn.functional.cross_entropy(model(x), y).backward()
    times: dict[str, list[float]] = {"none": [], "epoch": [], "every10": []}
    modes = list(times)
    for r in range(repeats):  # paired repeats in rotating order: the VM's drift hits all modes alike
        for mode in modes[r % 3:] + modes[:r % 3]:
            times[mode].append(run(mode))
    ratio = {k: float(np.median([a / b for a, b in zip(times[k], times["none"])])) for k in times}
    return {"n_params": n, "steps_per_epoch": steps_per_epoch, "epochs": epochs, "repeats": repeats,
            "step_ms": {k: 1e3 * float(np.median(v)) for k, v in times.items()},
            "overhead_every_epoch": ratio["epoch"] - 1,
            "overhead_every_10_steps": ratio["every10"] - 1}


@contextlib.contextmanager
def zarr_write_path():
    """The write path before issue 13: every params row and every per-snapshot value through zarr
    (shardwrite and chunkwrite decline)."""
    saved = shardwrite.write_row, ChunkWriter.for_array
    shardwrite.write_row = lambda *args: False
    ChunkWriter.for_array = classmethod(lambda cls, folder: None)
    try:
        yield
    finally:
        shardwrite.write_row, ChunkWriter.for_array = saved[0], classmethod(saved[1].__func__)


def throughput(out: Path, sizes: dict[str, list[int]], snapshots: dict[str, int], trials: dict[str, int]) -> dict:
    """Sustained snapshots/s of append + close per codec vs torch.save(state_dict) per snapshot, and
    the time append() blocks the loop vs a synchronous torch.save, per model size.

    torch.save and the store's configurations run interleaved in each trial, in an order rotated from
    trial to trial, each after ``os.sync()`` (so no phase pays for writing back the previous one's
    dirty pages): drift of the shared machine hits all alike. The ratio is the median over trials of
    torch.save's time / the store's in the same trial."""
    configs = {"lossless": dict(codec="lossless"), "lossless-fast": dict(codec="lossless-fast"),
               "lossless, durable (fsync)": dict(codec="lossless", durable=True),
               "before: lossless-zstd through zarr": dict(codec="lossless-zstd", before=True)}
    results = {}
    for label, shape in sizes.items():
        torch.manual_seed(0)
        model = mlp(shape)
        nbytes = sum(p.numel() for p in model.parameters()) * 4
        k, n_trials = snapshots[label], trials[label]
        names = list(configs) if label == "10M" else ["lossless", "lossless-fast"]
        t_save, t_store = [], {name: [] for name in names}
        blocking, blocking_save = [], []
        folder = out / "torchsave"

        def save_all() -> None:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            os.sync()
            t0 = time.perf_counter()
            for i in range(k):
                with torch.no_grad():
                    model[0].weight.add_(1e-4)
                t1 = time.perf_counter()
                torch.save(model.state_dict(), folder / f"{i}.pt")
                blocking_save.append(time.perf_counter() - t1)
            t_save.append(time.perf_counter() - t0)

        def store_all(name: str) -> None:
            conf = dict(configs[name])
            before = conf.pop("before", False)
            shutil.rmtree(out / "throughput.zarr", ignore_errors=True)
            os.sync()
            with zarr_write_path() if before else contextlib.nullcontext():
                t0 = time.perf_counter()
                store = TrajectoryStore.create(out / "throughput.zarr", model, overwrite=True, **conf)
                for i in range(k):
                    with torch.no_grad():
                        model[0].weight.add_(1e-4)
                    store.append(model, step=i)
                store.close()
                t_store[name].append(time.perf_counter() - t0)

        ratio_bytes = None
        for trial in range(n_trials):
            phases = ["torch.save", *names]
            for name in phases[trial % len(phases):] + phases[:trial % len(phases)]:
                if name == "torch.save":
                    save_all()
                    save_bytes = sum(f.stat().st_size for f in folder.iterdir())
                    shutil.rmtree(folder)
                else:
                    store_all(name)
                    if name == "lossless":
                        lossless_bytes = stored_bytes(str(out / "throughput.zarr"))
            ratio_bytes = lossless_bytes / save_bytes
            # what the training loop waits for when snapshots are spaced out (every epoch): append()
            # (copy and checks) vs a synchronous torch.save
            store = TrajectoryStore.create(out / "blocking.zarr", model, overwrite=True)
            for i in range(k):
                t0 = time.perf_counter()
                store.append(model, step=i)
                blocking.append(time.perf_counter() - t0)
                store.flush()  # the background write finishes "during the next epoch"
            store.close()
        shutil.rmtree(out / "throughput.zarr", ignore_errors=True)
        shutil.rmtree(out / "blocking.zarr", ignore_errors=True)
        med = lambda v: float(np.median(v))  # noqa: E731
        results[label] = {
            "n_params": nbytes // 4, "snapshots": k, "trials": n_trials,
            "torch_save_GBps": k * nbytes / med(t_save) / 1e9,
            "store_GBps": {name: k * nbytes / med(v) / 1e9 for name, v in t_store.items()},
            "ratio_vs_torch_save": {name: med([a / b for a, b in zip(t_save, v)]) for name, v in t_store.items()},
            "ratio_per_trial": {name: [a / b for a, b in zip(t_save, v)] for name, v in t_store.items()},
            "append_blocking_ms": 1e3 * med(blocking), "torch_save_ms": 1e3 * med(blocking_save),
            "blocking_ratio_vs_torch_save": med(blocking_save) / med(blocking),
            "store_bytes_vs_torch_save_bytes": ratio_bytes}
    return results


def principal_angle_deg(a: np.ndarray, b: np.ndarray, d: int) -> float:
    """Largest principal angle between the top-d PCA subspaces of two trajectories (t, n)."""
    def basis(x):
        x = x.astype(np.float64) - x.astype(np.float64).mean(0)
        return np.linalg.svd(x.T, full_matrices=False)[0][:, :d]
    s = np.linalg.svd(basis(a).T @ basis(b), compute_uv=False)
    return float(np.degrees(np.arccos(np.clip(s.min(), -1, 1))))


def compression(out: Path, snapshots: int) -> dict:
    """Per-iteration snapshots of a 1D-CNN on MNIST-1D, recorded with every preset."""
    torch.manual_seed(0)
    model = CNN1D()
    train, _ = loaders(mnist1d_arrays(), batch_size=100, seed=0, channel_dim=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    presets = ["lossless", "lossless-zstd", "xor-delta", "bitround-delta:8", "bitround-delta:6", "float16-delta"]
    stores = {p: TrajectoryStore.create(out / f"cmp-{p.replace(':', '_')}.zarr", model, codec=p, overwrite=True)
              for p in presets}
    step = 0
    while step < snapshots:
        for xb, yb in train:
            for s in stores.values():
                s.append(model, step=step)
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= snapshots:
                break
    reference = None
    result = {"n_params": sum(p.numel() for p in model.parameters()), "snapshots": snapshots, "presets": {}}
    for name, s in stores.items():
        s.close()
        with TrajectoryStore.open(s.path) as r:
            data = r.read(slice(None))
            ratio = len(r) * r.n_params * 4 / stored_bytes(r.path)
        entry = {"ratio": ratio}
        if name == "lossless":
            reference = data
        else:
            entry["max_principal_angle_deg_15d"] = principal_angle_deg(reference, data, 15)
            entry["max_abs_error"] = float(np.abs(reference - data).max())
        result["presets"][name] = entry
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="scratch folder (default: a temp dir; /dev/shm/... measures in memory, without a disk)")
    parser.add_argument("--sections", nargs="+", choices=["overhead", "throughput", "compression"],
                        default=["overhead", "throughput", "compression"])
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_record_"))
    out.mkdir(parents=True, exist_ok=True)
    q = args.quick
    report: dict = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "trajstore_threads": parallel.threads(), "out": str(out)}
    if "overhead" in args.sections:
        report["overhead"] = overhead(out, epochs=2, steps_per_epoch=20 if q else 200, repeats=1 if q else 3)
    if "throughput" in args.sections:
        report["throughput"] = throughput(out, {"10M": [1024, 2560, 2048, 1024, 10], "100M": [4096, 6656, 6656, 4096, 10]},
                                          {"10M": 5 if q else 12, "100M": 2 if q else 4},
                                          trials={"10M": 1 if q else 5, "100M": 1 if q else 3})
    if "compression" in args.sections:
        report["compression"] = compression(out, snapshots=100 if q else 400)
    report["peak_rss_MiB"] = peak_rss_mib()
    print(json.dumps(report, indent=2))
    if "overhead" in report:
        o = report["overhead"]
        print(f"\nstep time: none {o['step_ms']['none']:.1f} ms, every epoch {o['step_ms']['epoch']:.1f} ms "
              f"({100 * o['overhead_every_epoch']:+.2f}%), every 10 steps {o['step_ms']['every10']:.1f} ms "
              f"({100 * o['overhead_every_10_steps']:+.2f}%)")
    for label, r in report.get("throughput", {}).items():
        print(f"{label} ({r['n_params']:,} params, {r['n_params'] * 4 / 2**20:.0f} MiB a snapshot): torch.save "
              f"{r['torch_save_GBps']:.2f} GB/s; sustained store, median ratio to torch.save over {r['trials']} trials:")
        for name, ratio in r["ratio_vs_torch_save"].items():
            print(f"  {name:36s} {r['store_GBps'][name]:.2f} GB/s = {ratio:.2f}x torch.save")
        print(f"  the loop waits per snapshot: append {r['append_blocking_ms']:.1f} ms vs torch.save "
              f"{r['torch_save_ms']:.1f} ms = {r['blocking_ratio_vs_torch_save']:.2f}x; store bytes / torch.save "
              f"bytes {r['store_bytes_vs_torch_save_bytes']:.3f}")
    for name, e in report.get("compression", {}).get("presets", {}).items():
        extra = f", 15-D max principal angle {e['max_principal_angle_deg_15d']:.4f} deg" if "max_principal_angle_deg_15d" in e else ""
        print(f"compression {name}: {e['ratio']:.3f}x{extra}")
    print(f"peak RSS: {report['peak_rss_MiB']:.0f} MiB")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
