"""Decoding reads of committed rows: used by TrajectoryStore.read and by its dask arrays.

``RowReader`` is a small picklable array-like (shape, dtype, ``__getitem__``) over the
first ``committed`` rows of a store, so ``dask.array.from_array`` can build graphs that run
on threads or on dask.distributed workers, each worker opening the store read-only.
"""
from __future__ import annotations

import json

import numpy as np
import zarr

from .codecs import CodecPreset
from .errors import CorruptMetadataError, CorruptSnapshotError, StoreChangedError
from .fastread import open_fast
from .format import ATTR, PARAMS, REFERENCE, local_dir, zarr_store
from .layout import BF16, bf16_to_float32, raw_dtype, read_dtype

_DECODE_ERRORS = (ValueError, RuntimeError, OSError, TypeError, IndexError, KeyError, ArithmeticError)
CONTEXT_BYTES = 64 << 20  # memory for the decoding context of an xor-delta read (K rows x a column range)


class RowReader:
    """Array-like view (committed, n) of a store's decoded snapshots."""

    def __init__(self, path: str, committed: int, n: int, dtype: str, codec: dict,
                 storage_options: dict | None = None, token: str = "", strict: bool = True):
        self.path, self.committed, self.n = path, committed, n
        self.values = str(dtype)  # the store's dtype: a numpy float dtype, or "bfloat16"
        self.raw = raw_dtype(self.values)  # of the stored rows: bfloat16 as its uint16 bits
        self.dtype = read_dtype(self.values)  # what reads return: bfloat16 widened exactly to float32
        self.codec_json = codec
        self.storage_options = storage_options
        self.token = token
        self.strict = strict  # a missing chunk is damage (stores that write every chunk)
        self._arrays: tuple | None = None
        self._fast = None
        self._fast_ref = None  # checked reader of the reference row (delta presets)
        self._fast_checked = False

    # array-like protocol used by dask.array.from_array
    @property
    def shape(self) -> tuple[int, int]:
        return (self.committed, self.n)

    @property
    def ndim(self) -> int:
        return 2

    def __dask_tokenize__(self):
        return ("trajstore.RowReader", self.path, self.committed, self.token)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = None  # reopen on the worker
        state["_fast"], state["_fast_ref"], state["_fast_checked"] = None, None, False
        return state

    def _open(self):
        """The ``params`` (and ``reference``) zarr arrays, checked against the store's attributes:
        damaged or inconsistent array metadata raises CorruptMetadataError naming the file."""
        if self._arrays is None:
            preset = self.preset
            try:
                group = zarr.open_group(zarr_store(self.path, True, self.storage_options), mode="r", zarr_format=3)
            except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError, OSError) as exc:
                raise CorruptMetadataError(f"the group metadata {self._file('zarr.json')} is damaged ({exc})") from None
            params = self._array(group, PARAMS, preset.stored_dtype(self.raw), self.committed)
            reference = self._array(group, REFERENCE, self.raw, 1) if preset.transform == "delta" else None
            self._arrays = (params, reference)
        return self._arrays

    def _file(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def _array(self, group, name: str, dtype: np.dtype, rows: int):
        """Array ``name`` of ``group`` if its metadata match what the attributes promise, else raise."""
        where = self._file(f"{name}/zarr.json")
        try:
            arr = group[name]
            if not isinstance(arr, zarr.Array):
                raise ValueError("it is a group, not an array")
        except KeyError:
            raise CorruptMetadataError(f"the '{name}' array of store {self.path} is missing ({where}); "
                                       "restore it from a copy of the store") from None
        except (ValueError, TypeError, AttributeError, ArithmeticError, OSError) as exc:
            raise CorruptMetadataError(f"the metadata of the '{name}' array ({where}) are damaged "
                                       f"({type(exc).__name__}: {exc}); restore the file from a copy") from None
        problem = (f"shape {arr.shape}, not (>= {rows}, {self.n})" if len(arr.shape) != 2 or arr.shape[0] < rows
                   or arr.shape[1] != self.n else
                   f"dtype {arr.dtype}, not {np.dtype(dtype)}" if arr.dtype != np.dtype(dtype) else None)
        if problem:
            what = f"the store commits {rows} snapshots of {self.n} parameters" if name == PARAMS else \
                f"the store holds {self.n} parameters"
            raise CorruptMetadataError(f"the '{name}' array ({where}) has {problem}, but {what} "
                                       "(metadata damaged or mismatched); run `trajstore verify`", index=None)
        return arr

    @property
    def preset(self) -> CodecPreset:
        """The store's codec preset (parsed once)."""
        preset = self.__dict__.get("_preset")
        if preset is None:
            try:
                preset = self._preset = CodecPreset.from_json(self.codec_json)
            except ValueError as exc:
                raise CorruptMetadataError(f"the codec in {self._file('zarr.json')} is damaged: {exc}") from None
        return preset

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        r0, r1, rstep = rows.indices(self.committed) if isinstance(rows, slice) else (rows, rows + 1, 1)
        c0, c1, cstep = cols.indices(self.n)
        if r1 <= r0 or c1 <= c0:
            return np.empty((max(0, len(range(r0, r1, rstep))), max(0, len(range(c0, c1, cstep)))), self.dtype)
        block = self.read_block(r0, r1, c0, c1)
        out = block[::rstep, ::cstep]
        return out[0] if not isinstance(rows, slice) else out

    def read_block(self, r0: int, r1: int, c0: int = 0, c1: int | None = None,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Decoded rows [r0, r1) and columns [c0, c1) as (r1 - r0, c1 - c0).

        ``out`` (optional, (r1 - r0, c1 - c0) of the reader's ``dtype``) is filled and returned when the
        rows need no decoding context (plain codec): callers reuse one buffer across blocks. A bfloat16
        store's values come widened exactly to float32.
        Rows that decode from earlier ones (xor-delta) are decoded a column range at a time, so
        the context rows cost at most ``CONTEXT_BYTES`` of memory, never K full rows.
        """
        c1 = self.n if c1 is None else c1
        start = self.preset.decode_start(r0)
        rows = r1 - start
        if start == r0 or rows * (c1 - c0) * self.dtype.itemsize <= CONTEXT_BYTES:
            result = self._read_decoded(r0, r1, c0, c1, out)
            self._check_unchanged()
            return result
        result = np.empty((r1 - r0, c1 - c0), self.dtype) if out is None else out
        chunk = self._fast.chunk if self._fast is not None else 1 << 14
        width = max(1, CONTEXT_BYTES // (rows * self.dtype.itemsize)) // chunk * chunk or chunk  # whole chunks
        for s0 in range(c0, c1, width):
            s1 = min(c1, s0 + width)
            result[:, s0 - c0:s1 - c0] = self._read_decoded(r0, r1, s0, s1)
        self._check_unchanged()
        return result

    def _check_unchanged(self) -> None:
        if self.token:
            _, truncations, created = self.token.split("-", 2)
            check_unchanged(self.path, self.storage_options, truncations, created)

    def _read_decoded(self, r0: int, r1: int, c0: int, c1: int, out: np.ndarray | None = None) -> np.ndarray:
        preset = self.preset
        start = preset.decode_start(r0)
        params, reference = self._open()
        if not self._fast_checked:
            folder = local_dir(self.path)
            options = self.storage_options if folder is None else None
            for name in (PARAMS, REFERENCE) if preset.transform == "delta" else (PARAMS,):
                location = str(folder / name) if folder is not None else f"{self.path.rstrip('/')}/{name}"
                fast = open_fast(location, options, self.strict, layout_required=True)  # format 1 has one layout
                setattr(self, "_fast" if name == PARAMS else "_fast_ref", fast)
            self._fast_checked = True
        ref = self._reference_block(reference, c0, c1) if preset.transform == "delta" else None
        plain = start == r0 and preset.transform == "plain"
        try:
            target = out if out is not None and plain and self.raw == self.dtype else None
            if self._fast is not None:
                stored = self._fast.read(start, r1, c0, c1, target)
            else:
                stored = params[start:r1, c0:c1]
                if target is not None:
                    target[...] = stored
                    stored = target
        except CorruptSnapshotError as exc:
            raise CorruptSnapshotError(
                f"{exc} (store {self.path}; `trajstore verify` lists every bad snapshot, `trajstore repair` "
                "fixes the store)", index=exc.index) from None
        except _DECODE_ERRORS as exc:
            raise self._locate_corruption(start, r1, c0, c1, exc) from None
        decoded = preset.decode(stored, start, ref, self.raw)[r0 - start:]
        if self.values != BF16:
            return decoded
        return bf16_to_float32(decoded, out if out is not None and plain else None)  # exact

    def _reference_block(self, reference, c0: int, c1: int) -> np.ndarray:
        """Columns [c0, c1) of the reference row every delta row decodes from, read checked."""
        try:
            if self._fast_ref is not None:
                return self._fast_ref.read(0, 1, c0, c1)[0]
            return reference[0, c0:c1]
        except CorruptSnapshotError as exc:
            inner = exc
        except _DECODE_ERRORS as exc:
            inner = exc
        raise CorruptSnapshotError(
            f"the reference snapshot (the 'reference' array, {self._file('reference')}) of store {self.path} is "
            f"corrupt ({inner}); every snapshot decodes from it, so restore the store from a copy", index=0)

    def _locate_corruption(self, r0: int, r1: int, c0: int, c1: int, exc: Exception) -> Exception:
        """Re-read row by row through zarr to name the corrupt snapshot. When zarr reads every row,
        the data are not at fault (a bad argument, no thread to be had, ...): ``exc`` itself is
        returned, never a corruption verdict that ``repair`` would truncate the store for. An OSError
        (too many open files, permission, an I/O error) is the system's, not the data's: returned as is."""
        params, _ = self._open()  # the reference was read before (_reference_block)
        for i in range(r0, r1):
            try:
                params[i, c0:c1]
            except OSError as inner:
                return inner
            except _DECODE_ERRORS as inner:
                return CorruptSnapshotError(
                    f"snapshot {i} of store {self.path} is corrupt: {inner}. The other snapshots are "
                    f"intact; run `trajstore verify {self.path}` to list every bad snapshot", index=i)
        return exc


def check_unchanged(path: str, storage_options: dict | None, truncations: str, created: str) -> None:
    """Raise StoreChangedError if the store at ``path`` was truncated or re-created since a reader took
    its attributes (``truncations``: their count then, ``created``). Committed rows are only ever
    rewritten after a truncation or a re-create, which commits first: a check after a read that finds
    neither means the rows read were intact."""
    local = local_dir(path)
    try:
        if local is not None:
            doc = json.loads((local / "zarr.json").read_bytes())
        else:
            import fsspec

            fs, root = fsspec.core.url_to_fs(path, **{"use_listings_cache": False, **(storage_options or {})})
            doc = json.loads(fs.cat_file(f"{root.rstrip('/')}/zarr.json"))
        meta = doc["attributes"][ATTR]
        now = (str(len(meta.get("truncations", []))), str(meta.get("created")))
    except (OSError, ValueError, KeyError, TypeError):
        return  # unreadable now: the next open reports it; this read was checked by its checksums
    if now != (str(truncations), str(created)):
        raise StoreChangedError(
            f"store {path} was truncated or re-created while it was being read (a resumed or restarted training "
            "run?): the rows read may mix two versions of the trajectory. Read again after refresh() (a new "
            "open); a dask computation or an extraction must be rerun")
