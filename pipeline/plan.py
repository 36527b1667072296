"""A memory plan for recording a trajectory and training in its subspace: sizes, placement, traffic, time.

:func:`plan` answers, for n parameters, a d-dimensional basis and t snapshots:

* the trajectory's size on disk for each codec preset (:mod:`trajstore.codecs`), from the compression
  ratios of :data:`MEASURED_RATIOS` (or, for a store, the bytes it holds);
* P's size in its dtype (float32, or bfloat16 / float16: see :class:`pipeline.basis.Basis`);
* whether P is resident on the device or streamed to it: the very rule :class:`~pipeline.basis.Basis`
  applies (:func:`pipeline.placement._choose_mode`), with the device memory given or queried; and where
  streamed P lives, host RAM or a memory-mapped copy on disk (:func:`pipeline.placement._choose_host`, the
  rule of ``Basis.from_store(host="auto")``);
* the bytes one P-SGD step moves for P's two products (g̃ = Pᵀg reads P once; w += P c reads it again
  and reads and writes w), over the host-to-device link when P streams to an accelerator, and from disk
  when P is memory-mapped;
* the time those bytes take at the bandwidth given, measured here (a ~0.2 s probe; the disk: a cold read
  of a 64 MiB temp file), or a stated constant.

:func:`plan_store` reads n, t, the dtype, the codec and the stored bytes from a store, and d from one of
its subspaces, or of a ``trajstore train`` run directory's ``trajectory.zarr``. The ``trajstore plan``
command prints either (cli/plan_cmds.py).
"""
from __future__ import annotations

import functools
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import numpy as np
import torch

from trajstore.codecs import get_preset
from trajstore.errors import InvalidArgumentError

from .placement import (
    DTYPES,
    UPCAST_BYTES,
    _choose_host,
    _choose_mode,
    scratch_bytes,
    tile_cols,
)
from .tiles import tile_count

# Compression ratios (raw float32 bytes / stored snapshot bytes). The plain lossless presets: one snapshot of
# the 10M MLP (benchmarks/results/bench_codecs.txt; a 29M transformer gives the same, 1.138-1.139; a ~10K-
# parameter model's weights do not compress with lz4: 1.00, zstd 1.08). The xor and delta presets, which gain
# from consecutive snapshots: benchmarks/bench_record.py's "compression" (a 1D-CNN on MNIST-1D,
# pipeline.experiments.models.CNN1D, 9,610 float32 parameters, 400 snapshots one SGD step apart, lr 0.05,
# momentum 0.9, batch 100). Snapshots further apart (once per epoch) differ more: those presets then gain less.
MEASURED_RATIOS = {"lossless": 1.139, "lossless-zstd": 1.140, "xor-delta:16": 1.302, "bitround-delta:8": 1.838,
                   "bitround-delta:6": 2.175, "float16-delta": 2.094}
RATIO_SOURCE = ("benchmarks/results/bench_codecs.txt (lossless presets: a 10M MLP; ~10K-parameter models: 1.00) and "
                "bench_record.txt (xor/delta presets: 1D-CNN on MNIST-1D, 400 snapshots one SGD step apart)")
# Documented constants for an accelerator that is not on this machine (--device-memory without CUDA here).
DEVICE_BANDWIDTH = 2.0e12  # B/s: achieved read bandwidth of a data-centre GPU's HBM (H100 SXM: 3.35 TB/s peak)
LINK_BANDWIDTH = 25e9  # B/s: pinned host-to-device copies over PCIe 4.0 x16 (32 GB/s peak)
LIMIT = 1 << 62  # counts and sizes must be below it: the store's limit (trajstore/format.py, check_meta)
PROBE_BYTES = 64 << 20  # the disk read probe's temp file
_DECIMAL = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "B": 10 ** 9, "T": 10 ** 12}
_BINARY = {"KI": 2 ** 10, "MI": 2 ** 20, "GI": 2 ** 30, "TI": 2 ** 40}
_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
                "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
                "fp64": torch.float64, "float64": torch.float64, "double": torch.float64}


def parse_size(text: "str | int | float", what: str = "size") -> int:
    """Bytes from ``"80GB"`` (decimal: 80·10⁹), ``"80GiB"`` (binary), ``"512M"``, ``"1.5e9"`` or a number."""
    return _parse(text, what, bytes_=True)


def parse_count(text: "str | int | float", what: str = "count") -> int:
    """A count from ``"124M"``, ``"1.3B"`` (10⁹), ``"7e9"``, ``"1,000,000"`` or a number."""
    return _parse(text, what, bytes_=False)


def _parse(text: "str | int | float", what: str, bytes_: bool) -> int:
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = Decimal(text) if np.isfinite(text) else Decimal(0)
    else:
        found = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([KMGTB]I?)?(B)?\s*",
                             str(text).upper())
        unit = (found.group(2) or "") if found else ""
        if bytes_ and unit == "B" and found.group(3) is None:  # "512B": the bytes suffix, not 10⁹
            unit = ""
        if found is None or (unit == "B" and found.group(3)) or (not bytes_ and (found.group(3) or "I" in unit)):
            example = "80GB, 80GiB, 512MB or 1.5e9" if bytes_ else "124M, 1.3B, 7e9 or 1000000"
            raise InvalidArgumentError(f"{what} must be a number with an optional unit such as {example}; "
                                       f"got {text!r}")
        try:  # exact: "1.3B" is 1,300,000,000 and "4.5" is not a whole number
            value = Decimal(found.group(1).replace(",", "").replace("_", "")) * (_BINARY.get(unit) or _DECIMAL[unit])
        except InvalidOperation:
            raise InvalidArgumentError(f"{what} must be a number, got {text!r}") from None
    if value < 1:
        raise InvalidArgumentError(f"{what} must be at least 1, got {text!r}")
    if value != value.to_integral_value():
        shown = f"{value.normalize():f}"
        raise InvalidArgumentError(f"{what} must be a whole number{' of bytes' if bytes_ else ''}, got {text!r}"
                                   + ("" if shown == str(text).strip() else f" (= {shown})"))
    if value >= LIMIT:
        raise InvalidArgumentError(f"{what} must be below 2^62 ({LIMIT:.2e}), the largest a store holds, got "
                                   f"{text!r}")
    return int(value)


def parse_dtype(name: "str | torch.dtype") -> torch.dtype:
    """``bf16`` / ``bfloat16``, ``fp16`` / ``float16``, ``fp32`` / ``float32``, ``fp64`` (or a torch dtype)."""
    if isinstance(name, torch.dtype) and name in DTYPES:
        return name
    found = _DTYPE_NAMES.get(str(name).lower().removeprefix("torch."))
    if found is None:
        raise InvalidArgumentError(f"dtype must be one of bf16, fp16, fp32, fp64 (or bfloat16, float16, float32, "
                                   f"float64), got {name!r}")
    return found


def format_bytes(n: float) -> str:
    """``1.5 GiB``: binary units, as ``trajstore info`` prints."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_count(n: float) -> str:
    """``124M``, ``1.3B``: decimal units, as the sizes ``--params`` accepts."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


@dataclass
class Bandwidth:
    """A bandwidth in bytes per second and where it comes from (given, measured here, or a constant)."""

    bytes_per_s: float
    source: str


@dataclass
class CodecSize:
    """The trajectory's snapshots on disk with one codec preset."""

    codec: str
    lossless: bool
    ratio: float  # raw / stored
    bytes: int | None  # None when the number of snapshots is not known
    source: str


@dataclass
class MemoryPlan:
    """What :func:`plan` found; :meth:`to_json` for programs, the CLI's table for people."""

    params: int
    dim: int
    snapshots: int | None
    store_dtype: str
    basis_dtype: str
    device: str
    device_memory: int  # bytes the resident/streamed rule was given (free memory)
    device_memory_source: str
    fraction: float
    codecs: list[CodecSize]
    basis_bytes: int  # P (n, d) in basis_dtype
    basis_float32_bytes: int
    mode: str  # "resident" | "streamed"
    host: str  # where Basis.from_store(host="auto") keeps its host copy of P: "pinned" (RAM) | "mmap" (disk)
    host_memory: int  # bytes of free RAM that rule was given
    host_memory_source: str
    location: str  # where the products read P from: "device" | "host RAM" | "memory-mapped disk"
    basis_device_bytes: int  # P's device memory: all of it, or two streamed blocks (+ the upcast buffer)
    step_device_bytes: int  # read and written on the device per P-SGD step by P's products
    step_link_bytes: int  # host-to-device per P-SGD step (streamed to an accelerator), else 0
    step_disk_bytes: int  # read from the memory-mapped float32 copy per P-SGD step (P streamed from disk), else 0
    device_bandwidth: Bandwidth  # the device's memory: host RAM when the device is the CPU
    link_bandwidth: Bandwidth | None
    disk_bandwidth: Bandwidth | None
    step_overhead_s: float  # the products' time per step at those bandwidths (copies overlap compute)
    notes: list[str] = field(default_factory=list)
    store: dict | None = None  # plan_store: the store's path, stored bytes, subspace

    def to_json(self) -> dict:
        return asdict(self)


def plan(params: "int | str", dim: "int | str", snapshots: "int | str | None" = None, *,
         device_memory: "int | str | None" = None, dtype: "str | torch.dtype" = "float32",
         store_dtype: "str | torch.dtype" = "float32", device: str | None = None, fraction: float = 0.5,
         bandwidth: "float | None" = None, link_bandwidth: "float | None" = None,
         block_rows: int | None = None, host_memory: "int | str | None" = None,
         disk_bandwidth: "float | None" = None, disk_dir: "str | os.PathLike | None" = None) -> MemoryPlan:
    """The memory plan for ``params`` parameters, a ``dim``-dimensional basis held in ``dtype`` and
    ``snapshots`` recorded snapshots (sizes accept ``"124M"``, ``"80GB"``; see :func:`parse_size`).

    ``device_memory``: the accelerator's free memory; the resident/streamed choice is then Basis's rule
    (resident when P takes at most ``fraction`` of it) for a CUDA device of that size. Without it the
    choice is for this machine now: its CUDA device when there is one, else the CPU and its available RAM.
    ``bandwidth`` / ``link_bandwidth`` (bytes/s): the device memory's and the host-to-device link's;
    by default measured here (CPU: a host read probe; CUDA: a device copy probe and a pinned copy probe),
    or, for an accelerator not present here, :data:`DEVICE_BANDWIDTH` / :data:`LINK_BANDWIDTH`.

    Streamed P's host copy is in RAM, or memory-mapped from disk when its float32 copy takes more than half
    of ``host_memory`` (default: the device memory when the device is the CPU, else this machine's available
    RAM now): then each step reads P's float32 bytes twice from disk, at ``disk_bandwidth`` (bytes/s) or
    a cold read of a temp file in ``disk_dir`` (default: the current directory; see :func:`disk_read_probe`).
    """
    n, d = parse_count(params, "params"), parse_count(dim, "dim")
    t = None if snapshots is None else parse_count(snapshots, "snapshots")
    if d > n:
        raise InvalidArgumentError(f"dim ({d}) cannot exceed the number of parameters ({n})")
    if not 0 < fraction <= 1:
        raise InvalidArgumentError(f"fraction must be in (0, 1], got {fraction}")
    basis_dtype, stored = parse_dtype(dtype), parse_dtype(store_dtype)
    size, param_size = torch.finfo(basis_dtype).bits // 8, torch.finfo(stored).bits // 8
    here_cuda = torch.cuda.is_available()
    target = device or ("cuda" if device_memory is not None or here_cuda else "cpu")
    if target not in ("cpu", "cuda"):
        raise InvalidArgumentError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device_memory is not None:
        free, free_source = parse_size(device_memory, "device memory"), "given"
    elif target == "cuda" and here_cuda:
        free, free_source = torch.cuda.mem_get_info()[0], f"free now on {torch.cuda.get_device_name()}"
    elif target == "cpu":
        import psutil

        free, free_source = psutil.virtual_memory().available, "available RAM now"
    else:
        raise InvalidArgumentError("no CUDA device here: give the accelerator's memory (--device-memory 80GB)")
    basis_bytes = n * d * size
    mode = _choose_mode("auto", basis_bytes, torch.device(target), fraction, free=free)
    if host_memory is not None:
        host_free, host_source = parse_size(host_memory, "host memory"), "given"
    elif target == "cpu":
        host_free, host_source = free, free_source
    else:
        import psutil

        host_free, host_source = psutil.virtual_memory().available, "available RAM now on this machine"
    host = _choose_host("auto", n * d * 4, free=host_free)  # Basis.from_store(host="auto")'s rule
    location = ("device" if target == "cuda" else "host RAM") if mode == "resident" else \
        "memory-mapped disk" if host == "mmap" else "host RAM"
    accelerator = target == "cuda"
    cols = tile_cols(n, d, torch.device(target), mode, block_rows)  # Basis's tiles
    # resident: all of P; streamed: two tile buffers on an accelerator (none on the CPU, which reads RAM);
    # plus the products' buffers (per thread: P c of a piece, a 16-bit basis's upcast piece, a mapped tile)
    tiles = tile_count(n, cols) * cols * d * size  # P in tiles, the last one padded
    # the CPU's "device" is RAM: P's tiles are held there unless read from the memory map in place
    in_ram = not accelerator and location != "memory-mapped disk"
    held = tiles if mode == "resident" or in_ram else 2 * cols * d * size if accelerator else 0
    device_bytes = held + scratch_bytes(n, d, torch.device(target), mode, basis_dtype, block_rows,
                                        mapped=location == "memory-mapped disk")
    step_link = 2 * basis_bytes if mode == "streamed" and accelerator else 0  # P's blocks, once per product
    step_device = 2 * basis_bytes + 3 * n * param_size + step_link  # P read twice; g read, w read and written;
    # streamed: the copies write the blocks into the device buffers
    step_disk = 2 * n * d * 4 if location == "memory-mapped disk" else 0  # the float32 file, once per product
    dev_bw = _device_bandwidth(target, here_cuda, bandwidth)
    link_bw = _link_bandwidth(here_cuda, link_bandwidth) if step_link else None
    disk_bw = _disk_bandwidth(disk_bandwidth, disk_dir) if step_disk else None
    overhead = max(step_device / dev_bw.bytes_per_s, step_link / link_bw.bytes_per_s if link_bw else 0.0,
                   step_disk / disk_bw.bytes_per_s if disk_bw else 0.0)
    notes = []
    if size < 4:
        notes.append(f"{str(basis_dtype).removeprefix('torch.')} P: the products upcast it to float32 "
                     f"{format_bytes(UPCAST_BYTES)} at a time through one buffer; that traffic is not counted (it "
                     "stays in cache only where the cache holds the buffer)")
    if step_disk:
        notes.append("memory-mapped P: its float32 copy takes more than half the free RAM, so each step reads it "
                     "from disk, priced at the disk's cold-read bandwidth (an upper bound on the time: the page "
                     "cache may keep part of it in RAM); host='pinned' keeps P in RAM instead if it fits")
    if mode == "streamed" and accelerator and size < 4:
        notes.append("streamed 16-bit P keeps a host copy in its dtype beside the float32 one (1.5x P's float32 "
                     "size in RAM); a memory-mapped P (host='mmap') crosses the link at 4 bytes a value instead")
    return MemoryPlan(
        params=n, dim=d, snapshots=t, store_dtype=str(stored).removeprefix("torch."),
        basis_dtype=str(basis_dtype).removeprefix("torch."), device=target, device_memory=int(free),
        device_memory_source=free_source, fraction=fraction, codecs=codec_sizes(n, t, param_size),
        basis_bytes=basis_bytes, basis_float32_bytes=n * d * 4, mode=mode, host=host, host_memory=int(host_free),
        host_memory_source=host_source, location=location, basis_device_bytes=device_bytes,
        step_device_bytes=step_device, step_link_bytes=step_link, step_disk_bytes=step_disk,
        device_bandwidth=dev_bw, link_bandwidth=link_bw, disk_bandwidth=disk_bw, step_overhead_s=overhead,
        notes=notes)


def codec_sizes(n: int, t: int | None, itemsize: int = 4) -> list[CodecSize]:
    """Snapshot bytes on disk for each preset of :data:`MEASURED_RATIOS` (t snapshots of n values)."""
    raw = None if t is None else t * n * itemsize
    return [CodecSize(spec, get_preset(spec).lossless, ratio, None if raw is None else int(raw / ratio), RATIO_SOURCE)
            for spec, ratio in MEASURED_RATIOS.items()]


def plan_store(path: "str | os.PathLike", subspace: str | None = None, *, dim: "int | str | None" = None,
               **kwargs) -> MemoryPlan:
    """:func:`plan` for an existing store: n, t, dtype, codec and stored bytes read from it; d from ``dim``,
    else from subspace ``subspace`` (default: ``default``, else the store's only one). Its own codec's row
    gives the bytes it holds; the other presets are predicted from :data:`MEASURED_RATIOS`."""
    from trajstore import inspect

    from .experiments.export import STORE_NAME, is_run_directory
    from .subspace import open_subspace

    if is_run_directory(path):  # a `trajstore train` run directory: its trajectory
        path = Path(path) / STORE_NAME
    data = inspect.info(path)
    n, t, store_dtype = data["parameters"], data["snapshots"], data["dtype"]
    names = data["subspaces"]
    name = subspace if subspace is not None else ("default" if "default" in names else
                                                  names[0] if len(names) == 1 else None)
    sub = None
    if subspace is not None and subspace not in names:
        raise InvalidArgumentError(f"store {data['path']} has no subspace {subspace!r} (it has: "
                                   f"{', '.join(names) or 'none'})")
    if name is not None:
        sub = open_subspace(path, name)
    elif dim is None:
        raise InvalidArgumentError(
            f"store {data['path']} has {'subspaces ' + ', '.join(names) if names else 'no subspace'}: pass the "
            "dimension (--dim D)" + (" or the subspace's name (--subspace NAME)" if names else ""))
    d = dim if dim is not None else sub.dim
    from trajstore.format import local_dir

    local = local_dir(str(path))
    kwargs.setdefault("disk_dir", local if local is not None and local.is_dir() else None)  # where mmap copies go
    result = plan(n, d, t, store_dtype=store_dtype, **kwargs)
    spec = data["codec"]
    own = CodecSize(spec, data["lossless"], data["compression_ratio"] or 0.0, data["snapshot_bytes"],
                    "measured: the bytes this store holds")
    result.codecs = [own] + [c for c in result.codecs if c.codec != spec]
    result.store = {"path": data["path"], "codec": spec, "stored_bytes": data["stored_bytes"],
                    "snapshot_bytes": data["snapshot_bytes"], "raw_bytes": data["raw_bytes"],
                    "subspace": name if sub is not None else None,
                    "subspace_dim": sub.dim if sub is not None else None,
                    "subspace_bytes": data["derived_bytes"]["per_subspace"].get(name, 0) if sub is not None else 0}
    return result


def _device_bandwidth(target: str, here_cuda: bool, given: float | None) -> Bandwidth:
    if given is not None:
        return Bandwidth(_positive(given, "bandwidth"), "given")
    if target == "cpu":
        return Bandwidth(host_read_probe(), "measured: host RAM read probe on this machine (~0.2 s)")
    if here_cuda:
        return Bandwidth(cuda_copy_probe(), f"measured: device copy probe on {torch.cuda.get_device_name()}")
    return Bandwidth(DEVICE_BANDWIDTH, "constant: DEVICE_BANDWIDTH, typical achieved GPU HBM bandwidth (no CUDA "
                                       "device here; pass --bandwidth)")


def _link_bandwidth(here_cuda: bool, given: float | None) -> Bandwidth:
    if given is not None:
        return Bandwidth(_positive(given, "link bandwidth"), "given")
    if here_cuda:
        return Bandwidth(cuda_link_probe(), "measured: pinned host-to-device copy probe")
    return Bandwidth(LINK_BANDWIDTH, "constant: LINK_BANDWIDTH, PCIe 4.0 x16 pinned copies (no CUDA device here; "
                                     "pass --link-bandwidth)")


def _disk_bandwidth(given: float | None, folder: "str | os.PathLike | None") -> Bandwidth:
    if given is not None:
        return Bandwidth(_positive(given, "disk bandwidth"), "given")
    where = Path(folder) if folder is not None else Path.cwd()
    try:
        rate, cold = disk_read_probe(str(where.resolve()))
    except OSError as exc:
        raise InvalidArgumentError(f"could not probe the disk's read bandwidth in {where} ({exc}); pass it "
                                   "(--disk-bandwidth GB/s)") from None
    how = "page cache dropped first (posix_fadvise): a cold read" if cold else \
        "the page cache could not be dropped here: it may be memory speed"
    return Bandwidth(rate, f"measured: {format_bytes(PROBE_BYTES)} read of a temp file in {where} ({how}; "
                           "a tmpfs or network mount reads at its own speed)")


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidArgumentError(f"{what} must be a number of bytes per second (e.g. 2e10), got {value!r}")
    if not value > 0 or not np.isfinite(value):
        raise InvalidArgumentError(f"{what} must be a positive number of GB/s, got {value / 1e9:g} GB/s")
    return float(value)


def _timed(run, nbytes: int, seconds: float = 0.2) -> float:
    """Bytes per second of ``run`` (moving ``nbytes`` each call), best of as many calls as fit ``seconds``."""
    run()
    best, began = float("inf"), time.perf_counter()
    while time.perf_counter() - began < seconds:
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


@functools.lru_cache(maxsize=4)
def disk_read_probe(folder: str) -> tuple[float, bool]:
    """(bytes/s, cold) of one read of a :data:`PROBE_BYTES` temp file in ``folder``: written, fsynced, its
    pages dropped from the page cache where ``posix_fadvise`` can (``cold``), read in 8 MiB pieces, deleted."""
    fd, name = tempfile.mkstemp(prefix=".trajstore-plan-probe-", dir=folder)
    try:
        with os.fdopen(fd, "r+b", buffering=0) as f:
            f.write(np.random.default_rng().bytes(PROBE_BYTES))  # random: no filesystem compresses it away
            os.fsync(f.fileno())
            cold = hasattr(os, "posix_fadvise")
            if cold:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.seek(0)
            piece = memoryview(bytearray(8 << 20))
            began = time.perf_counter()
            while f.readinto(piece):
                pass
            return PROBE_BYTES / (time.perf_counter() - began), cold
    finally:
        os.unlink(name)


@functools.lru_cache(maxsize=1)
def host_read_probe() -> float:
    """Host RAM read bandwidth (bytes/s): sums of a 64 MiB float32 array for ~0.2 s (once per process)."""
    data = np.ones(16 << 20, dtype=np.float32)
    return _timed(lambda: float(data.sum()), data.nbytes)


@functools.lru_cache(maxsize=1)
def cuda_copy_probe() -> float:
    """Device memory bandwidth (bytes/s, read + write counted) of 256 MiB copies on the current CUDA device."""
    src = torch.empty(64 << 20, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)
        torch.cuda.synchronize()
    return _timed(run, 2 * src.nbytes)


@functools.lru_cache(maxsize=1)
def cuda_link_probe() -> float:
    """Pinned host-to-device copy bandwidth (bytes/s) of 64 MiB blocks."""
    src = torch.empty(16 << 20, dtype=torch.float32).pin_memory()
    dst = torch.empty(src.shape, dtype=src.dtype, device="cuda")

    def run() -> None:
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    return _timed(run, src.nbytes)
