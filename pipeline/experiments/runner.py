"""The resumable run: sample with SGD, extract with DLDR, train in the subspace, evaluate, report.

A run directory holds ``config.json``, ``trajectory.zarr``, ``checkpoint.pt`` (replaced
atomically at the end of every epoch: phase, epoch, model, optimizer, RNG and loader
states, metrics), ``paths/psgd.zarr`` and ``paths/pbfgs.zarr`` (the subspace-training paths, one
snapshot per epoch: :mod:`.paths`) and, when done, ``report.json``, ``report.md`` and the plots. Killed at
any point, the same command with ``resume=True`` continues; on CPU the result equals an
uninterrupted run bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError
from trajstore.recorder import Recorder

from ..basis import Basis, random_subspace_basis
from ..checks import check_choice, check_fraction, check_int, check_positive, selection_size
from ..dldr import extract_subspace, parse_snapshots
from ..settings import check_dim_variance
from ..optim import SubspaceBFGS, SubspaceSGD
from ..subspace import SUBSPACES
from .paths import PathRecorder
from .recipes import Recipe, build_recipe, with_generator

SUBSPACE_METHODS = ("psgd", "pbfgs", "random-subspace")
_EXTRACTION_FIELDS = {"dim", "variance", "snapshots"}  # used first by the extract phase


@dataclass
class RunConfig:
    """Everything that defines a run; a run directory refuses a different one unless resumed."""

    recipe: str = "mnist1d-cnn"
    sample_epochs: int = 15
    sample_every: int | None = None  # steps between snapshots; None: once per epoch (+ the initial weights)
    dim: int | None = 15
    variance: float | None = None
    snapshots: str | None = None  # "A:B" of the sampled snapshots; default all
    start_snapshot: int = 0  # the paper restarts from the first snapshot
    subspace_epochs: int = 10
    optimizer: str = "psgd"
    lr: float = 0.05
    momentum: float = 0.9
    subspace_lr: float = 0.1  # P-SGD (DLDR and random subspace)
    bfgs_lr: float = 1.0  # P-BFGS initial line-search step (the paper's 1)
    batch_size: int = 64
    bfgs_batch_size: int = 128
    seed: int = 0
    label_noise: float = 0.0
    device: str = "cpu"
    baselines: list[str] = field(default_factory=lambda: ["sgd"])

    bfgs_epochs: int | None = None  # epochs of P-BFGS when it runs beside P-SGD (default subspace_epochs)

    def methods(self) -> list[str]:
        return [self.optimizer] + [b for b in self.baselines if b not in ("none", self.optimizer)]

    def validate(self) -> None:
        """Check every field and resolve the recipe (importing a user's module); InvalidArgumentError."""
        from .recipes import resolve_recipe

        resolve_recipe(self.recipe)
        check_choice("optimizer", self.optimizer, ("psgd", "pbfgs"))
        for b in self.baselines:
            check_choice("baseline", b, ("sgd", "random-subspace", "none", "psgd", "pbfgs"))
        check_dim_variance(self.dim, self.variance)  # the extraction's own validator (pipeline/settings.py)
        parse_snapshots(self.snapshots)
        for name, minimum in (("sample_epochs", 1), ("subspace_epochs", 0), ("batch_size", 1), ("seed", 0)):
            check_int(name, getattr(self, name), minimum)
        check_int("bfgs_batch_size", self.bfgs_batch_size, 1, flag="")
        check_int("start_snapshot", self.start_snapshot, 0, flag="")
        if self.sample_every is not None:
            check_int("sample_every", self.sample_every, 1)
        if self.bfgs_epochs is not None:
            check_int("bfgs_epochs", self.bfgs_epochs, 0, flag="")
        check_positive("lr", self.lr)
        check_positive("subspace_lr", self.subspace_lr)
        check_positive("bfgs_lr", self.bfgs_lr, flag="--subspace-lr with --optimizer pbfgs")
        check_fraction("momentum", self.momentum, zero_ok=True, flag="")
        check_fraction("label_noise", self.label_noise, zero_ok=True)
        check_device(self.device)
        # how many snapshots the extraction gets: known now unless --sample-every decides it
        size = selection_size(parse_snapshots(self.snapshots),
                              self.sample_epochs + 1 if self.sample_every is None else None)
        if size == 0:
            raise InvalidArgumentError(f"snapshots (--snapshots) {self.snapshots!r} selects no snapshot; give "
                                       "START:STOP with START < STOP, e.g. 0:10")
        if self.dim is not None and size is not None and self.dim >= size:
            if self.snapshots is None:
                raise InvalidArgumentError(
                    f"dim {self.dim} needs more than {self.dim} snapshots, but {self.sample_epochs} sampling epochs "
                    f"record {self.sample_epochs + 1}; sample more epochs, use --sample-every, or lower --dim")
            raise InvalidArgumentError(
                f"dim (--dim) {self.dim} needs more than {self.dim} snapshots, but --snapshots {self.snapshots!r} "
                f"selects {'at most ' if self.sample_every is not None else ''}{size}; select more snapshots"
                + (f" or give --dim {size - 1} or less" if size > 1 else ""))


def check_device(device: str) -> None:
    """``device`` is a torch device this build and machine can use (cpu, cuda[:N], mps); InvalidArgumentError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgumentError(f"device (--device) {device!r} is not a device; use cpu, cuda, cuda:N or mps") \
            from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            why = "this PyTorch build has no CUDA support"
        elif not torch.cuda.is_available():
            why = "no CUDA GPU is visible"
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            why = f"there are {torch.cuda.device_count()} CUDA devices (cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
        else:
            return
    elif dev.type == "mps":
        if torch.backends.mps.is_available():
            return
        why = "MPS is not available on this machine"
    else:
        why = "only cpu, cuda[:N] and mps are supported"
    raise InvalidArgumentError(f"device (--device) {device!r} cannot be used: {why}; use --device cpu")


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def evaluate(model: nn.Module, recipe: Recipe, device: str) -> tuple[float, float]:
    """(test loss, test accuracy), averaged over targets: one per example for a classifier, one per
    position for a language model (out (B, V, T), y (B, T): next-token loss and accuracy)."""
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    with torch.no_grad():
        for x, y in recipe.test:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(recipe.loss(out, y)) * y.numel()  # the loss is a mean over y's elements
            correct += int((out.argmax(1) == y).sum())
            total += y.numel()
    model.train()
    return loss_sum / total, correct / total


class Run:
    """One run directory. ``Run(dir, config).execute(resume=...)``; see the module docstring."""

    def __init__(self, directory: "str | os.PathLike", config: RunConfig,
                 log: Callable[[str], None] = lambda s: None,
                 progress: Callable[[str, int, int], None] | None = None):
        config.validate()
        self.dir, self.config, self.log, self.progress = Path(directory), config, log, progress
        self.store_path = self.dir / "trajectory.zarr"
        self.ckpt_path = self.dir / "checkpoint.pt"
        self._created: list[Path] = []  # what this call made for a new run, undone if it fails before a step
        self._stepped = False

    # -- driver ---------------------------------------------------------------------------
    def execute(self, resume: bool = False) -> dict:
        """Run (or continue) every phase; returns the report. A finished run is not redone.

        A new run that fails before its first training step (a recipe that raises, a device that
        fails) leaves nothing behind, so the same command can simply be run again.
        """
        try:
            return self._execute(resume)
        except BaseException:
            if self._created and not self._stepped:
                self._undo_start()
            raise

    def _undo_start(self) -> None:
        """Remove what :meth:`_start` made for a new run (and the store the sampling phase created)."""
        import shutil

        for name in ("config.json", "checkpoint.pt", "checkpoint.tmp", "trajectory.zarr"):
            path = self.dir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if self.dir in self._created and not any(self.dir.iterdir()):
            self.dir.rmdir()

    def _execute(self, resume: bool) -> dict:
        state = self._start(resume)
        if state["phase"] == "done":
            if (self.dir / "report.json").exists():
                self.log(f"run {self.dir} is already finished; nothing to do (report: {self.dir / 'report.md'})")
                return json.loads((self.dir / "report.json").read_text())
            self.log(f"run {self.dir} finished training but not its report (killed meanwhile?): writing it now")
            from .report import write_report

            return write_report(self)
        order = ["sample", "extract", *self.config.methods(), "done"]
        while state["phase"] != "done":
            phase = state["phase"]
            if phase == "sample":
                self._sample(state)
            elif phase == "extract":
                self._extract(state)
            else:
                self._train_method(state, phase)
            state = self._advance(state, order[order.index(phase) + 1])
        from .report import write_report

        return write_report(self)

    def _start(self, resume: bool) -> dict:
        cfg_file = self.dir / "config.json"
        mine = asdict(self.config)
        if cfg_file.exists():
            theirs = json.loads(cfg_file.read_text())
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            # a run refused for too few snapshots continues with new extraction settings: nothing used them yet
            adopt = bool(changed) and set(changed) <= _EXTRACTION_FIELDS and self._before_extraction()
            if changed and not adopt:
                raise InvalidArgumentError(
                    f"run directory {self.dir} was used with a different configuration (differs in: "
                    f"{', '.join(changed)}); use a new --run directory or the original options")
            if self.ckpt_path.exists():
                state = torch.load(self.ckpt_path, weights_only=True)
                if state["phase"] != "done" and not resume:
                    raise InvalidArgumentError(
                        f"run directory {self.dir} holds an unfinished run (phase {state['phase']}, epoch "
                        f"{state['epoch']}); add --resume to continue it, or use a new --run directory")
                if adopt:
                    self.log(f"run {self.dir}: continuing with the new {', '.join(changed)} (nothing was extracted "
                             "yet)")
                    cfg_file.write_text(json.dumps(mine, indent=2))
                return state
        elif any(self.dir.glob("*")) if self.dir.exists() else False:
            raise InvalidArgumentError(f"{self.dir} is not empty and holds no run configuration")
        if not self.dir.exists():
            self._created.append(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._created.append(cfg_file)
        cfg_file.write_text(json.dumps(mine, indent=2))
        state = {"phase": "sample", "epoch": 0, "history": {}, "timing": {}}
        _atomic_save(state, self.ckpt_path)
        return state

    def _before_extraction(self) -> bool:
        """Whether this run is still sampling or extracting and holds no extracted subspace."""
        if not self.ckpt_path.exists():
            return False
        phase = torch.load(self.ckpt_path, weights_only=True)["phase"]
        return phase in ("sample", "extract") and not (self.store_path / SUBSPACES / "dldr").exists()

    def _advance(self, state: dict, phase: str) -> dict:
        state = {"phase": phase, "epoch": 0, "history": state["history"], "timing": state["timing"]}
        _atomic_save(state, self.ckpt_path)
        return state

    # -- phases ---------------------------------------------------------------------------
    def _recipe(self, method: str) -> Recipe:
        c = self.config
        batch = c.bfgs_batch_size if method == "pbfgs" else c.batch_size
        recipe = with_generator(build_recipe(c.recipe, seed=c.seed, batch_size=batch, label_noise=c.label_noise),
                                c.recipe, c.seed)
        recipe.model.to(c.device)
        return recipe

    def _sample(self, state: dict) -> None:
        c = self.config
        recipe = self._recipe("sgd")
        model = recipe.model
        opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum)
        self._restore(state, model, opt, recipe, "sample")
        trained = int(state.get("global_step", 0)) > 0
        # a store without a checkpointed step was left by a kill before the first checkpoint: it holds at most
        # this run's step-0 snapshot, and nothing was trained, so it starts again (a resume at step 0 is a
        # fresh start to the Recorder, which refuses a store holding snapshots)
        store = TrajectoryStore.open(self.store_path, "a", process_group=None) if self.store_path.exists() and \
            trained else TrajectoryStore.create(self.store_path, model, overwrite=True, process_group=None,
                                                metadata={"run": str(self.dir), "recipe": c.recipe})
        rec = Recorder(store, model, every_n_steps=c.sample_every, every_n_epochs=None if c.sample_every else 1)
        rec.start(int(state.get("global_step", 0)))
        try:
            for epoch in range(state["epoch"], c.sample_epochs):
                self._epoch(model, recipe, opt, "sample", epoch, state, rec)
                rec.epoch_end(epoch, {"test_acc": state["history"]["sample"][-1]["test_acc"]})
                store.flush()  # the snapshot is committed before the checkpoint that covers it
                state["epoch"] = epoch + 1
                state["global_step"] = rec.global_step
                self._checkpoint(state, model, opt, recipe)
                if epoch + 1 == c.sample_epochs:
                    _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(),
                                  "loader": recipe.train.generator.get_state(), "rng": torch.get_rng_state()},
                                 self.dir / "sample_end.pt")
        finally:
            store.close()

    def _extract(self, state: dict) -> None:
        c = self.config
        began = time.perf_counter()
        with TrajectoryStore.open(self.store_path) as store:
            t = len(store)
        retry = ("; the sampled trajectory is kept: rerun with --resume and a lower --dim, another --snapshots "
                 "or --variance")
        try:
            size = selection_size(parse_snapshots(c.snapshots), t)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{exc}{retry}") from None
        if c.dim is not None and c.dim >= size:
            selected = f" and --snapshots {c.snapshots!r} selects {size}" if c.snapshots else ""
            raise InvalidArgumentError(f"dim (--dim) {c.dim} needs at least {c.dim + 1} snapshots; the sampling "
                                       f"phase recorded {t}{selected}{retry}")
        if not _complete(self.store_path):
            self.log(f"extracting a {c.dim or f'{c.variance:.0%}-variance'}-dimensional subspace from {t} snapshots")
            extract_subspace(self.store_path, dim=c.dim, variance=c.variance, snapshots=parse_snapshots(c.snapshots),
                             name="dldr", overwrite=False)
        state["timing"]["extract"] = state["timing"].get("extract", 0.0) + time.perf_counter() - began

    def _train_method(self, state: dict, method: str) -> None:
        c = self.config
        recipe = self._recipe(method)
        model = recipe.model
        if method == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=c.lr, momentum=c.momentum)
            if state["epoch"] == 0 and "model" not in state:
                end = torch.load(self.dir / "sample_end.pt", weights_only=True)
                model.load_state_dict(end["model"])
                opt.load_state_dict(end["opt"])
                recipe.train.generator.set_state(end["loader"])
                torch.set_rng_state(end["rng"])
            first_epoch = c.sample_epochs
        else:
            with TrajectoryStore.open(self.store_path) as store:
                store.load_into(model, c.start_snapshot)
            if method == "random-subspace":
                basis = random_subspace_basis(model, self._dim(), seed=c.seed, device=c.device)
            else:
                basis = Basis.from_store(self.store_path, "dldr", device=c.device)
            if method == "pbfgs":
                opt = SubspaceBFGS(model.parameters(), basis, lr=c.bfgs_lr, buffers=model.buffers())
            else:
                opt = SubspaceSGD(model.parameters(), basis, lr=c.subspace_lr, momentum=c.momentum)
            if state["epoch"] == 0 and "model" not in state:
                torch.manual_seed(c.seed + 1 + SUBSPACE_METHODS.index(method))
                recipe.train.generator.manual_seed(c.seed + 1 + SUBSPACE_METHODS.index(method))
            first_epoch = 0
        self._restore(state, model, opt, recipe, method)
        epochs = c.bfgs_epochs if method == "pbfgs" and c.bfgs_epochs is not None else c.subspace_epochs
        path = PathRecorder.begin(self.dir, method, state, model, {"run": str(self.dir), "recipe": c.recipe,
                                                                   "start_snapshot": c.start_snapshot}, self.log)
        try:
            for epoch in range(state["epoch"], epochs):
                self._epoch(model, recipe, opt, method, first_epoch + epoch, state,
                            None if path is None else path.recorder)
                if path is not None:
                    path.epoch_end(epoch, state)  # committed before the checkpoint that covers it
                state["epoch"] = epoch + 1
                self._checkpoint(state, model, opt, recipe)
        finally:
            if path is not None:
                path.close()
        _atomic_save(model.state_dict(), self.dir / f"final-{method}.pt")

    def _dim(self) -> int:
        from ..subspace import open_subspace

        return open_subspace(self.store_path, "dldr").dim

    # -- one epoch, checkpoints -------------------------------------------------------------
    def _epoch(self, model, recipe: Recipe, opt, method: str, epoch: int, state: dict, rec) -> None:
        began = time.perf_counter()
        losses = []
        total = len(recipe.train)
        for i, (x, y) in enumerate(recipe.train):
            x, y = x.to(self.config.device), y.to(self.config.device)

            def closure(backward=True):  # backward=False: P-BFGS line-search trials, loss only
                loss = recipe.loss(model(x), y)
                if backward:
                    opt.zero_grad()
                    loss.backward()
                return loss

            if isinstance(opt, SubspaceBFGS):
                loss = opt.step(closure)
            else:
                loss = closure()
                opt.step()
            losses.append(float(loss.detach()))
            self._stepped = True
            if rec is not None:
                rec.step()
            if self.progress:
                self.progress(f"{method} epoch {epoch + 1}", i + 1, total)
        test_loss, test_acc = evaluate(model, recipe, self.config.device)
        seconds = time.perf_counter() - began
        elapsed = state["timing"].get(method, 0.0) + seconds
        state["timing"][method] = elapsed
        entry = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "test_loss": test_loss,
                 "test_acc": test_acc, "seconds": elapsed}
        if recipe.language_model:
            entry["test_perplexity"] = math.exp(min(test_loss, 700.0))  # exp(mean next-token loss); no overflow
        state["history"].setdefault(method, []).append(entry)
        self.log(f"{method:>15} epoch {epoch + 1:3d}: train loss {entry['train_loss']:.4f}  "
                 f"test loss {test_loss:.4f}  test acc {test_acc:.2%}"
                 + (f"  perplexity {entry['test_perplexity']:.2f}" if recipe.language_model else ""))

    def _checkpoint(self, state: dict, model, opt, recipe: Recipe) -> None:
        state["model"] = model.state_dict()
        state["optim"] = opt.state_dict()
        state["rng"] = torch.get_rng_state()
        state["loader"] = recipe.train.generator.get_state()
        _atomic_save(state, self.ckpt_path)

    def _restore(self, state: dict, model, opt, recipe: Recipe, method: str) -> None:
        if "model" not in state:
            return
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        torch.set_rng_state(state["rng"])
        recipe.train.generator.set_state(state["loader"])
        self.log(f"resuming {method} at epoch {state['epoch'] + 1}")


def _complete(store_path: Path) -> bool:
    from ..subspace import open_subspace
    from trajstore.errors import SubspaceNotFoundError

    try:
        open_subspace(store_path, "dldr")
        return True
    except SubspaceNotFoundError:
        return False
