"""Recorder: decide when to snapshot a model in a training loop, and resume without duplicates.

Snapshots are keyed by training step (optimizer steps taken). On (re)start the recorder
truncates every snapshot recorded after the step it resumes from, so a run restarted from
a checkpoint neither duplicates nor misses snapshots.
"""
from __future__ import annotations

import os
import warnings
from typing import Mapping

import numpy as np
import torch

from . import distributed
from .errors import InvalidArgumentError, StoreExistsError
from .format import local_dir, normalize
from .layout import ParamLayout
from .store import TrajectoryStore, metric_key


def open_for_recording(path: "str | os.PathLike | TrajectoryStore", model: torch.nn.Module, *,
                       codec: str = "lossless", buffers: bool = False, metadata: dict | None = None,
                       break_lock: bool = False, overwrite: bool = False, durable: bool = False,
                       process_group: object = "auto", optimizer_state: bool = False) -> TrajectoryStore:
    """Open ``path`` for appending, creating the store when it does not exist yet.

    ``overwrite=True`` replaces an existing store with a new, empty one (a fresh run);
    ``durable=True`` fsyncs every snapshot before its commit (survives power loss);
    ``optimizer_state=True`` creates a store that records the optimizer's state with each snapshot
    (an existing store must have been created so). Collective in a torch.distributed job (see
    :meth:`TrajectoryStore.create`): every rank calls it.
    """
    if isinstance(path, TrajectoryStore):
        return path
    path = normalize(path)
    local = local_dir(path)
    exists = (local / "zarr.json").exists() if local is not None else _remote_exists(path)
    context = distributed.resolve(process_group, model, "open_for_recording (or a trainer callback)")
    if context is not None:  # rank 0's view: every rank must make the same collective call (create or open)
        exists = context.broadcast(exists)
    if not exists or overwrite:
        return TrajectoryStore.create(path, model, codec=codec, buffers=buffers, metadata=metadata,
                                      overwrite=overwrite, durable=durable, process_group=process_group,
                                      optimizer_state=optimizer_state)
    store = TrajectoryStore.open(path, "a", break_lock=break_lock, durable=durable, process_group=process_group)
    error = None
    try:
        store.layout.check_same(ParamLayout.from_module(model), "model")
        if optimizer_state and not store.attrs.get("optimizer_state"):
            raise InvalidArgumentError(f"{path} was created without optimizer state, so it cannot record it now "
                                       "(its earlier snapshots have none): record into a new store, or without "
                                       "optimizer_state")
    except BaseException as exc:  # noqa: BLE001 -- raised below, on every rank of a job
        error = exc
    if context is not None:
        try:
            context.exchange(error)
        except BaseException:
            store._close_local()  # every rank fails here alike: close without collectives
            raise
    elif error is not None:
        store.close()
        raise error
    return store


def _remote_exists(url: str) -> bool:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return fs.exists(f"{root.rstrip('/')}/zarr.json")


class UnverifiedResumeWarning(UserWarning):
    """A resume that could not be checked to continue the run the store holds."""


class Recorder:
    """Snapshot ``model`` into ``store`` every N steps and/or every N epochs.

    Plain loop::

        rec = Recorder(store, model, every_n_epochs=1)
        rec.start()                      # records the initial weights (step 0)
        for epoch in range(E):
            for batch in loader:
                ...; opt.step(); rec.step()
            rec.epoch_end(epoch, metrics={"loss": loss})
        store.close()
    """

    def __init__(self, store: TrajectoryStore, model: torch.nn.Module, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, record_initial: bool = True,
                 optimizer: torch.optim.Optimizer | None = None, record_optimizer_state: bool = False):
        """``record_optimizer_state=True`` records ``optimizer``'s state (momentum buffers, Adam moments)
        with every snapshot, into a store created with ``optimizer_state=True``; restore it with
        ``store.load_optimizer_state(optimizer, model, index)``."""
        if every_n_steps is None and every_n_epochs is None:
            raise InvalidArgumentError("give every_n_steps, every_n_epochs, or both")
        if record_optimizer_state and optimizer is None:
            raise InvalidArgumentError("record_optimizer_state=True needs the optimizer: Recorder(..., optimizer=opt)")
        if bool(store.attrs.get("optimizer_state")) != bool(record_optimizer_state):
            raise InvalidArgumentError(
                f"{store.path} records optimizer state with every snapshot: pass optimizer=opt, "
                "record_optimizer_state=True" if record_optimizer_state is False else
                f"{store.path} was created without optimizer state: create it with optimizer_state=True "
                "(open_for_recording(path, model, optimizer_state=True)) to record it")
        self.optimizer = optimizer if record_optimizer_state else None
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {value}")
        self.store, self.model = store, model
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.record_initial = record_initial
        self.global_step = 0
        self._last_step: int | None = None
        self._counting = False  # whether optimizer steps are being counted (on_step / step / epoch_end(step=))

    def start(self, global_step: int = 0, epoch: int | None = None, run_id: str | None = None) -> None:
        """Begin or resume at ``global_step``: drop snapshots taken after it, record the initial weights.

        A resume is checked to continue the run the store holds before anything is dropped: against
        ``run_id`` (the store's :attr:`~TrajectoryStore.run_id` saved in the trainer's checkpoint) when
        given, and against the snapshot recorded at ``global_step`` when there is one (lossless codecs).
        """
        self.global_step = int(global_step)
        t = len(self.store)
        if self.global_step == 0 and t:
            steps = self.store.steps
            raise StoreExistsError(
                f"{self.store.path} already holds {t} snapshots (steps {int(steps[0])}..{int(steps[-1])}) of "
                "another run, and this run starts fresh at step 0: recording into it would mix the two runs. "
                "Record to a new path, pass overwrite=True to replace the old run, or, if this is the same run "
                "restarted, resume it from the trainer's checkpoint (which starts at its step > 0)")
        if self.global_step > 0 and t:
            self._check_same_run(run_id)
        self.store.truncate_after_step(self.global_step)
        steps = self.store.steps
        self._last_step = int(steps[-1]) if len(steps) else None
        self._counting = self.global_step > 0
        if self.record_initial and self.global_step == 0 and self._last_step is None:
            self.record(0, epoch=epoch)
        elif self.global_step > 0 and self.every_n_steps and self.global_step % self.every_n_steps == 0:
            # a checkpoint saved at a due step before that step's snapshot was committed (a kill in
            # between): the weights resumed with are that snapshot, record it so the store has no gap
            self.record(self.global_step, epoch=epoch)

    def _check_same_run(self, run_id: str | None) -> None:
        """Refuse to resume a checkpoint of another run into this store (it would mix the two)."""
        store, step = self.store, self.global_step
        why, verified = None, run_id is not None
        if run_id is not None and run_id != store.run_id:
            why = f"the checkpoint was recorded into run {run_id}, the store holds run {store.run_id}"
        elif store.codec.lossless:
            at = np.flatnonzero(store.steps == step)
            if len(at):
                verified = True
                if not store.holds(self.model, int(at[-1])):  # collective in a multi-process recording
                    why = f"its snapshot at step {step} differs from the weights this run resumes with"
        if why is None and not verified:
            warnings.warn(UnverifiedResumeWarning(
                f"resuming {store.path} at step {step} without a way to check that it is the same run (the "
                "checkpoint carries no trajstore run id and the store has no snapshot at that step): if this is "
                "another run, the store now mixes two. Save Recorder.state_dict() with your checkpoints, or use "
                "the Lightning / HF callbacks, to have this checked"), stacklevel=3)
        if why:
            raise StoreExistsError(
                f"{store.path} holds another run than the one resuming at step {step} ({why}): continuing would "
                "mix the two runs. Record this run to a new path (or overwrite=True on a fresh start), or resume "
                "from a checkpoint of the run the store holds")

    def record(self, step: int, epoch: int | None = None, metrics: Mapping[str, float] | None = None) -> bool:
        """Append a snapshot at ``step`` unless one was already taken there; returns whether it did."""
        if self._last_step is not None and step <= self._last_step:
            return False
        self.store.append(self.model, step=step, epoch=epoch, metrics=_scalars(metrics),
                          **({"optimizer": self.optimizer} if self.optimizer is not None else {}))
        self._last_step = step
        return True

    def on_step(self, step: int, epoch: int | None = None, metrics: Mapping[str, float] | None = None) -> bool:
        """Call after each optimizer step with the number of steps taken so far."""
        self.global_step, self._counting = step, True
        if self.every_n_steps and step % self.every_n_steps == 0:
            return self.record(step, epoch, metrics)
        return False

    def step(self, metrics: Mapping[str, float] | None = None) -> bool:
        """Plain loops: count one optimizer step and record if due."""
        return self.on_step(self.global_step + 1, None, metrics)

    def epoch_end(self, epoch: int, metrics: Mapping[str, float] | None = None, step: int | None = None) -> bool:
        """Call at the end of epoch ``epoch`` (0-based); records if due."""
        if step is not None:
            self.global_step, self._counting = step, True
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            if not self._counting:
                raise InvalidArgumentError(
                    f"epoch_end({epoch}): no optimizer step has been counted, so this snapshot has no step of "
                    "its own (it would repeat step 0 and be dropped). Call rec.step() after each "
                    "optimizer.step(), or pass the global step: rec.epoch_end(epoch, step=global_step)")
            last = self._last_step
            recorded = self.record(self.global_step, epoch, metrics)
            clash = self.every_n_steps and self.global_step == last
            if not recorded and not getattr(self, "_told_epoch_" + ("clash" if clash else "stale"), False):
                setattr(self, "_told_epoch_" + ("clash" if clash else "stale"), True)  # once each: it repeats
                what = f"this epoch's number and metrics {sorted(_scalars(metrics))} are not recorded"
                warnings.warn(
                    f"Recorder.epoch_end({epoch}): step {self.global_step} already has a snapshot (every_n_steps="
                    f"{self.every_n_steps} falls on the epoch's last step), so {what}: a committed snapshot is never "
                    "rewritten. Pass them to rec.step(metrics) on the epoch's last step, or pick an every_n_steps "
                    "that does not divide the steps per epoch" if clash else
                    f"Recorder.epoch_end({epoch}): step {self.global_step} does not come after step {last}, the last "
                    f"snapshot's, so {what}. Count optimizer steps with rec.step(), or pass a global step that "
                    "increases: rec.epoch_end(epoch, step=global_step)", UserWarning, stacklevel=2)
            return recorded
        if metrics and not self.every_n_epochs and not getattr(self, "_told_epoch_metrics", False):
            self._told_epoch_metrics = True  # once: a trainer calls this every epoch
            warnings.warn("Recorder.epoch_end(metrics=...) records nothing when snapshots are taken every_n_steps "
                          "only: pass the metrics to rec.step(metrics) / on_step, or set every_n_epochs too",
                          UserWarning, stacklevel=2)
        return False

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "run_id": self.store.run_id}

    def load_state_dict(self, state: Mapping) -> None:
        self.start(int(state["global_step"]), run_id=state.get("run_id"))


def _scalars(metrics: Mapping | None) -> dict[str, float]:
    """The one-number entries of a trainer's metrics (callbacks pass everything they log)."""
    out = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                metric_key(key)
            except InvalidArgumentError:
                continue  # a name that cannot be stored ("c", 300 characters): never stop training for it
            if any(metric_key(k) == metric_key(key) for k in out):
                continue  # "a/b" and "a_b" are stored under one name: keep the first, never stop training
            out[str(key)] = float(value)
    return out


def fsdp1_refusal(what: str) -> str:
    """The message trainer callbacks refuse FSDP1 with (at train start, on every rank)."""
    return (f"trajstore cannot record a model trained with {what} (FSDP1): its parameters are flattened "
            "shards (FlatParameter) with no per-tensor layout. Use FSDP2 instead: Lightning's "
            "ModelParallelStrategy with fully_shard() in configure_model() (every rank writes its own shard), or "
            "DDP (rank 0 writes); or save torch.distributed.checkpoint checkpoints and `trajstore import` them")


def _refuse_fsdp1(model: torch.nn.Module) -> None:
    """Raise (on every rank alike: no collective) when ``model`` holds FSDP1 modules."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover -- torch without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise InvalidArgumentError(fsdp1_refusal("FullyShardedDataParallel"))


_SESSIONS: "dict[str, RecordingSession]" = {}  # open sessions by store path, until they end


class RecordingSession:
    """What the trainer callbacks share: their settings, opening the store at train start, closing it."""

    def __init__(self, path: "str | os.PathLike", every_n_steps: int | None = None, every_n_epochs: int | None = None,
                 codec: str = "lossless", buffers: bool = False, record_initial: bool = True,
                 overwrite: bool = False, durable: bool = False, optimizer_state: bool = False):
        if every_n_steps is None and every_n_epochs is None:
            every_n_epochs = 1  # neither given: once per epoch. Both only when asked (uneven spacing biases DLDR)
        self.path, self.codec, self.buffers, self.overwrite = str(path), codec, buffers, overwrite
        self.optimizer_state = optimizer_state  # record the trainer's optimizer's state with each snapshot
        self.durable = durable
        self.every_n_steps, self.every_n_epochs, self.record_initial = every_n_steps, every_n_epochs, record_initial
        self.store: TrajectoryStore | None = None
        self.recorder: Recorder | None = None
        self.run_id: str | None = None  # of the store recorded into; restored from a trainer checkpoint

    def begin(self, model: torch.nn.Module, global_step: int, epoch: int | None,
              optimizer: torch.optim.Optimizer | None = None) -> Recorder:
        """Open (or create) the store and resume recording at ``global_step``.

        A fresh start (step 0) on a store that holds snapshots raises StoreExistsError unless the
        session was made with ``overwrite=True``; a resume (step > 0) never overwrites. ``optimizer``:
        the trainer's, whose state is recorded when the session was made with ``optimizer_state=True``.
        """
        if self.optimizer_state and optimizer is None:
            raise InvalidArgumentError("optimizer_state=True: the trainer gave the callback no optimizer to record")
        self.end(failed=True)  # a trainer restarted in the same process (a notebook) after a failure
        _refuse_fsdp1(model)
        key = normalize(self.path)
        earlier = _SESSIONS.get(key)
        if earlier is not None and earlier is not self and earlier.store is not None:
            # another callback's session, left open by a trainer that raised (the HF Trainer has no
            # exception hook): it is finished, commit what it queued and free the store's lock
            warnings.warn(f"closing {self.path}, left open by an earlier trainer in this process", stacklevel=2)
            earlier.end(failed=True)
        _SESSIONS[key] = self
        fresh = int(global_step) == 0
        self.store = open_for_recording(self.path, model, codec=self.codec, buffers=self.buffers,
                                        overwrite=self.overwrite and fresh, durable=self.durable,
                                        optimizer_state=self.optimizer_state)
        try:
            self.recorder = Recorder(self.store, model, self.every_n_steps, self.every_n_epochs, self.record_initial,
                                     optimizer=optimizer, record_optimizer_state=self.optimizer_state)
        except BaseException:
            self.end(failed=True)
            raise
        self.recorder._told_epoch_metrics = True  # callbacks pass every epoch's metrics: not the user's doing
        try:
            self.recorder.start(global_step, epoch=epoch, run_id=None if fresh else self.run_id)
        except BaseException:
            self.end(failed=True)
            raise
        self.run_id = self.store.run_id
        return self.recorder

    def end(self, failed: bool = False) -> None:
        """Flush and close the store (idempotent). ``failed``: training stopped on an error, which the
        other ranks of a job may not have had: close without collectives (what was queued is written)."""
        if self.store is not None:
            store, self.store, self.recorder = self.store, None, None
            if _SESSIONS.get(normalize(self.path)) is self:
                del _SESSIONS[normalize(self.path)]
            store._close_local() if failed else store.close()
