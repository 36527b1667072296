"""A recorded snapshot back to a state_dict file (``.pt`` or ``.safetensors``) that
``model.load_state_dict`` accepts: original shapes and dtypes, tied tensors under each of their
names, and the buffers when the store recorded them.

Files are written atomically (a temporary file in the same folder, fsynced, then renamed into
place), and an existing file is never replaced unless ``overwrite=True``.
"""
from __future__ import annotations

import os
import re
import stat
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from ._extras import require
from ._lazy import torch as _torch
from .errors import InvalidArgumentError, OutputExistsError, SnapshotIndexError
from .store import TrajectoryStore

if TYPE_CHECKING:
    import torch

FORMATS = {".pt": "pt", ".pth": "pt", ".safetensors": "safetensors"}
_STEP = re.compile(r"step=(-?\d+)")


@dataclass
class Exported:
    """What :func:`export_snapshot` / :func:`save_state_dict` wrote."""

    out: str
    format: str  # "pt" | "safetensors"
    bytes: int
    tensors: int  # keys of the state_dict, tied names included
    aliases: dict[str, str]  # tied name -> the name it shares its tensor with
    buffers: bool | None  # whether the buffers (BN running statistics) are in the file (None: not known)
    index: int | None = None  # the snapshot's index in its store (None: not from a store)
    step: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def parse_snapshot(spec: "str | int") -> tuple[str, int]:
    """``("index", i)`` for an index (``3``, ``-1``: negative counts from the end) or ``("step", n)``
    for ``step=N``; InvalidArgumentError otherwise."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return "index", spec
    text = str(spec).strip()
    if re.fullmatch(r"-?\d+", text):
        return "index", int(text)
    match = _STEP.fullmatch(text.replace(" ", ""))
    if match:
        return "step", int(match.group(1))
    raise InvalidArgumentError(f"snapshot (SNAPSHOT) must be an index (0, 3, -1 for the last) or step=N, "
                               f"got {str(spec)!r}")


def output_format(out: "str | os.PathLike") -> str:
    """``"pt"`` or ``"safetensors"`` from the file name; InvalidArgumentError for any other suffix."""
    fmt = FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise InvalidArgumentError(f"output file (OUT) {str(out)!r} must end in .pt, .pth or .safetensors")
    return fmt


def check_output(out: "str | os.PathLike", overwrite: bool) -> str:
    """Check ``out`` before any work: a known suffix, an existing folder, and (unless ``overwrite``)
    no file there yet. Returns its format; the optional ``safetensors`` package is required here."""
    target = Path(out)
    fmt = output_format(target)
    if target.is_dir():
        raise InvalidArgumentError(f"output file (OUT) {str(target)!r} is a folder; give a file name in it")
    if not target.parent.is_dir():
        why = "is not a folder" if target.parent.exists() else "does not exist"
        raise InvalidArgumentError(f"output file (OUT) {str(target)!r}: the folder {str(target.parent)!r} {why}; "
                                   "create it first or write the file elsewhere")
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists; pass --overwrite (overwrite=True) to replace it, "
                                "or choose another file name")
    if fmt == "safetensors":
        require("safetensors.torch", "safetensors", "writing .safetensors files")
    return fmt


def resolve_index(store: TrajectoryStore, spec: "str | int") -> int:
    """The non-negative index of snapshot ``spec`` (see :func:`parse_snapshot`) in ``store``."""
    kind, value = parse_snapshot(spec)
    t = len(store)
    if kind == "index":
        if not -t <= value < t:
            raise SnapshotIndexError(f"snapshot {value} out of range: {store.path} holds {t} committed snapshots"
                                     + (f" (0..{t - 1}, or -1..-{t} from the end)" if t else ""))
        return value % t
    steps = store.steps
    hits = [i for i, s in enumerate(steps.tolist()) if s == value]
    if not hits:
        where = f"steps {int(steps[0])}..{int(steps[-1])}" if len(steps) else "no snapshots"
        raise SnapshotIndexError(f"no snapshot of step {value} in {store.path} (it holds {where}, {t} snapshots)")
    return hits[-1]


def export_snapshot(run: "str | os.PathLike", snapshot: "str | int", out: "str | os.PathLike", *,
                    overwrite: bool = False, storage_options: dict | None = None) -> Exported:
    """Write snapshot ``snapshot`` of store ``run`` as a state_dict file ``out`` (``.pt``/``.pth`` via
    ``torch.save``, ``.safetensors`` via the optional ``safetensors`` package).

    ``snapshot`` is an index (negative counts from the end) or ``"step=N"``. The state_dict is
    :meth:`TrajectoryStore.state_dict`'s: every tensor in its original shape and dtype, tied tensors
    under each of their names, and the buffers when they were recorded. Stores recorded sharded
    (FSDP2) come out in parameter order like any other.
    """
    check_output(out, overwrite)
    with TrajectoryStore.open(run, "r", storage_options=storage_options) as store:
        index = resolve_index(store, snapshot)
        state = store.state_dict(index)
        step = int(store.steps[index])
        aliases = {**store.layout.aliases, **(store.buffer_layout.aliases if store.buffer_layout else {})}
        buffers = store.buffer_layout is not None
        meta = {"trajstore.store": store.path, "trajstore.index": str(index), "trajstore.step": str(step)}
    written = save_state_dict(state, out, overwrite=overwrite, metadata=meta)
    return Exported(written.out, written.format, written.bytes, written.tensors, aliases, buffers, index, step)


def save_state_dict(state_dict: "Mapping[str, torch.Tensor]", out: "str | os.PathLike", *, overwrite: bool = False,
                    metadata: Mapping[str, str] | None = None) -> Exported:
    """Write ``state_dict`` to ``out`` atomically (``.pt``/``.pth`` or ``.safetensors`` by its suffix).

    Use it for a model trained in the subspace too: ``save_state_dict(model.state_dict(), "final.safetensors")``.
    Tensors that share memory (tied weights) stay shared in a ``.pt`` file; a ``.safetensors`` file
    cannot hold shared tensors, so each later name gets its own copy (``load_state_dict`` takes both).
    ``metadata`` (string pairs) goes into the ``.safetensors`` header. Refuses to replace an existing
    file unless ``overwrite``.
    """
    fmt = check_output(out, overwrite)
    torch = _torch()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"a state_dict maps names to tensors; entry {key!r} holds "
                                       f"{type(value).__name__}")
    aliases, shared = _sharing(state_dict)
    target = Path(out)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        if fmt == "safetensors":
            save_file = require("safetensors.torch", "safetensors", "writing .safetensors files").save_file
            tensors = {k: (v.detach().clone() if k in shared else v.detach()).contiguous().cpu()
                       for k, v in state_dict.items()}
            with open(tmp, "wb"):  # created as open() creates files (the umask's mode) ...
                pass
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
            save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
            os.chmod(tmp, mode)  # ... which safetensors' own write (0600) does not keep
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            with open(tmp, "wb") as f:
                torch.save(dict(state_dict), f)
                f.flush()
                os.fsync(f.fileno())
        _publish(tmp, target, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return Exported(str(target), fmt, target.stat().st_size, len(state_dict), aliases, buffers=None)


def _sharing(state_dict: "Mapping[str, torch.Tensor]") -> tuple[dict[str, str], set[str]]:
    """(tied names: a later name of the very same tensor -> the first name, every later name whose
    tensor shares memory with an earlier entry's). A ``.safetensors`` file needs a copy of the latter."""
    first: dict[object, str] = {}
    storages: set[object] = set()
    aliases, shared = {}, set()
    for key, value in state_dict.items():
        if value.numel() == 0 or value.device.type == "meta":
            continue
        storage = (str(value.device), value.untyped_storage().data_ptr())
        ident = (storage, value.storage_offset(), tuple(value.shape), value.stride(), value.dtype)
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
        if storage in storages:
            shared.add(key)
        storages.add(storage)
    return aliases, shared


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``target`` atomically; without ``overwrite`` never replace a file
    that appeared meanwhile (a hard link fails when the name exists)."""
    if overwrite:
        os.replace(tmp, target)
    else:
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise OutputExistsError(f"{target} appeared while it was being written; pass --overwrite "
                                    "(overwrite=True) to replace it") from None
        except OSError:  # a filesystem without hard links: the check made before the work stands
            if target.exists():
                raise OutputExistsError(f"{target} already exists; pass --overwrite (overwrite=True)") from None
            os.replace(tmp, target)
    try:
        fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
