"""Recording from a 2-process torch.distributed job (gloo, real FSDP2 and DDP): tests/dist_record_proc.py."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import extract_subspace
from trajstore import TrajectoryStore
from trajstore.columns import ColumnMap
from trajstore.errors import CorruptMetadataError
from trajstore.inspect import verify
from trajstore.layout import ParamLayout, TensorSpec

ROOT = Path(__file__).resolve().parents[1]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(*args: str, env: dict | None = None) -> list[subprocess.Popen]:
    port = _port()
    return [subprocess.Popen([sys.executable, "-m", "tests.dist_record_proc", args[0], str(rank), "2", port, *args[1:]],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}) for rank in (0, 1)]


def _run(*args: str, env: dict | None = None) -> list[dict]:
    procs = _launch(*args, env=env)
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """A 2-rank FSDP2 training recorded with a lossless codec: (store path, expected rows file, rank reports)."""
    folder = tmp_path_factory.mktemp("fsdp")
    path, expected_file = folder / "run.zarr", folder / "expected.npy"
    return path, expected_file, _run("train", str(path), "fsdp", "xor-delta:4", str(expected_file))


@pytest.mark.parametrize("kind,codec", [("fsdp", "xor-delta:4"), ("fsdp", "float16-delta"), ("ddp", "lossless")])
def test_a_job_records_the_full_parameters_every_rank_gathers(tmp_path, kind, codec, request):
    if (kind, codec) == ("fsdp", "xor-delta:4"):
        path, expected_file, ranks = request.getfixturevalue("fsdp_run")
    else:
        path, expected_file = tmp_path / "run.zarr", tmp_path / "expected.npy"
        ranks = _run("train", str(path), kind, codec, str(expected_file))
    assert [r["lengths"] for r in ranks] == [[6, 7], [6, 7]]  # flush and close agree on every rank
    # a NaN in rank 1's shard only (FSDP2) is refused on both ranks, naming the rank that had it
    assert all(r["refused"] and "NaN" in r["refused"] for r in ranks)
    assert "rank 1 of the job" in ranks[0]["refused"] if kind == "fsdp" else "rank 0 of the job" in ranks[1]["refused"]
    expected = np.load(expected_file)  # (7, n): full parameters, gathered by the test after each append
    store = TrajectoryStore.open(path)
    assert list(store.steps) == [0, 1, 2, 3, 10, 11, 13]
    got = store.read(slice(None))
    if codec == "float16-delta":  # lossy: within the preset's stated bound of the difference from row 0
        assert np.allclose(got, expected, rtol=0, atol=2e-3) and np.array_equal(got[0], expected[0])
    else:
        assert np.array_equal(got, expected)
    assert np.isnan(store.metrics("loss")[4:]).all() and list(store.metrics("loss")[:4]) == [0, 1, 2, 3]
    assert verify(path).ok
    sd = store.state_dict(6)  # back to the model's own tensors, in the parameter order
    assert np.array_equal(np.concatenate([t.reshape(-1).numpy() for t in sd.values()]), got[6])
    if kind == "fsdp":  # every rank its own columns, each range starting on a shard boundary
        (lo0, hi0), (lo1, hi1) = store.columns.rank_columns
        shard = int(store.group["params"].shards[1])
        assert lo0 == 0 and lo1 % shard == 0 and hi0 <= lo1 and store.n_columns > store.n_params
        assert store.attrs["format_version"] == 2
    else:
        assert store.columns.is_identity and store.attrs["format_version"] == 1


def test_extraction_over_a_sharded_store_equals_the_single_process_store(tmp_path, fsdp_run):
    sharded, expected_file, _ = fsdp_run
    rows = np.load(expected_file)  # (t, n)
    store = TrajectoryStore.open(sharded)
    single = TrajectoryStore.create(tmp_path / "single.zarr", store.layout)
    for i, row in enumerate(rows):
        single.append(row, step=int(store.steps[i]))
    single.close()
    a = extract_subspace(sharded, dim=3, overwrite=True)
    b = extract_subspace(tmp_path / "single.zarr", dim=3)
    lam_a, lam_b = np.asarray(a.attrs["eigenvalues"]), np.asarray(b.attrs["eigenvalues"])
    assert np.allclose(lam_a, lam_b, rtol=1e-10, atol=1e-12 * lam_b[0])  # the Gram does not see the column order
    p_stored = a.read()[0]  # (n_columns, d): rows in the store's column order, zero in the padding
    padding = np.setdiff1d(np.arange(store.n_columns),
                           np.concatenate([np.arange(s, s + n) for _, s, n in store.columns.segments]))
    assert len(padding) and np.abs(p_stored[padding]).max() == 0
    assert (a.n_params, a.n_columns) == (store.n_params, store.n_columns)
    p_global, p_single = a.to_numpy(), b.to_numpy()  # (n, d) in parameter order
    assert np.array_equal(p_global, store.columns.to_global(p_stored.T).T)
    signs = np.sign((p_global * p_single).sum(0))
    assert np.allclose(p_global * signs, p_single, atol=1e-6)


def test_ranks_that_call_different_things_all_raise_and_nothing_is_mixed(tmp_path):
    ranks = _run("misuse", str(tmp_path))
    for case in ("truncate to different lengths", "one rank appends, the other flushes",
                 "ranks open different paths"):
        assert [r[case] for r in ranks] == ["RankFailedError"] * 2, case  # every rank, not one: no hang
    assert [r["a subgroup"] for r in ranks] == ["InvalidArgumentError"] * 2
    assert [r["ranks load different bases"] for r in ranks] == ["LayoutMismatchError"] * 2
    assert [r["append after an evaluation forward"] for r in ranks] == ["ok"] * 2
    rows, full = np.asarray(ranks[0]["after evaluation rows"]), np.asarray(ranks[0]["after evaluation full"])
    assert len(rows) == 4 and np.array_equal(rows[-1], full)  # the refused calls changed nothing; then one more
    n, columns = ranks[0]["default chunks"]
    assert columns < 2 * n  # shards sized to the ranks' parts: padding never doubles the store
    assert [r["import on rank 0 alone"] for r in ranks] == ["ok"] * 2
    assert len(TrajectoryStore.open(tmp_path / "imported.zarr")) == 2


def test_a_call_made_by_one_rank_alone_ends_in_an_error_not_a_hang(tmp_path):
    """New-user trial: `if rank == 0: create(...)` or a metric logged on rank 0 only used to wait for torch's 30
    minutes in silence; now every such call raises RankFailedError after TRAJSTORE_DIST_TIMEOUT."""
    t0 = time.time()
    ranks = _run("lone", str(tmp_path), env={"TRAJSTORE_DIST_TIMEOUT": "2"})
    assert time.time() - t0 < 120
    assert ranks[0]["create on rank 0 alone"] == ranks[0]["append on rank 0 alone"] == "RankFailedError"
    assert [r["process_group=None with FSDP2 shards"] for r in ranks] == ["InvalidArgumentError"] * 2
    assert [r["FSDP2 appends to a store recorded unsharded"] for r in ranks] == ["LayoutMismatchError"] * 2
    assert [r["load_into an FSDP2 model after an evaluation"] for r in ranks] == ["ok"] * 2
    assert [r["loaded"] for r in ranks] == [True, True]  # into the shards, not the gathered copy
    assert [r["Basis.from_store after an evaluation"] for r in ranks] == ["ok"] * 2
    assert len(TrajectoryStore.open(tmp_path / "s.zarr")) == 3  # the lone append committed nothing


def _committed(path: Path) -> int:
    try:
        return int(json.loads((path / "zarr.json").read_text())["attributes"]["trajstore"]["committed"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("codecs", [pytest.param(("xor-delta:4",), id="once"),
                                    pytest.param(("lossless", "xor-delta:4", "float16-delta") * 3, id="9-times",
                                                 marks=pytest.mark.slow)])
def test_kill_9_of_one_rank_mid_append_leaves_the_store_intact_and_resumable(tmp_path, codecs):
    from tests.dist_record_proc import row

    rng = random.Random(len(codecs))
    for trial, codec in enumerate(codecs):
        lossless = codec != "float16-delta"
        path = tmp_path / f"run{trial}.zarr"
        procs = _launch("kill", str(path), codec)
        deadline = time.time() + 120
        while _committed(path) < 3 + trial % 3 * 4 and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))
        procs[1].send_signal(signal.SIGKILL)  # one rank dies mid-append; the other hangs in a collective
        procs[1].wait()
        time.sleep(0.5)
        procs[0].send_signal(signal.SIGKILL)  # as torchrun tears the job down
        procs[0].wait()
        store = TrajectoryStore.open(path)
        t = len(store)
        assert t >= 3 + trial % 3 * 4 and verify(path).ok
        want = np.stack([np.concatenate([x.reshape(-1).numpy() for x in row(k)]) for k in range(t)])
        _check_rows(store.read(slice(None)), want, lossless)  # every committed snapshot
        ranks = _run("resume", str(path), codec, "3")
        assert [r["start"] for r in ranks] == [t, t] and [r["end"] for r in ranks] == [t + 3, t + 3]
        store = TrajectoryStore.open(path)
        want = np.stack([np.concatenate([x.reshape(-1).numpy() for x in row(k)]) for k in range(t + 3)])
        _check_rows(store.read(slice(None)), want, lossless)
        assert list(store.steps) == list(range(t + 3)) and verify(path).ok


def _check_rows(got: np.ndarray, want: np.ndarray, lossless: bool) -> None:
    if lossless:
        assert np.array_equal(got, want)
    else:  # float16 differences from row 0: within float16's rounding of |row - row 0| <= ~10
        assert np.array_equal(got[0], want[0]) and np.abs(got - want).max() <= 1e-2


def test_column_map_places_and_restores_the_global_vector():
    m = ColumnMap.rank_major(16, [[(0, 5), (10, 3)], [(5, 5), (13, 3)]], align=4)
    x = np.arange(16.0)
    stored = m.to_stored(x)
    assert m.rank_columns == [(0, 8), (8, 16)] and np.array_equal(m.to_global(stored), x)
    assert np.array_equal(np.concatenate([stored[a:b] for a, b in m.stored_ranges(3, 14)]), x[3:14])
    padded = ColumnMap.rank_major(16, [[(0, 5), (10, 2)], [(5, 5), (12, 4)]], align=4)
    assert padded.rank_columns == [(0, 7), (8, 17)] and padded.n_columns == 17
    assert np.array_equal(padded.to_global(padded.to_stored(x)), x) and padded.to_stored(x)[7] == 0
    assert ColumnMap.from_json(16, m.to_json()) == m and ColumnMap.identity(4).is_identity
    with pytest.raises(CorruptMetadataError):
        ColumnMap(16, 16, [(0, 0, 5), (5, 3, 11)])  # two segments over one column
    with pytest.raises(CorruptMetadataError):
        ColumnMap.from_json(16, {"n_columns": 16, "segments": [[0, 0, 10]]})  # a gap
    with pytest.raises(CorruptMetadataError):  # rank ranges that overlap: two ranks would write one shard
        ColumnMap(16, 16, m.segments.tolist(), [(0, 9), (8, 16)])
    with pytest.raises(CorruptMetadataError):
        padded.check_aligned(16)  # rank 1 starts at column 8


def test_a_format_1_store_with_a_column_map_is_refused(tmp_path):
    """A column map is format 2: in a store claiming format 1, older readers would misread every row."""
    layout = ParamLayout([TensorSpec("w", (8,), "float32")])
    with TrajectoryStore.create(tmp_path / "s.zarr", layout) as store:
        store.append(np.arange(8, dtype=np.float32), step=0)
        meta = store.attrs
    meta["columns"] = ColumnMap.rank_major(8, [[(0, 4)], [(4, 4)]], align=4).to_json()
    import zarr

    zarr.open_group(str(tmp_path / "s.zarr"), mode="r+").attrs["trajstore"] = meta
    with pytest.raises(CorruptMetadataError, match="format-1"):
        TrajectoryStore.open(tmp_path / "s.zarr")
