"""Basis: the subspace P (n, d), resident on the device or streamed to it in row blocks.

P is split along the store's parameter layout, so the optimizers compute
g̃ = Pᵀg = Σ_l P_lᵀ g_l and w_l += P_l c without ever building an n-vector.

* resident: all of P on the device, one view per parameter tensor;
* streamed: P stays in host memory (pinned) or in a memory-mapped uncompressed copy on
  disk, and moves to the device in blocks of ``block_rows`` rows through two device buffers
  with asynchronous copies on a side stream, so device memory for P is 2 x block_rows x d.

Under FSDP2 a rank's Basis holds only the rows of P its parameter shards cover (``from_store(...,
model=model)``): its layout is the local one, n is the local count (see :mod:`pipeline.distributed`).

**P in bfloat16 / float16** (``dtype=``): the device copy of P (resident, or the streamed block
buffers and the host copy they are filled from) is held in that dtype, halving its memory and the bytes
each product reads. The products still compute in float32: rows of P̂ are upcast in small pieces
(:data:`UPCAST_BYTES` of float32 at a time), the gradient and the coefficients are never rounded to
16 bits, and g̃ accumulates in float32 (float64 across blocks). So g̃ = P̂ᵀg and the update P̂ c are
those of the rounded basis P̂ itself: the iterates stay exactly in w₀ + span(P̂). P̂ is not
re-orthonormalised and no metric correction (P̂ᵀP̂)⁻¹ is applied: the optimizers run plain SGD / BFGS
on h(s) = f(w₀ + P̂ s), whose metric P̂ᵀP̂ differs from I by about the 16-bit rounding (measured by
benchmarks/bench_basis_dtype.py). The digest and fingerprint name the stored float32 P, so an optimizer
state moves between a float32 and a bfloat16 basis of the same extraction.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from trajstore.errors import (
    InvalidArgumentError,
    LayoutMismatchError,
    StoreWriteError,
    SubspaceChangedError,
    TrajstoreError,
)
from trajstore.layout import ParamLayout

from .distributed import Sharding, fsdp_modules, reshard, sharding_of
from .subspace import ATTEMPTS, BasisDigest, Subspace, block_rows, open_subspace

Segment = tuple[int, int, int, int, int]  # (tensor index, start in tensor, end, start in block, end)
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
UPCAST_BYTES = 16 << 20  # float32 bytes of P̂ upcast at a time by a 16-bit basis's products (one reused buffer)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a basis held in ``dtype`` computes in: float32 for 16-bit P, else ``dtype`` itself."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


class Basis:
    """An orthonormal basis P (n, d) split per parameter tensor. See :meth:`from_store`."""

    def __init__(self, host: "np.ndarray | torch.Tensor", layout: ParamLayout, *, device: "str | torch.device" = "cpu",
                 dtype: torch.dtype = torch.float32, mode: str = "auto", block_rows: int | None = None,
                 fraction: float = 0.5, name: str = ""):
        n, d = host.shape
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"dtype must be one of {', '.join(map(str, DTYPES))} (P is a float basis), "
                                       f"got {dtype}")
        if n != layout.n:
            raise LayoutMismatchError(f"basis has {n} rows but the layout has {layout.n} parameters")
        self.layout, self.n, self.d, self.dtype, self.name = layout, n, d, dtype, name
        self.device = torch.device(device)
        self.mode = _choose_mode(mode, n * d * torch.finfo(dtype).bits // 8, self.device, fraction)
        self.compute_dtype = compute_dtype(dtype)  # of the products: float32 for a 16-bit P
        self._host = host  # (n, d): numpy (possibly a memmap) or a (pinned) torch tensor, as given (float32)
        self._upcast_rows = max(1, UPCAST_BYTES // (d * 4)) if self.compute_dtype != dtype else None
        self._scratch: torch.Tensor | None = None  # (<= upcast_rows, d) float32: where _pieces upcasts P̂
        self.block_rows = int(block_rows or max(1, min(n, (64 << 20) // (d * 4))))
        # streamed 16-bit P: a host copy in that dtype, so blocks cross to the device at 2 bytes a value
        self._stream_host = self._low_precision_host() if self.mode == "streamed" and self._upcast_rows else None
        self._resident = self._make_resident() if self.mode == "resident" else None  # (n, d)
        if self._resident is not None:
            self.block_rows = n
        self._segments = [self._segments_of(r0, min(n, r0 + self.block_rows)) for r0 in range(0, n, self.block_rows)]
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and self.mode == "streamed" else None
        self._buffers: list[torch.Tensor] | None = None
        self._digest: str | None = None  # of the whole of P (see pipeline.subspace.BasisDigest); computed when needed
        self.global_n = n  # parameters of the whole model (n: those whose rows this basis holds)
        self.sharding: Sharding | None = None  # FSDP2: this rank's rows and the mesh's group (from_store(model=))

    def __repr__(self) -> str:
        held = f"{self.n} rows of this rank" if self.sharded else f"{self.n} rows"
        return f"Basis({self.name or 'in memory'}: d={self.d}, {held}, {self.mode} on {self.device}, {self.dtype})"

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_store(cls, path: "str | os.PathLike", name: str = "default", *, device: "str | torch.device" = "cpu",
                   dtype: torch.dtype = torch.float32, block_rows: int | None = None, mode: str = "auto",
                   fraction: float = 0.5, host: str = "auto", cache_dir: "str | os.PathLike | None" = None,
                   model: torch.nn.Module | None = None) -> "Basis":
        """Load subspace ``name`` of a store.

        ``model``: the model to train (checked against the store's layout). Replicated parameters (a plain
        module, or DDP: ``module.`` is stripped) load all of P, as without it. An FSDP2 model (every
        parameter a DTensor placed ``Shard(0)`` on one 1-D mesh, as ``fully_shard`` makes them) loads only the
        rows of P this rank's shards cover: n is the local element count, the layout has each tensor's local
        shape (possibly empty), and the optimizers sum g̃ over the mesh's group. Any other placement (Shard(1),
        HSDP's 2-D mesh, a mix of sharded and plain parameters) raises
        :class:`~trajstore.errors.InvalidArgumentError`. Such a partial read cannot be checked against the
        digest of the whole of P: it is checked against the subspace's attributes (before and after the read)
        and for NaN/Inf, see :meth:`Subspace.read_ranges`; ``host="mmap"`` is not available for it.

        ``mode``: ``"resident"``, ``"streamed"`` or ``"auto"`` (resident when P takes less than
        ``fraction`` of the device's free memory). Streamed P lives in ``host`` memory:
        ``"pinned"`` (RAM, page-locked when CUDA is present) or ``"mmap"`` (an uncompressed copy
        written once per store and subspace, in ``<store>/subspaces/<name>/`` or a folder of its own
        under ``cache_dir``; checked against the subspace before use and rebuilt when stale, see
        :func:`_mmap_copy`); ``"auto"`` picks pinned when P takes less than half the free RAM, else mmap.

        The basis returned is exactly one complete extraction's: what is read is checked against the digest
        the extraction recorded (a subspace written before digests: against its attributes, re-read after
        P, and for NaN/Inf). A subspace replaced meanwhile (``extract --overwrite`` / ``--follow``) is read
        again, a few times, then :class:`~trajstore.errors.SubspaceChangedError`.
        """
        if host not in ("auto", "pinned", "mmap"):
            raise InvalidArgumentError(f"host must be 'auto', 'pinned' or 'mmap', got {host!r}")
        sharding, checked = None, False
        if model is not None:  # an evaluation forward leaves the FSDP2 root gathered, its parameters plain
            reshard(fsdp_modules(model.modules()))
        elif torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            warnings.warn("Basis.from_store without model= inside a torch.distributed job loads all of P on every "
                          "rank: under FSDP2 pass model=model, so that each rank holds only the rows of its shards",
                          UserWarning, stacklevel=2)
        for attempt in range(ATTEMPTS):
            if attempt:
                time.sleep(0.05 * 2 ** (attempt - 1))
            sub = open_subspace(path, name)
            layout = sub.store.layout if sub.store is not None else _layout_of(sub.path)
            if model is not None and not checked:
                sharding, checked = sharding_of(layout, model), True
            whole = sharding is None and sub.columns.is_identity  # all of P, stored in the global order
            if not whole and host == "mmap":
                raise InvalidArgumentError(
                    "host='mmap' maps an uncompressed copy of the whole of P in its stored order; a rank of a sharded "
                    "(FSDP2) model, or a store recorded sharded (P's rows in rank-major order), reads its rows into "
                    "RAM instead: use host='auto' or 'pinned'")
            try:
                if whole:
                    data, digest = _host_copy(sub, host, cache_dir)
                else:  # this rank's rows, or all rows of a store whose columns are permuted
                    ranges = sharding.ranges if sharding is not None else ((0, layout.n),)
                    data, digest = sub.read_ranges(ranges), _extraction_digest(sub)
                break
            except SubspaceChangedError:
                if attempt == ATTEMPTS - 1:
                    raise
        local = sharding.layout if sharding is not None else layout
        if isinstance(data, np.ndarray) and data.flags.writeable and torch.cuda.is_available() \
                and torch.device(device).type == "cuda" and mode != "resident" and compute_dtype(dtype) == dtype:
            data = torch.from_numpy(data).pin_memory()  # (a 16-bit basis streams from a pinned copy of its own)
        basis = cls(data, local, device=device, dtype=dtype, mode=mode, block_rows=block_rows, fraction=fraction,
                    name=f"{sub.path}::{name}")
        basis._digest = digest
        basis.global_n, basis.sharding = layout.n, sharding
        return basis

    @classmethod
    def from_array(cls, p: "np.ndarray | torch.Tensor", layout_or_model: object, **kwargs) -> "Basis":
        """A basis from an in-memory (n, d) array and a layout (or a model to take it from)."""
        layout = layout_or_model if isinstance(layout_or_model, ParamLayout) else ParamLayout.of(layout_or_model)
        host = p.detach().cpu().contiguous() if isinstance(p, torch.Tensor) else np.ascontiguousarray(p)
        return cls(host, layout, **kwargs)

    # -- checks -------------------------------------------------------------------------
    def check_params(self, params: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> None:
        """Refuse parameters that do not match the basis layout, naming the first mismatching tensor."""
        if names is not None:
            self.layout.check_same(ParamLayout([_spec(nm, p) for nm, p in zip(names, params)]), "model")
        for i, spec in enumerate(self.layout.specs):
            if i >= len(params):
                raise LayoutMismatchError(f"the optimizer has no tensor for {spec.name!r} {spec.shape} of the basis")
            if tuple(params[i].shape) != spec.shape:
                raise LayoutMismatchError(
                    f"parameter #{i} has shape {tuple(params[i].shape)}, but the basis expects {spec.name!r} "
                    f"{spec.shape}: the basis was extracted for a different model")
        if len(params) > len(self.layout.specs):
            raise LayoutMismatchError(f"the optimizer has {len(params)} tensors, the basis covers {len(self.layout.specs)}")

    @property
    def sharded(self) -> bool:
        """Whether this basis holds one rank's rows of an FSDP2 model (g̃ is then summed over its ranks)."""
        return self.sharding is not None

    @property
    def digest(self) -> str:
        """``"blake2b-128:<hex>"`` of the whole of P's float32 values: the one its extraction recorded
        (from_store, whole or one rank's rows), else computed once over P. A sharded basis of a subspace
        written before digests has a hash of the extraction's attributes instead (``"attrs-blake2b:<hex>"``)."""
        if self._digest is None:
            digest = BasisDigest()
            rows = block_rows((self.n, self.d))
            for r0 in range(0, self.n, rows):
                block = self._host[r0:r0 + rows]
                digest.update(block.numpy() if isinstance(block, torch.Tensor) else block)
            self._digest = digest.hexdigest()
        return self._digest

    def fingerprint(self) -> torch.Tensor:
        """(n, d, h1, h2) as a float64 tensor, n the whole model's parameter count and h1, h2 two 48-bit parts
        of :attr:`digest` (exact in float64): lets an optimizer state refuse a different basis, whatever rows
        they share. It names the whole basis, not the rows a rank holds: the subspace state (momentum, B) is
        the same on every rank, so a state saved by one rank, or unsharded, loads into any sharding of the
        same basis (per-parameter state is checked against the local shapes on load)."""
        hexa = self.digest.rsplit(":", 1)[-1]
        return torch.tensor([self.global_n, self.d, float(int(hexa[:12], 16)), float(int(hexa[12:24], 16))],
                            dtype=torch.float64)

    def legacy_fingerprint(self) -> torch.Tensor:
        """The (n, d, hash of the first 64 rows) that earlier versions saved: it cannot tell apart bases
        that agree on those rows (a tensor frozen while recording makes them zero in every subspace)."""
        if self.sharded:
            raise LayoutMismatchError("this optimizer state was saved by an earlier version, whose basis check needs "
                                      "the first 64 rows of the whole of P; load it into an unsharded model once and "
                                      "save it again")
        head = np.asarray(self._host[: min(self.n, 64)], dtype=np.float32).tobytes()
        digest = int(hashlib.sha1(head).hexdigest()[:12], 16)
        return torch.tensor([self.n, self.d, float(digest)], dtype=torch.float64)

    # -- the two products -----------------------------------------------------------------
    @torch.no_grad()
    def project(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """g̃ = Σ_l P_lᵀ g_l as a (d,) float64 tensor on the device (products in :attr:`compute_dtype`,
        float32 at least, summed in float64 across blocks).

        One gradient per layout tensor, any memory format (read in the logical, row-major order the
        store records); a ``None`` entry counts as zero: its rows of P are left out. A 16-bit basis
        multiplies its own rounded values P̂ (upcast piece by piece) with the unrounded gradient.
        """
        flats = [None if g is None else g.reshape(-1) for g in grads]  # views unless non-contiguous
        out = torch.zeros(self.d, dtype=torch.float64, device=self.device)
        for block, segments in self._iter_blocks():
            acc = torch.zeros(self.d, dtype=self.compute_dtype, device=self.device)  # (d,)
            for i, lo, hi, b0, b1 in segments:
                if flats[i] is not None:
                    for a, rows in self._pieces(block, b0, b1):  # rows: (k, d) in compute_dtype
                        acc.addmv_(rows.T, flats[i][lo + a:lo + a + rows.shape[0]].to(self.compute_dtype))
            out += acc.double()
        return out

    @torch.no_grad()
    def add_lifted_(self, tensors: Sequence[torch.Tensor | None], coeffs: torch.Tensor, alpha: float = 1.0) -> None:
        """tensors_l += alpha · P_l c, in place, block by block; ``None`` entries are skipped (left untouched).

        A non-contiguous tensor (channels_last, transposed) is updated through a contiguous copy in
        the logical order, written back once at the end, so its memory format is kept. P c is computed
        in :attr:`compute_dtype` (c is not rounded to a 16-bit basis's dtype), then cast to each tensor's.
        """
        c = coeffs.to(device=self.device, dtype=self.compute_dtype)  # (d,)
        staged = {i: t.contiguous() for i, t in enumerate(tensors) if t is not None and not t.is_contiguous()}
        flats = [None if t is None else staged.get(i, t).view(-1) for i, t in enumerate(tensors)]
        for block, segments in self._iter_blocks():
            for i, lo, hi, b0, b1 in segments:
                flat = flats[i]
                if flat is not None:
                    for a, rows in self._pieces(block, b0, b1):  # rows: (k, d) in compute_dtype
                        flat[lo + a:lo + a + rows.shape[0]].add_((rows @ c).to(flat.dtype), alpha=alpha)
        for i, copy in staged.items():
            tensors[i].copy_(copy)

    def lift(self, coeffs: torch.Tensor, like: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-parameter tensors P_l c, shaped like the layout."""
        if like is None:
            out = [torch.zeros(s.shape, dtype=self.compute_dtype, device=self.device) for s in self.layout.specs]
        else:
            out = [torch.zeros_like(t) for t in like]
        self.add_lifted_(out, coeffs)
        return out

    def device_bytes(self) -> int:
        """Device memory held for P: all of it (resident) or the two block buffers (streamed), plus a 16-bit
        basis's upcast buffer (at most :data:`UPCAST_BYTES`) once a product has run."""
        held = [self._resident] if self._resident is not None else list(self._buffers or ())
        if self._scratch is not None:
            held.append(self._scratch)
        return sum(b.numel() * b.element_size() for b in held)

    # -- internals ------------------------------------------------------------------------
    def _make_resident(self) -> torch.Tensor:
        """All of P on the device, (n, d). A read-only host array (a memory map) is copied in row blocks:
        torch cannot share memory it must not write (and warns), and blocks bound the extra host memory."""
        host = self._host
        if isinstance(host, torch.Tensor) or host.flags.writeable:
            return torch.as_tensor(np.asarray(host) if isinstance(host, np.ndarray) else host).to(
                device=self.device, dtype=self.dtype)
        out = torch.empty((self.n, self.d), dtype=self.dtype, device=self.device)
        for r0 in range(0, self.n, self.block_rows):
            r1 = min(self.n, r0 + self.block_rows)
            out[r0:r1].copy_(self._host_block(r0, r1))
        return out

    def _pieces(self, block: torch.Tensor, b0: int, b1: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Rows b0:b1 of a block as (offset from b0, rows (k, d) in compute_dtype): the block's own view
        for a float32/float64 basis, else pieces of at most ``_upcast_rows`` rows upcast to float32."""
        if self._upcast_rows is None:
            yield 0, block[b0:b1]
            return
        if self._scratch is None:  # reused: a fresh allocation per piece costs page faults on the CPU
            rows = min(self._upcast_rows, self.block_rows)
            self._scratch = torch.empty((rows, self.d), dtype=self.compute_dtype, device=self.device)
        for a in range(b0, b1, self._upcast_rows):
            k = min(b1, a + self._upcast_rows) - a
            yield a - b0, self._scratch[:k].copy_(block[a:a + k])

    def _low_precision_host(self) -> torch.Tensor | None:
        """The host copy a streamed 16-bit basis copies its blocks from: (n, d) in its dtype, pinned when it
        streams to a CUDA device; made once, in blocks. None for a read-only memory map (P larger than
        half the free RAM), whose blocks are rounded as they are read (they then cross at 4 bytes a value)."""
        host = self._host
        if isinstance(host, np.ndarray) and not host.flags.writeable:
            return None
        out = torch.empty((self.n, self.d), dtype=self.dtype, pin_memory=self.device.type == "cuda")
        for r0 in range(0, self.n, self.block_rows):
            r1 = min(self.n, r0 + self.block_rows)
            out[r0:r1].copy_(torch.as_tensor(host[r0:r1]))
        return out

    def _segments_of(self, r0: int, r1: int) -> list[Segment]:
        segs = []
        for i, (lo, hi) in enumerate(zip(self.layout.offsets, self.layout.offsets[1:])):
            a, b = max(lo, r0), min(hi, r1)
            if a < b:
                segs.append((i, a - lo, b - lo, a - r0, b - r0))
        return segs

    def _host_block(self, r0: int, r1: int) -> torch.Tensor:
        if self._stream_host is not None:
            return self._stream_host[r0:r1]
        block = self._host[r0:r1]
        return block if isinstance(block, torch.Tensor) else torch.from_numpy(np.array(block, copy=True))

    def _iter_blocks(self) -> Iterator[tuple[torch.Tensor, list[Segment]]]:
        if self._resident is not None:
            yield self._resident, self._segments[0]
            return
        starts = range(0, self.n, self.block_rows)
        if self._stream is None:  # CPU: the host block is the block
            for r0, segs in zip(starts, self._segments):
                yield self._host_block(r0, min(self.n, r0 + self.block_rows)).to(self.dtype), segs
            return
        yield from self._iter_cuda(list(starts))

    def _iter_cuda(self, starts: list[int]) -> Iterator[tuple[torch.Tensor, list[Segment]]]:
        """Double-buffered: copy block k+1 on a side stream while block k is used."""
        if self._buffers is None:
            self._buffers = [torch.empty((self.block_rows, self.d), dtype=self.dtype, device=self.device) for _ in range(2)]
        main = torch.cuda.current_stream(self.device)
        ready = [torch.cuda.Event(), torch.cuda.Event()]
        free = [torch.cuda.Event(), torch.cuda.Event()]

        def prefetch(k: int) -> None:
            slot, r0 = k % 2, starts[k]
            r1 = min(self.n, r0 + self.block_rows)
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(free[slot])
                self._buffers[slot][: r1 - r0].copy_(self._host_block(r0, r1), non_blocking=True)
                ready[slot].record(self._stream)

        for slot in (0, 1):
            free[slot].record(main)
        prefetch(0)
        for k, r0 in enumerate(starts):
            if k + 1 < len(starts):
                prefetch(k + 1)
            slot = k % 2
            main.wait_event(ready[slot])
            r1 = min(self.n, r0 + self.block_rows)
            yield self._buffers[slot][: r1 - r0], self._segments[k]
            free[slot].record(main)


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


def _layout_of(path: str) -> ParamLayout:
    from trajstore import TrajectoryStore

    with TrajectoryStore.open(path, "r") as store:
        return store.layout


def _host_copy(sub: Subspace, host: str, cache_dir: "str | os.PathLike | None") -> tuple[np.ndarray, str]:
    """(P in host memory or memory-mapped, its digest), checked: see :meth:`Subspace.read`."""
    host = _choose_host(host, sub.n_params * sub.dim * 4)
    if host == "mmap":
        return _mmap_copy(sub, cache_dir)
    return sub.read()


def _mmap_copy(sub: Subspace, cache_dir: "str | os.PathLike | None") -> tuple[np.ndarray, str]:
    """The subspace's basis as an uncompressed (n, d) float32 .npy, memory-mapped read-only, and its digest.

    Each store and subspace has a folder of its own: ``<store>/subspaces/<name>/`` by default, or
    ``<cache_dir>/<store name>-<hash of its path>/<name>/`` (also under ``./.trajstore-cache`` for a
    remote store). The file is ``basis-<fingerprint>-<digest>.f32.npy``: the fingerprint hashes the
    subspace's attributes, spectrum and shape, the digest is the whole basis's (the one its extraction
    recorded; for a subspace written before digests, the one computed while the copy was made from a
    checked read). Before use the whole file is hashed and must give that digest, so a file of another
    store, subspace or extraction, or a damaged one, is rebuilt, never used. Each writer fills a private
    temp file, checks what it copied (see :meth:`Subspace.verify`) and renames it into place: concurrent
    loaders are safe (identical copies, the last rename wins) and a killed one leaves only its ``*.partial``.
    """
    folder = _cache_folder(sub, cache_dir)
    prefix = f"basis-{_subspace_fingerprint(sub)}-"
    expected = sub.digest
    candidates = [folder / f"{prefix}{_hex(expected)}.f32.npy"] if expected is not None else \
        sorted(folder.glob(f"{prefix}*.f32.npy"))  # an older subspace: the digest is in the file's name
    data = target = None
    for candidate in candidates:
        data = _open_cached(candidate, sub, expected or _digest_in_name(candidate, prefix))
        if data is not None:
            target, digest = candidate, expected or _digest_in_name(candidate, prefix)
            break
    if data is None:
        try:
            if not folder.is_dir():
                if cache_dir is None:  # the subspace's own folder: gone with it (do not create it again)
                    sub.check_unchanged()
                folder.mkdir(parents=True, exist_ok=True)
            target, digest = _write_cached(folder, prefix, sub)
        except (OSError, ValueError) as exc:  # e.g. its folder went with a subspace deleted meanwhile
            if isinstance(exc, TrajstoreError):
                raise
            sub.check_unchanged()
            raise StoreWriteError(f"could not write the memory-mapped copy of subspace {sub.name!r} into {folder} "
                                  f"({exc}); free space there, pass another cache_dir, or use host='pinned'") from exc
        data = _open_cached(target, sub, digest)
        if data is None:
            sub.check_unchanged()  # its folder may have gone with the subspace
            raise StoreWriteError(
                f"the memory-mapped copy of subspace {sub.name!r} written to {target} does not read back as the "
                "store's basis; check that disk, pass another cache_dir, or use host='pinned'")
    for old in [*folder.glob("basis-*.f32.npy"), folder / "basis.f32.npy"]:  # other versions are stale
        if old != target:
            try:
                old.unlink(missing_ok=True)  # a process still mapping it keeps its pages
            except OSError:
                pass
    return data, digest


def _extraction_digest(sub: Subspace) -> str:
    """The digest its extraction recorded for the whole basis; for a subspace written before digests, a hash
    of what identifies the extraction (its attributes, spectrum and shape)."""
    if sub.digest is not None:
        return sub.digest
    h = hashlib.blake2b(json.dumps(sub.attrs, sort_keys=True, default=str).encode(), digest_size=16)
    h.update(np.ascontiguousarray(sub.singular_values, dtype=np.float64).tobytes())
    h.update(repr(tuple(sub.basis.shape)).encode())
    return f"attrs-blake2b:{h.hexdigest()}"


def _hex(digest: str) -> str:
    return digest.rsplit(":", 1)[-1]


def _digest_in_name(path: Path, prefix: str) -> str | None:
    hexa = path.name[len(prefix):].removesuffix(".f32.npy")
    return f"blake2b-128:{hexa}" if re.fullmatch(r"[0-9a-f]{32}", hexa) else None


def _cache_folder(sub, cache_dir: "str | os.PathLike | None") -> Path:
    from trajstore.format import local_dir

    local = local_dir(sub.path)
    if cache_dir is None and local is not None:
        return local / "subspaces" / sub.name
    where = str(local.resolve()) if local is not None else str(sub.path)
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", where.rstrip("/").rsplit("/", 1)[-1])[:48] or "store"
    root = Path(cache_dir) if cache_dir is not None else Path.cwd() / ".trajstore-cache"
    return root / f"{label}-{hashlib.sha1(where.encode()).hexdigest()[:12]}" / sub.name


def _subspace_fingerprint(sub) -> str:
    """A hash of what identifies one extraction: its attributes (settings, snapshots, eigenvalues,
    creation time, duration), singular values and shape."""
    h = hashlib.sha1(json.dumps(sub.attrs, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(sub.singular_values, dtype=np.float64).tobytes())
    h.update(repr(tuple(sub.basis.shape)).encode())
    return h.hexdigest()[:16]


def _open_cached(target: Path, sub: Subspace, digest: str | None) -> np.ndarray | None:
    """The cached copy, memory-mapped, or None when it is missing, unreadable or not the basis whose
    whole digest is ``digest`` (every row is hashed: a hole anywhere is found)."""
    if digest is None:
        return None
    try:
        data = np.load(target, mmap_mode="r")  # (n, d)
    except (OSError, ValueError):
        return None
    if data.shape != tuple(sub.basis.shape) or data.dtype != np.float32 or not data.flags.c_contiguous:
        return None
    found = BasisDigest()
    rows = block_rows(data.shape)
    for r0 in range(0, data.shape[0], rows):
        found.update(data[r0:r0 + rows])
    return data if found.hexdigest() == digest else None


def _write_cached(folder: Path, prefix: str, sub: Subspace) -> tuple[Path, str]:
    """Copy the basis into a private temp file, check it (:meth:`Subspace.verify`), then rename it to
    ``<prefix><digest>.f32.npy`` (atomic); returns that path and the digest."""
    tmp = folder / f"{prefix}copy.f32.npy.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=sub.basis.shape)
        _, digest = sub.read(out)  # raises, before the rename, when what was copied is not the extraction's basis
        out.flush()
        del out
        target = folder / f"{prefix}{_hex(digest)}.f32.npy"
        os.replace(tmp, target)
        return target, digest
    finally:
        tmp.unlink(missing_ok=True)


def _spec(name: str, tensor: torch.Tensor):
    from trajstore.layout import TensorSpec

    return TensorSpec(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))


def random_subspace_basis(model: torch.nn.Module, d: int, seed: int = 0, **kwargs) -> Basis:
    """Li et al. (2018) baseline: a random orthonormal d-dimensional subspace of the parameters."""
    layout = ParamLayout.from_module(model)
    if not 1 <= d <= layout.n:
        raise InvalidArgumentError(f"d must be between 1 and n = {layout.n}, got {d}")
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(layout.n, d, generator=gen, dtype=torch.float64))
    return Basis.from_array(q.float(), layout, name=f"random-{d}-seed{seed}", **kwargs)
