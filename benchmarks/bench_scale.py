"""End to end at 100M+ parameters on CPU: record a byte-level GPT-2 through the Hugging Face Trainer callback,
extract DLDR subspaces out of core, train in the subspace with P resident and with P memory-mapped.

Phases, each in its own process (its peak RSS and I/O counters are its own):

  record          HF Trainer (AdamW) on the standard library's sources, TrajectoryCallback every N steps:
                  at least 41 snapshots (the initial weights and 40 steps, so d = 40 fits). Time spent inside
                  the callback's hooks is measured by two timing callbacks around it (the training loop's cost).
  extract d=D     pipeline.extract_subspace for each D (default 15 and 40), cold (the cached Gram removed first
                  unless --warm-gram), on the threaded scheduler: time, time per GB of trajectory, peak RSS,
                  bytes read. The subspaces not trained in are deleted afterwards (disk).
  train resident  Basis.from_store(mode="resident"): P-SGD steps from snapshot 0, then, in the same process on the
                  same batches, plain SGD and AdamW steps: the step-time ratios.
  train mmap      Basis.from_store(host="mmap", mode="streamed"): the uncompressed copy is built (timed), the
                  page cache of it dropped (posix_fadvise), then the same P-SGD steps streamed from the file.

Bytes read / written come from /proc/self/io: read_bytes counts what the process made the kernel fetch
from the disk (page-cache hits and mmap pages already cached are not in it), rchar counts bytes returned
by read() calls (cached or not; memory-mapped reads are not in it).

usage: python benchmarks/bench_scale.py [--params 124M] [--steps 40] [--batch 2] [--dims 15,40] [--out DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.compute import peak_rss_mib


@dataclass
class BenchConfig:
    """One benchmark run; saved as ``<out>/config.json`` for the phase processes."""

    out: str
    params: int = 124_000_000
    width: int = 768
    heads: int | None = None  # default width // 64
    context: int = 256
    batch: int = 2
    steps: int = 40  # Trainer steps; a snapshot every ``every`` steps plus the initial weights
    every: int = 1
    lr: float = 3e-4  # AdamW, constant
    dims: list[int] = field(default_factory=lambda: [15, 40])
    train_dim: int = 15
    timed_steps: int = 3  # measured steps per optimizer (after one warm-up step)
    subspace_lr: float = 1.0
    eval_windows: int = 8  # held-out windows for the loss / perplexity figures
    warm_gram: bool = False  # keep the cached Gram between extractions (the second then skips the Gram pass)
    seed: int = 0

    @property
    def store(self) -> Path:
        return Path(self.out) / "run.zarr"


# -- measurements -----------------------------------------------------------------------------
def io_counters() -> dict[str, int]:
    """This process's /proc/self/io (rchar, wchar, read_bytes, write_bytes, ...); empty where unavailable."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def io_delta(before: dict[str, int]) -> dict[str, int]:
    after = io_counters()
    return {k: after[k] - before.get(k, 0) for k in ("rchar", "read_bytes", "wchar", "write_bytes") if k in after}


def memory_now_mib() -> dict[str, float]:
    """Current anonymous and file-backed resident memory (a memory map's pages are file-backed)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def du_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- model and data ---------------------------------------------------------------------------
def build(cfg: BenchConfig):
    """(model, size, train windows, held-out windows) for ``cfg``, seeded."""
    import torch

    from pipeline.experiments.data import ByteWindows, stdlib_bytes
    from pipeline.experiments.models import ByteGPT, gpt_size_for

    size = gpt_size_for(cfg.params, cfg.width, cfg.heads, cfg.context)
    torch.manual_seed(cfg.seed)
    model = ByteGPT(size)
    need = (cfg.steps + cfg.timed_steps + 2) * cfg.batch * cfg.context + 1  # a window per example
    train, test = stdlib_bytes(max(need, 1 << 18), max(cfg.eval_windows * cfg.context + 1, 1 << 14))
    return model, size, ByteWindows(train, cfg.context), ByteWindows(test, cfg.context)


def held_out_loss(model, test, windows: int) -> float:
    """Mean next-byte cross entropy over the first ``windows`` held-out windows."""
    import torch

    x = torch.stack([test[i][0] for i in range(min(windows, len(test)))])  # (W, T)
    y = torch.stack([test[i][1] for i in range(min(windows, len(test)))])
    model.eval()
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(model(x), y))
    model.train()
    return loss


def fixed_batches(train, cfg: BenchConfig, count: int) -> list:
    """``count`` batches of the training windows after those the Trainer used: the same for every optimizer."""
    import torch

    first = cfg.steps * cfg.batch
    out = []
    for k in range(count):
        idx = [(first + k * cfg.batch + j) % len(train) for j in range(cfg.batch)]
        out.append((torch.stack([train[i][0] for i in idx]), torch.stack([train[i][1] for i in idx])))
    return out


# -- phases -----------------------------------------------------------------------------------
def phase_record(cfg: BenchConfig) -> dict:
    """Train with the HF Trainer for ``steps`` steps, recording every ``every`` steps."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from trajstore import TrajectoryStore
    from trajstore.integrations.transformers import TrajectoryCallback

    set_seed(cfg.seed)
    model, size, train, test = build(cfg)
    n = sum(p.numel() for p in model.parameters())
    loss_before = held_out_loss(model, test, cfg.eval_windows)

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            x, y = train[i]
            return {"input_ids": x, "labels": y}

    hooks = {"seconds": 0.0, "calls": 0}
    entered = [0.0]

    class Enter(TrainerCallback):  # runs just before TrajectoryCallback's hook of every event
        def on_event(self, *a, **k):
            entered[0] = time.perf_counter()

    class Leave(TrainerCallback):  # just after it
        def on_event(self, *a, **k):
            hooks["seconds"] += time.perf_counter() - entered[0]
            hooks["calls"] += 1

    for cls in (Enter, Leave):
        for event in ("on_train_begin", "on_step_begin", "on_step_end", "on_log", "on_epoch_begin", "on_epoch_end",
                      "on_save", "on_train_end"):
            setattr(cls, event, cls.on_event)
    args = TrainingArguments(output_dir=str(Path(cfg.out) / "trainer"), max_steps=cfg.steps,
                             per_device_train_batch_size=cfg.batch, learning_rate=cfg.lr, lr_scheduler_type="constant",
                             optim="adamw_torch", weight_decay=0.0, save_strategy="no", logging_steps=1, report_to=[],
                             use_cpu=True, seed=cfg.seed, data_seed=cfg.seed, remove_unused_columns=False,
                             disable_tqdm=True, dataloader_num_workers=0)
    callback = TrajectoryCallback(cfg.store, every_n_steps=cfg.every, overwrite=True)
    trainer = Trainer(model=model, args=args, train_dataset=Dicts(), callbacks=[Enter(), callback, Leave()])
    io0, began = io_counters(), time.perf_counter()
    trainer.train()  # on_train_end closes the store: every snapshot is committed when this returns
    seconds = time.perf_counter() - began
    io = io_delta(io0)
    with TrajectoryStore.open(cfg.store) as store:
        t, steps = len(store), store.steps.tolist()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"phase": "record", "n_params": n, "size": asdict(size), "snapshots": t, "steps_recorded": steps,
            "seconds": seconds, "seconds_per_step": seconds / cfg.steps,
            "callback_seconds": hooks["seconds"], "callback_fraction": hooks["seconds"] / seconds,
            "trajectory_GB": t * n * 4 / 1e9, "store_bytes_on_disk": du_bytes(cfg.store),
            "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
            "held_out_loss_before": loss_before, "held_out_loss_after": held_out_loss(model, test, cfg.eval_windows),
            "peak_rss_MiB": peak_rss_mib(), "io": io}


def phase_extract(cfg: BenchConfig, dim: int) -> dict:
    """One cold out-of-core extraction of a d-dimensional subspace named ``d<dim>``."""
    from pipeline import extract_subspace
    from trajstore import TrajectoryStore

    with TrajectoryStore.open(cfg.store) as store:
        t, n = len(store), store.layout.n
    gram_cached = (cfg.store / "gram").exists()
    if not cfg.warm_gram:
        shutil.rmtree(cfg.store / "gram", ignore_errors=True)  # cold: this extraction computes its own Gram
    io0, began = io_counters(), time.perf_counter()
    sub = extract_subspace(cfg.store, dim=dim, name=f"d{dim}", overwrite=True)
    seconds = time.perf_counter() - began
    gb = t * n * 4 / 1e9
    return {"phase": f"extract d={dim}", "dim": dim, "snapshots": t, "n_params": n, "seconds": seconds,
            "seconds_per_GB": seconds / gb, "trajectory_GB": gb, "gram_reused": cfg.warm_gram and gram_cached,
            "explained_variance": float(sub.explained_variance_ratio[:dim].sum()),
            "orthonormality_error": float(sub.orthonormality_error), "peak_rss_MiB": peak_rss_mib(),
            "io": io_delta(io0), "basis_bytes_on_disk": du_bytes(cfg.store / "subspaces" / f"d{dim}")}


def _time_steps(model, opt, batches) -> tuple[list[float], list[float]]:
    """(seconds, losses) of one optimizer step per batch: forward, backward, update."""
    import torch

    times, losses = [], []
    for x, y in batches:
        began = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - began)
        losses.append(float(loss.detach()))
    return times, losses


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def _restart(model, cfg: BenchConfig) -> None:
    from trajstore import TrajectoryStore

    with TrajectoryStore.open(cfg.store) as store:
        store.load_into(model, 0)  # the paper restarts from the first snapshot


def phase_train(cfg: BenchConfig, host: str) -> dict:
    """P-SGD in the ``d<train_dim>`` subspace, P resident (``host="resident"``, with the SGD and AdamW
    baselines in the same process) or memory-mapped and streamed (``host="mmap"``)."""
    import torch

    from pipeline.basis import Basis
    from pipeline.optim import SubspaceSGD

    model, _, train, test = build(cfg)
    batches = fixed_batches(train, cfg, cfg.timed_steps + 1)  # the first is a warm-up
    _restart(model, cfg)
    result: dict = {"phase": f"train {host}", "dim": cfg.train_dim, "timed_steps": cfg.timed_steps,
                    "held_out_loss_start": held_out_loss(model, test, cfg.eval_windows)}
    name = f"d{cfg.train_dim}"
    io0, began = io_counters(), time.perf_counter()
    if host == "resident":
        basis = Basis.from_store(cfg.store, name, mode="resident", host="pinned")
    else:
        basis = Basis.from_store(cfg.store, name, mode="streamed", host="mmap")
    result["basis_load_seconds"] = time.perf_counter() - began
    result["basis_load_io"] = io_delta(io0)
    result["basis_mode"] = basis.mode
    if host == "mmap":
        result["mmap_file_bytes"] = os.path.getsize(basis.mapped_file)  # the tiled .npy copy, memory-mapped
        fd = os.open(basis.mapped_file, os.O_RDONLY)
        try:  # drop its pages from the page cache: the steps read P from the disk
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    opt = SubspaceSGD(model.parameters(), basis, lr=cfg.subspace_lr, momentum=0.9)
    io0 = io_counters()
    times, losses = _time_steps(model, opt, batches)
    result.update({"psgd_ms": 1e3 * _median(times[1:]), "psgd_first_step_ms": 1e3 * times[0],
                   "psgd_step_ms_all": [1e3 * t for t in times], "psgd_losses": losses,
                   "psgd_io": io_delta(io0), "held_out_loss_after_psgd": held_out_loss(model, test, cfg.eval_windows),
                   "peak_rss_MiB_psgd": peak_rss_mib(), "rss_now_MiB": memory_now_mib()})
    if host == "resident":
        del opt, basis
        for label, make in (("sgd", lambda p: torch.optim.SGD(p, lr=1e-3, momentum=0.9)),
                            ("adamw", lambda p: torch.optim.AdamW(p, lr=cfg.lr, weight_decay=0.0))):
            _restart(model, cfg)
            times, losses = _time_steps(model, make(model.parameters()), batches)
            result[f"{label}_ms"] = 1e3 * _median(times[1:])
            result[f"{label}_step_ms_all"] = [1e3 * t for t in times]
            result[f"{label}_losses"] = losses
            result[f"psgd_ratio_vs_{label}"] = result["psgd_ms"] / result[f"{label}_ms"]
    result["peak_rss_MiB"] = peak_rss_mib()
    return result


# -- driver -----------------------------------------------------------------------------------
def run_phase(cfg_path: Path, *args: str) -> dict:
    """Run one phase in a fresh process and return its JSON result (its last stdout line)."""
    proc = subprocess.run([sys.executable, __file__, "--part", str(cfg_path), *args], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode:
        raise RuntimeError(f"phase {args} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_all(cfg: BenchConfig, in_process: bool = False, log=print) -> dict:
    """Every phase in order; the report dict. ``in_process``: no subprocesses (tests; RSS then shared)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    cfg_path.write_text(json.dumps(asdict(cfg)))

    def phase(*args: str) -> dict:
        if in_process:
            return _dispatch(cfg, list(args))
        return run_phase(cfg_path, *args)

    report: dict = {"config": asdict(cfg), "machine": machine()}
    began = time.perf_counter()
    report["record"] = r = phase("record")
    log(f"record: {r['n_params']:,} parameters, {r['snapshots']} snapshots in {r['seconds']:.1f} s "
        f"({r['seconds_per_step']:.2f} s/step, recording hooks {100 * r['callback_fraction']:.1f}% of it), "
        f"{r['trajectory_GB']:.2f} GB raw, {r['store_bytes_on_disk'] / 1e9:.2f} GB on disk, peak RSS "
        f"{r['peak_rss_MiB']:.0f} MiB, wrote {r['io'].get('write_bytes', 0) / 1e9:.2f} GB; held-out loss "
        f"{r['held_out_loss_before']:.3f} -> {r['held_out_loss_after']:.3f} (perplexity "
        f"{math.exp(r['held_out_loss_before']):.1f} -> {math.exp(r['held_out_loss_after']):.1f})")
    report["extract"] = []
    for d in sorted(cfg.dims, reverse=True):  # the largest first: it is deleted before the next one (disk)
        e = phase("extract", str(d))
        report["extract"].append(e)
        log(f"extract d={d}: {e['seconds']:.1f} s = {e['seconds_per_GB']:.1f} s/GB of trajectory, peak RSS "
            f"{e['peak_rss_MiB']:.0f} MiB, read {e['io'].get('read_bytes', 0) / 1e9:.2f} GB from disk "
            f"({e['io'].get('rchar', 0) / 1e9:.2f} GB through read()), explained variance "
            f"{e['explained_variance']:.4f}, ‖PᵀP − I‖ {e['orthonormality_error']:.1e}")
        if d != cfg.train_dim:  # disk: only the trained subspace is kept
            shutil.rmtree(cfg.store / "subspaces" / f"d{d}", ignore_errors=True)
    for host in ("resident", "mmap"):
        t = phase("train", host)
        report[f"train_{host}"] = t
        line = (f"train P {host} (d={cfg.train_dim}): basis load {t['basis_load_seconds']:.1f} s, P-SGD step "
                f"{t['psgd_ms']:.0f} ms (first {t['psgd_first_step_ms']:.0f} ms), read "
                f"{t['psgd_io'].get('read_bytes', 0) / 1e9:.2f} GB from disk in {cfg.timed_steps + 1} steps, peak RSS "
                f"{t['peak_rss_MiB']:.0f} MiB (anon now {t['rss_now_MiB'].get('RssAnon', 0):.0f} MiB, file-backed "
                f"{t['rss_now_MiB'].get('RssFile', 0):.0f} MiB); held-out loss {t['held_out_loss_start']:.3f} -> "
                f"{t['held_out_loss_after_psgd']:.3f}")
        if host == "resident":
            line += (f"; SGD step {t['sgd_ms']:.0f} ms, AdamW step {t['adamw_ms']:.0f} ms -> P-SGD / SGD "
                     f"{t['psgd_ratio_vs_sgd']:.2f}x, P-SGD / AdamW {t['psgd_ratio_vs_adamw']:.2f}x")
        else:
            res = report["train_resident"]
            t["psgd_ratio_vs_resident"] = t["psgd_ms"] / res["psgd_ms"]
            t["psgd_ratio_vs_sgd"] = t["psgd_ms"] / res["sgd_ms"]
            t["psgd_ratio_vs_adamw"] = t["psgd_ms"] / res["adamw_ms"]
            t["max_loss_diff_vs_resident"] = max(abs(a - b) for a, b in zip(t["psgd_losses"], res["psgd_losses"]))
            line += (f"; vs resident {t['psgd_ratio_vs_resident']:.2f}x, vs SGD {t['psgd_ratio_vs_sgd']:.2f}x, "
                     f"vs AdamW {t['psgd_ratio_vs_adamw']:.2f}x; mmap copy {t.get('mmap_file_bytes', 0) / 1e9:.2f} GB, "
                     f"losses equal resident's to {t['max_loss_diff_vs_resident']:.1e}")
        log(line)
    report["total_seconds"] = time.perf_counter() - began
    report["peak_rss_MiB_extraction_max"] = max(e["peak_rss_MiB"] for e in report["extract"])
    log(f"total {report['total_seconds']:.0f} s; largest extraction peak RSS "
        f"{report['peak_rss_MiB_extraction_max']:.0f} MiB (target ≤ 1024 MiB: "
        f"{'met' if report['peak_rss_MiB_extraction_max'] <= 1024 else 'NOT met'})")
    return report


def machine() -> dict:
    import platform

    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__}


def _dispatch(cfg: BenchConfig, args: list[str]) -> dict:
    name, rest = args[0], args[1:]
    if name == "record":
        return phase_record(cfg)
    if name == "extract":
        return phase_extract(cfg, int(rest[0]))
    if name == "train":
        return phase_train(cfg, rest[0])
    raise SystemExit(f"unknown phase {name!r}")


def parse_count(text: str) -> int:
    """``124M``, ``20m``, ``1.5G``, ``500K`` or a plain integer."""
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:].lower())
    return int(float(text[:-1]) * scale) if scale else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="124M", help="target parameter count (layers chosen at --width)")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--dims", default="15,40")
    parser.add_argument("--train-dim", type=int, default=15)
    parser.add_argument("--timed-steps", type=int, default=3)
    parser.add_argument("--subspace-lr", type=float, default=1.0)
    parser.add_argument("--warm-gram", action="store_true", help="reuse the Gram between extractions")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (the store is t x n x 4 bytes)")
    parser.add_argument("--part", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        cfg = BenchConfig(**json.loads(Path(args.part[0]).read_text()))
        print(json.dumps(_dispatch(cfg, args.part[1:])))
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig(out=str(out), params=parse_count(args.params), width=args.width, heads=args.heads,
                      context=args.context, batch=args.batch, steps=args.steps, every=args.every,
                      dims=[int(d) for d in args.dims.split(",")], train_dim=args.train_dim,
                      timed_steps=args.timed_steps, subspace_lr=args.subspace_lr, warm_gram=args.warm_gram)
    if cfg.train_dim not in cfg.dims:
        parser.error(f"--train-dim {cfg.train_dim} must be one of --dims {args.dims}")
    if cfg.steps // cfg.every + 1 <= max(cfg.dims):
        parser.error(f"{cfg.steps // cfg.every + 1} snapshots cannot give d = {max(cfg.dims)}: raise --steps")
    from pipeline.experiments.models import gpt_size_for

    size = gpt_size_for(cfg.params, cfg.width, cfg.heads, cfg.context)
    print(f"model: {size} = {size.param_count():,} parameters (asked {args.params}); "
          f"{cfg.steps // cfg.every + 1} snapshots = {(cfg.steps // cfg.every + 1) * size.param_count() * 4 / 1e9:.2f} "
          f"GB raw; free disk at {out}: {shutil.disk_usage(out).free / 1e9:.1f} GB", flush=True)
    try:
        report = run_all(cfg, log=lambda s: print(s, flush=True))
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
