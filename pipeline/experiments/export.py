"""``trajstore export`` over a store or a ``trajstore train`` run directory.

A run directory (:mod:`pipeline.experiments.runner`) holds its trajectory in ``trajectory.zarr`` and,
for each method it has finished, the model's final weights as a plain state_dict ``final-METHOD.pt``
(parameters and buffers). For a subspace method those weights are w₀ + P θ folded back into the
model's own tensors: the optimizers update the model in place and keep no separate coordinates, so
this state_dict is the whole result of subspace training.
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from trajstore.errors import CorruptSnapshotError, InvalidArgumentError
from trajstore.export import Exported, check_output, export_snapshot, save_state_dict

STORE_NAME = "trajectory.zarr"  # Run.store_path
CONFIG_NAME = "config.json"
FINAL = re.compile(r"final-([\w-]+)")  # Run._train_method saves final-{method}.pt


def is_run_directory(path: "str | os.PathLike") -> bool:
    """Whether ``path`` is a local ``trajstore train`` run directory (config.json and trajectory.zarr)."""
    p = Path(str(path))
    return "://" not in str(path) and (p / CONFIG_NAME).is_file() and (p / STORE_NAME).is_dir()


def final_methods(run_dir: "str | os.PathLike") -> list[str]:
    """The methods whose final weights the run directory holds (``final-METHOD.pt``)."""
    return sorted(f.name[len("final-"):-len(".pt")] for f in Path(run_dir).glob("final-*.pt") if f.is_file())


def export(run: "str | os.PathLike", snapshot: "str | int", out: "str | os.PathLike", *,
           overwrite: bool = False) -> Exported:
    """Export to ``out`` (``.pt``/``.pth``/``.safetensors``): snapshot ``snapshot`` (an index, negative
    from the end, or ``step=N``) of store ``run``, or, when ``run`` is a ``trajstore train`` run
    directory, of its trajectory, or with ``snapshot="final-METHOD"`` the weights that method ended with
    (``final-psgd``: P-SGD's result). Refuses to replace ``out`` unless ``overwrite``."""
    name = str(snapshot).strip()
    final = FINAL.fullmatch(name)
    if not is_run_directory(run):
        if final:
            raise InvalidArgumentError(f"snapshot {name!r} names the final weights of a `trajstore train` run "
                                       f"directory, but {run} is not one (no {CONFIG_NAME} and {STORE_NAME}); "
                                       "give a snapshot index or step=N")
        return export_snapshot(run, snapshot, out, overwrite=overwrite)
    if not final:
        return export_snapshot(Path(run) / STORE_NAME, snapshot, out, overwrite=overwrite)
    check_output(out, overwrite)
    method = final.group(1)
    source = Path(run) / f"final-{method}.pt"
    if not source.is_file():
        have = final_methods(run)
        raise InvalidArgumentError(
            f"run directory {run} holds no final weights of {method!r}"
            + (f"; it holds: {', '.join(f'final-{m}' for m in have)}" if have else
               " (no method has finished yet: resume it with `trajstore train ... --resume`)"))
    state = _load(source)
    written = save_state_dict(state, out, overwrite=overwrite,
                              metadata={"trajstore.run": str(Path(run).absolute()), "trajstore.method": method})
    return replace(written, buffers=True)  # model.state_dict(): its buffers are in


def _load(source: Path) -> dict:
    """A final-METHOD.pt state_dict (``torch.load(weights_only=True)``); damage is a typed error."""
    import pickle

    import torch

    try:
        state = torch.load(source, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CorruptSnapshotError(f"{source} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CorruptSnapshotError(f"{source} does not hold a state_dict of tensors")
    return state
