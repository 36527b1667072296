"""One rank of a 2-process gloo job recording through trajstore (tests/test_distributed_record.py).

usage: python -m tests.dist_record_proc SCENARIO RANK WORLD PORT STORE [ARGS...]

Scenarios:
  train KIND CODEC OUT   real training (KIND fsdp or ddp), one snapshot a step; rank 0 saves the full
                         parameters each rank gathered after each append to OUT (.npy, (t, n)); then
                         a resume (truncate, more steps) and a NaN on one rank only
  kill CODEC             deterministic weights (rows of :func:`row`) appended until killed
  resume CODEC K         reopen, append K more deterministic rows, close
  misuse OUT             ranks that call different things: each case's outcome per rank, as JSON
  lone OUT               calls made by rank 0 alone, and other new-user mistakes (TRAJSTORE_DIST_TIMEOUT short)
"""
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from trajstore import NonFiniteError, TrajectoryStore

CHUNKS = dict(chunk_size=64, shard_size=128)  # several shards per rank, shard edges inside tensors


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(10, 33), torch.nn.Tanh(), torch.nn.Linear(33, 7))  # odd sizes


def wrap(model: torch.nn.Module, kind: str, world: int) -> torch.nn.Module:
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    return DistributedDataParallel(model)


def row(step: int) -> list[torch.Tensor]:
    """The deterministic global weights of snapshot ``step``, one tensor per parameter."""
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) for p in make_model().parameters()]


def set_weights(model: torch.nn.Module, tensors: list[torch.Tensor], rank: int, world: int) -> None:
    """Copy global ``tensors`` into the model: this rank's dim-0 rows of each FSDP2 shard."""
    with torch.no_grad():
        for p, full in zip(model.parameters(), tensors):
            local = p.to_local()
            size = -(-full.shape[0] // world)
            local.copy_(full[rank * size:rank * size + local.shape[0]])


def full_vector(model: torch.nn.Module) -> np.ndarray:
    """Every parameter gathered in full (collective under FSDP2), flattened in order."""
    parts = []
    for p in model.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
        parts.append(t.detach().reshape(-1).numpy())
    return np.concatenate(parts)


def train(rank: int, world: int, path: str, kind: str, codec: str, out: str) -> None:
    model = wrap(make_model(), kind, world)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(7 + rank)  # each rank its own batches
    store = TrajectoryStore.create(path, model, codec=codec, **CHUNKS)
    expected = []
    for step in range(6):
        if step:
            x = torch.randn(16, 10, generator=gen)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        store.append(model, step=step, epoch=0, metrics={"loss": float(step)})
        expected.append(full_vector(model))
    store.flush()
    lengths = [len(store)]
    # resume: drop steps after 3, then go on (the weights go on from where training is)
    store.truncate_after_step(3)
    expected = expected[:4]
    for step in (10, 11):
        store.append(model, step=step)
        expected.append(full_vector(model))
    # a NaN in one rank's shard only: every rank refuses the snapshot, nothing is recorded
    p = next(model.parameters())
    local = p.to_local() if hasattr(p, "to_local") else p
    saved = local.detach().clone()
    if rank == 1 or kind == "ddp":
        with torch.no_grad():
            local.view(-1)[0] = float("nan")
    try:
        store.append(model, step=12)
        refused = None
    except NonFiniteError as exc:
        refused = str(exc)
    with torch.no_grad():
        local.copy_(saved)
    store.append(model, step=13)
    expected.append(full_vector(model))
    store.close()
    lengths.append(len(store))
    if rank == 0:
        np.save(out, np.stack(expected))
    print(json.dumps({"rank": rank, "lengths": lengths, "refused": refused}), flush=True)


def kill(rank: int, world: int, path: str, codec: str) -> None:
    model = wrap(make_model(), "fsdp", world)
    store = TrajectoryStore.create(path, model, codec=codec, **CHUNKS)
    step = 0
    while True:
        set_weights(model, row(step), rank, world)
        store.append(model, step=step)
        step += 1


def resume(rank: int, world: int, path: str, codec: str, more: int) -> None:
    model = wrap(make_model(), "fsdp", world)
    store = TrajectoryStore.open(path, "a", break_lock=True)
    start = len(store)
    step = int(store.steps[-1]) + 1 if start else 0
    for k in range(more):
        set_weights(model, row(step + k), rank, world)
        store.append(model, step=step + k)
    store.close()
    print(json.dumps({"rank": rank, "start": start, "end": len(store)}), flush=True)


def _cases(out: dict):
    """``case(name, fn)``: run ``fn`` on this rank, keep its outcome (the error's type, or "ok"), then meet the
    other ranks."""
    def case(name, fn):
        try:
            fn()
            out[name] = "ok"
        except Exception as exc:  # noqa: BLE001 -- the outcome is the result
            out[name] = type(exc).__name__
        dist.barrier()
    return case


def misuse(rank: int, world: int, folder: str) -> None:
    """Each case: what every rank got (the error's type, or "ok"). Ranks that disagree must all raise."""
    from pathlib import Path

    from pipeline import extract_subspace
    from pipeline.basis import Basis
    from pipeline.optim import SubspaceSGD
    from trajstore import import_checkpoints

    out, root = {}, Path(folder)

    case = _cases(out)

    model = wrap(make_model(), "fsdp", world)
    store = TrajectoryStore.create(root / "s.zarr", model, **CHUNKS)
    for step in range(3):
        set_weights(model, row(step), rank, world)
        store.append(model, step=step)
    case("truncate to different lengths", lambda: store.truncate(2 if rank == 0 else 1))
    case("one rank appends, the other flushes", lambda: store.append(model, step=9) if rank == 0 else store.flush())
    store._close_local()
    case("ranks open different paths", lambda: TrajectoryStore.open(root / ("s.zarr" if rank == 0 else "t.zarr"), "a"))
    case("a subgroup", lambda: TrajectoryStore.open(root / "s.zarr", "a", process_group=dist.new_group([0, 1])))

    def after_evaluation():  # fully_shard leaves the root gathered after a no-grad forward
        with TrajectoryStore.open(root / "s.zarr", "a", break_lock=True) as again:
            with torch.no_grad():
                model(torch.randn(2, 10))
            again.append(model, step=again.steps[-1] + 1)
        out["after evaluation rows"] = TrajectoryStore.open(root / "s.zarr").read(slice(None)).tolist()
        out["after evaluation full"] = full_vector(model).tolist()
    case("append after an evaluation forward", after_evaluation)

    def default_chunks():
        with TrajectoryStore.create(root / "d.zarr", model) as small:
            out["default chunks"] = [small.n_params, small.n_columns]
    case("default chunks", default_chunks)

    def import_on_rank_0():  # the DCP/pt import, run by one rank inside a job, never waits for the others
        if rank == 0:
            ckpts = root / "ckpts"
            ckpts.mkdir()
            for k in range(2):
                torch.save(make_model().state_dict(), ckpts / f"step_{k}.pt")
            import_checkpoints(ckpts, root / "imported.zarr")
    case("import on rank 0 alone", import_on_rank_0)

    if rank == 0:
        for name in ("a", "b"):
            extract_subspace(root / "s.zarr", dim=1, name=name, snapshots=[0, 1, 2] if name == "a" else [0, 1, 2, 3])
    dist.barrier()
    case("ranks load different bases", lambda: SubspaceSGD(
        model.parameters(), Basis.from_store(root / "s.zarr", "a" if rank == 0 else "b", model=model), lr=0.1))
    print(json.dumps({"rank": rank, **out}), flush=True)


def lone(rank: int, world: int, folder: str) -> None:
    """Calls made by one rank alone end in an error within TRAJSTORE_DIST_TIMEOUT, not a hang; and the
    other mistakes a new user makes get typed errors."""
    from pathlib import Path

    from pipeline import extract_subspace
    from pipeline.basis import Basis

    out, root = {}, Path(folder)

    case = _cases(out)

    model = wrap(make_model(), "fsdp", world)
    case("process_group=None with FSDP2 shards",
         lambda: TrajectoryStore.create(root / "none.zarr", model, process_group=None))
    store = TrajectoryStore.create(root / "s.zarr", model, **CHUNKS)
    for step in range(3):
        set_weights(model, row(step), rank, world)
        store.append(model, step=step)
    store.close()
    plain = make_model()
    with TrajectoryStore.create(root / "ddp.zarr", plain, process_group=None) if rank == 0 else _nothing() as s:
        if rank == 0:
            s.append(plain, step=0)
    dist.barrier()

    def resume_sharded_into_unsharded():
        with TrajectoryStore.open(root / "ddp.zarr", "a") as s:
            s.append(model, step=1)
    case("FSDP2 appends to a store recorded unsharded", resume_sharded_into_unsharded)

    def load_after_evaluation():
        with torch.no_grad():
            model(torch.randn(2, 10))  # leaves the root gathered: a load must still reach the shards
        TrajectoryStore.open(root / "s.zarr").load_into(model, 1)
        out["loaded"] = bool(np.array_equal(full_vector(model), TrajectoryStore.open(root / "s.zarr").read(1)))
    case("load_into an FSDP2 model after an evaluation", load_after_evaluation)
    if rank == 0:
        extract_subspace(root / "s.zarr", dim=1)
    dist.barrier()

    def basis_after_evaluation():
        with torch.no_grad():
            model(torch.randn(2, 10))
        out["rows"] = Basis.from_store(root / "s.zarr", model=model).n
    case("Basis.from_store after an evaluation", basis_after_evaluation)
    # last: a call made by one rank alone leaves trajstore's collectives out of step for the rest of the job
    case("append on rank 0 alone", lambda: _append_alone(root / "s.zarr", model, rank))
    case("create on rank 0 alone", lambda: TrajectoryStore.create(root / "alone.zarr", model) if rank == 0 else None)
    print(json.dumps({"rank": rank, **out}), flush=True)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _append_alone(path, model, rank: int) -> None:
    store = TrajectoryStore.open(path, "a", break_lock=True)
    try:
        if rank == 0:
            store.append(model, step=10)
            store.flush()
    finally:
        store._close_local()  # its collectives are out of step now: no collective close


def main() -> None:
    scenario, rank, world, port, path, *args = sys.argv[1:]
    rank, world = int(rank), int(world)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if scenario == "train":
            train(rank, world, path, *args)
        elif scenario == "kill":
            kill(rank, world, path, *args)
        elif scenario == "misuse":
            misuse(rank, world, path)
        elif scenario == "lone":
            lone(rank, world, path)
        else:
            resume(rank, world, path, args[0], int(args[1]))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
