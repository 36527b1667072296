"""Import a folder of per-epoch checkpoints (``0.pt, 1.pt, ..., 10.pt``) into a store."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import InvalidArgumentError, TrajstoreError
from .layout import ParamLayout, strip_prefixes
from .store import TrajectoryStore

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")


def natural_key(path: Path) -> list:
    """Sort key under which ``2.pt`` comes before ``10.pt``."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name)]


def load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """Load a ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` state_dict."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(file))
    else:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrajstoreError(f"cannot load {file} with torch.load(weights_only=True): {exc}") from None
    for key in _NESTED_KEYS:  # Lightning / common training-script checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TrajstoreError(f"{file} does not hold a state_dict of tensors")
    return {strip_prefixes(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def import_checkpoints(folder: "str | os.PathLike", path: "str | os.PathLike", pattern: str = "*.pt", *,
                       codec: str = "lossless", param_names: Iterable[str] | None = None,
                       overwrite: bool = False, resume: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> TrajectoryStore:
    """Convert every file matching ``pattern`` in ``folder`` (natural order) into a new store at ``path``.

    Parameters are told from buffers by ``param_names`` when given, else by name (BN
    running statistics and integer tensors are buffers). The number in each file name is
    recorded as the snapshot's epoch and step. ``resume=True`` continues an interrupted import
    of the same folder and pattern after its last committed snapshot. Returns the store, closed.
    """
    files = sorted((p for p in Path(folder).glob(pattern) if p.is_file()), key=natural_key)
    if not files:
        raise InvalidArgumentError(f"no files match {pattern!r} in {folder}")
    first = load_state_dict(files[0])
    layout, buffer_layout = ParamLayout.from_state_dict(first, param_names)
    source = {"imported_from": str(Path(folder).absolute()), "pattern": pattern}
    if resume and _exists(path):
        store = TrajectoryStore.open(path, "a")
        t = len(store)
        same = {k: store.metadata.get(k) for k in source} == source and t <= len(files)
        if same and t:  # the committed rows came from the first t files, in this order
            same = int(store.steps[-1]) == _file_step(files[t - 1], t - 1) and store.layout == layout
        if not same:
            store.close()
            raise InvalidArgumentError(
                f"{path} was not imported from {pattern!r} in {folder}, or the folder's files changed since "
                "(its last snapshot does not match the file at that position); resume only continues the same "
                "import. Use --overwrite to start again")
    else:
        store = TrajectoryStore.create(path, first if buffer_layout.n else layout, codec=codec,
                                       overwrite=overwrite, buffers=bool(buffer_layout.n), metadata=source)
    done = len(store)  # committed by an interrupted import
    try:
        for i, file in enumerate(files):
            if i < done:
                continue
            sd = first if i == 0 else load_state_dict(file)
            index = _file_step(file, i)
            store.append(sd, step=index, epoch=index)
            if progress:
                progress(i + 1, len(files))
    finally:
        store.close()
    return store


def _file_step(file: Path, position: int) -> int:
    """The step a checkpoint file stands for: the last number in its name, else its position."""
    numbers = re.findall(r"\d+", file.stem)
    return int(numbers[-1]) if numbers else position


def _exists(path: "str | os.PathLike") -> bool:
    from .errors import NotAStoreError

    try:
        TrajectoryStore.open(path).close()
        return True
    except NotAStoreError:
        return False
