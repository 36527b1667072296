"""The two subspace products against the memory-bandwidth bound (issue 13), with the old layout as baseline.

For P (n, d) float32 at n = 1M and 10M, d = 15 and 40, in one run:
  read      one read of P (``tiles.sum()`` over all threads): the measured read bandwidth;
  bound     the two-pass bound of a P-SGD step, 2·n·d·4 bytes ÷ that bandwidth;
  row-major the previous Basis: P (n, d) row-major, one float32 gemv per tensor (``P.T @ g``, ``w += P @ c``);
  tiled     today's Basis (and the same on one thread: the layout's gain alone) (P transposed in column tiles, shared over the threads, g̃ folded into float64 per
            piece), resident and memory-mapped (the tiled file ``host="mmap"`` maps, read in place; the page
            cache holds it after the warm-up);
  P-SGD     ``SubspaceSGD.step()`` alone (the gradient already there), resident, whose extra work over a
            plain step is the two products; and ``torch.optim.SGD(momentum=0.9).step()`` on the same parameters
            and gradients: the issue's figure is P-SGD's extra time over it, as a ratio to the bound.
Each line prints milliseconds (median of --repeats), the ratio to the bound, and the projection's error
against float64. Peak RSS at the end.

usage: python benchmarks/bench_products.py [--sizes 1M,10M] [--dims 15,40] [--repeats 9] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.basis import Basis
from pipeline.compute import peak_rss_mib
from pipeline.optim import SubspaceSGD
from trajstore.layout import ParamLayout, TensorSpec


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: buffers, page cache
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1e3 * sorted(times)[len(times) // 2]


def layout_of(n: int) -> ParamLayout:
    """Two tensors, as a layer's weight and bias: a weight of n - 1000 and a bias of 1000."""
    return ParamLayout([TensorSpec("weight", (n - 1000,), "float32"), TensorSpec("bias", (1000,), "float32")])


def bench_one(n: int, d: int, repeats: int, folder: Path) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(n, d, generator=gen) / n ** 0.5  # (n, d) row-major, as the store holds P
    g = torch.randn(n, generator=gen) * 1e-3 + 1e-3
    grads = [g[:n - 1000], g[n - 1000:]]
    c = torch.randn(d, dtype=torch.float64, generator=gen)
    ref = rows.double().T @ g.double()  # (d,)
    out: dict = {"n": n, "d": d, "threads": torch.get_num_threads()}

    def error(g_tilde: torch.Tensor) -> float:
        return float((g_tilde.double() - ref).norm() / ref.norm())

    resident = Basis(rows, layout_of(n), mode="resident")
    out["read_ms"] = median_ms(lambda: resident._tiles.sum(), repeats)
    out["read_GBps"] = n * d * 4 / out["read_ms"] / 1e6
    out["bound_ms"] = 2 * out["read_ms"]

    w = [torch.zeros(n - 1000), torch.zeros(1000)]
    c32 = c.float()

    def row_major_project():
        return sum(torch.mv(rows[lo:hi].T, gl).double() for (lo, hi), gl in zip(((0, n - 1000), (n - 1000, n)), grads))

    def row_major_lift():
        for (lo, hi), wl in zip(((0, n - 1000), (n - 1000, n)), w):
            wl.add_(rows[lo:hi] @ c32, alpha=-0.1)

    out["row_major_project_ms"] = median_ms(row_major_project, repeats)
    out["row_major_lift_ms"] = median_ms(row_major_lift, repeats)
    out["row_major_error"] = error(row_major_project())
    np.save(folder / "tiles.npy", resident._tiles.numpy())  # the tiled file from_store(host="mmap") maps
    mapped = Basis(rows, layout_of(n), mode="streamed", tiles=np.load(folder / "tiles.npy", mmap_mode="r"))
    assert mapped.mapped_file is not None  # the products read the map in place
    for label, basis in (("tiled", resident), ("mapped", mapped)):
        out[f"{label}_project_ms"] = median_ms(lambda: basis.project(grads), repeats)
        out[f"{label}_lift_ms"] = median_ms(lambda: basis.add_lifted_(w, c, alpha=-0.1), repeats)
        out[f"{label}_error"] = error(basis.project(grads))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the layout's gain alone: the tiles on one thread
    try:
        out["tiled_1thread_project_ms"] = median_ms(lambda: resident.project(grads), repeats)
        out["tiled_1thread_lift_ms"] = median_ms(lambda: resident.add_lifted_(w, c, alpha=-0.1), repeats)
    finally:
        torch.set_num_threads(threads)
    del mapped
    params = [torch.nn.Parameter(torch.zeros(n - 1000)), torch.nn.Parameter(torch.zeros(1000))]
    for p, gl in zip(params, grads):
        p.grad = gl.clone()
    opt = SubspaceSGD(params, resident, lr=0.1, momentum=0.9)
    out["psgd_step_ms"] = median_ms(opt.step, repeats)
    plain = [torch.nn.Parameter(torch.zeros(n - 1000)), torch.nn.Parameter(torch.zeros(1000))]
    for p, gl in zip(plain, grads):
        p.grad = gl.clone()
    sgd = torch.optim.SGD(plain, lr=0.1, momentum=0.9)  # the baseline: what P-SGD's step adds to is this step
    out["sgd_step_ms"] = median_ms(sgd.step, repeats)
    out["psgd_extra_ms"] = out["psgd_step_ms"] - out["sgd_step_ms"]
    out["psgd_extra_vs_bound"] = out["psgd_extra_ms"] / out["bound_ms"]
    for label in ("row_major", "tiled", "tiled_1thread", "mapped"):
        both = out[f"{label}_project_ms"] + out[f"{label}_lift_ms"]
        out[f"{label}_products_ms"] = both
        out[f"{label}_vs_bound"] = both / out["bound_ms"]
    out["psgd_step_vs_bound"] = out["psgd_step_ms"] / out["bound_ms"]
    out["speedup_vs_row_major"] = out["row_major_products_ms"] / out["tiled_products_ms"]
    return out


def parse_count(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}.get(text[-1:], 1)
    return int(float(text[:-1] if text[-1:] in "KMG" else text) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M,10M")
    parser.add_argument("--dims", default="15,40")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-products-") as folder:
        for n in map(parse_count, args.sizes.split(",")):
            for d in map(int, args.dims.split(",")):
                r = bench_one(n, d, args.repeats, Path(folder))
                results.append(r)
                print(f"n={n:,} d={d}: read {r['read_ms']:.1f} ms ({r['read_GBps']:.1f} GB/s), two-pass bound "
                      f"{r['bound_ms']:.1f} ms | row-major {r['row_major_products_ms']:.1f} ms "
                      f"({r['row_major_vs_bound']:.2f}x bound, err {r['row_major_error']:.1e}) | tiled "
                      f"{r['tiled_products_ms']:.1f} ms ({r['tiled_vs_bound']:.2f}x, err {r['tiled_error']:.1e}, "
                      f"{r['speedup_vs_row_major']:.2f}x faster; on 1 thread {r['tiled_1thread_products_ms']:.1f} ms) | mapped {r['mapped_products_ms']:.1f} ms "
                      f"({r['mapped_vs_bound']:.2f}x) | P-SGD step() {r['psgd_step_ms']:.1f} ms "
                      f"({r['psgd_step_vs_bound']:.2f}x bound), SGD step() {r['sgd_step_ms']:.1f} ms: extra "
                      f"{r['psgd_extra_ms']:.1f} ms = {r['psgd_extra_vs_bound']:.2f}x bound", flush=True)
    report = {"results": results, "peak_rss_MiB": peak_rss_mib(), "threads": torch.get_num_threads()}
    print(f"peak RSS {report['peak_rss_MiB']:.0f} MiB")
    print(json.dumps(report, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
