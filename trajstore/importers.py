"""Import a folder of checkpoints (``0.pt, 1.pt, ..., 10.pt``, a Hugging Face Trainer output folder
``checkpoint-<step>/model.safetensors``, or ``torch.distributed.checkpoint`` folders ``step_100/``)
into a store."""
from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ._dcp import METADATA_FILE, choose_model_keys, is_dcp_checkpoint, load_dcp_state_dict
from ._template import LayoutTemplate
from .errors import InvalidArgumentError, LayoutMismatchError, TrajstoreError
from .layout import ParamLayout, strip_prefixes
from .store import TrajectoryStore

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")
# a number a name labels as the step: step100, step=100, global_step100, checkpoint-100, ckpt_100, iter_100, it100
_STEP_LABEL = re.compile(r"(?<![a-z])(?:global_step|steps?|checkpoint|ckpt|iterations?|iters?|it)[=_-]?(\d+)(?!\.\d)",
                         re.IGNORECASE)
_EPOCH_LABEL = re.compile(r"(?<![a-z])epochs?[=_-]?(\d+)(?!\.\d)", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_NAMING = ("name the files with a labelled step (step100_acc0.81.pt, global_step100, checkpoint-100/, iter_100), "
           "or pass the steps: steps=[...] (--steps 100,200,..., one per file in natural order) or "
           "steps='position' (--steps position: 0, 1, 2, ...)")


def natural_key(path: "Path | str") -> tuple[list, str]:
    """Sort key under which ``2.pt`` comes before ``10.pt``, and ``checkpoint-7/model.safetensors``
    before ``checkpoint-14/model.safetensors``: pass the path relative to the imported folder."""
    text = Path(path).as_posix()
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)], text


def load_state_dict(file: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Load a ``.pt``/``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors`` state_dict, or the
    model's tensors of a DCP checkpoint folder (:func:`trajstore._dcp.load_dcp_state_dict`).

    ``key`` names where the model's weights are in a nested state dict (``model``, ``app.model``);
    without it a DCP checkpoint's ``model`` entry, else its top level, and a file's ``state_dict``,
    ``model_state_dict``, ``model`` or ``module`` entry, else its top level."""
    if is_dcp_checkpoint(file):
        sd = load_dcp_state_dict(file, key)
        return {strip_prefixes(k): v for k, v in sd.items()}
    if file.suffix == ".safetensors":
        from ._extras import require

        sd = require("safetensors.torch", "safetensors", "reading .safetensors checkpoints").load_file(str(file))
    else:
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrajstoreError(f"cannot load {file} with torch.load(weights_only=True): {exc}") from None
    if key is not None:
        tensors = dict(_nested_tensors(sd))
        names = choose_model_keys({name: path for name, (path, _) in tensors.items()}, key, str(file))
        sd = {names[name]: tensor for name, (_, tensor) in tensors.items() if name in names}
    else:
        for nested in _NESTED_KEYS:  # Lightning / common training-script checkpoints nest the weights
            if isinstance(sd, dict) and isinstance(sd.get(nested), dict):
                sd = sd[nested]
                break
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TrajstoreError(f"{file} does not hold a state_dict of tensors")
    return {strip_prefixes(k): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _nested_tensors(obj: object, path: tuple[str, ...] = ()
                    ) -> Iterable[tuple[str, tuple[tuple[str, ...], torch.Tensor]]]:
    """The tensors of nested dicts as (dotted key, (path, tensor)), as DCP flattens a state dict."""
    if isinstance(obj, torch.Tensor) and path:
        yield ".".join(path), (path, obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nested_tensors(v, (*path, str(k)))


def find_checkpoints(root: Path, pattern: str | None) -> tuple[list[Path], str]:
    """The checkpoints under ``root`` in natural order of their relative paths, and the pattern used.

    A match is a checkpoint file, a DCP checkpoint folder (holding ``.metadata``), or a ``.metadata``
    file (its folder). Without a pattern: the ``*.pt`` files, else the DCP folders in ``root``
    (``*/.metadata``). A matched folder holding ``.distcp`` files but no ``.metadata`` (an unfinished
    save) is refused; other matched folders are left out."""
    if not root.is_dir():
        raise InvalidArgumentError(f"{root} is not a folder: pass the folder that holds the checkpoints")
    default = pattern is None
    if default:
        if is_dcp_checkpoint(root):
            raise InvalidArgumentError(
                f"{root} is one DCP checkpoint (it holds {METADATA_FILE}); import the folder that holds the "
                f"checkpoint folders, e.g. {root.parent} with pattern={root.name!r} (--pattern {root.name!r})")
        pattern = "*.pt" if any(p.is_file() for p in root.glob("*.pt")) else f"*/{METADATA_FILE}"
    found: set[Path] = set()
    others: list[Path] = []
    matches = list(root.glob(pattern))
    if default and pattern != "*.pt":  # the DCP folders: an unfinished one among them is no checkpoint to skip
        matches += [folder for folder in root.iterdir() if folder.is_dir() and not is_dcp_checkpoint(folder)]
    for match in matches:
        if match.name == METADATA_FILE and match.is_file():
            found.add(match.parent)
        elif is_dcp_checkpoint(match) or match.is_file():
            found.add(match)
        elif match.is_dir():
            if any(match.glob("*.distcp")):
                raise InvalidArgumentError(
                    f"{match} holds .distcp files but no {METADATA_FILE}: a DCP save that did not finish, or a "
                    "damaged checkpoint; remove that folder, or import without it (--pattern)")
            others.append(match)
    if not found:
        if others and not default:
            raise InvalidArgumentError(
                f"{pattern!r} matches only folders in {root} that are not DCP checkpoints (no {METADATA_FILE}), "
                f"e.g. {others[0].name}; match checkpoint files (--pattern '*/model.safetensors') or DCP folders")
        where = (f"'*.pt' in {root}, and no folder in it is a DCP checkpoint (holding {METADATA_FILE})" if default
                 else f"{pattern!r} in {root} (nor DCP checkpoint folders)")
        raise InvalidArgumentError(f"no files match {where}; pass the checkpoints' pattern (--pattern)")
    return sorted(found, key=lambda p: natural_key(p.relative_to(root))), pattern


def import_checkpoints(folder: "str | os.PathLike", path: "str | os.PathLike", pattern: str | None = None, *,
                       like: "torch.nn.Module | str | os.PathLike | None" = None, codec: str = "lossless",
                       param_names: Iterable[str] | None = None, overwrite: bool = False, resume: bool = False,
                       steps: "Sequence[int] | str | None" = None, key: str | None = None,
                       progress: Callable[[int, int], None] | None = None) -> TrajectoryStore:
    """Convert every checkpoint matching ``pattern`` under ``folder`` into a new store at ``path``.

    A checkpoint is a ``.pt``/``.safetensors`` file or a ``torch.distributed.checkpoint`` (DCP) folder
    (one holding ``.metadata``; FSDP-sharded saves are read whole, one checkpoint at a time, without a
    process group). Without ``pattern``: the ``*.pt`` files in ``folder``, else its DCP folders. ``key``
    names the model's weights in a nested state dict (``"model"``, ``"app.model"``: the tensors under
    that dotted prefix, which is dropped); a DCP checkpoint defaults to its ``model`` entry, else its
    top level, leaving optimizer state out. Checkpoints are taken in natural order of their path
    below ``folder`` (``checkpoint-7/`` before ``checkpoint-14/``). A snapshot's step is the
    ``global_step`` of a ``trainer_state.json`` in the file's own subfolder (a Hugging Face Trainer
    checkpoint), else read from the file name, else from its subfolder names (innermost first), else
    its position. In a name, a labelled number
    wins (``step100``, ``step=100``, ``global_step100``, ``checkpoint-100``, ``ckpt_100``,
    ``iter_100``, ``it100``; then ``epoch=3``), else its only integer; a name with several
    unlabelled integers (``resnet18_5.pt``) or only a decimal (``acc0.81.pt``) is refused before
    anything is written. ``steps`` overrides all that: one step per file in natural order, or
    ``"position"`` (0, 1, 2, ...). Steps must increase. A snapshot's epoch is the Trainer's
    (``trainer_state.json``'s ``epoch``, 0-based as the Trainer callback records it) or a name's
    ``epoch`` label, else -1 (unknown). Which tensors are parameters: ``like`` (an nn.Module, or
    the path of a store whose layout to reuse) gives the model's own layout: tied weights once, a float buffer such as a
    positional encoding apart. ``param_names`` names exactly the parameter keys. Without either,
    tied tensors of a ``.pt`` file count once, BN statistics and integer tensors are buffers, and
    any other float tensor counts as a parameter (a bare file cannot tell: pass ``like``).
    ``resume=True`` continues an interrupted import of the same folder and pattern after its last
    committed snapshot. A file whose tied keys (one tensor in the layout, e.g. ``lm_head.weight``
    and ``wte.weight`` of ``like``) hold different values is refused (LayoutMismatchError): its
    values would be dropped. Returns the store, closed.
    """
    root = Path(folder)
    files, pattern = find_checkpoints(root, pattern)
    steps = _steps(files, root, steps)
    epochs = [_file_epoch(file, root) for file in files]
    first: dict[str, torch.Tensor] | None = load_state_dict(files[0], key)
    layout, buffer_layout = _layouts(first, files[0], like, param_names)
    _check_ties(first, files[0], layout, buffer_layout)
    source = {"imported_from": str(Path(folder).absolute()), "pattern": pattern}
    if key is not None:
        source["key"] = key
    if resume and _exists(path):
        store = TrajectoryStore.open(path, "a", process_group=None)  # one process imports, even inside a job
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
                                       overwrite=overwrite, buffers=bool(buffer_layout.n), metadata=source,
                                       process_group=None)
    done = len(store)  # committed by an interrupted import
    try:
        for i, file in enumerate(files):
            if i < done:
                first = None
                continue
            sd = first if first is not None else load_state_dict(file, key)
            first = None  # one checkpoint's tensors in memory at a time
            _check_ties(sd, file, layout, buffer_layout)
            store.append(sd, step=steps[i], epoch=epochs[i])
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


def _check_ties(sd: dict[str, torch.Tensor], file: Path, *layouts: ParamLayout) -> None:
    """Each tied key ``sd`` holds besides its tensor's stored name holds the same values: the import
    keeps only one of them, so a file of an untied model would lose the other's values."""
    for layout in layouts:
        for alias, target in layout.aliases.items():
            a, t = sd.get(alias), sd.get(target)
            if a is None or t is None or a is t or _same_values(a, t):
                continue
            raise LayoutMismatchError(
                f"{file} holds different values under {alias!r} and {target!r}, which are one tied tensor in "
                "this import's layout (from like, or shared in the first file); the file is not a checkpoint of "
                "that tied model, and importing it would drop the values of "
                f"{alias!r}: import it without like (each key its own parameter), or with another model as like")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype != b.dtype:
        a = a.to(b.dtype)
    if torch.equal(a, b):
        return True
    return b.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def _steps(files: list[Path], root: Path, given: "Sequence[int] | str | None" = None) -> list[int]:
    """The step of each file (``given``: the caller's), checked to increase before anything is written."""
    if given is None:
        steps = [_file_step(file, root, i) for i, file in enumerate(files)]
        where = "steps come from trainer_state.json, else the file's name or folders"
    else:
        steps = _given_steps(given, len(files))
        where = "the steps given"
    for before, after, s, t in zip(files, files[1:], steps, steps[1:]):
        if t <= s:
            raise InvalidArgumentError(
                f"{after} stands for step {t}, which does not follow step {s} of {before}, the file before it in "
                f"natural order ({where}). Rename the files or folders, import them with separate patterns, or "
                "pass steps=[...] (--steps) in natural order")
    return steps


def _given_steps(given: "Sequence[int] | str", n: int) -> list[int]:
    if isinstance(given, str):
        if given != "position":
            raise InvalidArgumentError(f"steps (--steps) must be 'position' or one step per file, got {given!r}")
        return list(range(n))
    steps = list(given)
    bad = [s for s in steps if not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < 0]
    if bad:
        raise InvalidArgumentError(f"steps (--steps) must be integers >= 0, got {bad[0]!r}")
    if len(steps) != n:
        raise InvalidArgumentError(f"steps (--steps) gives {len(steps)} steps for {n} files; give one per file "
                                   "in natural order, or 'position'")
    return [int(s) for s in steps]


def _file_step(file: Path, root: Path, position: int) -> int:
    """The step a checkpoint file stands for: ``global_step`` of a ``trainer_state.json`` in its own
    subfolder, else the step its name tells (:func:`_name_step`), else its subfolders' names
    (innermost first), else its position."""
    folders = file.relative_to(root).parent.parts
    if folders:
        step = _trainer_step(file.parent / "trainer_state.json")
        if step is not None:
            return step
    for part in (file.stem, *reversed(folders)):
        step = _name_step(part, file)
        if step is not None:
            return step
    return position


def _name_step(part: str, file: Path) -> int | None:
    """The step one name (a file stem or a folder) tells: its labelled step, else its epoch label,
    else its only integer; None when it holds no number; InvalidArgumentError when it is ambiguous."""
    labelled = {int(m) for m in _STEP_LABEL.findall(part)}
    if len(labelled) == 1:
        return labelled.pop()
    if labelled:
        raise InvalidArgumentError(f"{file}: {part!r} labels several steps ({sorted(labelled)}); {_NAMING}")
    epochs = {int(m) for m in _EPOCH_LABEL.findall(part)}
    rest = _NUMBER.findall(_EPOCH_LABEL.sub(" ", part))
    integers = [n for n in rest if "." not in n]
    if len(epochs) == 1 and not integers:
        return epochs.pop()
    if not epochs and len(integers) == 1:
        return int(integers[0])
    if not epochs and not rest:
        return None
    raise InvalidArgumentError(
        f"{file}: cannot tell which number of {part!r} is the step (it holds {', '.join(_NUMBER.findall(part))} "
        f"and no step label); {_NAMING}")


def _file_epoch(file: Path, root: Path) -> int:
    """The 0-based epoch of a checkpoint: the Trainer's ``epoch`` in a ``trainer_state.json`` of its own
    subfolder (which runs over (e, e + 1] in epoch e), else an ``epoch`` label of its name or folders
    (innermost first), else -1 (unknown)."""
    folders = file.relative_to(root).parent.parts
    if folders:
        epoch = _trainer_state(file.parent / "trainer_state.json").get("epoch")
        if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) and math.isfinite(epoch) and epoch >= 0:
            return max(0, math.ceil(epoch - 1e-6) - 1)
    for part in (file.stem, *reversed(folders)):
        epochs = {int(m) for m in _EPOCH_LABEL.findall(part)}
        if len(epochs) == 1:
            return epochs.pop()
    return -1


def _trainer_state(file: Path) -> dict:
    """A Hugging Face ``trainer_state.json``; {} without a readable one."""
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _trainer_step(file: Path) -> int | None:
    """The ``global_step`` of a Hugging Face ``trainer_state.json``; None without a usable one."""
    step = _trainer_state(file).get("global_step")
    return step if type(step) is int and step >= 0 else None


def _exists(path: "str | os.PathLike") -> bool:
    from .errors import NotAStoreError

    try:
        TrajectoryStore.open(path).close()
        return True
    except NotAStoreError:
        return False
