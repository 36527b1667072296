"""Subspace training under torch.distributed: real gloo, 2 processes, real FSDP2 (fully_shard) and DDP.

A trajectory of a small MLP on scikit-learn's digits is recorded and a subspace extracted in this
process; a single-process P-SGD + P-BFGS run on full global batches is the reference. One job of 2
worker processes (tests/distributed_optim_proc.py, each rank on its half of every global batch) runs
the FSDP2, DDP and unsupported-placement scenarios once; the tests below check what it measured.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import extract_subspace
from pipeline.basis import Basis
from pipeline.experiments.data import digits_arrays
from pipeline.optim import SubspaceBFGS
from trajstore import TrajectoryStore
from trajstore.recorder import Recorder

from .distributed_optim_proc import (
    BFGS_LR,
    BFGS_STEPS,
    SGD_STEPS,
    DistMLP,
    flat,
    loss_of,
    pbfgs,
    psgd,
)

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TOLERANCE = 1e-5  # relative: ‖w_ranks − w_single‖ / ‖w_single‖


def _batches(x: torch.Tensor, y: torch.Tensor, count: int, size: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        idx = torch.randperm(len(x), generator=gen)[:size]
        out.append((x[idx], y[idx]))
    return out


def _record(path: Path, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Plain SGD on digits, one snapshot every 8 steps (17 in all); returns the weights at snapshot 0."""
    torch.manual_seed(0)
    model = DistMLP()
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    store = TrajectoryStore.create(path, model)
    rec = Recorder(store, model, every_n_steps=8)
    rec.start()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    for bx, by in _batches(x, y, 128, 64, seed=1):
        opt.zero_grad()
        loss_of(model, bx, by).backward()
        opt.step()
        rec.step()
    store.close()
    extract_subspace(path, dim=8)
    extract_subspace(path, dim=8, snapshots=slice(0, 10), name="other")  # another basis of the same model
    return w0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(job: Path, timeout: float = 150) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed_optim_proc", str(job)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs, deadline = [], time.monotonic() + timeout
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()  # only the workers started above, by their own handle
                proc.wait()
    results = []
    for rank, (proc, text) in enumerate(zip(procs, outputs)):
        found = job / f"rank{rank}.pt"
        result = torch.load(found, weights_only=True) if found.exists() else {}
        failures = {k: v for k, v in result.items() if k.endswith("/traceback")}
        assert proc.returncode == 0 or failures, f"rank {rank} failed ({proc.returncode}):\n{text[-4000:]}"
        result["output"] = text
        results.append(result)
    return results


def ranks_of(job: dict, scenario: str) -> list[dict]:
    """Every rank's results, once no rank's ``scenario`` (or an earlier one, which stops the job) failed."""
    for rank, result in enumerate(job["ranks"]):
        assert f"{scenario}/seconds" in result, f"rank {rank} stopped before {scenario}:\n{result['output'][-4000:]}"
        assert f"{scenario}/traceback" not in result, f"rank {rank}, {scenario}:\n{result[f'{scenario}/traceback']}"
    return job["ranks"]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    began = time.perf_counter()
    folder = tmp_path_factory.mktemp("ddp")
    xtr, ytr, _, _ = digits_arrays()
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    w0 = _record(folder / "run.zarr", x, y)
    inputs = {"w0": w0, "sgd_batches": _batches(x, y, SGD_STEPS, 64, seed=2),
              "bfgs_batches": _batches(x, y, BFGS_STEPS + 6, 512, seed=3)}  # P-BFGS: large batches
    torch.save(inputs, folder / "inputs.pt")
    recorded = time.perf_counter()

    # the single-process reference: the same steps on the full global batches
    model = DistMLP()
    model.load_state_dict(w0)
    basis = Basis.from_store(folder / "run.zarr")
    psgd(model, basis, inputs["sgd_batches"])
    sgd_weights = flat(model.parameters())
    alphas = pbfgs(model, SubspaceBFGS(model.parameters(), basis, lr=BFGS_LR), inputs["bfgs_batches"][:BFGS_STEPS])
    reference = {"w0": flat(_w0_params(w0)), "sgd": sgd_weights,
                 "bfgs": flat(model.parameters()), "alphas": alphas, "n": basis.n}
    ranks = _run_ranks(folder)
    print(f"\n[distributed] record+extract {recorded - began:.1f} s, job {time.perf_counter() - recorded:.1f} s "
          f"(scenarios, rank 0: " + ", ".join(f"{k.split('/')[0]} {v:.1f} s" for k, v in ranks[0].items()
                                              if k.endswith("/seconds")) + ")")
    return {"reference": reference, "ranks": ranks}


def _w0_params(w0: dict) -> list[torch.Tensor]:
    model = DistMLP()
    model.load_state_dict(w0)
    return list(model.parameters())


def _relative(found: torch.Tensor, ref: dict, key: str) -> tuple[float, float]:
    """‖w_ranks − w_single‖ relative to ‖w_single‖ (asserted) and to the distance travelled ‖w_single − w_0‖."""
    error = float((found - ref[key]).norm())
    return error / float(ref[key].norm()), error / float((ref[key] - ref["w0"]).norm())


@pytest.mark.parametrize("kind", ["fsdp", "ddp"])
def test_two_ranks_give_the_single_process_weights(job, kind):
    """20 P-SGD then 10 P-BFGS steps, each rank on half of every global batch: the single-process
    weights (full batches) to a relative 1e-5, on both ranks, with the same line-search decisions."""
    ref = job["reference"]
    assert (ref["sgd"] - ref["w0"]).norm() > 0.1 and (ref["bfgs"] - ref["sgd"]).norm() > 0.01  # they trained
    assert min(ref["alphas"]) < BFGS_LR  # some line-search trials were rejected: the Armijo decisions mattered
    ranks = ranks_of(job, {"fsdp": "fsdp2", "ddp": "ddp"}[kind])
    assert torch.equal(ranks[0][f"{kind}/bfgs_weights"], ranks[1][f"{kind}/bfgs_weights"])  # the ranks agree exactly
    for rank, result in enumerate(ranks):
        sgd, bfgs = _relative(result[f"{kind}/sgd_weights"], ref, "sgd"), _relative(result[f"{kind}/bfgs_weights"], ref, "bfgs")
        print(f"[{kind} rank {rank}] relative error after P-SGD {sgd[0]:.1e} ({sgd[1]:.1e} of the distance travelled), "
              f"after P-BFGS {bfgs[0]:.1e} ({bfgs[1]:.1e})")
        assert sgd[0] <= TOLERANCE and bfgs[0] <= TOLERANCE, (kind, rank, sgd, bfgs)
        assert result[f"{kind}/alphas"].tolist() == ref["alphas"]  # the same line-search decisions


def test_fsdp2_basis_holds_only_this_ranks_rows(job):
    ref = job["reference"]
    ranks = ranks_of(job, "fsdp2")
    counts = [r["fsdp/local_count"] for r in ranks]
    assert sum(counts) == ref["n"] and counts[0] != counts[1]  # uneven shards, one of them empty
    for r in ranks:
        assert r["fsdp/basis_n"] == r["fsdp/local_count"] < ref["n"] == r["fsdp/global_n"]
        assert r["fsdp/basis_shapes"] == r["fsdp/local_shapes"]
        assert r["fsdp/rows_equal"]  # the rows of P its shards cover, in order
        assert r["fsdp/fingerprint_equal"]  # the basis's fingerprint names the whole extraction
        assert r["fsdp/unsharded_basis_refused"].startswith("InvalidArgumentError: the parameters are FSDP2 shards")
    assert "(0,)" in ranks[1]["fsdp/local_shapes"]  # rank 1's shard of temperature is empty


def test_ddp_loads_the_whole_basis(job):
    for r in ranks_of(job, "ddp"):
        assert r["ddp/basis_n"] == job["reference"]["n"] and r["ddp/sharded"] is False


@pytest.mark.parametrize("case", ["shard1", "hsdp", "mixed"])
def test_unsupported_placements_raise_the_typed_error(job, case):
    for r in ranks_of(job, "unsupported"):
        message = r[f"errors/{case}"]
        assert message.startswith("InvalidArgumentError: ") and "supports FSDP2 parameters sharded" in message, message


def test_state_dict_round_trip_per_rank(job):
    for r in ranks_of(job, "fsdp2"):
        assert r["fsdp/residual_shapes_local"] and r["fsdp/state_float64"]
        assert r["fsdp/resumed_moved"] > 0  # the steps after the checkpoint changed the weights ...
        assert r["fsdp/resumed_diff"] == 0.0  # ... and the reloaded state repeats them exactly
        assert r["fsdp/other_basis_refused"].startswith("LayoutMismatchError: this optimizer state was saved with a "
                                                        "different basis")


def test_store_recorded_sharded_gives_each_rank_its_rows_in_global_order(job):
    """The FSDP2 job records its own store (rank-major columns, so P's rows are rank-major too) and loads
    its subspace: each rank's rows, and the unsharded whole basis, are P's rows in the global order."""
    for r in ranks_of(job, "sharded_store"):
        assert r["sharded/permuted"]  # the column map is not the identity: the reordering is exercised
        assert r["sharded/rows_equal"] and r["sharded/whole_equal"]
        assert r["sharded/basis_n"] == r["sharded/local_count"]
