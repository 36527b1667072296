"""Step time of P-SGD against plain SGD (same run), resident against streamed P, and peak memory;
step time of P-BFGS with loss-only line-search trials against trials that backpropagate (same run).

CPU (default): MLPs of about 1M and 10M parameters, d = 15 and 40, batch 128.
GPU (--device cuda): an MLP of at least 100M parameters, P resident and streamed.

A "step" is the whole training step: forward, backward and the optimizer update (P-BFGS: its
closure evaluations, line search included). The two P-BFGS variants follow the same trajectory (loss-only
trials are bit-identical to backpropagating ones), step for step on twin models, interleaved so that
background load hits both alike.

usage: python benchmarks/bench_optim.py [--device cpu|cuda] [--steps 30] [--only all|psgd|pbfgs]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import time

import torch
from torch import nn

from pipeline.basis import Basis
from pipeline.compute import peak_rss_mib
from pipeline.experiments.models import mlp
from pipeline.optim import SubspaceBFGS, SubspaceSGD
from trajstore.layout import ParamLayout


def random_basis(model: nn.Module, d: int, seed: int = 0) -> torch.Tensor:
    """A random orthonormal (n, d) float32 basis by CholeskyQR2 (Gram matrices accumulated in float64 over
    row blocks). Not torch.linalg.qr: MKL's ?orgqr refuses its workspace size at ~134M x 15 ("Parameter 8
    was incorrect on entry to SORGQR", seen on the H200) and the bench would time a basis that is not one."""
    n = sum(p.numel() for p in model.parameters())
    q = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))  # (n, d)
    for _ in range(2):  # the second pass takes the error to float32 rounding
        gram = sum(block.T.double() @ block.double() for block in q.split(1 << 22))  # (d, d)
        chol = torch.linalg.cholesky(gram)  # gram = L L^T, so q L^-T is orthonormal
        q = torch.linalg.solve_triangular(chol.float(), q.T, upper=False).T.contiguous()
    return q


def time_steps(model: nn.Module, opt, x, y, steps: int, device: str) -> float:
    """Median seconds per full training step."""
    times = []
    for i in range(steps + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def one_pass_ms(host: torch.Tensor, mode: str, block_rows: int, repeats: int = 5) -> float:
    """GPU only: median milliseconds for one read of P (n, d) where ``mode`` reads it from: device memory
    (resident: ``P.sum()``) or page-locked host memory over the bus (streamed: block copies, back to back,
    into one device buffer). Twice this is the two-pass bound of a P-SGD step."""
    if mode == "resident":
        dev = host.to("cuda")  # (n, d)

        def one_pass():
            dev.sum()
    else:
        buf = torch.empty(block_rows, host.shape[1], device="cuda")  # (block_rows, d)

        def one_pass():
            for block in host.split(block_rows):
                buf[: len(block)].copy_(block, non_blocking=True)
    times = []
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        one_pass()
        end.record()
        end.synchronize()
        if i:  # the first is a warm-up
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def bench(sizes: list[int], dims: list[int], steps: int, device: str, block_rows: int) -> list[dict]:
    rows = []
    for widths in ([int(s) for s in str(sz).split("x")] for sz in sizes):
        torch.manual_seed(0)
        model = mlp(widths).to(device)
        n = sum(p.numel() for p in model.parameters())
        layout = ParamLayout.from_module(model)
        x = torch.randn(128, widths[0], device=device)
        y = torch.randint(0, widths[-1], (128,), device=device)
        start = [p.detach().clone() for p in model.parameters()]
        sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        t_sgd = time_steps(model, sgd, x, y, steps, device)
        for d in dims:
            p = random_basis(model, d)
            entry = {"n_params": n, "d": d, "sgd_ms": 1e3 * t_sgd}
            for mode in ("resident", "streamed"):
                with torch.no_grad():
                    for w, w0 in zip(model.parameters(), start):
                        w.copy_(w0)
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    host = p.pin_memory() if mode == "streamed" else p
                else:
                    host = p
                basis = Basis.from_array(host, layout, device=device, mode=mode, block_rows=block_rows)
                opt = SubspaceSGD(model.parameters(), basis, lr=1e-3, momentum=0.9)
                t = time_steps(model, opt, x, y, steps, device)
                entry[f"{mode}_ms"] = 1e3 * t
                entry[f"{mode}_ratio_vs_sgd"] = t / t_sgd
                entry[f"{mode}_basis_device_MiB"] = basis.device_bytes() / 2**20
                tiled = basis.pass_bytes / (host.numel() * host.element_size())  # the step reads padded tiles
                del basis, opt
                if device == "cuda":
                    gc.collect()
                    entry[f"{mode}_peak_device_MiB"] = torch.cuda.max_memory_allocated() / 2**20
                    bound = 2 * one_pass_ms(host, mode, block_rows) * tiled
                    entry[f"{mode}_bound_ms"] = bound
                    entry[f"{mode}_extra_vs_bound"] = (entry[f"{mode}_ms"] - entry["sgd_ms"]) / bound
                    print(f"  {mode}: two-pass bound {bound:.2f} ms ({2 * tiled * p.numel() * 4 / bound / 1e6:.0f} GB/s), "
                          f"P-SGD extra over SGD {entry[f'{mode}_ms'] - entry['sgd_ms']:.2f} ms = "
                          f"{entry[f'{mode}_extra_vs_bound']:.2f}x the bound (issue 13: <= 1.15x)", flush=True)
            rows.append(entry)
            print(f"n={n:,} d={d}: SGD {1e3 * t_sgd:.2f} ms | P-SGD resident {entry['resident_ms']:.2f} ms "
                  f"({entry['resident_ratio_vs_sgd']:.2f}x) | streamed {entry['streamed_ms']:.2f} ms "
                  f"({entry['streamed_ratio_vs_sgd']:.2f}x), P on device: resident "
                  f"{entry['resident_basis_device_MiB']:.0f} MiB, streamed {entry['streamed_basis_device_MiB']:.0f} MiB",
                  flush=True)
    return rows


def bench_bfgs(sizes: list[str], dims: list[int], steps: int, device: str, batches: int = 4) -> list[dict]:
    """P-BFGS median step time: closure(backward=...) (trials forward-only) vs a plain closure (trials
    backpropagate, the behaviour before loss-only trials), on twin models fed the same batches."""
    rows = []
    for widths in ([int(s) for s in str(sz).split("x")] for sz in sizes):
        for d in dims:
            torch.manual_seed(0)
            models = [mlp(widths).to(device)]
            models.append(copy.deepcopy(models[0]))
            n = sum(p.numel() for p in models[0].parameters())
            basis = Basis.from_array(random_basis(models[0], d), ParamLayout.from_module(models[0]), device=device,
                                     mode="resident")
            opts = [SubspaceBFGS(m.parameters(), basis) for m in models]
            gen = torch.Generator().manual_seed(1)
            data = [(torch.randn(128, widths[0], generator=gen).to(device),
                     torch.randint(0, widths[-1], (128,), generator=gen).to(device)) for _ in range(batches)]
            times: list[list[float]] = [[], []]
            calls = [0, 0]
            for i in range(steps + 3):
                x, y = data[i % batches]
                for k, (model, opt) in enumerate(zip(models, opts)):
                    def loss_only(backward=True, model=model, opt=opt, k=k):
                        calls[k] += i >= 3
                        loss = nn.functional.cross_entropy(model(x), y)
                        if backward:
                            opt.zero_grad(set_to_none=False)
                            loss.backward()
                        return loss

                    closure = (lambda: loss_only(True)) if k == 0 else loss_only
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    opt.step(closure)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    if i >= 3:  # warm-up
                        times[k].append(time.perf_counter() - t0)
            before, after = (sorted(t)[len(t) // 2] for t in times)
            same = all(torch.equal(p, q) for p, q in zip(*(m.parameters() for m in models)))
            entry = {"n_params": n, "d": d, "pbfgs_backprop_trials_ms": 1e3 * before,
                     "pbfgs_loss_only_trials_ms": 1e3 * after, "ratio_after_vs_before": after / before,
                     "closure_calls_per_step": calls[1] / steps, "trajectories_identical": same,
                     "ls_failures": int(opts[1].subspace_state["ls_failures"])}
            rows.append(entry)
            print(f"n={n:,} d={d}: P-BFGS step, trials backpropagate (before) "
                  f"{entry['pbfgs_backprop_trials_ms']:.2f} ms | loss-only trials (after) {entry['pbfgs_loss_only_trials_ms']:.2f} ms "
                  f"({entry['ratio_after_vs_before']:.2f}x) | {entry['closure_calls_per_step']:.2f} closure calls/step,"
                  f" identical trajectories: {same}", flush=True)
            del models, opts, basis
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", choices=("all", "psgd", "pbfgs"), default="all")
    args = parser.parse_args()
    if args.device == "cuda":
        # ~134M parameters: 8192 -> 8192 -> 8192 -> 10; resident P at d = 15 is 8 GB
        sizes, dims, block_rows = ["8192x8192x8192x10"], [15], 1 << 22
        print(f"device: {torch.cuda.get_device_name()}")
    else:
        # ~1.05M and ~10.5M parameters
        sizes, dims, block_rows = ["1024x768x256x10", "2048x2560x2048x10"], [15, 40], 1 << 18
    rows = bench(sizes, dims, args.steps, args.device, block_rows) if args.only in ("all", "psgd") else []
    bfgs_rows = bench_bfgs(sizes, dims, args.steps, args.device) if args.only in ("all", "pbfgs") else []
    print(json.dumps({"device": args.device, "threads": torch.get_num_threads(), "results": rows,
                      "pbfgs": bfgs_rows, "peak_rss_MiB": peak_rss_mib()}, indent=2))
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
