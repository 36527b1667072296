"""One rank of the torch.distributed subspace-training checks (tests/test_distributed_optim.py).

usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.distributed_optim_proc JOB

JOB holds ``inputs.pt`` (the initial weights and the global batches) and the store ``run.zarr``. Every
rank runs every scenario (FSDP2, DDP, unsupported placements) on its half of each global batch and
writes what it measured to ``JOB/rank<r>.pt`` (tensors, numbers and strings: weights_only loads it).
A scenario that fails records its traceback and the rank exits 1.
"""
from __future__ import annotations

import io
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.basis import Basis
from pipeline.optim import SubspaceBFGS, SubspaceSGD

SGD_STEPS, BFGS_STEPS = 20, 10
BFGS_LR = 4.0  # the first trial overshoots now and then: some trials are rejected


class DistMLP(nn.Module):
    """A small MLP for 8x8 digits whose tensors shard unevenly over 2 ranks: fc1 (15, 64) splits 8/7
    rows, and ``temperature`` (1,) leaves rank 1 an empty shard; ``temperature`` belongs to the root
    FSDP2 module, whose parameters stay all-gathered after a forward without grad."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 15)
        self.fc2 = nn.Linear(15, 10)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 64)
        return self.fc2(torch.tanh(self.fc1(x))) * self.temperature


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def psgd(model: nn.Module, basis: Basis, batches: list, **kwargs) -> SubspaceSGD:
    """SGD_STEPS steps of P-SGD (lr 0.1, momentum 0.9) on ``batches``."""
    opt = SubspaceSGD(model.parameters(), basis, lr=0.1, momentum=0.9, **kwargs)
    for x, y in batches[:SGD_STEPS]:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    return opt


def pbfgs(model: nn.Module, opt: SubspaceBFGS, batches: list) -> list[float]:
    """One P-BFGS step per batch with a loss-only-capable closure; returns the step sizes taken."""
    alphas = []
    for x, y in batches:
        def closure(backward: bool = True) -> torch.Tensor:
            loss = loss_of(model, x, y)
            if backward:
                opt.zero_grad()
                loss.backward()
            return loss
        opt.step(closure)
        alphas.append(float(opt.subspace_state["last_alpha"]))
    return alphas


def flat(params) -> torch.Tensor:
    """The whole model's parameters as one float64 vector (DTensors gathered: collective)."""
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in params]).double()


def _half(batches: list, rank: int, world: int) -> list:
    out = []
    for x, y in batches:
        h = x.shape[0] // world
        out.append((x[rank * h:(rank + 1) * h], y[rank * h:(rank + 1) * h]))
    return out


def _fresh(w0: dict) -> DistMLP:
    model = DistMLP()
    model.load_state_dict(w0)
    return model


def _error(fn) -> str:
    """``"Type: message"`` of what ``fn()`` raised, or ``"no error"``."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 -- the test asserts on the type
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def fsdp2(job: Path, inputs: dict, rank: int, world: int, out: dict) -> None:
    """P-SGD then P-BFGS on a fully_shard model; the basis's local rows; a per-rank state_dict round trip."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _fresh(inputs["w0"])
    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model.fc2, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root shards temperature
    basis = Basis.from_store(job / "run.zarr", model=model)
    out["fsdp/basis_n"] = basis.n
    out["fsdp/local_count"] = sum(p.to_local().numel() for p in model.parameters())
    out["fsdp/local_shapes"] = str([tuple(p.to_local().shape) for p in model.parameters()])
    out["fsdp/basis_shapes"] = str([s.shape for s in basis.layout.specs])
    out["fsdp/global_n"] = basis.global_n
    # the rows held are P's rows of this rank's shards: compare with the whole P read unsharded
    whole = Basis.from_store(job / "run.zarr")
    mine = torch.cat([torch.as_tensor(whole.to_numpy()[lo:hi]) for lo, hi in basis.sharding.ranges])
    out["fsdp/rows_equal"] = bool(torch.equal(torch.as_tensor(basis.to_numpy()), mine))
    out["fsdp/fingerprint_equal"] = bool(torch.equal(basis.fingerprint(), whole.fingerprint()))
    out["fsdp/unsharded_basis_refused"] = _error(lambda: SubspaceSGD(model.parameters(), whole, lr=0.1))

    sgd = _half(inputs["sgd_batches"], rank, world)
    bfgs = _half(inputs["bfgs_batches"], rank, world)
    psgd(model, basis, sgd)
    out["fsdp/sgd_weights"] = flat(model.parameters())
    opt = SubspaceBFGS(model.parameters(), basis, lr=BFGS_LR)
    out["fsdp/alphas"] = torch.tensor(pbfgs(model, opt, bfgs[:BFGS_STEPS]), dtype=torch.float64)
    out["fsdp/bfgs_weights"] = flat(model.parameters())

    # state_dict round trip, per rank, with per-parameter state (the P(+) residual buffers: local shards)
    more = bfgs[BFGS_STEPS:]
    opt = SubspaceBFGS(model.parameters(), basis, lr=BFGS_LR, residual_weight=0.1)
    pbfgs(model, opt, more[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    start = [p.to_local().detach().clone() for p in model.parameters()]
    at_checkpoint = flat(model.parameters())
    pbfgs(model, opt, more[3:6])
    went_on = flat(model.parameters())
    with torch.no_grad():
        for p, w in zip(model.parameters(), start):
            p.to_local().copy_(w)
    again = SubspaceBFGS(model.parameters(), basis, lr=BFGS_LR, residual_weight=0.1)
    again.load_state_dict(saved)
    residual = [again.state[p].get("residual_momentum_buffer") for p in model.parameters()]
    out["fsdp/residual_shapes_local"] = all(r is not None and r.shape == p.to_local().shape
                                            for r, p in zip(residual, model.parameters()))
    out["fsdp/state_float64"] = again.subspace_state["inverse_hessian"].dtype == torch.float64
    pbfgs(model, again, more[3:6])
    out["fsdp/resumed_diff"] = float((flat(model.parameters()) - went_on).abs().max())
    out["fsdp/resumed_moved"] = float((went_on - at_checkpoint).abs().max())
    other = Basis.from_store(job / "run.zarr", "other", model=model)
    out["fsdp/other_basis_refused"] = _error(
        lambda: SubspaceBFGS(model.parameters(), other, lr=BFGS_LR, residual_weight=0.1).load_state_dict(saved))


def ddp(job: Path, inputs: dict, rank: int, world: int, out: dict) -> None:
    """P-SGD then P-BFGS on a DDP model: the whole basis, no reduction of g̃, losses averaged in P-BFGS."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_fresh(inputs["w0"]))
    basis = Basis.from_store(job / "run.zarr", model=model)
    out["ddp/basis_n"], out["ddp/sharded"] = basis.n, basis.sharded
    psgd(model, basis, _half(inputs["sgd_batches"], rank, world))
    out["ddp/sgd_weights"] = flat(model.parameters())
    opt = SubspaceBFGS(model.parameters(), basis, lr=BFGS_LR)
    out["ddp/alphas"] = torch.tensor(pbfgs(model, opt, _half(inputs["bfgs_batches"], rank, world)[:BFGS_STEPS]),
                                     dtype=torch.float64)
    out["ddp/bfgs_weights"] = flat(model.parameters())


def unsupported(job: Path, inputs: dict, rank: int, world: int, out: dict) -> None:
    """Placements other than Shard(0) on a 1-D mesh, and a half-sharded model: the typed error."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    model = _fresh(inputs["w0"])
    fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % world == 0 else None)
    out["errors/shard1"] = _error(lambda: Basis.from_store(job / "run.zarr", model=model))
    hsdp = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
    model = _fresh(inputs["w0"])
    fully_shard(model, mesh=hsdp)
    out["errors/hsdp"] = _error(lambda: Basis.from_store(job / "run.zarr", model=model))
    model = _fresh(inputs["w0"])
    fully_shard(model.fc1, mesh=mesh)  # fc2 and temperature stay plain, replicated
    out["errors/mixed"] = _error(lambda: Basis.from_store(job / "run.zarr", model=model))


def sharded_store(job: Path, inputs: dict, rank: int, world: int, out: dict) -> None:
    """A store recorded by the FSDP2 model itself holds its columns rank-major, and so does its P: each rank's
    basis must still be P's rows of its shards in the global order (Subspace.read_rows through the column map)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pipeline import extract_subspace
    from pipeline.subspace import open_subspace
    from trajstore import TrajectoryStore

    mesh = init_device_mesh("cpu", (world,))
    model = _fresh(inputs["w0"])
    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model.fc2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    path = job / "sharded.zarr"
    store = TrajectoryStore.create(path, model, chunk_size=128, shard_size=256)  # collective: every rank writes
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    store.append(model, step=0)
    for i, (x, y) in enumerate(_half(inputs["sgd_batches"], rank, world)):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        store.append(model, step=i + 1)
    store.close()
    if rank == 0:
        extract_subspace(path, dim=8)
    dist.barrier()
    basis = Basis.from_store(path, model=model)
    sub = open_subspace(path)
    columns = sub.columns
    stored, _ = sub.read()  # (n_columns, d), stored (rank-major) order, checked against its digest
    in_order = torch.from_numpy(columns.to_global(stored.T).T.copy())  # (n, d), global order
    mine = torch.cat([in_order[lo:hi] for lo, hi in basis.sharding.ranges])
    out["sharded/permuted"] = not columns.is_identity
    out["sharded/rows_equal"] = bool(torch.equal(torch.as_tensor(basis.to_numpy()), mine))
    out["sharded/basis_n"] = basis.n
    out["sharded/local_count"] = sum(p.to_local().numel() for p in model.parameters())
    whole = Basis.from_store(path)  # unsharded: all rows, reordered the same way
    out["sharded/whole_equal"] = bool(torch.equal(torch.as_tensor(whole.to_numpy()), in_order))


def main(job: Path) -> int:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    inputs = torch.load(job / "inputs.pt", weights_only=True)
    out: dict = {}
    status = 0
    for scenario in (fsdp2, ddp, unsupported, sharded_store):
        began = time.perf_counter()
        try:
            torch.manual_seed(0)
            scenario(job, inputs, rank, world, out)
        except Exception:  # noqa: BLE001 -- reported to the test, which fails naming it
            out[f"{scenario.__name__}/traceback"] = traceback.format_exc()
            status = 1
        out[f"{scenario.__name__}/seconds"] = time.perf_counter() - began
        if status:
            break  # a rank that failed midway may have left the other in a collective
    torch.save(out, job / f"rank{rank}.pt")
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
