"""bfloat16 / float16 models stored in their own dtype (format 3), read back exactly, and widened only
for extraction; mixed models widened to float32; an older trajstore refuses the new stores."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import nn

from trajstore import LayoutMismatchError, NonFiniteError, TrajectoryStore
from trajstore.errors import InvalidArgumentError
from trajstore.export import export_snapshot
from trajstore.inspect import info, verify

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "cff13b5"  # a trajstore of format <= 2, before native half storage (kept in history)


def half_model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3)).to(dtype)


def train_and_record(path, model: nn.Module, steps: int = 6, codec: str = "lossless") -> list[dict]:
    """Record the initial weights and one snapshot per SGD step; returns the state_dicts recorded."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    kept = []
    with TrajectoryStore.create(path, model, codec=codec) as store:
        for step in range(steps):
            if step:
                x = torch.randn(8, 12, generator=gen).to(next(model.parameters()).dtype)
                model(x).float().pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            store.append(model, step=step)
            kept.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return kept


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("codec", ["lossless", "xor-delta:4"])
def test_half_model_stored_natively_and_read_exactly(tmp_path, dtype, codec):
    path = tmp_path / "run.zarr"
    kept = train_and_record(path, half_model(dtype), codec=codec)
    name = str(dtype).removeprefix("torch.")
    params = zarr.open_group(str(path), mode="r")["params"]
    if dtype == torch.bfloat16:  # zarr has no bfloat16: its bits, said so on the array
        assert params.dtype == (np.uint16) and params.attrs["trajstore_values"] == "bfloat16"
    else:
        assert params.dtype == (np.uint16 if codec.startswith("xor") else np.float16)
    with TrajectoryStore.open(path) as store:
        assert store.attrs["format_version"] == 3 and store.attrs["dtype"] == name
        assert store.dtype == (np.float32 if dtype == torch.bfloat16 else np.float16)
        rows = store.read(slice(None))  # (t, n)
        for i, sd in enumerate(kept):
            want = torch.cat([v.reshape(-1) for v in sd.values()]).float().numpy()
            assert np.array_equal(rows[i].astype(np.float32), want)  # exact, widened
            got = store.state_dict(i)
            assert all(got[k].dtype == dtype and torch.equal(got[k], v) for k, v in sd.items())
        fresh = half_model(dtype, seed=5)
        store.load_into(fresh, 3)
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in kept[3].items())
        assert np.array_equal(store.to_dask().compute(), rows)  # the dask reader extraction uses
    exported = torch.load(export_snapshot(path, -1, tmp_path / "last.pt").out, weights_only=True)
    assert all(exported[k].dtype == dtype and torch.equal(exported[k], v) for k, v in kept[-1].items())
    summary = info(path)
    assert summary["dtype"] == name and summary["widened"] is None and summary["model_dtypes"] == {name: 147}
    assert summary["raw_bytes"] == 6 * 147 * 2  # 2 bytes a value
    assert verify(path).ok


def test_half_rows_hold_half_the_raw_bytes_of_widened_ones(tmp_path):
    """On disk, bitshuffle already squeezes the zero low halves of widened bfloat16 out (measured: equal
    sizes within 0.3% at 400k parameters); rows, staging buffers and decoded bytes are half."""
    kept = train_and_record(tmp_path / "bf16.zarr", half_model(torch.bfloat16, seed=3), steps=4)
    wide = half_model(torch.float32)
    with TrajectoryStore.create(tmp_path / "f32.zarr", wide) as store:
        for step, sd in enumerate(kept):  # the same values, widened (what trajstore <= format 2 stored)
            store.append({k: v.float() for k, v in sd.items()}, step=step)
    native, widened = info(tmp_path / "bf16.zarr"), info(tmp_path / "f32.zarr")
    assert widened["dtype"] == "float32" and widened["format_version"] == 1
    assert 2 * native["raw_bytes"] == widened["raw_bytes"] == 4 * 147 * 4
    assert native["snapshot_bytes"] <= 1.05 * widened["snapshot_bytes"]
    assert np.array_equal(TrajectoryStore.open(tmp_path / "bf16.zarr").read(slice(None)),
                          TrajectoryStore.open(tmp_path / "f32.zarr").read(slice(None)))


def test_extraction_sees_the_exact_values(tmp_path):
    """A bf16 store and a float32 store of the same (widened) values give the same subspace, bit for bit."""
    from pipeline import extract_subspace

    kept = train_and_record(tmp_path / "bf16.zarr", half_model(torch.bfloat16, seed=2), steps=7)
    with TrajectoryStore.create(tmp_path / "f32.zarr", half_model(torch.float32)) as store:
        for step, sd in enumerate(kept):
            store.append({k: v.float() for k, v in sd.items()}, step=step)
    subs = [extract_subspace(tmp_path / name, dim=3) for name in ("bf16.zarr", "f32.zarr")]
    assert np.array_equal(np.asarray(subs[0].singular_values), np.asarray(subs[1].singular_values))
    assert np.array_equal(np.asarray(subs[0].basis[:]), np.asarray(subs[1].basis[:]))
    assert float(np.asarray(subs[0].singular_values)[0]) > 0


def test_nonfinite_bf16_snapshot_refused_unless_allowed(tmp_path):
    model = half_model(torch.bfloat16)
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        store.append(model, step=0)
        for bad in (float("nan"), float("inf"), -float("inf")):
            with torch.no_grad():
                model[2].bias[1] = bad
            with pytest.raises(NonFiniteError, match="'2.bias'"):
                store.append(model, step=1)
        store.append(model, step=1, allow_nonfinite=True)
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert len(store) == 2 and np.isneginf(store.read(1)[-2])
    report = verify(tmp_path / "run.zarr")
    assert report.ok and any("snapshot 1 holds 1 NaN/Inf" in note for note in report.notes)


def test_values_a_half_store_cannot_hold_are_refused(tmp_path):
    model = half_model(torch.bfloat16)
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        wide = {k: v.float() for k, v in model.state_dict().items()}
        wide["0.weight"][0, 0] = 1.0 + 2.0 ** -12  # between two bfloat16 values
        with pytest.raises(LayoutMismatchError, match="'0.weight'.*bfloat16 cannot represent"):
            store.append(wide, step=0)
        flat = np.full(store.n_params, 0.1, np.float32)  # 0.1 is not a bfloat16
        with pytest.raises(LayoutMismatchError, match="cannot represent exactly"):
            store.append(flat, step=0)
        assert len(store) == 0
        exact = np.linspace(-2, 2, store.n_params).astype(np.float32)
        exact = torch.from_numpy(exact).bfloat16().float().numpy()  # float32 values a bfloat16 holds
        store.append(exact, step=0)
    assert np.array_equal(TrajectoryStore.open(tmp_path / "run.zarr").read(0), exact)


def test_mixed_model_is_widened_and_says_so(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).to(torch.bfloat16), nn.Linear(3, 2))  # bf16 and float32
    with TrajectoryStore.create(tmp_path / "run.zarr", model) as store:
        store.append(model, step=0)
        assert store.attrs["format_version"] == 1  # nothing new: older trajstores read it
    summary = info(tmp_path / "run.zarr")
    assert summary["dtype"] == "float32" and summary["model_dtypes"] == {"bfloat16": 15, "float32": 8}
    assert "mixed-dtype model" in summary["widened"]
    sd = TrajectoryStore.open(tmp_path / "run.zarr").state_dict(0)
    assert sd["0.weight"].dtype == torch.bfloat16 and torch.equal(sd["0.weight"], model[0].weight)
    assert sd["1.weight"].dtype == torch.float32 and torch.equal(sd["1.weight"], model[1].weight)


def test_lossy_codecs_refused_for_half_models(tmp_path):
    for codec in ("bitround-delta:6", "float16-delta"):
        with pytest.raises(InvalidArgumentError, match="use codec 'lossless' or 'xor-delta'"):
            TrajectoryStore.create(tmp_path / codec, half_model(torch.float16), codec=codec)


def _old_trajstore(tmp_path) -> Path:
    """The package as of OLD_COMMIT (format <= 2), unpacked from git history."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the repository's git history")
    dest = tmp_path / "old"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_COMMIT, "trajstore"], capture_output=True)
    if archive.returncode:
        pytest.skip(f"commit {OLD_COMMIT} not in this clone")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


OLD_SCRIPT = """
import json, sys, torch
from torch import nn
from trajstore import TrajectoryStore
assert 'old' in TrajectoryStore.__module__ or True
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3)).to(torch.bfloat16)
with TrajectoryStore.create(sys.argv[1], model) as store:
    store.append(model, step=0)
try:
    TrajectoryStore.open(sys.argv[2])
    outcome = "opened"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {exc}"
print(json.dumps({"file": __import__('trajstore').__file__, "new": outcome}))
"""


def test_older_trajstore_stores_read_and_new_half_stores_are_refused_by_it(tmp_path):
    old = _old_trajstore(tmp_path)
    train_and_record(tmp_path / "new.zarr", half_model(torch.bfloat16), steps=2)
    run = subprocess.run([sys.executable, "-c", OLD_SCRIPT, str(tmp_path / "old.zarr"), str(tmp_path / "new.zarr")],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(old)},
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(old))  # it really was the older package
    assert result["new"].startswith("FormatVersionError") and "format version 3" in result["new"]
    assert "pip install -U trajstore" in result["new"]
    with TrajectoryStore.open(tmp_path / "old.zarr") as store:  # widened to float32 by the older one
        assert store.attrs["dtype"] == "float32" and store.attrs["format_version"] == 1
        sd = store.state_dict(0)
    assert sd["0.weight"].dtype == torch.bfloat16 and torch.equal(sd["0.weight"], half_model(torch.bfloat16)[0].weight)
    assert "recorded before format 3" in info(tmp_path / "old.zarr")["widened"]
    with TrajectoryStore.open(tmp_path / "old.zarr", "a") as store:  # and this version appends to it
        store.append(half_model(torch.bfloat16, seed=4), step=1)
    assert verify(tmp_path / "old.zarr").ok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_store_reopened_for_appending_continues_its_xor_chain(tmp_path, dtype):
    """A reopened xor-delta store decodes its last row to continue the chain: from bfloat16's widened
    float32 back to its bits."""
    path = tmp_path / "run.zarr"
    models = [half_model(dtype, seed=s) for s in range(6)]
    with TrajectoryStore.create(path, models[0], codec="xor-delta:4") as store:
        for step in range(3):
            store.append(models[step], step=step)
    with TrajectoryStore.open(path, "a") as store:  # row 3 is stored as its bits xor row 2's
        for step in range(3, 6):
            store.append(models[step], step=step)
    with TrajectoryStore.open(path) as store:
        for i, model in enumerate(models):
            assert all(torch.equal(store.state_dict(i)[k], v) for k, v in model.state_dict().items())
    assert verify(path).ok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fsdp_shards_into_a_half_store_are_copied_exactly_or_refused(tmp_path, dtype):
    """FSDP2 recording (each rank's DTensor shards): values a half store holds are copied bit for bit;
    a shard cast to float32 with a value the half type would round is refused, like an unsharded append.
    A real 1-rank gloo group and real DTensors (the 2-rank job in test_distributed_record takes longer)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from trajstore.distributed import flatten_local
    from trajstore.layout import ParamLayout, raw_dtype, torch_view

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = half_model(dtype)
        layout = ParamLayout.from_module(model)
        values = str(dtype).removeprefix("torch.")
        shards = {k: distribute_tensor(v.detach(), mesh, [Shard(0)]) for k, v in model.named_parameters()}
        out = np.full(layout.n + 3, 7, raw_dtype(values))  # padding after the tensors
        flatten_local(layout, shards, out)
        want = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert torch.equal(torch_view(out)[:layout.n], want) and not out[layout.n:].any()
        wide = {k: distribute_tensor(v.detach().float(), mesh, [Shard(0)]) for k, v in model.named_parameters()}
        flatten_local(layout, wide, out)  # float32 holding half values: exact, accepted
        assert torch.equal(torch_view(out)[:layout.n], want)
        first = next(iter(wide))
        wide[first] = distribute_tensor(wide[first].to_local() + 1e-4, mesh, [Shard(0)])  # not a half value
        with pytest.raises(LayoutMismatchError, match="cannot represent exactly"):
            flatten_local(layout, wide, out)
    finally:
        dist.destroy_process_group()


def test_values_attribute_disagreeing_with_the_store_dtype_is_refused(tmp_path):
    """With xor codecs float16 and bfloat16 rows are both uint16 on disk: the params array's
    trajstore_values attribute must agree with the store's dtype, or every value would be misread."""
    from trajstore.errors import CorruptMetadataError

    for dtype, tamper in [(torch.float16, "bfloat16"), (torch.bfloat16, None)]:
        path = tmp_path / f"{dtype}.zarr"
        model = half_model(dtype)
        with TrajectoryStore.create(path, model, codec="xor-delta") as store:
            store.append(model, step=0)
        meta_file = path / "params" / "zarr.json"
        meta = json.loads(meta_file.read_text())
        assert meta["data_type"] == "uint16"
        if tamper is None:
            meta["attributes"].pop("trajstore_values")
        else:
            meta.setdefault("attributes", {})["trajstore_values"] = tamper
        meta_file.write_text(json.dumps(meta))
        with pytest.raises(CorruptMetadataError, match="trajstore_values"):
            TrajectoryStore.open(path)
