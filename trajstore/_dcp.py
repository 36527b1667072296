"""Read one ``torch.distributed.checkpoint`` (DCP) checkpoint folder in a single process.

A DCP checkpoint is a folder holding ``.metadata`` (the pickled ``Metadata``: each key's global size,
dtype and chunks) and ``__<rank>_<i>.distcp`` files (each chunk one ``torch.save`` blob). FSDP2 saves
every tensor as one chunk per rank; reading it into a full-sized empty tensor with DCP's own
no-process-group load (``torch.distributed.checkpoint.load(..., no_dist=True)``) gathers the chunks.

Nothing here unpickles anything but DCP's own metadata classes: ``.metadata`` goes through an
unpickler that refuses every other global (DCP's reader calls plain ``pickle.load`` on it), tensor
chunks are read by DCP with ``torch.load(weights_only=True)``, and non-tensor values (which DCP
would ``torch.load(weights_only=False)``) are never requested.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import pickle
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidArgumentError, TrajstoreError

METADATA_FILE = ".metadata"
_METADATA_CLASSES = ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
                     "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
_ALLOWED_GLOBALS = {("torch.distributed.checkpoint.metadata", name) for name in _METADATA_CLASSES} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
_PATH_CLASSES = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")  # the checkpoint_id saved


def is_dcp_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a DCP checkpoint folder (it holds a ``.metadata`` file)."""
    return path.is_dir() and (path / METADATA_FILE).is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata classes, torch sizes, dtypes and layouts, and paths; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES:  # pure: a save from another OS
            return getattr(pathlib, "Pure" + name.removeprefix("Pure"))
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not part of DCP's metadata")


def read_metadata(folder: Path) -> Any:
    """The ``torch.distributed.checkpoint.metadata.Metadata`` of the checkpoint in ``folder``, unpickled
    with only DCP's metadata classes allowed; TrajstoreError naming the file when it is unreadable."""
    from torch.distributed.checkpoint.metadata import Metadata

    file = folder / METADATA_FILE
    try:
        with open(file, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except Exception as exc:  # truncated, garbage, or a global we refuse to load
        raise TrajstoreError(f"cannot read the DCP metadata file {file}: {exc}; the checkpoint is damaged or its "
                             "save did not finish: save it again, or leave its folder out (--pattern)") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise TrajstoreError(f"{file} does not hold DCP metadata (it unpickles to {type(metadata).__name__})")
    return metadata


def tensor_paths(metadata: Any) -> dict[str, tuple[str, ...]]:
    """Each tensor's flattened DCP key -> its path in the saved (possibly nested) state dict:
    ``model.fc.weight`` -> ``("model", "fc.weight")`` for ``{"model": model_sd}``, ``("model.fc.weight",)``
    for a flat state dict."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    planner_data = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    return {fqn: tuple(str(part) for part in planner_data.get(fqn, (fqn,)))
            for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}


def choose_model_keys(paths: dict[str, tuple[str, ...]], key: str | None, where: str) -> dict[str, str]:
    """The model's tensors among a checkpoint's: flattened key -> name in the model.

    ``key`` given: the tensors whose flattened key starts with ``key + "."`` (``model``, ``app.model``),
    with that prefix dropped. Otherwise the state dict nested under a top-level ``"model"`` key, else
    the tensors at its top level (a flat state dict; nested optimizer state is left out). Anything else
    is an InvalidArgumentError that lists the top-level keys and says to pass ``key``."""
    if key is not None:
        prefix = key.strip().rstrip(".") + "."
        chosen = {fqn: fqn[len(prefix):] for fqn in paths if fqn.startswith(prefix) and len(fqn) > len(prefix)}
        if prefix != "." and chosen:
            return chosen
        raise InvalidArgumentError(f"{where} holds no tensors under key {key!r}; {_summary(paths)}. Pass the key "
                                   "that holds the model's weights: key='model' (--key model), or a dotted path "
                                   "such as 'app.model'")
    nested = {fqn: fqn[len("model."):] for fqn, path in paths.items() if len(path) > 1 and path[0] == "model"}
    if nested:
        return nested
    flat = {fqn: fqn for fqn, path in paths.items() if len(path) == 1}
    if flat:
        return flat
    raise InvalidArgumentError(f"{where} holds no state dict under 'model' and no tensors at its top level; "
                               f"{_summary(paths)}. Pass the key that holds the model's weights: key=... "
                               f"(--key ...){_hint(paths)}")


def _summary(paths: dict[str, tuple[str, ...]]) -> str:
    """Its top-level keys with their tensor counts, and the second level when there is one top-level key."""
    if not paths:
        return "it holds no tensors at all"
    top = Counter(path[0] for path in paths.values())
    text = "its top-level keys holding tensors are " + ", ".join(f"{k!r} ({n})" for k, n in sorted(top.items()))
    if len(top) == 1:
        (only,) = top
        inner = Counter(path[1] for path in paths.values() if len(path) > 2)
        if inner:
            text += f"; under {only!r}: " + ", ".join(f"{k!r} ({n})" for k, n in sorted(inner.items()))
    return text


def _hint(paths: dict[str, tuple[str, ...]]) -> str:
    models = sorted({".".join(path[:i + 1]) for path in paths.values() for i in range(len(path) - 1)
                     if path[i] == "model"})
    return f", e.g. key={models[0]!r} (--key {models[0]})" if models else ""


def load_dcp_state_dict(folder: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) tensors of the DCP checkpoint in ``folder``, named as in the model.

    Which tensors: :func:`choose_model_keys`. Only those are read (never the optimizer state), each
    into a full-sized tensor, so memory is one checkpoint's model weights. A missing or truncated
    ``.distcp`` file, or one that does not decode, is a TrajstoreError naming the file."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    metadata = read_metadata(folder)
    names = choose_model_keys(tensor_paths(metadata), key, str(folder))
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    for fqn in names:
        item = metadata.state_dict_metadata[fqn]
        covered = sum(math.prod(chunk.sizes) for chunk in item.chunks)
        if covered != math.prod(item.size):
            raise TrajstoreError(f"{folder / METADATA_FILE}: the saved chunks of {fqn!r} hold {covered} of its "
                                 f"{math.prod(item.size)} values; the checkpoint is incomplete")
        for chunk in item.chunks:
            info = storage.get(MetadataIndex(fqn, chunk.offsets))
            if info is None:
                raise TrajstoreError(f"{folder / METADATA_FILE} names no file for a chunk of {fqn!r}; the "
                                     "checkpoint is damaged")
            _check_file(folder / info.relative_path, info.offset + info.length, fqn)
    # NaN-filled (floats): a hole that damaged chunk metadata leaves is refused as non-finite on append,
    # never read as whatever memory held
    state_dict = {fqn: _filled(tuple(metadata.state_dict_metadata[fqn].size),
                               metadata.state_dict_metadata[fqn].properties.dtype) for fqn in names}
    _load(folder, metadata, state_dict)
    return {names[fqn]: tensor for fqn, tensor in state_dict.items()}


def _filled(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)


def _check_file(file: Path, needed: int, fqn: str) -> None:
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise TrajstoreError(f"DCP data file {file} (holding {fqn!r}) is missing or unreadable: {exc.strerror}; "
                             "the checkpoint is incomplete: copy the file back, or leave its folder out "
                             "(--pattern)") from None
    if size < needed:
        raise TrajstoreError(f"DCP data file {file} is truncated: {size} bytes, but {fqn!r} ends at byte {needed}; "
                             "copy the whole file back, or leave the checkpoint out (--pattern)")


def _load(folder: Path, metadata: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """Fill ``state_dict``'s tensors in place with DCP's single-process load."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    class Reader(FileSystemReader):
        """DCP's file reader with the metadata read safely above, reading one file at a time so that
        a failure names its file."""

        failed: tuple[str, BaseException] | None = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

        def read_data(self, plan: Any, planner: Any) -> Any:
            files: dict[str, list] = {}
            for item in plan.items:
                files.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for relative_path, items in files.items():
                try:
                    super().read_data(dataclasses.replace(plan, items=items), planner).wait()
                except Exception as exc:
                    self.failed = (relative_path, exc)
                    raise
            return super().read_data(dataclasses.replace(plan, items=[]), planner)

    reader = Reader(folder)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state_dict, storage_reader=reader, no_dist=True)
    except (Exception, dcp.CheckpointException) as exc:  # DCP wraps a failure in a BaseException
        failures = getattr(exc, "failures", None) or {}
        if any(isinstance(failure[0], KeyboardInterrupt) for failure in failures.values()):
            raise KeyboardInterrupt from None
        if reader.failed is None:
            raise TrajstoreError(f"cannot load the DCP checkpoint {folder}: {exc}") from None
        relative_path, cause = reader.failed
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise TrajstoreError(f"cannot read DCP data file {folder / relative_path}: {type(cause).__name__}: "
                             f"{first_line}; the file is damaged: copy it back, or leave the checkpoint out "
                             "(--pattern)") from None
