"""Snapshots of CUDA weights that never stall training: ``append`` enqueues the copy and returns.

Taken for a single-process store (parameter-ordered columns) given a module or state_dict whose
parameters all live on one CUDA device in the store's dtype, without ``optimizer=``; anything else takes
the synchronous path (a blocking copy to the host), unchanged. On the training (current) stream: one
device-to-device copy of every parameter into a flat staging buffer, a finiteness flag, the buffers (if
recorded) as float64 with a flag saying every int64 buffer value survived that widening, then an event. A side stream waits for it on the GPU, copies all that into
page-locked host memory (the writer's staging buffer) and records ``done``, which the writer thread waits
on before it reads the row. Nothing here synchronizes the host with the device; the next snapshot's copy
into the staging buffer waits (on the GPU) for the previous ``done``. NaN/Inf is therefore seen only after
``append`` returned (:meth:`Pending.__call__`), and so is an int64 buffer float64 cannot hold (the synchronous
path refuses both at once).

Memory: the device staging buffer (n x itemsize: 400 MB for 100M float32 parameters), held while the
store is open. With less than twice that free on the device, the side stream copies straight from the
weights and the training stream waits (on the GPU) for that copy, so no step changes a weight mid-copy.
The writer's ``queue_depth`` staging buffers become page-locked (torch rounds each up to a power of two).
``TRAJSTORE_ASYNC_DEVICE_COPY=0`` or ``async_device_copy=False`` keeps every copy synchronous.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ._lazy import is_module, is_tensor, torch as _torch
from .errors import InexactValuesError, InvalidArgumentError, LayoutMismatchError, NonFiniteError
from .layout import BF16, torch_view

if TYPE_CHECKING:
    import torch

ENV = "TRAJSTORE_ASYNC_DEVICE_COPY"


def enabled_by_default() -> bool:
    """Whether stores copy CUDA weights asynchronously unless told otherwise (``TRAJSTORE_ASYNC_DEVICE_COPY``:
    1/true/yes/on or 0/false/no/off; anything else is reported with a warning and the default, on, is used)."""
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value not in ("1", "true", "yes", "on", ""):
        warnings.warn(f"{ENV}={value!r} is neither on (1/true/yes/on) nor off (0/false/no/off): using on",
                      RuntimeWarning, stacklevel=3)
    return True


def configured(store: Any, async_device_copy: bool | None) -> Any:
    """``store`` with its ``async_device_copy`` option set (None: the default, :func:`enabled_by_default`)."""
    if async_device_copy is not None:
        if not isinstance(async_device_copy, bool):  # "false" would be true
            store._close_local()
            raise InvalidArgumentError(f"async_device_copy must be True, False or None, got {async_device_copy!r}")
        store.async_device_copy = async_device_copy
    return store


def store_reason(enabled: bool, multiprocess: bool, identity: bool, optimizer: object) -> str | None:
    """Why a store takes the synchronous path whatever the weights are, or None."""
    if not enabled:
        return "asynchronous device copies are off (async_device_copy=False or TRAJSTORE_ASYNC_DEVICE_COPY=0)"
    if multiprocess:
        return "a multi-process recording"
    if not identity:
        return "the store's columns are not in parameter order (recorded sharded)"
    if optimizer is not None:
        return "optimizer state is captured synchronously"
    return None


def device_reason(tensors: list["torch.Tensor"], kind: str = "cuda", dtype: "torch.dtype | None" = None
                  ) -> str | None:
    """Why ``tensors`` cannot be copied as one device's block (of ``dtype`` when given), or None."""
    if not tensors:
        return "no tensors"
    device = tensors[0].device
    if device.type != kind:
        return f"the weights are on {device}, not a {kind} device"
    for t in tensors:
        if t.device != device:
            return f"the weights are on several devices ({device}, {t.device})"
        if dtype is not None and t.dtype != dtype:
            return f"a weight of dtype {t.dtype} goes into a store of {dtype} (converted on the host)"
        if t.layout != _torch().strided:
            return f"a weight of layout {t.layout}"
    return None


@dataclass
class Plan:
    """One snapshot to copy asynchronously: its tensors in layout order, and the copier that copies them."""

    copier: "DeviceCopier"
    params: list  # [torch.Tensor] in the store's layout order, all on copier.device
    buffers: list | None  # [torch.Tensor] in the buffer layout order; None: the store records no buffers


def examine(store: Any, source: object, optimizer: object) -> "Plan | str":
    """A :class:`Plan` for copying ``source`` asynchronously into ``store``, or why it is copied synchronously.

    Creates the store's copier on first use (which makes the writer's staging buffers page-locked)."""
    why = store_reason(getattr(store, "async_device_copy", True), store._ctx is not None,
                       store.columns.is_identity, optimizer)
    if why is not None:
        return why
    if not (is_module(source) or isinstance(source, Mapping)):
        return "a flat snapshot"
    first = (next(source.parameters(), None) if is_module(source)
             else next((v for v in source.values() if is_tensor(v)), None))
    if first is None or first.device.type != "cuda":  # every CPU model leaves here, at once
        return "the weights are not on a CUDA device"
    torch = _torch()
    if store.layout.n == 0:
        return "no parameters"
    try:
        params = store.layout.tensors_of(source)
        buffers = store.buffer_layout.tensors_of(source) if store.buffer_layout is not None else None
    except LayoutMismatchError as exc:  # raised again by the synchronous path, in its words
        return str(exc)
    want = torch.bfloat16 if store.values == BF16 else getattr(torch, store.values)
    why = device_reason(params, dtype=want) or (device_reason(buffers) if buffers else None)
    if why is None and buffers and (odd := next((b for b in buffers if b.dtype == getattr(torch, "uint64", None)), None)):
        why = f"a buffer of dtype {odd.dtype} (checked for float64 exactness on the host)"
    if why is None and buffers and buffers[0].device != params[0].device:
        why = f"the buffers are on {buffers[0].device}, the weights on {params[0].device}"
    if why is not None:
        return why
    copier = _copier_for(store, params[0].device, want)
    return "page-locked host memory is not available" if copier is None else Plan(copier, params, buffers)


def select(store: Any, source: object, optimizer: object) -> Plan | None:
    """:func:`examine`'s plan, or None for the synchronous path."""
    return found if isinstance(found := examine(store, source, optimizer), Plan) else None


def _copier_for(store: Any, device: "torch.device", dtype: "torch.dtype") -> "DeviceCopier | None":
    copier = getattr(store, "_device_copier", None)
    if copier is None:
        m = store.buffer_layout.n if store.buffer_layout is not None else None
        try:
            copier = DeviceCopier(device, store.layout.n, dtype, store.layout.offsets, m)
            store._writer.restage(copier.new_buffer)
        except (RuntimeError, MemoryError) as exc:  # e.g. no page-locked memory: synchronous from now on
            warnings.warn(f"trajstore: the asynchronous copy of CUDA weights into {store.path} could not be set up "
                          f"({exc}); they are copied synchronously (training waits for each snapshot)",
                          RuntimeWarning, stacklevel=4)
            store.async_device_copy = False
            return None
        store._device_copier = copier
    copier.use(device)
    return copier


@dataclass
class _Slot:
    """Page-locked host memory one snapshot lands in: the row, its finiteness flag, its buffers."""

    row: "torch.Tensor"  # (n,) in the weights' dtype; ``arr`` views it as the writer's dtype
    arr: np.ndarray
    flag: "torch.Tensor"  # (2,) bool: every weight finite; every int64 buffer value exact in float64
    buffers: "torch.Tensor | None"  # (m,) float64


class DeviceCopier:
    """A store's side stream, device staging buffer and page-locked landing slots."""

    def __init__(self, device: "torch.device", n: int, dtype: "torch.dtype", offsets: tuple[int, ...],
                 m: int | None):
        self.n, self.dtype, self.offsets, self.m = n, dtype, offsets, m
        self.slots: dict[int, _Slot] = {}  # id(writer's buffer) -> its slot
        self.device: "torch.device | None" = None
        self.done = None  # the last snapshot's ``done`` event: the staging buffer is free after it
        self.use(device)

    def use(self, device: "torch.device") -> None:
        """Copy from ``device`` (a model moved to another GPU gets a new stream and staging buffer)."""
        if device != self.device:
            self.device, self.side = device, _torch().cuda.Stream(device)
            self.staging, self.direct = None, False  # the old buffer is freed once its side stream is done

    def new_buffer(self) -> np.ndarray:
        """One page-locked staging buffer (n,) of the writer's dtype (uint16 for bfloat16), with its slot."""
        torch = _torch()
        row = torch.empty(self.n, dtype=self.dtype, pin_memory=True)
        arr = row.view(torch.int16).numpy().view(np.uint16) if self.dtype == torch.bfloat16 else row.numpy()
        self.slots[id(arr)] = self._slot(row, arr)
        return arr

    def _slot(self, row: "torch.Tensor", arr: np.ndarray) -> _Slot:
        torch = _torch()
        buffers = None if self.m is None else torch.empty(self.m, dtype=torch.float64, pin_memory=True)
        return _Slot(row, arr, torch.empty(2, dtype=torch.bool, pin_memory=True), buffers)

    def _staging(self) -> "torch.Tensor | None":
        """The device staging buffer (n,), made on first use; None when the device lacks room for it."""
        torch = _torch()
        if self.staging is None and not self.direct:
            need = self.n * torch.empty((), dtype=self.dtype).element_size()
            free, _ = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            self.direct = free + cached < 2 * need
            if not self.direct:
                try:
                    self.staging = torch.empty(self.n, dtype=self.dtype, device=self.device)
                except torch.cuda.OutOfMemoryError:
                    self.direct = True
        return self.staging

    def capture(self, plan: Plan, buf: np.ndarray, store: Any, step: int, allow_nonfinite: bool
                ) -> tuple[np.ndarray | None, "Pending"]:
        """Enqueue the copy of ``plan``'s tensors into ``buf`` (the writer's staging buffer), with no host
        synchronization on the way; returns (the buffers row, the Pending the writer thread calls)."""
        torch = _torch()
        slot = self.slots.get(id(buf))
        if slot is None:  # not a page-locked buffer (never expected): correct, but the D2H copy blocks
            slot = self._slot(torch_view(buf), buf)
        main = torch.cuda.current_stream(self.device)  # the training stream
        with torch.no_grad():
            if self.done is not None:
                main.wait_event(self.done)  # the previous snapshot has left the staging buffer
            staging = self._staging()
            flat = [t.detach().reshape(-1) for t in plan.params]  # views (a copy if not contiguous)
            if staging is not None:
                torch.cat(flat, out=staging)  # (n,) the weights as of now, in stream order
                staging.record_stream(main)  # (the training stream may differ from the one it was made on)
                finite = torch.isfinite(staging).all().reshape(1)
            else:
                finite = torch.stack([torch.isfinite(f).all() for f in flat]).all().reshape(1)
            buffers = (torch.cat([b.detach().reshape(-1).to(torch.float64) for b in plan.buffers])
                       if plan.buffers else None)  # (m,) a copy: training may change them next
            flags = torch.cat([finite, _exact_in_float64(plan.buffers or [], finite)])  # (2,) checked by Pending
            copied = torch.cuda.Event()
            copied.record(main)
            self.side.wait_event(copied)  # on the GPU: the side stream starts after the work above
            done = torch.cuda.Event(blocking=True)  # the writer thread sleeps on it instead of spinning
            try:
                with torch.cuda.stream(self.side):
                    for src, lo, hi in ([(staging, 0, self.n)] if staging is not None
                                        else zip(flat, self.offsets, self.offsets[1:])):
                        slot.row[lo:hi].copy_(src, non_blocking=True)
                        src.record_stream(self.side)  # not reused before the side stream has read it
                    slot.flag.copy_(flags, non_blocking=True)
                    flags.record_stream(self.side)
                    if buffers is not None:
                        slot.buffers.copy_(buffers, non_blocking=True)
                        buffers.record_stream(self.side)
                    done.record(self.side)
            except BaseException:
                self.side.synchronize()  # (error path only) no copy may still be landing in buf
                raise
            if staging is None:
                main.wait_event(done)  # copied straight from the weights: no step may change them mid-copy
            self.done = done
        host_buffers = None if plan.buffers is None else (slot.buffers.numpy() if plan.buffers
                                                           else np.empty(0, np.float64))  # (m,)
        names = [spec.name for spec, b in zip(store.buffer_layout.specs, plan.buffers) if b.dtype == torch.int64] \
            if plan.buffers else []
        return host_buffers, Pending(done, slot.flag, store, step, store._last_step, allow_nonfinite, buf, names)


def _exact_in_float64(buffers: list, like: "torch.Tensor") -> "torch.Tensor":
    """(1,) bool on the device, computed in stream order: every value of the int64 buffers is one float64 holds
    exactly (it survives the round trip, as the host path checks; every other buffer dtype widens to float64
    exactly). No host synchronization."""
    torch = _torch()
    wide = [b.detach().reshape(-1) for b in buffers if b.dtype == torch.int64]
    if not wide:
        return torch.ones_like(like)
    exact = []
    for b in wide:
        f = b.to(torch.float64)
        # (f < 2^63: CUDA clamps 2^63, the rounding of INT64_MAX, back to INT64_MAX, which would compare equal)
        exact.append(((f.to(torch.int64) == b) & (f < 2.0 ** 63)).all())
    return torch.stack(exact).all().reshape(1)


class Pending:
    """A snapshot still landing in host memory; the writer thread calls it before it reads the row."""

    def __init__(self, done: "torch.cuda.Event", flag: "torch.Tensor", store: Any, step: int,
                 last_step: int | None, allow_nonfinite: bool, row: np.ndarray, int_buffers: list[str] = ()):
        self.done, self.flag, self.store, self.step = done, flag, store, step
        self.last_step, self.allow_nonfinite, self.row = last_step, allow_nonfinite, row
        self.int_buffers = list(int_buffers)  # the int64 buffers' names (flag[1] covers them)

    def __call__(self) -> bool:
        """Wait for the copy; return whether the row holds NaN/Inf. With ``allow_nonfinite=False`` such a
        row is refused instead: NonFiniteError, which the writer keeps and the next append/flush/close
        raises; the writer then writes neither this row nor any queued after it."""
        self.done.synchronize()  # releases the GIL; a blocking-sync event: no spinning
        committed = len(self.store)  # every earlier row is committed, or this one would not be examined
        if not bool(self.flag[1]):  # the synchronous path refuses the same values (layout._copy_exact)
            raise InexactValuesError(
                f"snapshot at step {self.step}: an int64 buffer ({', '.join(self.int_buffers)}) holds a value the "
                "store's float64 buffers row cannot hold exactly (above 2^53 in magnitude). It was captured "
                "asynchronously from CUDA, so this is reported by a later call: neither it nor any snapshot "
                f"appended after it was recorded; the {committed} snapshot(s) before it are committed and intact. "
                "Record into a store without buffers (buffers=False), or keep that buffer below 2^53")
        if bool(self.flag[0]):
            return False
        if self.allow_nonfinite:
            return True
        last = f" (the last at step {self.last_step})" if committed and self.last_step is not None else ""
        raise NonFiniteError(
            f"snapshot at step {self.step} holds NaN or Inf in {self.store._first_nonfinite(self.row)}. It was "
            "captured asynchronously from CUDA weights, so this is reported by a later call: neither it nor any "
            f"snapshot appended after it was recorded; the {committed} snapshot(s) before it{last} are committed "
            "and intact. Training has diverged? Resume from a checkpoint at or before the last recorded step and "
            "reopen the store with mode='a' (Recorder.start(step) drops later snapshots), or pass "
            "allow_nonfinite=True to record non-finite snapshots (flagged)")
