"""Basis: the subspace P (n, d), resident on the device or streamed to it tile by tile.

P is split along the store's parameter layout, so the optimizers compute
g̃ = Pᵀg = Σ_l P_lᵀ g_l and w_l += P_l c without ever building an n-vector.

P is held transposed, in column tiles of ``block_rows`` parameters (:mod:`pipeline.tiles`): both
products then read P once, in long contiguous runs, and each tile is one contiguous copy to a device.

* resident: all the tiles on the device (on the CPU: in RAM, shared out over the cores);
* streamed: P stays in host memory (pinned) or in a memory-mapped uncompressed copy on
  disk, and moves to the device tile by tile through two device buffers with asynchronous
  copies on a side stream, so device memory for P is 2 x block_rows x d.

Numerics: each product call covers at most :func:`piece_cols` parameters in float32, and g̃'s partial
sums are added in float64 in the tiles' order (relative error ~1e-6 at 20M parameters, where one float32
gemv over a whole tensor gave ~1e-4); resident and streamed P with the same tiles give the same bits.

Under FSDP2 a rank's Basis holds only the rows of P its parameter shards cover (``from_store(...,
model=model)``): its layout is the local one, n is the local count (see :mod:`pipeline.distributed`).

**P in bfloat16 / float16** (``dtype=``): the device copy of P (resident, or the streamed tile
buffers and the host copy they are filled from) is held in that dtype, halving its memory and the bytes
each product reads. The products still compute in float32: pieces of P̂ are upcast
(:data:`UPCAST_BYTES` of float32 at most), the gradient and the coefficients are never rounded to
16 bits, and g̃ accumulates in float32 per piece (float64 across pieces). So g̃ = P̂ᵀg and the update P̂ c
are those of the rounded basis P̂ itself: the iterates stay exactly in w₀ + span(P̂). P̂ is not
re-orthonormalised and no metric correction (P̂ᵀP̂)⁻¹ is applied: the optimizers run plain SGD / BFGS
on h(s) = f(w₀ + P̂ s), whose metric P̂ᵀP̂ differs from I by about the 16-bit rounding (measured by
benchmarks/bench_basis_dtype.py). The digest and fingerprint name the stored float32 P, so an optimizer
state moves between a float32 and a bfloat16 basis of the same extraction.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from trajstore.errors import (
    InvalidArgumentError,
    LayoutMismatchError,
    SubspaceChangedError,
)
from trajstore.layout import ParamLayout

from .basis_cache import extraction_digest, mmap_copy
from .distributed import Sharding, fsdp_modules, reshard, sharding_of
from .placement import (  # noqa: F401 -- the sizing rules, also reached as pipeline.basis.*
    ALIGN_COLS, CPU_TILE_COLS, DTYPES, PIECE_COLS, UPCAST_BYTES, _check_device, _check_dtype, _choose_host,
    _choose_mode, _pool, compute_dtype, one_blas_thread, piece_cols, product_threads, product_workers, scratch_bytes, tile_cols)
from .subspace import ATTEMPTS, DIGEST, LEGACY_DIGEST, BasisDigest, Subspace, block_rows, open_subspace
from .tile_walk import Segment, TileWalk
from .tiles import padded_rows, rows_of, tile_count, tile_in_place, tiles_of

def _digest_of(rows: "Callable[[int, int], np.ndarray]", n: int, d: int, algorithm: str = DIGEST) -> str:
    digest = BasisDigest(algorithm)
    step = block_rows((n, d))
    for r0 in range(0, n, step):
        digest.update(rows(r0, min(n, r0 + step)))
    return digest.hexdigest()


def _whole_copy(sub: Subspace, host: str, cache_dir: "str | os.PathLike | None", device: torch.device, mode: str,
                block_rows: int | None) -> tuple[np.ndarray, str, "torch.Tensor | np.ndarray | None"]:
    """(P (n, d) or a placeholder of its shape, its digest, P tiled or None), read and checked (see
    :meth:`Subspace.read`): memory-mapped tiles when ``host`` says so; into RAM and tiled in place when it will
    be held in host memory (P held once); else (CUDA resident) as rows, which the Basis tiles on the device."""
    n, d = sub.basis.shape
    cols = tile_cols(n, d, device, mode, block_rows)
    if _choose_host(host, n * d * 4) == "mmap":
        mapped, digest = mmap_copy(sub, cache_dir, cols)  # (k, d, cols), read-only
        return np.broadcast_to(np.float32(0), (n, d)), digest, mapped
    if device.type == "cuda" and mode == "resident":
        return (*sub.read(), None)
    buf = padded_rows(n, d, cols)  # (k·cols, d)
    _, digest = sub.read(buf[:n])
    return buf[:n], digest, tile_in_place(buf, n, cols)


class Basis(TileWalk):
    """An orthonormal basis P (n, d) split per parameter tensor. See :meth:`from_store`."""

    def __init__(self, host: "np.ndarray | torch.Tensor", layout: ParamLayout, *, device: "str | torch.device" = "cpu",
                 dtype: torch.dtype = torch.float32, mode: str = "auto", block_rows: int | None = None,
                 fraction: float = 0.5, name: str = "", digest: str | None = None,
                 tiles: "torch.Tensor | np.ndarray | None" = None, _recorded: bool | None = None):
        """``host``: P (n, d) float32 (numpy or a CPU tensor; a memory map of rows is read into tiles in RAM:
        to stream P from disk, use ``from_store(host="mmap")`` or pass its tiled map as ``tiles``). ``tiles``: the
        same P already in host tiles (k, d, block_rows) float32: a tensor (:meth:`from_store` tiles its read in
        place) or a read-only numpy memory map (``host="mmap"``, read in place when streamed); ``host`` then
        gives only the shape. ``digest``: the whole basis's, when known (else computed when needed).
        ``block_rows``: parameters (rows of P) per tile, the unit that moves and that one thread works on."""
        n, d = host.shape
        _check_dtype(dtype)
        mapped = isinstance(tiles, np.ndarray)  # from_store(host="mmap"): the read-only file
        self.mapped_file: str | None = str(tiles.filename) if mapped else None  # its path
        if mapped:
            with warnings.catch_warnings():  # torch warns of a read-only array: the products only read it
                warnings.simplefilter("ignore", UserWarning)
                tiles = torch.from_numpy(tiles)
        if n != layout.n:
            raise LayoutMismatchError(f"basis has {n} rows but the layout has {layout.n} parameters")
        self.layout, self.n, self.d, self.dtype, self.name = layout, n, d, dtype, name
        self.device = _check_device(device)
        if not 0 < fraction <= 1:
            raise InvalidArgumentError(f"fraction must be in (0, 1] (of the free memory P may take), got {fraction!r}")
        self.mode = _choose_mode(mode, n * d * torch.finfo(dtype).bits // 8, self.device, fraction)
        self.compute_dtype = compute_dtype(dtype)  # of the products: float32 for a 16-bit P
        self.block_rows = tile_cols(n, d, self.device, self.mode, block_rows)  # parameters per tile
        self._upcast = self.compute_dtype != dtype
        self._piece_cols = piece_cols(d, self.device, dtype)  # per product call; g̃ folds into float64 after each

        def rows(r0: int, r1: int) -> np.ndarray:  # (r1 - r0, d) float32 of the P given
            return np.asarray(host[r0:r1], np.float32) if tiles is None else rows_of(tiles, n, r0, r1)

        self._digest = digest  # of the whole of P (see pipeline.subspace.BasisDigest); computed when needed
        # recorded by the extraction (the same in every version), or computed here (by earlier versions with
        # LEGACY_DIGEST: optimizer states they saved hold a fingerprint of that, see earlier_fingerprint)
        self._recorded = digest is not None if _recorded is None else _recorded
        self._earlier_digest: str | None = None
        if not self._recorded and self._upcast:  # P̂ holds rounded values: hash the float32 P now
            self._digest = digest or _digest_of(rows, n, d)
            self._earlier_digest = _digest_of(rows, n, d, LEGACY_DIGEST)
        self._head = rows(0, min(n, 64))  # (<= 64, d) float32: what legacy_fingerprint hashes
        # where P lives: tiles (k, d, cols) on the device (resident, or any CPU basis held in RAM), in host memory
        # (CUDA streamed, pinned), or in the memory-mapped file of from_store(host="mmap") (streamed)
        self._round_tiles = False  # a 16-bit basis streamed from a float32 memory map rounds each tile as used
        self._in_place = False  # the tiles are the memory map itself (from_store(host="mmap"), streamed)
        self._tiles = self._make_tiles(host, tiles, mapped)
        self._blocks = [self._segments_of(c0, min(n, c0 + self.block_rows)) for c0 in range(0, n, self.block_rows)]
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" and self.mode == "streamed" else None
        self._buffers: list[torch.Tensor] | None = None  # CUDA streaming: two (d, cols) device tiles
        self._scratch: dict[int, dict[str, torch.Tensor]] = {}  # per thread: the products' buffers, kept
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

        ``block_rows``: parameters per tile (see :mod:`pipeline.tiles`), by default
        :func:`tile_cols`. ``mode``: ``"resident"``, ``"streamed"`` or ``"auto"`` (resident when P takes less than
        ``fraction`` of the device's free memory). Streamed P lives in ``host`` memory:
        ``"pinned"`` (RAM, page-locked when CUDA is present) or ``"mmap"`` (an uncompressed copy
        written once per store and subspace, in ``<store>/subspaces/<name>/`` or a folder of its own
        under ``cache_dir``; checked against the subspace before use and rebuilt when stale, see
        :func:`pipeline.basis_cache.mmap_copy`); ``"auto"`` picks pinned when P takes less than half the free RAM, else mmap.

        The basis returned is exactly one complete extraction's: what is read is checked against the digest
        the extraction recorded (a subspace written before digests: against its attributes, re-read after
        P, and for NaN/Inf). A subspace replaced meanwhile (``extract --overwrite`` / ``--follow``) is read
        again, a few times, then :class:`~trajstore.errors.SubspaceChangedError`.
        """
        if host not in ("auto", "pinned", "mmap"):
            raise InvalidArgumentError(f"host must be 'auto', 'pinned' or 'mmap', got {host!r}")
        _check_dtype(dtype)
        _check_device(device)
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
            n, d = (sharding.layout.n if sharding is not None else layout.n), sub.dim
            mode = _choose_mode(mode, n * d * torch.finfo(dtype).bits // 8, torch.device(device), fraction)
            try:
                if whole:
                    data, digest, tiles = _whole_copy(sub, host, cache_dir, torch.device(device), mode, block_rows)
                else:  # this rank's rows, or all rows of a store whose columns are permuted
                    ranges = sharding.ranges if sharding is not None else ((0, layout.n),)
                    data, digest, tiles = sub.read_ranges(ranges), extraction_digest(sub), None
                break
            except SubspaceChangedError:
                if attempt == ATTEMPTS - 1:
                    raise
        local = sharding.layout if sharding is not None else layout
        basis = cls(data, local, device=device, dtype=dtype, mode=mode, block_rows=block_rows, fraction=fraction,
                    name=f"{sub.path}::{name}", digest=digest, tiles=tiles,
                    _recorded=sub.digest is not None or not whole)  # a whole read of a subspace without one: computed
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
        """``"sha256-128:<hex>"`` of the whole of P's float32 values: the one its extraction recorded
        (from_store, whole or one rank's rows), else computed once over P. A sharded basis of a subspace
        written before digests has a hash of the extraction's attributes instead (``"attrs-blake2b:<hex>"``)."""
        if self._digest is None:
            self._digest = _digest_of(self._rows, self.n, self.d)
        return self._digest

    def fingerprint(self) -> torch.Tensor:
        """(n, d, h1, h2) as a float64 tensor, n the whole model's parameter count and h1, h2 two 48-bit parts
        of :attr:`digest` (exact in float64): lets an optimizer state refuse a different basis, whatever rows
        they share. It names the whole basis, not the rows a rank holds: the subspace state (momentum, B) is
        the same on every rank, so a state saved by one rank, or unsharded, loads into any sharding of the
        same basis (per-parameter state is checked against the local shapes on load)."""
        return self._fingerprint_of(self.digest)

    def earlier_fingerprint(self) -> torch.Tensor | None:
        """The fingerprint states saved before 2026-11-28 hold for this basis when its digest is computed here
        (a P given as an array, or a subspace extracted before digests were recorded: hashed with
        :data:`~pipeline.subspace.LEGACY_DIGEST` then), else None (a recorded digest is the same in every version)."""
        if self._earlier_digest is None and not self._recorded:  # (a 16-bit basis took it when it was made)
            self._earlier_digest = _digest_of(self._rows, self.n, self.d, LEGACY_DIGEST)
        return None if self._earlier_digest is None else self._fingerprint_of(self._earlier_digest)

    def _fingerprint_of(self, digest: str) -> torch.Tensor:
        hexa = digest.rsplit(":", 1)[-1]
        return torch.tensor([self.global_n, self.d, float(int(hexa[:12], 16)), float(int(hexa[12:24], 16))],
                            dtype=torch.float64)

    def legacy_fingerprint(self) -> torch.Tensor:
        """The (n, d, hash of the first 64 rows) that earlier versions saved: it cannot tell apart bases
        that agree on those rows (a tensor frozen while recording makes them zero in every subspace)."""
        if self.sharded:
            raise LayoutMismatchError("this optimizer state was saved by an earlier version, whose basis check needs "
                                      "the first 64 rows of the whole of P; load it into an unsharded model once and "
                                      "save it again")
        head = self._head.tobytes()
        digest = int(hashlib.sha1(head).hexdigest()[:12], 16)
        return torch.tensor([self.n, self.d, float(digest)], dtype=torch.float64)

    # -- the two products -----------------------------------------------------------------
    @torch.no_grad()
    def project(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """g̃ = Σ_l P_lᵀ g_l as a (d,) float64 tensor on the device.

        Each product call covers at most a few ten thousand parameters of one tensor (:func:`piece_cols`) in
        :attr:`compute_dtype` (float32 at least); those partial sums are added in float64, tile by tile, in
        the tiles' order whatever the threads: resident and streamed P with the same ``block_rows`` give the
        same bits. One gradient per layout tensor, any memory format (read in the logical, row-major order
        the store records); a ``None`` entry counts as zero: its rows of P are left out. A 16-bit basis
        multiplies its own rounded values P̂ (upcast piece by piece) with the unrounded gradient.
        """
        flats = [None if g is None else g.reshape(-1) for g in grads]  # views unless non-contiguous
        cdt = self.compute_dtype

        def tile_sum(tile: torch.Tensor, segments: list[Segment], scratch: dict) -> torch.Tensor:
            acc = torch.zeros(self.d, dtype=torch.float64, device=self.device)  # (d,)
            # each sum over k on one core: MKL would split it over threads as it sees fit, changing the bits
            with one_blas_thread() if self.device.type == "cpu" else contextlib.nullcontext():
                for i, lo, _, b0, b1 in segments:
                    if flats[i] is not None:
                        for a, cols in self._pieces(tile, b0, b1, scratch):  # cols: (d, k) in compute_dtype
                            acc += torch.mv(cols, flats[i][lo + a:lo + a + cols.shape[1]].to(cdt)).double()
            return acc

        out = torch.zeros(self.d, dtype=torch.float64, device=self.device)  # (d,)
        for part in self._over_tiles(tile_sum):  # in the tiles' order: the same bits however they were shared out
            out += part
        return out

    @torch.no_grad()
    def add_lifted_(self, tensors: Sequence[torch.Tensor | None], coeffs: torch.Tensor, alpha: float = 1.0) -> None:
        """tensors_l += alpha · P_l c, in place, tile by tile; ``None`` entries are skipped (left untouched).

        A non-contiguous tensor (channels_last, transposed) is updated through a contiguous copy in
        the logical order, written back once at the end, so its memory format is kept. P c is computed
        in :attr:`compute_dtype` (c is not rounded to a 16-bit basis's dtype), then cast to each tensor's.
        """
        c = coeffs.to(device=self.device, dtype=self.compute_dtype)  # (d,)
        staged = {i: t.contiguous() for i, t in enumerate(tensors) if t is not None and not t.is_contiguous()}
        flats = [None if t is None else staged.get(i, t).view(-1) for i, t in enumerate(tensors)]

        def tile_lift(tile: torch.Tensor, segments: list[Segment], scratch: dict) -> None:
            for i, lo, _, b0, b1 in segments:
                if flats[i] is not None:
                    for a, cols in self._pieces(tile, b0, b1, scratch):  # cols: (d, k) in compute_dtype
                        k = cols.shape[1]
                        lifted = self._buffer(scratch, "lifted", (min(self._piece_cols, self.block_rows),),
                                              c.dtype, self.device)
                        # P c into a buffer first: the weights are rounded once (an addmv_ into them rounds d times)
                        pc = torch.mv(cols.T, c, out=lifted[:k])  # (k,)
                        flats[i][lo + a:lo + a + k].add_(pc if flats[i].dtype == c.dtype else pc.to(flats[i].dtype),
                                                         alpha=alpha)

        self._over_tiles(tile_lift)
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

    def to_numpy(self) -> np.ndarray:
        """P (n, d) as float32 numpy, as this basis holds it (a 16-bit basis: its rounded values, widened)."""
        return self._rows(0, self.n)

    @property
    def pass_bytes(self) -> int:
        """Bytes of P's tiles as held, rows padded to whole tiles (a little over n * d * itemsize): what one pass
        reads, except for a 16-bit basis rounded from float32 tiles as it goes (those are float32 here)."""
        return self._tiles.numel() * self._tiles.element_size()

    def device_bytes(self) -> int:
        """Device memory held for P: all of it (resident, and on the CPU any basis not read from the memory map
        in place) or the two tile buffers (CUDA streamed), plus each product thread's buffers once the products
        have run (see :func:`scratch_bytes`)."""
        in_ram = self.device.type == "cpu" and not self._in_place  # a CPU basis's tiles in RAM: its "device"
        held = [self._tiles] if self.mode == "resident" or in_ram else list(self._buffers or ())
        held += [b for scratch in self._scratch.values() for b in scratch.values() if b.device == self.device]
        return sum(b.numel() * b.element_size() for b in held)

    # -- internals ------------------------------------------------------------------------
    def _make_tiles(self, host: "np.ndarray | torch.Tensor", tiles: torch.Tensor | None, mapped: bool) -> torch.Tensor:
        """P as tiles (k, d, cols) in :attr:`dtype`: on the device when resident (or on the CPU), else in
        page-locked host memory (CUDA streamed), from which each tile crosses to the device in one copy."""
        on_device = self.mode == "resident" or self.device.type == "cpu"
        where, pin = (self.device, False) if on_device else (torch.device("cpu"), True)
        if tiles is None:
            return tiles_of(host, self.block_rows, self.dtype, device=where, pin=pin)
        if tuple(tiles.shape) != (tile_count(self.n, self.block_rows), self.d, self.block_rows):
            raise InvalidArgumentError(f"tiles of shape {tuple(tiles.shape)} do not hold P ({self.n}, {self.d}) "
                                       f"in tiles of {self.block_rows} columns")
        if mapped and self.mode == "streamed":  # read in place (a 16-bit basis rounds each tile as it is used)
            self._round_tiles, self._in_place = tiles.dtype != self.dtype, True
            return tiles
        self.mapped_file = None  # copied out of the map: not read from it
        if where.type == "cpu" and not pin:
            return tiles.clone() if mapped and tiles.dtype == self.dtype else tiles.to(self.dtype)  # into RAM
        low = tiles.to(self.dtype)
        return low.pin_memory() if pin else low.to(where)

    def _rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows r0:r1 of P as held, (r1 - r0, d) float32."""
        rows = rows_of(self._tiles, self.n, r0, r1)
        return torch.from_numpy(rows).to(self.dtype).float().numpy() if self._round_tiles else rows


def _layout_of(path: str) -> ParamLayout:
    from trajstore import TrajectoryStore

    with TrajectoryStore.open(path, "r") as store:
        return store.layout


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
