"""Fuzzing the reader side (issue 8, "prove it at volume").

One small real store per codec preset is built once; every example copies it, damages one of its
files (flipped bytes anywhere or in a shard index, truncation, deletion, appended junk, one JSON
value changed, invalid JSON) and runs every reader-side operation on the copy. Each operation must
end in a ``TrajstoreError`` that names the snapshot or the file, or in data bit-identical to what
was appended, and ``verify`` must flag every committed snapshot that cannot be read back exactly.
Default run: ``CASES`` derandomized examples; ``-m slow``: ``FULL_CASES`` random ones.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pipeline import extract_subspace
from trajstore import InvalidArgumentError, TrajectoryStore, TrajstoreError, get_preset
from trajstore.inspect import info, verify
from trajstore.layout import ParamLayout, TensorSpec

PRESETS = ("lossless", "xor-delta:4", "bitround-delta:8", "float16-delta")
N, ROWS, CHUNK, SHARD = 20_000, 7, 4096, 16384  # 2 shards a row, 4 inner chunks a shard
LAYOUT = ParamLayout([TensorSpec("a", (100, 50), "float32"), TensorSpec("b", (N - 5000,), "float32")])
CASES = int(os.environ.get("TRAJSTORE_FUZZ_CASES", 60))
FULL_CASES = int(os.environ.get("TRAJSTORE_FUZZ_FULL_CASES", 1000))
TIMEOUT_S = 60  # per example: a hang is a failure, not a stuck suite


def appended_row(i: int) -> np.ndarray:
    """Snapshot ``i`` as appended: deterministic, float32 (n,)."""
    rng = np.random.default_rng(i)
    return (rng.standard_normal(N) * 0.05 + np.sin(np.arange(N) * 0.001 * (i + 1))).astype(np.float32)


def appended_metrics(i: int) -> dict[str, float]:
    """Metrics of snapshot ``i``: ``loss`` always, ``acc`` on odd snapshots only (NaN elsewhere)."""
    return {"loss": 1.0 / (i + 1), **({"acc": i / ROWS} if i % 2 else {})}


@dataclass
class Template:
    """A pristine store and what reading it must give."""

    path: Path
    rows: np.ndarray  # (ROWS, N) float32: appended rows, or the pristine decode for lossy presets
    columns: dict[str, np.ndarray]  # steps / epochs / metrics:<name> as read from the pristine store
    files: list[str]  # every file of the store, relative, '/'-separated
    singular_values: np.ndarray | None = None  # of extract_subspace(dim=2), computed on first use

    def __repr__(self) -> str:  # short, for hypothesis' falsifying examples
        return f"Template({self.path.name})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def build_template(root: Path, codec: str) -> Template:
    """Record ROWS snapshots with ``codec`` into ``root/<codec>.zarr`` and read back what must be read."""
    path = root / (codec.replace(":", "_") + ".zarr")
    with TrajectoryStore.create(path, LAYOUT, codec=codec, chunk_size=CHUNK, shard_size=SHARD) as store:
        for i in range(ROWS):
            store.append(appended_row(i), step=10 * i, epoch=i, metrics=appended_metrics(i))
    with TrajectoryStore.open(path) as store:
        rows = store.read(slice(None))
        if store.codec.lossless:
            assert np.array_equal(rows, np.stack([appended_row(i) for i in range(ROWS)]))
        columns = {"steps": store.steps, "epochs": store.epochs,
                   **{f"metrics:{m}": store.metrics(m) for m in ("loss", "acc")}}
    assert columns["steps"].tolist() == [10 * i for i in range(ROWS)] and verify(path).ok
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
                   and not p.name.startswith(".trajstore"))
    return Template(path, rows, columns, files)


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Template]:
    root = tmp_path_factory.mktemp("fuzz-templates")
    return {codec: build_template(root, codec) for codec in PRESETS}


# -- damage ------------------------------------------------------------------------------------
def json_nodes(doc, prefix=()) -> list[tuple]:
    """Paths (tuples of keys / indices) of every node of a JSON document, the root excluded."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    out = []
    for key, value in items:
        out.append(prefix + (key,))
        out.extend(json_nodes(value, prefix + (key,)))
    return out


KEY_PATHS = [("attributes", "trajstore", k) for k in ("committed", "format_version", "dtype", "layout")] + [
    ("attributes", "trajstore", "codec", k) for k in ("name", "transform", "lossless", "keyframe_interval",
                                                      "keepbits", "delta_dtype", "spec")] + [
    ("attributes", "trajstore", "layout", 1, "shape", 0), ("shape", 0), ("shape", 1), ("data_type",),
    ("chunk_grid", "configuration", "chunk_shape", 1), ("fill_value",), ("chunk_key_encoding", "name"),
    ("codecs", 0, "configuration", "endian"), ("codecs", 0, "configuration", "chunk_shape", 1),
    ("codecs", 0, "configuration", "codecs"), ("codecs", 0, "configuration", "codecs", 0, "configuration", "endian"),
    ("codecs", 0, "configuration", "index_codecs", 0, "configuration", "endian"),
    ("codecs", 0, "configuration", "index_location")]


def mutated(value, data) -> object:
    """A replacement for one JSON value, of a kind a damaged or hand-edited file could hold."""
    if isinstance(value, bool) or value is None:
        return data.draw(st.sampled_from([not value, 0, 1, "true", None, {}]))
    if isinstance(value, int):
        return data.draw(st.sampled_from([value + 1, value - 1, 2 * value + 3, -value - 1, 0, -1, 2**63,
                                          10**20, str(value), float(value) + 0.5, None, True]))
    if isinstance(value, float):
        return data.draw(st.sampled_from([value * 2, -value, 0.0, str(value), None]))
    if isinstance(value, str):
        return data.draw(st.sampled_from(["", value + "x", value[:-1], "float64", "uint32", "int32", "float16",
                                          "xor", "delta", "plain", "lossless", "xor-delta:8", "bitround-delta:3",
                                          "blosc", "big", "v2", "start", ".", 7, None]))
    if isinstance(value, list):
        return data.draw(st.sampled_from([value[:-1], value + value[-1:], value[::-1], [], None]))
    return data.draw(st.sampled_from([{}, None, []]))


def damage_json(file: Path, data) -> str:
    """Change, drop or add one value of a zarr.json, or make it invalid JSON; returns a description."""
    text = file.read_text()
    doc = json.loads(text)
    kind = data.draw(st.sampled_from(["key", "key", "any", "any", "drop", "invalid", "delete"]))
    if kind == "delete":
        file.unlink()
        return "deleted"
    if kind == "invalid":
        junk = data.draw(st.sampled_from(["", "{", "null", "[]", '{"zarr_format": 3}', text[:-2], text + "}"]))
        file.write_text(junk)
        return f"json replaced by {junk[:20]!r}"
    present = [p for p in KEY_PATHS if _get(doc, p) is not _MISSING]
    paths = present if kind == "key" and present else json_nodes(doc)
    where = data.draw(st.sampled_from(paths))
    parent = _get(doc, where[:-1])
    if kind == "drop" and isinstance(parent, dict):
        del parent[where[-1]]
        what = f"dropped {where}"
    else:
        parent[where[-1]] = new = mutated(parent[where[-1]], data)
        what = f"{where} = {new!r}"
    file.write_text(json.dumps(doc))
    return what


_MISSING = object()


def _get(doc, path):
    try:
        for key in path:
            doc = doc[key]
        return doc
    except (KeyError, IndexError, TypeError):
        return _MISSING


def damage_bytes(file: Path, data) -> str:
    """Flip, truncate, delete or append junk to a data file; returns a description."""
    raw = bytearray(file.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "flip", "flip-index", "truncate", "delete", "append"]))
    if kind == "delete":
        file.unlink()
        return "deleted"
    if kind == "truncate":
        size = data.draw(st.integers(0, max(0, len(raw) - 1)))
        file.write_bytes(bytes(raw[:size]))
        return f"truncated to {size} of {len(raw)} bytes"
    if kind == "append":
        junk = data.draw(st.binary(min_size=1, max_size=64))
        file.write_bytes(bytes(raw) + junk)
        return f"{len(junk)} junk bytes appended"
    tail = 16 * (SHARD // CHUNK) + 4 if kind == "flip-index" else len(raw)
    lo = max(0, len(raw) - tail)
    flips = data.draw(st.lists(st.tuples(st.integers(lo, len(raw) - 1), st.integers(1, 255)), min_size=1, max_size=8))
    for pos, mask in flips:
        raw[pos] ^= mask
    file.write_bytes(bytes(raw))
    return f"{kind} {flips}"


# -- the oracle --------------------------------------------------------------------------------
def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Same dtype, shape and bits (NaN payloads included)."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    view = f"u{want.dtype.itemsize}"
    return bool(np.array_equal(np.ascontiguousarray(got).view(view), np.ascontiguousarray(want).view(view)))


def names_damage(message: str, rel: str, path: Path) -> bool:
    """Whether an error message names a snapshot, the damaged file or its array (the store for the root)."""
    parts = rel.split("/")
    array = "/".join(parts[:parts.index("c")] if "c" in parts else parts[:-1])
    return bool(re.search(r"snapshots? \d+", message) or rel in message or "zarr.json" in message
                or (array and f"'{array}'" in message or f"/{array}" in message)
                or (not array and str(path) in message))


COLUMNS = {"steps": lambda s: s.steps, "epochs": lambda s: s.epochs,
           "metrics:loss": lambda s: s.metrics("loss"), "metrics:acc": lambda s: s.metrics("acc")}


def examine(path: Path, tpl: Template, rel: str, extract: bool) -> list[str]:
    """Run every reader-side operation on the damaged store at ``path``; return the violations found."""
    found: list[str] = []
    bad_rows: set[int] = set()  # committed snapshots that do not read back exactly
    bad_columns: list[str] = []
    t = None
    failed = object()

    def attempt(op: str, fn):
        """``fn()``, or ``failed`` after judging its error: typed, and naming the snapshot or the file."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 -- judged here
            if op == "extract_subspace" and isinstance(exc, InvalidArgumentError) and t is not None and t <= 2:
                return failed  # a committed count lowered to 0..2 looks like a short store: dim=2 needs 3
            if not isinstance(exc, TrajstoreError):
                found.append(f"{op}: raw {type(exc).__name__}: {exc}")
            elif not names_damage(str(exc), rel, path):
                found.append(f"{op}: {type(exc).__name__} names neither a snapshot nor the file: {exc}")
            return failed

    store = attempt("open", lambda: TrajectoryStore.open(path))
    if store is not failed:
        with store:
            t = len(store)
            for i in range(min(t, ROWS + 2)):
                got = attempt(f"read({i})", lambda: store.read(i))
                if got is failed or i >= ROWS or not same_bits(got, tpl.rows[i]):
                    if got is not failed:
                        found.append(f"read({i}) returned silently wrong data")
                    bad_rows.add(i)
            whole = attempt("read(:)", lambda: store.read(slice(None)))
            if whole is failed and not bad_rows:
                found.append("read(:) raised although every snapshot reads")
            elif whole is not failed and (bad_rows or not same_bits(whole, tpl.rows[:t])):
                found.append(f"read(:) returned silently wrong data, shape {whole.shape}")
            for name, column in COLUMNS.items():
                got = attempt(name, lambda: column(store))
                want, k = tpl.columns[name], min(t, ROWS, len(got) if got is not failed else 0)
                if got is failed or got.shape != (t,) or not same_bits(got[:k], want[:k]):
                    if got is not failed:
                        found.append(f"{name} silently wrong: {got[:12]} (shape {got.shape}, {t} committed)")
                    bad_columns.append(name)
    report = attempt("verify", lambda: verify(path))
    if report is not failed:
        if (bad_rows or bad_columns) and report.ok:
            found.append(f"verify says ok, but snapshots {sorted(bad_rows)} / {bad_columns} do not read back")
        if not report.store_problems and [i for i in bad_rows if i not in report.problems]:
            found.append(f"verify misses unreadable snapshots: {sorted(bad_rows)} vs {report.problems}")
        if t is not None and {i for i in report.problems if i < ROWS} - bad_rows:
            found.append(f"verify flags snapshots that read back exactly: {report.problems}")
    summary = attempt("info", lambda: info(path))
    if summary is not failed and t is not None:
        if summary["snapshots"] != t:
            found.append(f"info says {summary['snapshots']} snapshots, the store {t}")
        if "steps" not in bad_columns and summary["steps"][:ROWS] != tpl.columns["steps"][:t].tolist():
            found.append(f"info steps wrong: {summary['steps'][:12]}")
    sub = attempt("extract_subspace", lambda: extract_subspace(path, dim=2)) if extract else failed
    if sub is not failed and bad_rows:
        found.append(f"extract_subspace succeeded over unreadable snapshots {sorted(bad_rows)}")
    elif sub is not failed and t == ROWS and not np.allclose(sub.singular_values, tpl.singular_values, rtol=1e-6):
        found.append(f"extract_subspace silently wrong: {sub.singular_values} vs {tpl.singular_values}")
    attempt("open('a')", lambda: TrajectoryStore.open(path, "a").close())
    return found


_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fuzz-case")


def pristine_singular_values(tpl: Template) -> np.ndarray:
    """Singular values of the undamaged store's 2-d subspace (extracted once, on a copy)."""
    if tpl.singular_values is None:
        with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
            copy = Path(tmp) / "run.zarr"
            shutil.copytree(tpl.path, copy)
            tpl.singular_values = extract_subspace(copy, dim=2).singular_values
    return tpl.singular_values


def fuzz_case(templates: dict[str, Template], data) -> None:
    """One example: copy a template, damage one file, examine every reader-side operation."""
    codec = data.draw(st.sampled_from(PRESETS), label="codec")
    tpl = templates[codec]
    rel = data.draw(st.sampled_from(tpl.files + ["zarr.json"] * 6 + ["params/zarr.json"] * 2), label="file")
    extract = data.draw(st.integers(0, 15), label="extract") == 0  # the slow one: 1 example in 16
    if extract:
        pristine_singular_values(tpl)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "run.zarr"
        shutil.copytree(tpl.path, path)
        target = path / rel
        what = damage_json(target, data) if rel.endswith("zarr.json") else damage_bytes(target, data)
        future = _EXECUTOR.submit(examine, path, tpl, rel, extract)
        try:
            found = future.result(timeout=TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"{codec}: {rel} {what}: the reader-side operations hang (> {TIMEOUT_S} s)")
    assert not found, f"{codec}: {rel} {what}:\n  " + "\n  ".join(found)


_SETTINGS = dict(deadline=None, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                        HealthCheck.data_too_large])


@settings(max_examples=CASES, derandomize=True, **_SETTINGS)
@given(data=st.data())
def test_a_damaged_store_reads_exactly_or_raises_a_typed_error(templates, data):
    fuzz_case(templates, data)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # at volume, on a loaded 2-core machine
@settings(max_examples=FULL_CASES, **_SETTINGS)
@given(data=st.data())
def test_a_damaged_store_reads_exactly_or_raises_a_typed_error_at_volume(templates, data):
    fuzz_case(templates, data)


# -- pinned cases: each bug found outside the reader is an xfail(strict=True) until fixed -----------
JSON_EDITS = {"big-endian": lambda doc: doc["codecs"][0]["configuration"].update(endian="big"),
              "v2-keys": lambda doc: doc.update(chunk_key_encoding={"name": "v2", "configuration": {"separator": "/"}}),
              "committed-17": lambda doc: doc["attributes"]["trajstore"].update(committed=17),  # 16 rows held
              "fill-2^63": lambda doc: doc.update(fill_value=2**63),
              "attributes-list": lambda doc: doc.update(attributes=[]), "no-rows": lambda doc: doc.update(shape=[0, N])}


def damaged_copy(tpl: Template, tmp_path: Path, rel: str, damage: str) -> Path:
    """A copy of ``tpl`` with ``rel`` edited (JSON_EDITS), made invalid JSON, deleted or byte-flipped."""
    path = tmp_path / "run.zarr"
    shutil.copytree(tpl.path, path)
    target = path / rel
    if damage in JSON_EDITS:
        doc = json.loads(target.read_text())
        JSON_EDITS[damage](doc)
        target.write_text(json.dumps(doc))
    elif damage == "invalid":
        target.write_text("{")
    elif damage == "delete":
        target.unlink()
    elif damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        target.write_bytes(bytes(raw))
    return path


def _outside(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


OPS = {"open('a')": lambda p: TrajectoryStore.open(p, "a").close(),
       "metrics": lambda p: TrajectoryStore.open(p).metrics("acc"), "epochs": lambda p: TrajectoryStore.open(p).epochs,
       "extract": lambda p: extract_subspace(p, dim=2)}


@pytest.mark.parametrize("codec, rel, damage, op", [
    ("lossless", "step/zarr.json", "invalid", "open('a')"),  # fixed: store.array() names it
    ("float16-delta", "reference/c/0/1", "flip", "open('a')"),  # fixed: store.array() names it
    ("lossless", "metrics/acc/zarr.json", "invalid", "metrics"),  # fixed: store.array() names it
    ("lossless", "metrics/acc/zarr.json", "delete", "metrics"),  # fixed: store.array() names it
    ("lossless", "nonfinite/c/0", "flip", "extract"),  # fixed: pipeline/gram.py reads it through _row_values
    ("lossless", "params/zarr.json", "invalid", "extract"),  # fixed: store.array() names it
    ("lossless", "epoch/zarr.json", "fill-2^63", "open('a')"),  # fixed: ArithmeticError caught
    ("lossless", "epoch/zarr.json", "attributes-list", "epochs"),  # fixed: row layout checked first
    ("lossless", "metrics/acc/zarr.json", "attributes-list", "open('a')"),  # found at volume: checked on open
    ("float16-delta", "reference/zarr.json", "no-rows", "open('a')"),  # fixed: reference shape checked
])
def test_damage_met_outside_the_reader_is_a_typed_error(templates, tmp_path, codec, rel, damage, op):
    path = damaged_copy(templates[codec], tmp_path, rel, damage)
    with pytest.raises(TrajstoreError, match=re.escape(rel.split("/c/")[0].removesuffix("/zarr.json"))):
        OPS[op](path)


@pytest.mark.parametrize("rel, damage", [("step/zarr.json", "big-endian"), ("step/zarr.json", "v2-keys"),
                                         ("zarr.json", "committed-17")])
def test_steps_never_read_wrong_through_damaged_metadata(templates, tmp_path, rel, damage):
    path = damaged_copy(templates["lossless"], tmp_path, rel, damage)
    assert not verify(path).ok
    try:
        steps = TrajectoryStore.open(path).steps
    except TrajstoreError as exc:
        assert "step" in str(exc)
    else:
        assert steps.tolist() == [10 * i for i in range(ROWS)], f"steps read wrong: {steps}"


@_outside("format 1: a chunk's crc32c covers its bytes, not its place, so a shard file copied over another "
          "row's (a botched copy or restore) passes every check; binding chunks to their key needs a format "
          "change (e.g. a digest per committed row in the attributes)")
def test_a_shard_file_copied_over_another_rows_is_detected(templates, tmp_path):
    path = damaged_copy(templates["lossless"], tmp_path, "params/c/4/0", "as it was")
    shutil.copyfile(path / "params/c/3/0", path / "params/c/4/0")
    try:
        row = TrajectoryStore.open(path).read(4)
    except TrajstoreError as exc:
        assert "snapshot 4" in str(exc)
    else:
        assert same_bits(row, templates["lossless"].rows[4]), "snapshot 4 reads snapshot 3's first shard"


@pytest.mark.parametrize("codec", ["xor-delta:4", "lossless", "bitround-delta:8"])
def test_chunks_equal_to_the_fill_value_are_written_and_read_back(tmp_path, codec):
    """An unchanged chunk (xor: all zero bits, the fill value), a repeated snapshot and an all-NaN
    chunk recorded with allow_nonfinite are written like any other chunk, so the strict reader
    does not take their absence for damage."""
    rows = [appended_row(0)] * 2 + [appended_row(1)]
    rows.append(rows[-1].copy())
    rows[-1][CHUNK:] += 1  # inner chunk 0 as in the row before
    rows.append(rows[-1].copy())
    rows[-1][:CHUNK] = np.nan
    path = tmp_path / "run.zarr"
    with TrajectoryStore.create(path, LAYOUT, codec=codec, chunk_size=CHUNK, shard_size=SHARD) as store:
        for i, row in enumerate(rows):
            store.append(row, step=i, allow_nonfinite=True)
    with TrajectoryStore.open(path) as store:
        got = store.read(slice(None))
    if get_preset(codec).lossless:
        assert same_bits(got, np.stack(rows))
    assert np.isnan(got[-1, :CHUNK]).all() and np.isfinite(got[:-1]).all()
    assert verify(path).ok
