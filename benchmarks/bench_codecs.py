"""Lossless codec candidates on real snapshots: encode and decode GB/s, and the compression ratio.

Snapshots (float32, each trained a few steps so the weights are not the initialiser's):

* ``cnn``: the MNIST-1D 1D-CNN (9,610 parameters, 200 SGD steps on MNIST-1D);
* ``mlp10m``: the ~10M-parameter MLP of bench_record.py (20 SGD steps);
* ``gpt``: a GPT-2-shaped byte-level transformer (``ByteGPT``, 768 wide, 4 layers, ~29M parameters;
  random init plus 5 Adam steps on standard-library source, nothing downloaded).

Candidates: Blosc with zstd, lz4, lz4hc, blosclz at clevel 1; bit-, byte- or no shuffle; chunks of
1 MiB compressed in 256 KiB blocks (the store's layout). Threads: ``1`` one thread; ``pool2`` two
Python threads each encoding whole chunks (numcodecs releases the GIL; what trajstore does);
``blosc2`` Blosc's own two-thread pool (its global context, one chunk at a time). Each figure is the
best of ``--repeats`` runs (the machine is shared: the best run is the least disturbed one); ``cpu``
is GB per CPU-second of the one encoding thread, which other processes on the machine barely move.

Reference points, measured in the same run on the 10M snapshot: ``torch.save(state_dict)`` to a
file, ``ndarray.tofile`` (raw write), and crc32c. The ``store`` section records the 10M model with
TrajectoryStore itself for a few presets and shard sizes (sustained append + close, vs torch.save);
the ``io`` section reads, verifies and imports a 10M store with 1 thread and with every core.

usage: flock /tmp/trajstore-heavy.lock python benchmarks/bench_codecs.py [--quick] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import numcodecs
import numcodecs.blosc as blosc
import numpy as np
import torch
from torch import nn

from pipeline.compute import peak_rss_mib
from pipeline.experiments.data import loaders, mnist1d_arrays, stdlib_bytes
from pipeline.experiments.models import CNN1D, ByteGPT, GPTSize, mlp

CHUNK = 1 << 18  # float32 elements per chunk: 1 MiB, the store's default
BLOCK = 1 << 18  # bytes per blosc block, as CodecPreset.zarr_compressors for chunks >= 1 MiB
CNAMES = ("zstd", "lz4", "lz4hc", "blosclz")
SHUFFLES = {"bitshuffle": blosc.BITSHUFFLE, "shuffle": blosc.SHUFFLE, "noshuffle": blosc.NOSHUFFLE}


def flat(model: nn.Module) -> np.ndarray:
    """The model's parameters as one float32 vector (n,)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def snapshot_cnn() -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(0)
    model = CNN1D()
    train, _ = loaders(mnist1d_arrays(), batch_size=100, seed=0, channel_dim=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    step = 0
    while step < 200:
        for xb, yb in train:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == 200:
                break
    return model, flat(model)


def snapshot_mlp() -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(0)
    model = mlp([1024, 2560, 2048, 1024, 10])  # ~9.97M parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(20):
        x, y = torch.randn(128, 1024), torch.randint(0, 10, (128,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, flat(model)


def snapshot_gpt() -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(0)
    size = GPTSize(layers=4, width=768, heads=12, context=128)
    model = ByteGPT(size)
    text, _ = stdlib_bytes(1 << 20, 1 << 10)
    data = torch.as_tensor(text[: 4 * 129 * 5].astype(np.int64)).reshape(5, 4, 129)
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    for batch in data:
        loss = nn.functional.cross_entropy(model(batch[:, :-1]), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, flat(model)


def best(fn, repeats: int, cpu: list | None = None) -> float:
    """Shortest wall time of ``repeats`` calls of ``fn``; appends the shortest CPU time of this
    thread to ``cpu`` (what one core spends: barely moved by other processes on a shared machine)."""
    times, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.thread_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpus.append(time.thread_time() - c0)
    if cpu is not None:
        cpu.append(min(cpus))
    return min(times)


def candidate(row: np.ndarray, cname: str, shuffle: str, repeats: int, chunk: int = CHUNK) -> dict:
    """Encode/decode GB/s of one codec on ``row`` with 1 thread, two Python threads, Blosc's two threads."""
    codec = numcodecs.Blosc(cname=cname, clevel=1, shuffle=SHUFFLES[shuffle], blocksize=BLOCK, typesize=4)
    parts = [row[i:i + chunk] for i in range(0, len(row), chunk)]
    encoded = [codec.encode(p) for p in parts]
    out = np.empty_like(row)
    outs = [out[i:i + chunk] for i in range(0, len(row), chunk)]
    for e, o, p in zip(encoded, outs, parts):
        codec.decode(e, out=o)
    assert np.array_equal(out.view(np.uint32), row.view(np.uint32)), f"{cname}/{shuffle} is not lossless"
    gb = row.nbytes / 1e9
    result = {"ratio": row.nbytes / sum(len(e) for e in encoded)}
    cpu: list[float] = []
    result["encode_1"] = gb / best(lambda: [codec.encode(p) for p in parts], repeats, cpu)
    result["decode_1"] = gb / best(lambda: [codec.decode(e, out=o) for e, o in zip(encoded, outs)], repeats, cpu)
    result["encode_1_cpu"], result["decode_1_cpu"] = gb / cpu[0], gb / cpu[1]  # GB per CPU-second of one thread
    with ThreadPoolExecutor(2) as pool:  # not the main thread: numcodecs uses blosc's one-thread contexts
        result["encode_pool2"] = gb / best(lambda: list(pool.map(codec.encode, parts)), repeats)
        result["decode_pool2"] = gb / best(lambda: list(pool.map(lambda a: codec.decode(a[0], out=a[1]),
                                                                 zip(encoded, outs))), repeats)
    saved = blosc.use_threads
    blosc.use_threads, before = True, blosc.set_nthreads(2)  # the global context (zarr turns it off)
    try:
        result["encode_blosc2"] = gb / best(lambda: [codec.encode(p) for p in parts], repeats)
        result["decode_blosc2"] = gb / best(lambda: [codec.decode(e, out=o) for e, o in zip(encoded, outs)], repeats)
    finally:
        blosc.use_threads = saved
        blosc.set_nthreads(before)
    return result


def references(model: nn.Module, row: np.ndarray, folder: Path, repeats: int) -> dict:
    """torch.save of the state_dict, raw tofile and crc32c of the same bytes, GB/s."""
    gb = row.nbytes / 1e9
    state = model.state_dict()

    def save():
        torch.save(state, folder / "snapshot.pt")

    def raw():
        row.tofile(folder / "snapshot.bin")

    return {"torch_save": gb / best(save, repeats), "tofile": gb / best(raw, repeats),
            "crc32c": gb / best(lambda: crc32c.crc32c(row), repeats)}


def store_section(model: nn.Module, folder: Path, snapshots: int, quick: bool) -> dict:
    """Sustained append + close of the 10M model through TrajectoryStore per preset and shard size,
    against torch.save of the state_dict per snapshot, measured interleaved in the same run."""
    from trajstore import TrajectoryStore, get_preset

    specs = [("lossless", 1 << 21), ("lossless", 1 << 19), ("lossless", 1 << 23), ("lossless-zstd", 1 << 21),
             ("lossless-fast", 1 << 21)]
    specs = [(s, k) for s, k in specs if _known(get_preset, s)]
    if quick:
        specs = specs[:2]
    nbytes = sum(p.numel() for p in model.parameters()) * 4
    result = {}
    for spec, shard in specs:
        target = folder / "pt"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        t0 = time.perf_counter()
        for i in range(snapshots):
            torch.save(model.state_dict(), target / f"{i}.pt")
        t_save = time.perf_counter() - t0
        shutil.rmtree(target)
        t0 = time.perf_counter()
        store = TrajectoryStore.create(folder / "s.zarr", model, codec=spec, shard_size=shard, overwrite=True)
        for i in range(snapshots):
            store.append(model, step=i)
        store.close()
        t_store = time.perf_counter() - t0
        result[f"{spec} shard {shard * 4 >> 20} MiB"] = {
            "store_GBps": snapshots * nbytes / t_store / 1e9, "torch_save_GBps": snapshots * nbytes / t_save / 1e9,
            "ratio_vs_torch_save": t_save / t_store}
    return result


def io_section(model: nn.Module, folder: Path, snapshots: int) -> dict:
    """Reading every row, ``verify`` and ``import`` of the 10M model with 1 thread vs the default
    (every core), each the best of two runs: the decode side and the import's encode side."""
    from trajstore import TrajectoryStore, import_checkpoints, parallel
    from trajstore.inspect import verify

    nbytes = sum(p.numel() for p in model.parameters()) * 4 * snapshots
    pts = folder / "pts"
    pts.mkdir(exist_ok=True)
    store = TrajectoryStore.create(folder / "io.zarr", model, overwrite=True)
    for i in range(snapshots):
        with torch.no_grad():
            model[0].weight.add_(1e-4)
        store.append(model, step=i)
        torch.save(model.state_dict(), pts / f"step{i}.pt")
    store.close()
    result = {}
    for threads in (1, parallel.cores()):
        parallel.set_threads(threads)
        try:
            with TrajectoryStore.open(folder / "io.zarr") as s:
                read = best(lambda: s.read(slice(None)), 2)
            check = best(lambda: verify(folder / "io.zarr"), 2)
            imp = best(lambda: import_checkpoints(pts, folder / "imported.zarr", overwrite=True), 2)
        finally:
            parallel.set_threads(None)
        result[f"threads={threads}"] = {"read_GBps": nbytes / read / 1e9, "verify_GBps": nbytes / check / 1e9,
                                        "import_GBps": nbytes / imp / 1e9}
    shutil.rmtree(pts)
    return result


def _known(get_preset, spec: str) -> bool:
    try:
        get_preset(spec)
        return True
    except ValueError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the MLP only, fewer candidates (a smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the report (text) to this file")
    parser.add_argument("--no-store", action="store_true", help="skip the TrajectoryStore section")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench_codecs_"))
    try:
        snaps = {"mlp10m": snapshot_mlp()} if args.quick else {
            "cnn": snapshot_cnn(), "mlp10m": snapshot_mlp(), "gpt": snapshot_gpt()}
        report = {"torch": torch.__version__, "numcodecs": numcodecs.__version__, "blosc": blosc.VERSION_STRING,
                  "cores": len(os.sched_getaffinity(0)), "repeats": args.repeats,
                  "models": {k: int(v[1].size) for k, v in snaps.items()}, "candidates": {}}
        report["reference"] = references(snaps["mlp10m"][0], snaps["mlp10m"][1], folder, args.repeats)
        cnames = ("zstd", "lz4") if args.quick else CNAMES
        for model_name, (_, row) in snaps.items():
            table = report["candidates"][model_name] = {}
            for cname in cnames:
                for shuffle in SHUFFLES:
                    table[f"{cname}/{shuffle}"] = candidate(row, cname, shuffle, args.repeats)
        if not args.no_store:
            report["store"] = store_section(snaps["mlp10m"][0], folder, 4 if args.quick else 12, args.quick)
            report["io"] = io_section(snaps["mlp10m"][0], folder, 4 if args.quick else 12)
        report["peak_rss_MiB"] = peak_rss_mib()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = json.dumps(report, indent=2) + "\n\n" + summary(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def summary(report: dict) -> str:
    ref = report["reference"]
    lines = [f"reference (10M MLP, {report['models']['mlp10m'] * 4 / 2**20:.0f} MiB): torch.save {ref['torch_save']:.2f} "
             f"GB/s, tofile {ref['tofile']:.2f} GB/s, crc32c {ref['crc32c']:.1f} GB/s"]
    for model_name, table in report["candidates"].items():
        lines.append(f"\n{model_name} ({report['models'][model_name]:,} float32): GB/s encode cpu / 1 / pool2 / "
                     "blosc2 | decode cpu / 1 / pool2 / blosc2 | ratio   (cpu: GB per CPU-second of one thread)")
        for name, r in sorted(table.items(), key=lambda kv: -kv[1]["encode_1_cpu"]):
            lines.append(f"  {name:20s} {r['encode_1_cpu']:5.2f} {r['encode_1']:5.2f} {r['encode_pool2']:5.2f} "
                         f"{r['encode_blosc2']:5.2f} | {r['decode_1_cpu']:5.2f} {r['decode_1']:5.2f} "
                         f"{r['decode_pool2']:5.2f} {r['decode_blosc2']:5.2f} | {r['ratio']:.3f}")
    for name, r in report.get("store", {}).items():
        lines.append(f"store {name}: {r['store_GBps']:.2f} GB/s vs torch.save {r['torch_save_GBps']:.2f} GB/s = "
                     f"{r['ratio_vs_torch_save']:.2f}x")
    for name, r in report.get("io", {}).items():
        lines.append(f"10M store, {name}: read {r['read_GBps']:.2f} GB/s, verify {r['verify_GBps']:.2f} GB/s, "
                     f"import {r['import_GBps']:.2f} GB/s")
    lines.append(f"peak RSS: {report['peak_rss_MiB']:.0f} MiB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
