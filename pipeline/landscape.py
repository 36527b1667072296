"""Loss landscapes around a snapshot, in the plane of a subspace's first two principal directions.

As in Li et al. 2018 ("Visualizing the Loss Landscape of Neural Nets"), with the trajectory's own PCA
directions: the loss and accuracy of w = w_K + a u1 + b u2 over a grid of (a, b), where u1, u2 are the
first two columns of P (orthonormal, so a and b are distances in parameter space) and w_K is snapshot
K. Each cell is a forward pass over a fixed evaluation set, without autograd. The grid is cached in the
store (:mod:`pipeline.landscape_cache`), row by row: a killed evaluation resumes where it stopped, and a
finished one is read back without a forward pass.

**Projection error.** For any weights w_i (a snapshot, a point of a P-SGD path), with d_i = w_i − w_K,
the plane shows (a_i, b_i) = (u1ᵀd_i, u2ᵀd_i); ``relative_residual`` is ‖d_i − a_i u1 − b_i u2‖ / ‖d_i‖
(0 for w_K itself): the fraction of the point's distance from the centre that the picture hides (0: in
the plane; 1: orthogonal to it). For the trajectory as a whole, ``variance_outside_plane`` is
1 − EVR₁ − EVR₂: the fraction of the extraction snapshots' variance (about their mean) off span(u1, u2).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError
from trajstore.layout import ParamLayout

from .checks import check_choice, check_int
from .compute import Interrupted, StopFlag
from .landscape_cache import open_cache, settings_key
from .landscape_plane import Plane, Projection, open_plane, project_all

DATA_SETS = ("train", "test")
GRID_RANGE = (3, 501)  # points per axis
MARGIN = 0.25  # the default span: the trajectory's extent on each axis, widened by this fraction on each side
PROJECTION_ERROR = ("relative_residual[i] = ||d_i - a_i u1 - b_i u2|| / ||d_i||, d_i = w_i - w_K (0 at w_K): the "
                    "fraction of the point's distance from the centre snapshot that lies outside the plane")
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


# -- arguments -----------------------------------------------------------------------------------------
def parse_span(text: "str | float | Sequence[float] | None") -> tuple[float, float, float, float] | None:
    """``S`` (a, b in [-S, S]), ``A0:A1`` (both axes), or ``A0:A1,B0:B1`` as text; a number S; a
    4-sequence (a0, a1, b0, b1); None (the default span)."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        values = (-abs(float(text)), abs(float(text))) * 2
    elif not isinstance(text, str):
        try:
            values = tuple(float(v) for v in text)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            values = ()
    else:
        s = text.replace(" ", "")
        pair = rf"({_NUMBER}):({_NUMBER})"
        if re.fullmatch(_NUMBER, s):
            values = (-abs(float(s)), abs(float(s))) * 2
        elif m := re.fullmatch(rf"{pair},{pair}", s):
            values = tuple(float(x) for x in m.groups())
        elif m := re.fullmatch(pair, s):
            values = tuple(float(x) for x in m.groups()) * 2
        else:
            values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or values[0] >= values[1] \
            or values[2] >= values[3]:
        raise InvalidArgumentError(f"span (--span) must be S (a and b in [-S, S], S > 0), A0:A1 (both axes) or "
                                   f"A0:A1,B0:B1 with A0 < A1 and B0 < B1, got {text!r}")
    return values  # type: ignore[return-value]


def check_landscape_args(*, grid: int, span: object, data: str, batches: int | None, batch_size: int) -> None:
    """Every argument that needs no store; InvalidArgumentError naming the option."""
    if not isinstance(grid, int) or isinstance(grid, bool) or not GRID_RANGE[0] <= grid <= GRID_RANGE[1]:
        raise InvalidArgumentError(f"grid (--grid) must be an integer from {GRID_RANGE[0]} to {GRID_RANGE[1]} "
                                   f"(points per axis), got {grid!r}")
    parse_span(span)  # type: ignore[arg-type]
    check_choice("data", data, DATA_SETS)
    if batches is not None:
        check_int("batches", batches, 1)
    check_int("batch_size", batch_size, 1)


def default_span(*projections: Projection, margin: float = MARGIN) -> tuple[float, float, float, float]:
    """The extent of the projected points on each axis (and the centre, 0), widened by ``margin`` of it
    on each side, rounded to 4 significant digits (outwards)."""
    out = []
    for values in (np.concatenate([p.a for p in projections]), np.concatenate([p.b for p in projections])):
        lo, hi = min(0.0, float(values.min())), max(0.0, float(values.max()))
        pad = margin * (hi - lo) if hi > lo else 1.0
        out += [_round(lo - pad, math.floor), _round(hi + pad, math.ceil)]
    return tuple(out)  # type: ignore[return-value]


def _round(x: float, direction: Callable[[float], float]) -> float:
    if x == 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(abs(x))) - 3)
    return float(direction(x / scale) * scale)


# -- evaluation ----------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """The fixed evaluation set: the first ``--batches`` batches of a loader, held on the device."""

    data: str  # "train" | "test"
    batches: list  # [(x, y)]
    samples: int
    digest: str  # blake2b of every tensor's dtype, shape and bytes


def evaluation_set(loader, data: str, batches: int | None, device: str) -> EvalSet:
    """The first ``batches`` batches (None: all) of ``loader``, on ``device``, with their digest."""
    h, taken, samples = hashlib.blake2b(digest_size=16), [], 0
    for x, y in loader:
        for t in (x, y):
            c = t.detach().cpu().contiguous()
            h.update(f"{c.dtype}{tuple(c.shape)}".encode())
            h.update(c.reshape(-1).view(torch.uint8).numpy().tobytes())
        taken.append((x.to(device), y.to(device)))
        samples += len(y)
        if batches is not None and len(taken) >= batches:
            break
    if not taken:
        raise InvalidArgumentError(f"the recipe's {data} loader yields no batch: nothing to evaluate")
    return EvalSet(data, taken, samples, h.hexdigest())


class GridEvaluator:
    """Loss and accuracy of weights w (n,) over an :class:`EvalSet`, written into ``model`` in place."""

    def __init__(self, model: torch.nn.Module, layout: ParamLayout, loss_fn: Callable, evalset: EvalSet):
        self.model, self.loss_fn, self.evalset = model.eval(), loss_fn, evalset
        self.params = layout.tensors_of(model)  # layout order
        self.offsets = layout.offsets

    @torch.no_grad()
    def __call__(self, w: torch.Tensor) -> tuple[float, float]:
        """(mean loss, accuracy; NaN when the output is not (B, classes) with integer labels (B,))."""
        for p, lo, hi in zip(self.params, self.offsets, self.offsets[1:]):
            p.copy_(w[lo:hi].view(p.shape))
        loss_sum, correct, total, classify = 0.0, 0, 0, True
        for x, y in self.evalset.batches:
            out = self.model(x)
            loss_sum += float(self.loss_fn(out, y)) * len(y)
            classify = classify and out.ndim == 2 and y.ndim == 1 and not y.is_floating_point()
            if classify:
                correct += int((out.argmax(1) == y).sum())
            total += len(y)
        return loss_sum / total, (correct / total if classify else math.nan)


# -- the landscape ---------------------------------------------------------------------------------------
@dataclass
class Landscape:
    """Loss and accuracy on the grid; ``loss[i, j]`` is the cell at a = a[j], b = b[i]."""

    store: str
    plane: Plane = field(repr=False)
    a: np.ndarray  # (g,)
    b: np.ndarray  # (g,)
    loss: np.ndarray  # (g, g)
    accuracy: np.ndarray  # (g, g)
    trajectory: Projection
    overlays: dict[str, Projection]  # label -> points; ``steps`` None: a start -> final segment
    settings: dict
    evaluated: int  # cells computed by this call
    reused: int  # cells read from the cache
    overlay_sources: dict[str, str] = field(default_factory=dict)  # label -> what it was read from

    @property
    def key(self) -> str:
        return settings_key(self.settings)

    def to_json(self) -> dict:
        """JSON-ready (non-finite numbers as null)."""
        p = self.plane
        return _finite({
            "store": self.store, "subspace": p.subspace, "snapshot": p.snapshot, "step": p.step,
            "explained_variance_ratio": list(p.explained_variance_ratio),
            "variance_outside_plane": 1.0 - sum(p.explained_variance_ratio), "grid": len(self.a),
            "span": self.settings["span"], "a": self.a, "b": self.b, "orientation": "loss[i][j] is at a[j], b[i]",
            "loss": self.loss, "accuracy": self.accuracy, "data": self.settings["data"],
            "recipe": self.settings["recipe"], "trajectory": self.trajectory.to_json(),
            "overlays": {k: v.to_json() for k, v in self.overlays.items()},
            "overlay_sources": self.overlay_sources,
            "projection_error": PROJECTION_ERROR,
            "cache": {"key": self.key, "evaluated_cells": self.evaluated, "reused_cells": self.reused}})


def _finite(obj):
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass
class Source:
    """What RUN names: a store, or a `trajstore train` run directory with its recipe, final weights and
    recorded subspace-training paths."""

    store: str
    recipe: str
    seed: int
    label_noise: float
    finals: dict[str, tuple[int, Path]]  # label -> (start snapshot, final-METHOD.pt)
    paths: dict[str, Path] = field(default_factory=dict)  # label -> RUN/paths/METHOD.zarr
    start: int = 0  # the run's start snapshot (subspace training starts there)


def resolve_source(run: "str | os.PathLike", recipe: str | None, seed: int | None) -> Source:
    """A run directory gives its store, recipe, seed and label noise (``recipe``/``seed`` override them)
    and its P-SGD / P-BFGS results (final weights, recorded paths); a store needs ``recipe``."""
    from .experiments.export import CONFIG_NAME, STORE_NAME, is_run_directory
    from .experiments.paths import RECORDED, recorded_paths

    if not is_run_directory(run):
        if recipe is None:
            raise InvalidArgumentError(f"recipe (--recipe) is needed: {run} is a store, not a `trajstore train` run "
                                       "directory; give the recipe it was trained with (digits-mlp, mnist1d-cnn, "
                                       "module:function)")
        return Source(str(run), recipe, 0 if seed is None else seed, 0.0, {})
    config = json.loads((Path(run) / CONFIG_NAME).read_text())
    finals = {label: (int(config.get("start_snapshot", 0)), Path(run) / f"final-{method}.pt")
              for method, label in RECORDED.items() if (Path(run) / f"final-{method}.pt").is_file()}
    paths = {RECORDED[method]: store for method, store in recorded_paths(run).items()}
    return Source(str(Path(run) / STORE_NAME), recipe or config["recipe"],
                  int(config.get("seed", 0)) if seed is None else seed, float(config.get("label_noise", 0.0)), finals,
                  paths, int(config.get("start_snapshot", 0)))


def _final_weights(path: Path, layout: ParamLayout) -> np.ndarray:
    from .experiments.export import _load

    return layout.flatten_into(_load(path), np.empty(layout.n, np.float32))


def run_overlays(store: TrajectoryStore, plane: Plane, source: Source,
                 log: Callable[[str], None] | None) -> tuple[dict[str, Projection], dict[str, str]]:
    """A run directory's P-SGD / P-BFGS overlays and where each came from: the recorded path
    ``RUN/paths/METHOD.zarr`` (every snapshot: the start, then each epoch) when the run has one that
    starts at its start snapshot and, once the method has finished, ends at its final weights; else (an
    older run directory, or a path that does not match, which ``log`` reports) the start -> final segment."""
    from .experiments.paths import RECORDED

    overlays, sources = {}, {}
    for label in RECORDED.values():
        final, path = source.finals.get(label), source.paths.get(label)
        if path is not None:
            with TrajectoryStore.open(path, "r") as recorded:
                store.layout.check_same(recorded.layout, f"the recorded path {path}")
                why = _path_mismatch(store, recorded, source.start, final)
                if why is None:
                    overlays[label] = project_all(plane, (recorded.read(i) for i in range(len(recorded))),
                                                  [int(s) for s in recorded.steps])
                    sources[label] = str(path) + ("" if final else " (in progress: the method has not finished)")
                    continue
            told = f"{label}: {path} {why}; drawing the start -> final segment instead"
            if log:
                log(told)
            else:
                warnings.warn(told, UserWarning, stacklevel=3)
        if final is not None:
            start, weights = final
            overlays[label] = project_all(plane, [store.read(start), _final_weights(weights, store.layout)])
            sources[label] = f"snapshot {start} -> {weights}"
    return overlays, sources


def _path_mismatch(store: TrajectoryStore, recorded: TrajectoryStore, start: int,
                   final: tuple[int, Path] | None) -> str | None:
    """Why a recorded path is not the run's (None: it is): empty, another start, another end."""
    if len(recorded) == 0:
        return "holds no snapshot"
    if not np.array_equal(recorded.read(0), store.read(start)):
        return f"does not start at snapshot {start} of {store.path}"
    if final is not None and not np.array_equal(recorded.read(len(recorded) - 1),
                                                _final_weights(final[1], store.layout)):
        return f"does not end at {final[1]}"
    return None


def compute_landscape(run: "str | os.PathLike", recipe: str | None = None, *, name: str | None = None,
                      snapshot: "int | str" = -1, grid: int = 41, span: "str | float | Sequence[float] | None" = None,
                      data: str = "train", batches: int | None = 8, batch_size: int = 256, seed: int | None = None,
                      device: str = "cpu", threads: int | None = None, paths: Sequence["str | os.PathLike"] = (),
                      progress: Callable[[int, int], None] | None = None, stop: StopFlag | None = None,
                      log: Callable[[str], None] | None = None) -> Landscape:
    """Loss and accuracy on a ``grid`` x ``grid`` grid around snapshot ``snapshot`` of ``run``.

    ``run``: a store (then ``recipe`` is required) or a `trajstore train` run directory (recipe, seed and
    label noise from its config; its P-SGD / P-BFGS paths recorded in ``RUN/paths/`` are overlaid, one
    point per epoch, or for a run directory without them the start -> final segments).
    ``span``: see :func:`parse_span`; default :func:`default_span` of the trajectory and the overlaid
    points (so the grid holds the P-SGD path too; the span is part of the cache key). ``data``: the
    recipe's ``train`` loader (its first batches in the order the seed gives) or ``test``; ``batches``
    batches of ``batch_size`` (None: the whole loader). ``threads``: torch's intra-op threads while the
    cells are evaluated (None: torch's setting; 1 is often fastest for small models on a busy CPU, where
    each forward is too small to share). ``paths``: stores of the same model whose every
    snapshot is projected and overlaid (e.g. a P-SGD run recorded with a Recorder). Rows are cached in
    the store; ``stop`` (set) raises :class:`Interrupted` after the row in flight is committed.
    """
    from .experiments.recipes import build_recipe, resolve_recipe
    from .experiments.runner import check_device

    check_landscape_args(grid=grid, span=span, data=data, batches=batches, batch_size=batch_size)
    check_device(device)
    if threads is not None:
        check_int("threads", threads, 1)
    source = resolve_source(run, recipe, seed)
    resolve_recipe(source.recipe)  # an unknown recipe is refused before the store is read
    with TrajectoryStore.open(source.store, "r") as store:
        plane = open_plane(store, name, snapshot)
        steps = [int(s) for s in store.steps]
        trajectory = project_all(plane, (store.read(i) for i in range(len(store))), steps)
        overlays, overlay_sources = run_overlays(store, plane, source, log)
        for path in paths:
            with TrajectoryStore.open(path, "r") as other:
                store.layout.check_same(other.layout, f"--path {path}")
                overlays[f"path {Path(str(path)).name}"] = project_all(
                    plane, (other.read(i) for i in range(len(other))), [int(s) for s in other.steps])
                overlay_sources[f"path {Path(str(path)).name}"] = str(path)
        bounds = parse_span(span) or default_span(trajectory, *overlays.values())
        a = np.linspace(bounds[0], bounds[1], grid)  # (g,)
        b = np.linspace(bounds[2], bounds[3], grid)  # (g,)
        rec = build_recipe(source.recipe, seed=source.seed, batch_size=batch_size, label_noise=source.label_noise)
        model = rec.model.to(device)
        store.layout.check_same(ParamLayout.from_module(model), f"the model of recipe {source.recipe!r}")
        store.load_into(model, plane.snapshot)  # the buffers too, when recorded
        if store.buffer_layout is None and any(t.is_floating_point() for t in model.buffers()) and log:
            log("the store records no buffers: the model's buffers (BN running statistics) are the recipe's "
                "initial ones in every cell")
        evalset = evaluation_set(rec.train if data == "train" else rec.test, data, batches, device)
        settings = {"plane": plane.digest, "subspace": plane.subspace, "snapshot": plane.snapshot,
                    "step": plane.step, "grid": grid, "span": list(bounds), "recipe": source.recipe,
                    "seed": source.seed, "data": {"set": data, "batches": len(evalset.batches),
                                                  "batch_size": batch_size, "samples": evalset.samples,
                                                  "digest": evalset.digest}}
        with open_cache(store, settings, grid) as cache:
            loss, acc, done = cache.read()
            reused = int(done.sum()) * grid
            evaluate = GridEvaluator(model, store.layout, rec.loss, evalset)
            center, u1, u2 = (torch.from_numpy(v).to(device) for v in (plane.center, plane.u[:, 0].copy(),
                                                                        plane.u[:, 1].copy()))
            evaluated, before = 0, torch.get_num_threads()
            torch.set_num_threads(threads or before)
            try:
                for i in np.flatnonzero(~done):
                    if stop:
                        raise Interrupted
                    base = center + float(b[i]) * u2  # (n,)
                    for j in range(grid):
                        loss[i, j], acc[i, j] = evaluate(base + float(a[j]) * u1)
                        evaluated += 1
                        if progress:
                            progress(reused + evaluated, grid * grid)
                    cache.commit_row(int(i), loss[i], acc[i])
            finally:
                torch.set_num_threads(before)
            cache.mark_complete()
        if progress:
            progress(grid * grid, grid * grid)
    return Landscape(store.path, plane, a, b, loss, acc, trajectory, overlays, settings, evaluated, reused,
                     overlay_sources)
