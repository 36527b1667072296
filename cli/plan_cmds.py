"""``trajstore plan``: sizes on disk and on the device, P's placement, bytes and time per P-SGD step.

The logic is :mod:`pipeline.plan`; this module parses the options and prints (rich table on stdout,
or ``--json``). torch is imported inside the command.
"""
from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from trajstore.errors import InvalidArgumentError

from ._console import errors_to_exit, out, print_json


def plan(run: Optional[str] = typer.Argument(None, metavar="RUN", help="a store or `trajstore train` run directory "
                                             "to plan for: n, snapshots, dtype, codec and stored bytes are read "
                                             "from it, d from its subspace"),
         params: Optional[str] = typer.Option(None, "--params", help="parameters n, e.g. 124M, 1.3B, 7e9"),
         dim: Optional[str] = typer.Option(None, "--dim", help="subspace dimension d (with RUN: instead of its "
                                           "subspace's)"),
         snapshots: Optional[str] = typer.Option(None, "--snapshots", help="snapshots t to record (disk sizes)"),
         device_memory: Optional[str] = typer.Option(
             None, "--device-memory", help="the accelerator's free memory, e.g. 80GB (10^9) or 80GiB; default: "
             "this machine's CUDA device, else its available RAM (CPU)"),
         dtype: str = typer.Option("fp32", "--dtype", help="P's dtype: fp32, bf16, fp16 (or bfloat16, float16, ...)"),
         store_dtype: str = typer.Option("fp32", "--store-dtype", help="the parameters' dtype (without RUN)"),
         bandwidth: Optional[float] = typer.Option(
             None, "--bandwidth", metavar="GB/s", help="device memory bandwidth; default: measured here, or a "
             "stated constant for an accelerator not on this machine"),
         link_bandwidth: Optional[float] = typer.Option(
             None, "--link-bandwidth", metavar="GB/s", help="host-to-device bandwidth for streamed P; default: "
             "measured here, or a stated constant"),
         host_memory: Optional[str] = typer.Option(
             None, "--host-memory", help="free RAM for P's host copy (memory-mapped from disk when its float32 "
             "copy exceeds half of it); default: --device-memory on the CPU, else this machine's available RAM"),
         disk_bandwidth: Optional[float] = typer.Option(
             None, "--disk-bandwidth", metavar="GB/s", help="read bandwidth of the disk holding a memory-mapped P; "
             "default: a cold read of a 64 MiB temp file (in the store, else the current directory)"),
         subspace: Optional[str] = typer.Option(None, "--subspace", help="with RUN: the subspace giving d "
                                                "(default: 'default', else its only one)"),
         fraction: float = typer.Option(0.5, "--fraction", help="P is resident when it takes at most this fraction "
                                        "of the device memory (Basis's rule)"),
         json: bool = typer.Option(False, "--json", help="machine-readable output on stdout")) -> None:
    """Plan the memory of a run: the trajectory's size on disk per codec, P's size, resident or streamed
    P, the bytes one P-SGD step moves and the time they take. Give --params and --dim, or a store RUN."""
    import pipeline.plan as planning

    options = dict(device_memory=device_memory, dtype=dtype, fraction=fraction,
                   bandwidth=None if bandwidth is None else bandwidth * 1e9,
                   link_bandwidth=None if link_bandwidth is None else link_bandwidth * 1e9, host_memory=host_memory,
                   disk_bandwidth=None if disk_bandwidth is None else disk_bandwidth * 1e9)
    with errors_to_exit():
        if run is not None:
            if params is not None or snapshots is not None:
                raise InvalidArgumentError("with a store RUN, n and the snapshots are read from it: drop --params "
                                           "and --snapshots")
            result = planning.plan_store(run, subspace, dim=dim, **options)
        else:
            if params is None or dim is None:
                raise InvalidArgumentError("give --params N and --dim D (e.g. --params 124M --dim 40), or a store RUN")
            if subspace is not None:
                raise InvalidArgumentError("--subspace names a subspace of a store RUN; give RUN too")
            result = planning.plan(params, dim, snapshots, store_dtype=store_dtype, **options)
    if json:
        print_json(result.to_json())
        return
    out.print(_table(result, planning))


def _table(p, planning) -> Table:
    size, count = planning.format_bytes, planning.format_count
    table = Table(show_header=False, title=escape(f"trajstore plan{' ' + p.store['path'] if p.store else ''}"))
    rows = [("parameters", f"{count(p.params)} ({p.params:,}, {p.store_dtype})"),
            ("snapshots", "-" if p.snapshots is None else f"{p.snapshots:,}")]
    for c in p.codecs:
        kind = "lossless" if c.lossless else "lossy"
        on_disk = "-" if c.bytes is None else size(c.bytes)
        how = "" if c.source == planning.RATIO_SOURCE else f"; {c.source}"
        rows.append((f"disk: {c.codec}", f"{on_disk} ({c.ratio:.2f}x, {kind}{how})"))
    if any(c.source == planning.RATIO_SOURCE for c in p.codecs):
        rows.append(("codec ratios", f"measured on {planning.RATIO_SOURCE}"))
    if p.store:
        rows.append(("store holds", f"{size(p.store['stored_bytes'])} trajectory"
                     + (f", subspace {p.store['subspace']!r} {size(p.store['subspace_bytes'])}"
                        if p.store["subspace"] else "")))
    cpu = p.device == "cpu"
    memory = "host RAM" if cpu else "device memory"  # where the products' bytes move
    source = "" if p.host_memory_source == p.device_memory_source else f" ({p.host_memory_source})"
    host = (f"its float32 copy {size(p.basis_float32_bytes)} {'>' if p.host == 'mmap' else '<='} 0.5 x "
            f"{size(p.host_memory)} free RAM{source}, so the host copy is "
            f"{'memory-mapped from disk' if p.host == 'mmap' else 'kept in RAM'}")
    where = {"device": "P on the device", "host RAM": "P in host RAM",
             "memory-mapped disk": "P memory-mapped from disk"}[p.location]
    rows += [
        ("P", f"{p.params:,} x {p.dim} {p.basis_dtype}: {size(p.basis_bytes)} (float32: {size(p.basis_float32_bytes)})"),
        ("placement", f"{where}: {p.mode} on {p.device} (the rule: resident when P <= {p.fraction:g} x "
                      f"{size(p.device_memory)}, {p.device_memory_source})"
                      + (f"; {host}" if p.mode == "streamed" else "")),
        ("P in RAM" if cpu else "P in device memory", size(p.basis_device_bytes)
         + ("" if not cpu or p.mode == "resident" else
            " (streamed: tiles read in place from the memory-mapped file; this is the products' buffers)"
            if p.host == "mmap" else " (streamed on the CPU: the tiles are held in RAM)")),
        ("bytes per P-SGD step", f"{size(p.step_device_bytes)} through {memory}"
         + (f", {size(p.step_link_bytes)} host-to-device" if p.step_link_bytes else "")
         + (f", {size(p.step_disk_bytes)} read from disk" if p.step_disk_bytes else "")),
        (f"{'RAM' if cpu else 'device'} bandwidth",
         f"{p.device_bandwidth.bytes_per_s / 1e9:.1f} GB/s ({p.device_bandwidth.source})"),
    ]
    if p.link_bandwidth is not None:
        rows.append(("link bandwidth", f"{p.link_bandwidth.bytes_per_s / 1e9:.1f} GB/s ({p.link_bandwidth.source})"))
    if p.disk_bandwidth is not None:
        rows.append(("disk bandwidth", f"{p.disk_bandwidth.bytes_per_s / 1e9:.2f} GB/s ({p.disk_bandwidth.source})"))
    took = f"{p.step_overhead_s:.3g} s" if p.step_overhead_s >= 1 else f"{1e3 * p.step_overhead_s:.3g} ms"
    rows.append(("step overhead", f"{took} per P-SGD step (P's two products, at "
                                  f"{'the slowest of those bandwidths' if p.link_bandwidth or p.disk_bandwidth else 'that bandwidth'}; "
                                  "forward and backward not included)"))
    rows += [("note", n) for n in p.notes]
    for key, value in rows:
        table.add_row(key, escape(value))
    return table


def register(app: typer.Typer) -> None:
    app.command("plan", short_help="disk, device memory and per-step traffic of a run, before or after recording")(
        plan)
