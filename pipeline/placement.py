"""Where a basis's P lives and in what pieces: tile widths, product-call sizes, the threads the CPU
products run on, the scratch memory they add, resident or streamed, host RAM or a memory map.

These are the sizing rules :class:`pipeline.basis.Basis` applies and :func:`pipeline.plan.plan`
predicts with (the same functions, so a plan and a basis never disagree); no tensor of P here.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch

from trajstore.errors import InvalidArgumentError
from trajstore.lock import user_stacklevel

from .tiles import tile_count

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
UPCAST_BYTES = 16 << 20  # float32 bytes of P̂ upcast at a time by a 16-bit basis's products (a reused buffer)
CPU_TILE_COLS = 1 << 19  # parameters per tile on the CPU (benchmarks/bench_products.py)
ALIGN_COLS = 16  # tiles are a multiple of 16 parameters wide: 64 bytes of float32
PIECE_COLS = {"cpu": 1 << 17, "cuda": 1 << 22}  # parameters per product call: g̃ folds into float64 after each


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a basis held in ``dtype`` computes in: float32 for 16-bit P, else ``dtype`` itself."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def tile_cols(n: int, d: int, device: torch.device, mode: str, block_rows: int | None = None) -> int:
    """Parameters per tile: ``block_rows`` when given, else CUDA resident: all n (one tile), CUDA streamed:
    64 MiB of float32 P, CPU: :data:`CPU_TILE_COLS` (tiles the cores share out); rounded up to a multiple of
    :data:`ALIGN_COLS` (every tile then starts as aligned as the first: BLAS kernels round by alignment, and
    P held anywhere, or tiled from a memory map, gives the same bits), at most n."""
    if block_rows is not None:
        if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
            raise InvalidArgumentError(f"block_rows must be a positive integer (parameters per tile), got {block_rows!r}")
        cols = int(block_rows)
    elif device.type == "cuda":
        cols = n if mode == "resident" else (64 << 20) // (d * 4) // ALIGN_COLS * ALIGN_COLS
    else:
        cols = CPU_TILE_COLS
    return max(1, min(n, -(-cols // ALIGN_COLS) * ALIGN_COLS))


def piece_cols(d: int, device: torch.device, dtype: torch.dtype) -> int:
    """Parameters one product call takes: :data:`PIECE_COLS`, and for a 16-bit basis at most
    :data:`UPCAST_BYTES` of upcast float32."""
    cols = PIECE_COLS.get(device.type, PIECE_COLS["cuda"])
    return min(cols, max(1, UPCAST_BYTES // (d * 4))) if compute_dtype(dtype) != dtype else cols


def product_threads() -> int:
    """Threads the CPU products may use: ``TRAJSTORE_PRODUCT_THREADS`` (a positive integer), else
    ``torch.get_num_threads()``. Another value is reported once with a RuntimeWarning and not used: the
    setting changes how fast the products run, never their bits."""
    value = os.environ.get("TRAJSTORE_PRODUCT_THREADS", "").strip()
    if not value:
        return torch.get_num_threads()
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value not in _warned:
        _warned.add(value)
        warnings.warn(f"TRAJSTORE_PRODUCT_THREADS={value!r} is not a positive integer: using torch.get_num_threads()",
                      RuntimeWarning, stacklevel=user_stacklevel())
    return torch.get_num_threads()


_warned: set[str] = set()


def product_workers(n: int, d: int, device: torch.device, mode: str, block_rows: int | None = None) -> int:
    """Threads the products run on: on the CPU up to :func:`product_threads`, one per run of tiles."""
    if device.type != "cpu":
        return 1
    return max(1, min(product_threads(), tile_count(n, tile_cols(n, d, device, mode, block_rows))))


def scratch_bytes(n: int, d: int, device: torch.device, mode: str, dtype: torch.dtype, block_rows: int | None = None,
                  mapped: bool = False) -> int:
    """Device bytes a basis's products add once both have run: per product thread, P c of one piece (the
    weights are rounded once), a 16-bit basis's upcast piece, and on the CPU a 16-bit basis's tile rounded
    from the memory map (``mapped``)."""
    cols = tile_cols(n, d, device, mode, block_rows)
    piece = min(piece_cols(d, device, dtype), cols)
    each = piece * 4 * (1 + (d if compute_dtype(dtype) != dtype else 0))
    if mapped and device.type == "cpu" and mode == "streamed" and dtype != torch.float32:
        each += d * cols * torch.finfo(dtype).bits // 8  # a tile of the float32 map, rounded to dtype
    return product_workers(n, d, device, mode, block_rows) * each


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _after_fork() -> None:  # a forked child has none of the parent's threads: start new pools when needed
    global _pool_lock
    _pool_lock = threading.Lock()
    _pools.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run this thread's MKL calls on one core: MKL's thread-local setting, restored after (other threads,
    and torch's own intra-op setting, are untouched). Left to itself MKL may split a long gemv's sum
    (g̃ = Pᵀg) over several OpenMP threads where it judges that worth it, which depends on the CPU and on
    the thread count MKL runs with, so the bits would change with that count (P c splits its rows, not its
    sums: unaffected). A no-op where torch has no MKL (its other BLAS back ends were not measured)."""
    setter = _mkl_local_threads()
    if setter is None:
        yield
        return
    torch.get_num_threads()  # torch sets MKL's local count on a thread's first parallel op: let it happen now
    previous = setter(1)
    try:
        yield
    finally:
        setter(previous)


_TORCH_CPU_LIBS = ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll")


@functools.cache
def _mkl_local_threads() -> "Callable[[int], int] | None":
    """MKL's ``mkl_set_num_threads_local`` (C interface) in the MKL torch links, or None (no MKL)."""
    if not torch.backends.mkl.is_available():
        return None
    setter = mkl_function("MKL_Set_Num_Threads_Local")
    if setter is None:
        warnings.warn("torch has MKL but trajstore found no mkl_set_num_threads_local in it: g̃ = Pᵀg may sum in an "
                      "order that changes with torch's thread count (the same bits need the same "
                      "torch.set_num_threads)", RuntimeWarning, stacklevel=user_stacklevel())
    return setter


def mkl_function(name: str) -> "Callable[[int], int] | None":
    """An ``int f(int)`` of MKL's C interface from the torch library that links it (or from the symbols this
    process has loaded), or None."""
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    for lib in [os.path.join(folder, each) for each in _TORCH_CPU_LIBS if os.path.exists(os.path.join(folder, each))
                ] + [None]:
        try:
            function = getattr(ctypes.CDLL(lib), name)
        except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) where that is not supported (Windows)
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        return function
    return None


def _pool() -> ThreadPoolExecutor:
    """The threads that run the products' tiles on the CPU (each product call runs on one core)."""
    size = max(1, product_threads() - 1)
    with _pool_lock:
        if size not in _pools:
            _pools[size] = ThreadPoolExecutor(size, thread_name_prefix="trajstore-basis")
        return _pools[size]


def _check_device(device: "str | torch.device") -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device={str(device)!r} but torch sees no CUDA device here: use device='cpu', "
                                   "or check the CUDA install (torch.cuda.is_available())")
    return device


def _check_dtype(dtype: object) -> None:
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"dtype must be one of {', '.join(map(str, DTYPES))} (P is a float basis), "
                                   f"got {dtype}")


def _choose_mode(mode: str, nbytes: int, device: torch.device, fraction: float, free: int | None = None) -> str:
    """``"resident"`` when P's ``nbytes`` fit in ``fraction`` of the device's free memory (``free``, or
    queried now: CUDA's free memory, else the available RAM), else ``"streamed"``; an explicit ``mode``
    is returned as it is. :func:`pipeline.plan.plan` calls this same rule with a given ``free``."""
    if mode not in ("auto", "resident", "streamed"):
        raise InvalidArgumentError(f"mode must be 'auto', 'resident' or 'streamed', got {mode!r}")
    if mode != "auto":
        return mode
    if free is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        else:
            import psutil

            free = psutil.virtual_memory().available
    return "resident" if nbytes <= fraction * free else "streamed"


def _choose_host(host: str, nbytes: int, free: int | None = None) -> str:
    """Where streamed P lives: ``"mmap"`` (a memory-mapped copy on disk) when its float32 copy of ``nbytes``
    takes more than half the free RAM (``free``, or the available RAM now), else ``"pinned"`` (RAM); an
    explicit ``host`` is returned as it is. :func:`pipeline.plan.plan` calls this same rule with a given ``free``."""
    if host != "auto":
        return host
    if free is None:
        import psutil

        free = psutil.virtual_memory().available
    return "mmap" if nbytes > 0.5 * free else "pinned"
