"""Issue 10: ``trajstore plan``: its numbers against hand computation, on a real store, and through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import torch

import pipeline.basis
import pipeline.plan
from cli.main import app
from pipeline.basis import Basis, tile_cols
from pipeline.tiles import tiles_of
from pipeline.experiments.models import mlp
from pipeline import extract_subspace
from pipeline.plan import MEASURED_RATIOS, UPCAST_BYTES, parse_count, parse_size, plan, plan_store
from trajstore import inspect
from trajstore.errors import InvalidArgumentError
from trajstore.layout import ParamLayout

from .synthetic import trajectory, write_store

runner = CliRunner()


@pytest.mark.parametrize("text, value", [("80GB", 80 * 10 ** 9), ("80GiB", 80 * 2 ** 30), ("512MiB", 512 * 2 ** 20),
                                         ("512B", 512), ("1.5e9", 1_500_000_000), ("2 tb", 2 * 10 ** 12), (4096, 4096)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text, value", [("124M", 124_000_000), ("1.3B", 1_300_000_000), ("7e9", 7 * 10 ** 9),
                                         ("1,000,000", 10 ** 6), ("10k", 10_000), ("40", 40)])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("bad", ["80GBB", "GB", "-5GB", "0", "1.2.3G", ""])
def test_parse_refuses_with_a_message(bad):
    with pytest.raises(InvalidArgumentError, match="size must be"):
        parse_size(bad)


def test_count_refuses_bytes():
    with pytest.raises(InvalidArgumentError, match="params must be a number"):
        plan("80GB", 10)


def test_resident_numbers_by_hand():
    """1M parameters, d = 10 in bfloat16, 100 snapshots, 1 GB device at 1 GB/s."""
    p = plan("1M", 10, 100, device_memory="1GB", dtype="bf16", bandwidth=1e9)
    n, d = 10 ** 6, 10
    assert (p.params, p.dim, p.snapshots, p.basis_dtype) == (n, d, 100, "bfloat16")
    assert p.basis_bytes == n * d * 2 and p.basis_float32_bytes == n * d * 4
    assert p.mode == "resident" and p.device == "cuda" and p.device_memory == 10 ** 9
    piece = min(1 << 22, UPCAST_BYTES // (d * 4))  # one CUDA product call's columns (16-bit: the upcast bound)
    assert p.basis_device_bytes == n * d * 2 + piece * d * 4 + piece * 4  # P, the upcast piece, P c of a piece
    assert p.step_device_bytes == 2 * n * d * 2 + 3 * n * 4  # P twice; g, w read, w written (float32)
    assert p.step_link_bytes == 0 and p.link_bandwidth is None
    assert p.step_overhead_s == pytest.approx(p.step_device_bytes / 1e9)
    assert p.device_bandwidth.source == "given"
    sizes = {c.codec: c.bytes for c in p.codecs}
    assert sizes == {spec: int(100 * n * 4 / r) for spec, r in MEASURED_RATIOS.items()}
    assert {c.codec: c.lossless for c in p.codecs}["float16-delta"] is False


def test_streamed_numbers_by_hand():
    """float32 P of 400 MB on a 300 MB device: streamed; the link carries P twice per step."""
    n, d = 10 ** 7, 10
    p = plan(n, d, device_memory="300MB", bandwidth=1e12, link_bandwidth=1e9)
    assert p.mode == "streamed"
    rows = (64 << 20) // (d * 4) // 16 * 16  # Basis's default tile (64 MiB, a multiple of 16 columns)
    assert p.basis_device_bytes == 2 * rows * d * 4 + rows * 4  # two tile buffers, P c of one piece (a tile)
    assert p.step_link_bytes == 2 * n * d * 4
    assert p.step_device_bytes == 2 * n * d * 4 + 3 * n * 4 + p.step_link_bytes
    assert p.step_overhead_s == pytest.approx(p.step_link_bytes / 1e9)  # the link binds
    assert all(c.bytes is None for c in p.codecs)  # no --snapshots: no disk sizes


def test_placement_is_basis_rule_at_its_boundary():
    """The same function as Basis (not a copy), and its boundary: resident iff P <= fraction x memory."""
    assert pipeline.plan._choose_mode is pipeline.basis._choose_mode
    n, d = 1000, 5  # P: 20,000 bytes in float32
    assert plan(n, d, device_memory=40_000, fraction=0.5, bandwidth=1e9).mode == "resident"
    assert plan(n, d, device_memory=39_999, fraction=0.5, bandwidth=1e9).mode == "streamed"
    assert plan(n, d, device_memory=39_999, dtype="fp16", fraction=0.5, bandwidth=1e9).mode == "resident"


@pytest.mark.parametrize("mode, memory", [("resident", "1GB"), ("streamed", "10MB")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_bytes_are_what_a_basis_holds(tmp_path, mode, memory, dtype):
    """On the CPU (no tile buffers), against a real Basis after both products (their per-thread buffers)."""
    model = mlp([1000, 1000, 10])
    layout = ParamLayout.from_module(model)
    d = 4
    p = plan(layout.n, d, device="cpu", device_memory=memory, dtype=dtype, bandwidth=1e9)
    assert p.mode == mode
    q = np.ascontiguousarray(torch.linalg.qr(torch.randn(layout.n, d))[0].numpy())
    tiles = None
    if p.location == "memory-mapped disk":  # what from_store(host="auto") then holds: the tiled file, mapped
        np.save(tmp_path / "tiles.npy", tiles_of(q, tile_cols(layout.n, d, torch.device("cpu"), mode),
                                                  torch.float32).numpy())
        tiles = np.load(tmp_path / "tiles.npy", mmap_mode="r")
    basis = Basis(q, layout, dtype=dtype, mode=mode, tiles=tiles)
    basis.project([torch.ones_like(w) for w in model.parameters()])
    basis.add_lifted_([torch.zeros_like(w) for w in model.parameters()], torch.ones(d))
    assert p.basis_device_bytes == basis.device_bytes()


def test_cpu_plan_measures_host_bandwidth():
    p = plan("100k", 8, device="cpu")
    assert p.device == "cpu" and p.device_bandwidth.source.startswith("measured: host RAM")
    assert p.device_bandwidth.bytes_per_s > 1e8


def test_plan_of_a_store_reads_it(tmp_path):
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(12, 5_000, rank=3), codec="xor-delta")
    with pytest.raises(InvalidArgumentError, match="--dim"):
        plan_store(path, bandwidth=1e9)
    extract_subspace(path, dim=4)
    info = inspect.info(path)
    p = plan_store(path, device_memory="1GB", dtype="bf16", bandwidth=1e9)
    assert (p.params, p.snapshots, p.dim, p.store_dtype) == (5_000, 12, 4, info["dtype"])
    assert p.basis_bytes == 5_000 * 4 * 2
    own = p.codecs[0]
    assert own.codec == "xor-delta:16" and own.bytes == info["snapshot_bytes"] and own.source.startswith("measured")
    assert own.ratio == pytest.approx(info["raw_bytes"] / info["snapshot_bytes"])
    assert [c.codec for c in p.codecs].count("xor-delta:16") == 1 and len(p.codecs) == len(MEASURED_RATIOS)
    assert p.store["subspace"] == "default" and p.store["subspace_dim"] == 4 and p.store["subspace_bytes"] > 0
    assert plan_store(path, dim=9, bandwidth=1e9).dim == 9
    with pytest.raises(InvalidArgumentError, match="no subspace 'other'"):
        plan_store(path, "other", bandwidth=1e9)


def test_cli_json_and_store(tmp_path):
    result = runner.invoke(app, ["plan", "--params", "124M", "--dim", "40", "--snapshots", "10", "--device-memory",
                                 "80GB", "--dtype", "bf16", "--bandwidth", "2000", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    n = 124_000_000
    assert data["basis_bytes"] == n * 40 * 2 and data["mode"] == "resident"
    assert data["step_overhead_s"] == pytest.approx((2 * n * 40 * 2 + 3 * n * 4) / 2e12)
    assert data["codecs"][0] == {"codec": "lossless", "lossless": True, "ratio": MEASURED_RATIOS["lossless"],
                                 "bytes": int(10 * n * 4 / MEASURED_RATIOS["lossless"]),
                                 "source": pipeline.plan.RATIO_SOURCE}
    path = tmp_path / "run.zarr"
    write_store(path, trajectory(8, 3_000, rank=3))
    extract_subspace(path, dim=3)
    result = runner.invoke(app, ["plan", str(path), "--json", "--bandwidth", "10"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["params"], data["snapshots"], data["dim"]) == (3_000, 8, 3)
    assert data["store"]["codec"] == "lossless"
    table = runner.invoke(app, ["plan", str(path), "--bandwidth", "10"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "placement" in table.stdout and "resident" in table.stdout


@pytest.mark.parametrize("args, expect", [
    (["--params", "1M"], "--dim"),
    (["--params", "1M", "--dim", "10", "--device-memory", "lots"], "device memory"),
    (["--params", "1M", "--dim", "10", "--dtype", "int8"], "dtype must be"),
    (["--params", "10", "--dim", "20"], "cannot exceed"),
    (["--params", "1M", "--dim", "10", "--bandwidth", "0"], "bandwidth must be a positive number of GB/s"),
    (["--params", "1M", "--dim", "4.5"], "dim must be a whole number"),
    (["--params", "1.5", "--dim", "1"], "params must be a whole number"),
    (["--params", "1e30", "--dim", "40"], "params must be below 2^62"),
    (["--params", "1M", "--dim", "10", "--device-memory", "1e19"], "device memory must be below 2^62"),
    (["--params", "1M", "--dim", "10", "--device-memory", "1.5"], "device memory must be a whole number of bytes"),
    (["--params", "1M", "--dim", "10", "--device-memory", "1MB", "--host-memory", "1MB", "--disk-bandwidth", "-1"],
     "disk bandwidth must be a positive number of GB/s"),
])
def test_cli_refuses_in_one_line(args, expect):
    result = runner.invoke(app, ["plan", *args])
    out = result.output.strip()
    assert result.exit_code == 2 and len(out.splitlines()) == 1 and expect in out, out


@pytest.mark.parametrize("bad, expect", [("4.5", "whole number"), (4.5, "whole number"), ("1.5", "whole number"),
                                         ("0.0015K", "whole number"), ("1e30", r"below 2\^62"), (2 ** 62, r"below 2\^62"),
                                         ("4611686018427387904", r"below 2\^62")])
def test_counts_must_be_whole_and_below_the_store_limit(bad, expect):
    """Finding 5: no silent truncation (4.5 -> 4) or rounding (1.5 -> 2), no absurd sizes."""
    with pytest.raises(InvalidArgumentError, match=expect):
        parse_count(bad, "dim")
    assert parse_count(2 ** 62 - 1) == 2 ** 62 - 1 and parse_count("1.3B") == 1_300_000_000
    assert parse_count("0.1K") == 100  # exact decimal: not 100.00000000000001


def test_host_copy_is_basis_rule_at_its_boundary():
    """Finding 6: where streamed P lives is Basis.from_store(host="auto")'s rule (the same function): memory-mapped
    when its float32 copy takes more than half the free RAM."""
    assert pipeline.plan._choose_host is pipeline.basis._choose_host
    n, d = 10 ** 6, 10  # float32 P: 40 MB; streamed on a 1 MB device
    kept = plan(n, d, device_memory="1MB", host_memory=80_000_000, bandwidth=1e12, link_bandwidth=1e10)
    mapped = plan(n, d, device_memory="1MB", host_memory=79_999_999, bandwidth=1e12, link_bandwidth=1e10,
                  disk_bandwidth=1e8)
    assert (kept.host, kept.location, kept.step_disk_bytes, kept.disk_bandwidth) == ("pinned", "host RAM", 0, None)
    assert (mapped.host, mapped.location, mapped.host_memory_source) == ("mmap", "memory-mapped disk", "given")
    assert plan(n, d, device_memory="1GB", host_memory="1MB", bandwidth=1e12).location == "device"  # resident
    assert plan(n, d, device="cpu", device_memory="1GB", bandwidth=1e9).location == "host RAM"


def test_memory_mapped_step_is_priced_at_the_disk():
    """Finding 6: on the CPU with P over half the RAM, each step reads P's float32 bytes twice from disk."""
    n, d = 10 ** 6, 10
    p = plan(n, d, device="cpu", device_memory="30MB", dtype="bf16", bandwidth=1e12, disk_bandwidth=1e8)
    assert (p.mode, p.host, p.location, p.host_memory) == ("streamed", "mmap", "memory-mapped disk", 30 * 10 ** 6)
    assert p.step_disk_bytes == 2 * n * d * 4  # the float32 file, whatever P's dtype
    assert p.disk_bandwidth.source == "given"
    assert p.step_overhead_s == pytest.approx(2 * n * d * 4 / 1e8)  # the disk binds, not RAM at 1 TB/s
    assert any("memory-mapped" in note for note in p.notes)
    # bfloat16 P (20 MB) fits half of 50 MB: Basis copies it from the map into RAM (resident), no disk per step
    copied = plan(n, d, device="cpu", device_memory="50MB", dtype="bf16", bandwidth=1e12, disk_bandwidth=1e8)
    assert (copied.mode, copied.host, copied.location, copied.step_disk_bytes) == ("resident", "mmap", "host RAM", 0)


def test_disk_probe_reads_a_temp_file_where_told(tmp_path):
    pipeline.plan.disk_read_probe.cache_clear()
    p = plan(10 ** 6, 10, device="cpu", device_memory="50MB", bandwidth=1e12, disk_dir=tmp_path)
    assert p.disk_bandwidth.source.startswith("measured: 64.0 MiB read of a temp file in " + str(tmp_path.resolve()))
    assert "page cache" in p.disk_bandwidth.source and p.disk_bandwidth.bytes_per_s > 1e6
    assert list(tmp_path.iterdir()) == []  # the probe's file is gone
    with pytest.raises(InvalidArgumentError, match="--disk-bandwidth"):
        plan(10 ** 6, 10, device="cpu", device_memory="50MB", bandwidth=1e12, disk_dir=tmp_path / "missing")


def _rendered(p) -> str:
    import io

    from rich.console import Console

    import cli.plan_cmds

    console = Console(file=io.StringIO(), width=400)
    console.print(cli.plan_cmds._table(p, pipeline.plan))
    return console.file.getvalue()


def test_table_words_placement_and_traffic_by_where_they_are():
    """Finding 6: the placement says where P lives; on the CPU the bytes move through host RAM, not 'the device'."""
    cpu = _rendered(plan(10 ** 6, 10, device="cpu", device_memory="50MB", bandwidth=1e12, disk_bandwidth=1e8))
    assert "P memory-mapped from disk: streamed on cpu" in cpu and "through host RAM" in cpu
    assert "76.3 MiB read from disk" in cpu and "on the device" not in cpu and "P on the device" not in cpu
    assert "disk bandwidth" in cpu and "0.10 GB/s (given)" in cpu
    gpu = _rendered(plan(10 ** 6, 10, device_memory="1GB", bandwidth=1e12))
    assert "P on the device: resident on cuda" in gpu and "through device memory" in gpu and "from disk" not in gpu
    ram = _rendered(plan(10 ** 6, 10, device="cpu", device_memory="1GB", bandwidth=1e12))
    assert "P in host RAM: resident on cpu" in ram and "through host RAM" in ram


def test_plan_of_a_run_directory(tmp_path):
    """Finding 9: a `trajstore train` run directory is planned from its trajectory.zarr, as landscape/export do."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"recipe": "digits-mlp", "seed": 0}))
    write_store(run / "trajectory.zarr", trajectory(6, 2_000, rank=3))
    extract_subspace(run / "trajectory.zarr", dim=3)
    p = plan_store(run, bandwidth=1e9)
    assert (p.params, p.snapshots, p.dim) == (2_000, 6, 3) and p.store["path"].rstrip("/").endswith("trajectory.zarr")
    result = runner.invoke(app, ["plan", str(run), "--json", "--bandwidth", "10"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["store"]["subspace"] == "default"
