"""Import a folder of checkpoints (``0.pt, 1.pt, ..., 10.pt``, or a Hugging Face Trainer output
folder ``checkpoint-<step>/model.safetensors``) into a store."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch

from ._template import LayoutTemplate
from .errors import InvalidArgumentError, LayoutMismatchError, TrajstoreError
from .layout import ParamLayout, strip_prefixes
from .store import TrajectoryStore

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")


def natural_key(path: "Path | str") -> tuple[list, str]:
    """Sort key under which ``2.pt`` comes before ``10.pt``, and ``checkpoint-7/model.safetensors``
    before ``checkpoint-14/model.safetensors``: pass the path relative to the imported folder."""
    text = Path(path).as_posix()
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)], text


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
                       like: "torch.nn.Module | str | os.PathLike | None" = None, codec: str = "lossless",
                       param_names: Iterable[str] | None = None, overwrite: bool = False, resume: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> TrajectoryStore:
    """Convert every file matching ``pattern`` under ``folder`` into a new store at ``path``.

    Files are taken in natural order of their path below ``folder`` (``checkpoint-7/`` before
    ``checkpoint-14/``). A snapshot's step (recorded as its epoch too) is the ``global_step`` of
    a ``trainer_state.json`` in the file's own subfolder (a Hugging Face Trainer checkpoint), else
    the last number in the file name, else in its subfolder names, else its position; steps must
    increase. Which tensors are parameters: ``like`` (an nn.Module, or the path of a store whose
    layout to reuse) gives the model's own layout: tied weights once, a float buffer such as a
    positional encoding apart. ``param_names`` names exactly the parameter keys. Without either,
    tied tensors of a ``.pt`` file count once, BN statistics and integer tensors are buffers, and
    any other float tensor counts as a parameter (a bare file cannot tell: pass ``like``).
    ``resume=True`` continues an interrupted import of the same folder and pattern after its last
    committed snapshot. Returns the store, closed.
    """
    root = Path(folder)
    files = sorted((p for p in root.glob(pattern) if p.is_file()), key=lambda p: natural_key(p.relative_to(root)))
    if not files:
        raise InvalidArgumentError(f"no files match {pattern!r} in {folder}")
    steps = _steps(files, root)
    first = load_state_dict(files[0])
    layout, buffer_layout = _layouts(first, files[0], like, param_names)
    source = {"imported_from": str(Path(folder).absolute()), "pattern": pattern}
    if resume and _exists(path):
        store = TrajectoryStore.open(path, "a")
        t = len(store)
        same = {k: store.metadata.get(k) for k in source} == source and t <= len(files)
        if same and t:  # the committed rows came from the first t files, in this order
            same = int(store.steps[-1]) == steps[t - 1] and store.layout == layout
        if not same:
            store.close()
            raise InvalidArgumentError(
                f"{path} was not imported from {pattern!r} in {folder}, or the folder's files changed since "
                "(its last snapshot does not match the file at that position); resume only continues the same "
                "import. Use --overwrite to start again")
    else:
        store = TrajectoryStore.create(path, LayoutTemplate(layout, buffer_layout) if buffer_layout.n else layout,
                                       codec=codec,
                                       overwrite=overwrite, buffers=bool(buffer_layout.n), metadata=source)
    done = len(store)  # committed by an interrupted import
    try:
        for i, file in enumerate(files):
            if i < done:
                continue
            sd = first if i == 0 else load_state_dict(file)
            store.append(sd, step=steps[i], epoch=steps[i])
            if progress:
                progress(i + 1, len(files))
    finally:
        store.close()
    return store


def _layouts(first: dict[str, torch.Tensor], file: Path, like: object,
             param_names: Iterable[str] | None) -> tuple[ParamLayout, ParamLayout]:
    """(parameter layout, buffer layout) of an import whose first file holds ``first``."""
    if like is None:
        try:
            return ParamLayout.from_state_dict(first, param_names)
        except LayoutMismatchError as exc:
            raise LayoutMismatchError(f"{file}: {exc}") from None
    if param_names is not None:
        raise InvalidArgumentError("give like or param_names, not both: like names the parameters itself")
    if isinstance(like, torch.nn.Module):
        layout, buffers = ParamLayout.from_module(like), ParamLayout.buffers_of(like)
        buffers = buffers.subset({buffers.aliases.get(k, k) for k in first})  # non-persistent ones are in no file
    else:
        with TrajectoryStore.open(like) as store:
            layout, buffers = store.layout, store.buffer_layout or ParamLayout([])
    try:
        layout.tensors_of(first)
        buffers.tensors_of(first)
    except LayoutMismatchError as exc:
        raise LayoutMismatchError(f"{file} does not hold the tensors of the model given as like: {exc}; import "
                                  "checkpoints of that model, or another model as like") from None
    return layout, buffers


def _steps(files: list[Path], root: Path) -> list[int]:
    """The step of each file, checked to increase before anything is written."""
    steps = [_file_step(file, root, i) for i, file in enumerate(files)]
    for before, after, s, t in zip(files, files[1:], steps, steps[1:]):
        if t <= s:
            raise InvalidArgumentError(
                f"{after} stands for step {t}, which does not follow step {s} of {before}, the file before it in "
                "natural order (steps come from trainer_state.json, else the numbers in the path). Rename the "
                "files or folders, or import them with separate patterns")
    return steps


def _file_step(file: Path, root: Path, position: int) -> int:
    """The step a checkpoint file stands for: ``global_step`` of a ``trainer_state.json`` in its own
    subfolder, else the last number in its name, else in its subfolders' names (innermost first),
    else its position."""
    folders = file.relative_to(root).parent.parts
    if folders:
        step = _trainer_step(file.parent / "trainer_state.json")
        if step is not None:
            return step
    for part in (file.stem, *reversed(folders)):
        numbers = re.findall(r"\d+", part)
        if numbers:
            return int(numbers[-1])
    return position


def _trainer_step(file: Path) -> int | None:
    """The ``global_step`` of a Hugging Face ``trainer_state.json``; None without a usable one."""
    try:
        step = json.loads(file.read_text()).get("global_step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if type(step) is int and step >= 0 else None


def _exists(path: "str | os.PathLike") -> bool:
    from .errors import NotAStoreError

    try:
        TrajectoryStore.open(path).close()
        return True
    except NotAStoreError:
        return False
