"""Out-of-core DLDR extraction against the paper's pipeline and against numpy's in-RAM limit.

Synthetic low-rank-plus-noise trajectory, t = 100 snapshots of n parameters (n = 10M is
4 GB of float32). Each part runs in its own subprocess so its peak RSS is its own:

  paper        one .pt per snapshot -> one numpy array -> sklearn PCA(n_components=d)
  numpy        float64 X @ X.T on data already in RAM, plus the basis product (the machine's limit); its
               float64 Gram and basis are the dense reference for the exactness figures
  trajstore    pipeline.extract_subspace on the threaded scheduler: cold (Gram pass + basis pass), then with
               the Gram current (what `extract --follow` leaves: the basis pass alone), then the float32
               basis product option; each with its Gram error and principal angle to the reference
  distributed  the same on a dask.distributed LocalCluster with 2 worker processes
  scaling      trajstore at n = 1M, 10M (and 50M with --slow): seconds per parameter, peak RSS

usage: python benchmarks/bench_extract.py [--n 10000000] [--t 100] [--dim 15] [--slow] [--out DIR] [--save FILE]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.compute import peak_rss_mib

ROOT = Path(__file__).resolve().parents[1]


def rows(t: int, n: int, rank: int = 10, seed: int = 0):
    """Yield t float32 rows: base + low-rank drift + noise (generated on the fly)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(n, dtype=np.float32)
    dirs = rng.standard_normal((rank, n), dtype=np.float32)
    scales = (10.0 / 1.5 ** np.arange(rank)).astype(np.float32)
    for i in range(t):
        coeff = (rng.standard_normal(rank).astype(np.float32) * scales * 1e-2)
        yield base + coeff @ dirs + 1e-3 * rng.standard_normal(n, dtype=np.float32)


# -- parts (each in its own process) --------------------------------------------------------
def part_generate(out: Path, t: int, n: int, pt: bool) -> dict:
    from trajstore import TrajectoryStore
    from trajstore.layout import ParamLayout, TensorSpec

    store = TrajectoryStore.create(out / f"traj-{n}.zarr", ParamLayout([TensorSpec("w", (n,), "float32")]),
                                   overwrite=True)
    folder = out / f"pt-{n}"
    if pt:
        import torch

        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    began = time.perf_counter()
    for i, row in enumerate(rows(t, n)):
        store.append(row, step=i)
        if pt:
            torch.save({"w": torch.from_numpy(row)}, folder / f"{i}.pt")
    store.close()
    return {"seconds": time.perf_counter() - began}


def part_paper(out: Path, t: int, n: int, dim: int) -> dict:
    import torch
    from sklearn.decomposition import PCA

    began = time.perf_counter()
    x = np.stack([torch.load(out / f"pt-{n}" / f"{i}.pt", weights_only=True)["w"].numpy() for i in range(t)])
    loaded = time.perf_counter() - began
    pca = PCA(n_components=dim).fit(x)
    basis = pca.components_.T
    return {"seconds": time.perf_counter() - began, "load_seconds": loaded, "peak_rss_MiB": peak_rss_mib(),
            "singular_values": pca.singular_values_.tolist(), "basis_head": basis[:2000].tolist()}


def part_numpy(out: Path, t: int, n: int, dim: int) -> dict:
    x = np.empty((t, n), np.float64)
    for i, row in enumerate(rows(t, n)):
        x[i] = row
    x -= x[0].copy()  # shifted, in place (not timed: "data already in RAM")
    began = time.perf_counter()
    g = x @ x.T  # (t, t) float64: the limit of one in-RAM product
    gram_seconds = time.perf_counter() - began
    c = np.eye(t) - 1.0 / t
    lam, vec = np.linalg.eigh(c @ g @ c)
    order = np.argsort(lam)[::-1][:dim]
    w = vec[:, order] / np.sqrt(lam[order])
    basis = x.T @ w  # (n, d): the basis product
    seconds = time.perf_counter() - began
    np.save(out / f"ref-basis-{n}.npy", basis)  # the float64 dense reference (not timed)
    return {"seconds": seconds, "gram_seconds": gram_seconds, "peak_rss_MiB": peak_rss_mib(),
            "singular_values": np.sqrt(lam[order]).tolist(), "basis_head": basis[:2000].tolist(), "gram": g.tolist()}


def _timed(fn, record: dict, key: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record[key] = record.get(key, 0.0) + time.perf_counter() - began
    return wrapper


def part_trajstore(out: Path, n: int, dim: int, scheduler: str | None, name: str = "default", cold: bool = True,
                   precision: str = "float64") -> dict:
    import pipeline.dldr as dldr
    from pipeline import extract_subspace

    path = out / f"traj-{n}.zarr"
    shutil.rmtree(path / "subspaces" / name, ignore_errors=True)
    if cold:  # no cached Gram
        shutil.rmtree(path / "gram", ignore_errors=True)
    phases: dict = {}
    dldr.update_gram = _timed(dldr.update_gram, phases, "gram_pass_seconds")  # the passes, for the profile
    dldr.run_resumable = _timed(dldr.run_resumable, phases, "basis_pass_seconds")
    client = None
    began_cluster = time.perf_counter()
    if scheduler == "local-cluster":
        from distributed import Client, LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    cluster_seconds = time.perf_counter() - began_cluster
    began = time.perf_counter()
    sub = extract_subspace(path, dim=dim, scheduler=client, name=name, basis_precision=precision)
    seconds = time.perf_counter() - began
    result = {"seconds": seconds, **phases, "peak_rss_MiB": peak_rss_mib(),
              "orthonormality_error": sub.orthonormality_error, "gram_blocks_computed": sub.attrs["gram_blocks_computed"],
              "singular_values": sub.singular_values.tolist(), "basis_head": sub.basis[:2000, :].tolist(),
              "cluster_start_seconds": cluster_seconds}
    if client is not None:
        worker_rss = client.run(peak_rss_mib)
        result["worker_peak_rss_MiB"] = max(worker_rss.values())
        client.close()
        cluster.close()
    return result


def part_compare(out: Path, n: int, names: list[str]) -> dict:
    """Each subspace's largest principal angle (rad, whole basis) to the float64 reference, and the Gram's error."""
    import zarr

    ref = np.load(out / f"ref-basis-{n}.npy", mmap_mode="r")  # (n, d) float64
    q_ref, _ = np.linalg.qr(ref)
    group = zarr.open_group(str(out / f"traj-{n}.zarr"), mode="r")
    result = {}
    for name in names:
        p, _ = np.linalg.qr(group[f"subspaces/{name}/basis"][:].astype(np.float64))
        residual = p - q_ref @ (q_ref.T @ p)
        result[name] = float(np.arcsin(min(1.0, np.linalg.norm(residual, 2))))
        del p, residual
    t = int(group["gram"].attrs["rows"])
    result["gram"] = group["gram/value"][:t, :t].tolist()
    return result


def run_part(*args: str) -> dict:
    load = os.getloadavg()[0]  # the machine is shared: say how loaded it was when each part ran
    proc = subprocess.run([sys.executable, __file__, "--part", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"part {args} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_avg_1min_before": load}


def angle_deg(a: list, b: list) -> float:
    """Largest principal angle between two bases' leading rows (a quick agreement check)."""
    qa, _ = np.linalg.qr(np.asarray(a))
    qb, _ = np.linalg.qr(np.asarray(b))
    return float(np.degrees(np.arcsin(min(1.0, np.linalg.norm(qa - qb @ (qb.T @ qa), 2)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--t", type=int, default=100)
    parser.add_argument("--dim", type=int, default=15)
    parser.add_argument("--slow", action="store_true", help="also n = 50M in the scaling part")
    parser.add_argument("--skip-paper", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--save", type=Path, default=None, help="also write the summary and the JSON report here")
    parser.add_argument("--part", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        name, out, *rest = args.part
        out = Path(out)
        fn = {"generate": lambda: part_generate(out, int(rest[0]), int(rest[1]), rest[2] == "1"),
              "paper": lambda: part_paper(out, int(rest[0]), int(rest[1]), int(rest[2])),
              "numpy": lambda: part_numpy(out, int(rest[0]), int(rest[1]), int(rest[2])),
              "trajstore": lambda: part_trajstore(out, int(rest[0]), int(rest[1]), (rest + [""])[2] or None,
                                                  *(rest[3:4] + [r == "1" for r in rest[4:5]] + rest[5:6])),
              "compare": lambda: part_compare(out, int(rest[0]), rest[1:])}
        print(json.dumps(fn[name]()))
        return

    out = args.out or Path(tempfile.mkdtemp(prefix="bench_extract_"))
    out.mkdir(parents=True, exist_ok=True)
    t, n, d = args.t, args.n, args.dim
    raw_mib = t * n * 4 / 2**20
    report: dict = {"t": t, "n": n, "dim": d, "trajectory_MiB": raw_mib}
    print(f"generating t={t} x n={n:,} ({raw_mib:.0f} MiB float32) ...", file=sys.stderr)
    report["generate"] = run_part("generate", str(out), str(t), str(n), "0" if args.skip_paper else "1")
    ours = run_part("trajstore", str(out), str(n), str(d))
    after_follow = run_part("trajstore", str(out), str(n), str(d), "", "after-follow", "0", "float64")
    fast = run_part("trajstore", str(out), str(n), str(d), "", "f32", "1", "float32")
    limit = run_part("numpy", str(out), str(t), str(n), str(d))
    compared = run_part("compare", str(out), str(n), "default", "after-follow", "f32")
    g_ref = np.asarray(limit.pop("gram"))
    gram_error = float(np.linalg.norm(np.asarray(compared["gram"]) - g_ref) / np.linalg.norm(g_ref))
    report["trajstore"] = {k: v for k, v in ours.items() if k != "basis_head"}
    report["numpy_limit"] = {k: v for k, v in limit.items() if k != "basis_head"}
    report["vs_numpy_limit"] = {"time_ratio": ours["seconds"] / limit["seconds"],
                                "rss_fraction_of_trajectory": ours["peak_rss_MiB"] / raw_mib,
                                "gram_rel_error": gram_error, "max_principal_angle_rad": compared["default"],
                                "max_angle_deg": angle_deg(ours["basis_head"], limit["basis_head"])}
    report["after_follow"] = {**{k: v for k, v in after_follow.items() if k != "basis_head"},
                              "time_ratio": after_follow["seconds"] / limit["seconds"],
                              "max_principal_angle_rad": compared["after-follow"]}
    report["basis_float32"] = {**{k: v for k, v in fast.items() if k != "basis_head"},
                               "time_ratio": fast["seconds"] / limit["seconds"],
                               "max_principal_angle_rad": compared["f32"]}
    if not args.skip_paper:
        paper = run_part("paper", str(out), str(t), str(n), str(d))
        report["paper"] = {k: v for k, v in paper.items() if k != "basis_head"}
        report["vs_paper"] = {"speedup": paper["seconds"] / ours["seconds"],
                              "rss_fraction": ours["peak_rss_MiB"] / paper["peak_rss_MiB"]}
    dist = run_part("trajstore", str(out), str(n), str(d), "local-cluster")
    report["distributed"] = {k: v for k, v in dist.items() if k != "basis_head"}
    report["distributed"]["time_ratio_vs_threads"] = dist["seconds"] / ours["seconds"]
    report["distributed"]["max_abs_basis_diff_vs_threads"] = float(
        np.abs(np.asarray(dist["basis_head"]) - np.asarray(ours["basis_head"])).max())
    scaling = {}
    for size in [1_000_000, n] + ([50_000_000] if args.slow else []):
        if size != n:
            run_part("generate", str(out), str(t), str(size), "0")
        r = ours if size == n else run_part("trajstore", str(out), str(size), str(d))
        scaling[str(size)] = {"seconds": r["seconds"], "ns_per_param": 1e9 * r["seconds"] / size,
                              "peak_rss_MiB": r["peak_rss_MiB"]}
    report["scaling"] = scaling
    lines = [json.dumps(report, indent=2), "",
             f"trajstore: {ours['seconds']:.1f} s (Gram pass {ours['gram_pass_seconds']:.1f} s, basis pass "
             f"{ours['basis_pass_seconds']:.1f} s), peak RSS {ours['peak_rss_MiB']:.0f} MiB "
             f"({100 * ours['peak_rss_MiB'] / raw_mib:.1f}% of the trajectory), ‖PᵀP−I‖ {ours['orthonormality_error']:.1e}",
             f"numpy in-RAM limit: {limit['seconds']:.1f} s (X@X.T {limit['gram_seconds']:.1f} s), peak RSS "
             f"{limit['peak_rss_MiB']:.0f} MiB -> time ratio {report['vs_numpy_limit']['time_ratio']:.2f}x; Gram "
             f"error {gram_error:.1e} relative, largest principal angle {compared['default']:.1e} rad",
             f"extraction after training (Gram kept current by extract --follow): {after_follow['seconds']:.1f} s, "
             f"one read pass ({after_follow['gram_blocks_computed']} Gram blocks computed), "
             f"{report['after_follow']['time_ratio']:.2f}x the numpy limit",
             f"basis_precision='float32': {fast['seconds']:.1f} s ({report['basis_float32']['time_ratio']:.2f}x the "
             f"numpy limit; basis pass {fast['basis_pass_seconds']:.1f} s vs {ours['basis_pass_seconds']:.1f} s), "
             f"largest principal angle {compared['f32']:.1e} rad (float64: {compared['default']:.1e})"]
    print("\n".join(lines))
    lines = lines[2:]
    tail = []
    if "paper" in report:
        p = report["paper"]
        tail.append(f"paper pipeline: {p['seconds']:.1f} s (load {p['load_seconds']:.1f} s), peak RSS "
                    f"{p['peak_rss_MiB']:.0f} MiB -> trajstore {report['vs_paper']['speedup']:.2f}x faster at "
                    f"{100 * report['vs_paper']['rss_fraction']:.1f}% of its RSS")
    tail += [f"distributed (2 workers): {dist['seconds']:.1f} s = {report['distributed']['time_ratio_vs_threads']:.2f}x "
            f"threads, worker peak RSS {dist.get('worker_peak_rss_MiB', 0):.0f} MiB"]
    for size, s in scaling.items():
        tail.append(f"scaling n={int(size):,}: {s['seconds']:.1f} s, {s['ns_per_param']:.2f} ns/param, "
                    f"peak RSS {s['peak_rss_MiB']:.0f} MiB")
    tail.append("load average (1 min) before each part: " + ", ".join(
        f"{k} {v['load_avg_1min_before']:.1f}" for k, v in
        [("trajstore", ours), ("after-follow", after_follow), ("float32", fast), ("numpy", limit), ("distributed", dist)]))
    print("\n".join(tail))
    if args.save:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        args.save.write_text("\n".join([f"== run of {stamp}, {os.cpu_count()} cores, 1-min load average now "
                                         f"{os.getloadavg()[0]:.1f} (see each part's below) ==",
                                         *lines, *tail, "", json.dumps(report, indent=2), ""]))
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
