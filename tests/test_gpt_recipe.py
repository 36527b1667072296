"""The byte-level GPT recipes (gpt-tiny, gpt-small) and benchmarks/bench_scale.py: sizes, the stdlib text split
by file, next-byte loss / accuracy / perplexity through the runner, the typed error without transformers, and
the scale benchmark's phases (in process at a tiny size in CI; the script itself at a small size under slow)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from pipeline.experiments.data import ByteWindows, is_held_out, stdlib_bytes, stdlib_files
from pipeline.experiments.models import GPT_SIZES, ByteGPT, GPTSize, gpt_size_for
from pipeline.experiments.recipes import build_recipe
from trajstore.errors import InvalidArgumentError, MissingDependencyError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# -- sizes ----------------------------------------------------------------------------------------------
def test_gpt_small_has_over_100m_parameters_and_gpt_tiny_under_1m():
    with torch.device("meta"):  # the real module, no memory
        small = ByteGPT(GPT_SIZES["gpt-small"])
    n_small = sum(p.numel() for p in small.parameters())  # lm_head tied to wte: counted once
    assert n_small == GPT_SIZES["gpt-small"].param_count() >= 100_000_000
    assert small.gpt.config.n_embd == 768 and small.gpt.config.n_head == 12 and small.gpt.config.vocab_size == 256
    tiny = ByteGPT(GPT_SIZES["gpt-tiny"])
    assert sum(p.numel() for p in tiny.parameters()) == GPT_SIZES["gpt-tiny"].param_count() < 1_000_000
    size = gpt_size_for(124_000_000)
    assert size.width == 768 and size.heads == 12 and abs(size.param_count() - 124e6) < size.param_count() / size.layers
    with torch.device("meta"):
        assert sum(p.numel() for p in ByteGPT(GPTSize(3, 96, 3, 32)).parameters()) == GPTSize(3, 96, 3, 32).param_count()


def test_model_returns_class_scores_in_dim_1_and_a_trainer_loss():
    torch.manual_seed(0)
    model = ByteGPT(GPT_SIZES["gpt-tiny"])
    x = torch.randint(0, 256, (3, 64))
    logits = model(x)
    assert logits.shape == (3, 256, 64)
    out = model(input_ids=x, labels=x)
    assert torch.equal(out["logits"], logits)
    manual = torch.nn.functional.cross_entropy(logits.transpose(1, 2).reshape(-1, 256), x.reshape(-1))
    assert torch.allclose(out["loss"], manual)


# -- data -------------------------------------------------------------------------------------------------
def write_corpus(root: Path, count: int = 40) -> dict[str, bytes]:
    files = {}
    for i in range(count):
        rel = f"pkg{i % 3}/mod{i:02d}.py"
        files[rel] = f"# file {rel}\n".encode() + bytes([65 + i % 26]) * (100 + 7 * i)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(files[rel])
    for skipped in ("site-packages/big.py", "pkg0/__pycache__/mod00.py", "pkg1/notes.txt"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_bytes(b"SKIPPED" * 100)
    return files


def test_text_is_split_by_file_in_sorted_order_to_exact_budgets(tmp_path):
    files = write_corpus(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in stdlib_files(tmp_path)] == sorted(files)
    held = [rel for rel in sorted(files) if is_held_out(rel)]
    assert held and len(held) < len(files)  # the corpus holds files of both splits
    train_text = b"".join(files[r] for r in sorted(files) if not is_held_out(r))
    test_text = b"".join(files[r] for r in held)
    train, test = stdlib_bytes(len(train_text) - 5, len(test_text), str(tmp_path))
    assert train.dtype == np.uint8 and len(train) == len(train_text) - 5 and len(test) == len(test_text)
    assert train.tobytes() == train_text[:-5] and test.tobytes() == test_text  # whole files, sorted, cut at the end
    assert b"SKIPPED" not in train.tobytes() + test.tobytes()
    for rel in held:  # no held-out file leaks into the training text
        assert files[rel][:20] not in train.tobytes()
    with pytest.raises(InvalidArgumentError, match="ask for less text"):
        stdlib_bytes(len(train_text) + 1, 10, str(tmp_path))


def test_stdlib_text_is_deterministic_and_python_source():
    a_train, a_test = stdlib_bytes.__wrapped__(50_000, 10_000)
    b_train, b_test = stdlib_bytes.__wrapped__(50_000, 10_000)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_test, b_test)
    assert b"def " in a_train.tobytes() and b"import " in a_test.tobytes()
    assert a_train[:2000].tobytes() != a_test[:2000].tobytes()


def test_byte_windows_are_next_byte_pairs_without_overlap():
    data = np.arange(100, dtype=np.uint8)
    windows = ByteWindows(data, 16)
    assert len(windows) == 6  # 99 // 16: the last byte is only a target
    x, y = windows[1]
    assert x.dtype == torch.int64 and x.tolist() == list(range(16, 32)) and y.tolist() == list(range(17, 33))
    assert windows[-1][1].tolist() == list(range(81, 97))
    with pytest.raises(IndexError):
        windows[6]
    with pytest.raises(InvalidArgumentError, match="no window"):
        ByteWindows(data[:10], 16)


# -- errors -----------------------------------------------------------------------------------------------
def test_without_transformers_the_recipe_raises_the_typed_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails, as when missing
    with pytest.raises(MissingDependencyError, match=r"trajstore\[transformers\]"):
        build_recipe("gpt-tiny", seed=0, batch_size=8)
    r = runner.invoke(app, ["train", "gpt-tiny", "--run", "/nonexistent/never-created", "--sample-epochs", "1",
                            "--dim", "1"])
    assert r.exit_code != 0 and "transformers" in " ".join(r.output.split())


def test_label_noise_is_refused_for_a_language_model():
    with pytest.raises(InvalidArgumentError, match="label noise"):
        build_recipe("gpt-tiny", seed=0, batch_size=8, label_noise=0.1)


# -- through the runner -----------------------------------------------------------------------------------
def test_gpt_tiny_trains_end_to_end_with_next_byte_accuracy_and_perplexity(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "gpt-tiny", "--run", str(run), "--sample-epochs", "1", "--sample-every",
                                 "1", "--dim", "4", "--subspace-epochs", "1", "--lr", "0.3", "--subspace-lr", "0.3",
                                 "--baseline", "none", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    sampled = report["history"]["sample"]
    assert sampled[-1]["test_perplexity"] < 0.5 * 256  # learned: uniform over bytes is 256
    psgd = report["methods"]["psgd"]
    assert psgd["final_test_perplexity"] == pytest.approx(math.exp(psgd["final_test_loss"]), rel=1e-12)
    assert "final test perplexity" in (run / "report.md").read_text()
    # the runner's loss and accuracy are per byte position: recompute them from the final weights
    recipe = build_recipe("gpt-tiny", seed=0, batch_size=64)
    recipe.model.load_state_dict(torch.load(run / "final-psgd.pt", weights_only=True))
    recipe.model.eval()
    with torch.no_grad():
        pairs = [(recipe.model(x), y) for x, y in recipe.test]
    logits = torch.cat([o for o, _ in pairs])  # (W, 256, T)
    targets = torch.cat([y for _, y in pairs])  # (W, T)
    assert psgd["final_test_acc"] == pytest.approx(float((logits.argmax(1) == targets).double().mean()), abs=1e-12)
    assert psgd["final_test_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, targets)),
                                                    rel=1e-5)


# -- benchmarks/bench_scale.py ------------------------------------------------------------------------------
def test_bench_scale_phases_at_a_tiny_size(tmp_path):
    bench = load_bench()
    cfg = bench.BenchConfig(out=str(tmp_path / "b"), params=20_000, width=32, heads=2, context=32, batch=2, steps=12,
                            dims=[3, 8], train_dim=3, timed_steps=2)
    report = bench.run_all(cfg, in_process=True, log=lambda s: None)
    rec = report["record"]
    assert rec["snapshots"] == 13 and rec["steps_recorded"] == list(range(13))  # via the HF Trainer callback
    assert 0 <= rec["callback_fraction"] < 1 and rec["io"]  # /proc/self/io on Linux
    assert [e["dim"] for e in report["extract"]] == [8, 3]
    assert all(e["orthonormality_error"] < 1e-4 and e["seconds_per_GB"] > 0 for e in report["extract"])
    assert not (cfg.store / "subspaces" / "d8").exists()  # only the trained subspace is kept
    res, mm = report["train_resident"], report["train_mmap"]
    assert res["basis_mode"] == "resident" and mm["basis_mode"] == "streamed"
    assert 0 < mm["mmap_file_bytes"] - rec["n_params"] * 3 * 4 < 16 * 3 * 4 + 4096  # tiles (last padded), .npy header
    assert mm["max_loss_diff_vs_resident"] == 0.0  # the same P-SGD steps bit for bit, P read from the memory map
    assert all(np.isfinite(res[k]) for k in ("psgd_ms", "sgd_ms", "adamw_ms", "psgd_ratio_vs_adamw"))


@pytest.mark.slow
def test_bench_scale_script_at_2m_parameters(tmp_path):
    """The script as run for the README (--params 124M), at 2M: 41 snapshots, d = 15 and 40, each phase in its
    own process, extraction peak RSS under 1 GB."""
    proc = subprocess.run([sys.executable, "benchmarks/bench_scale.py", "--params", "2M", "--width", "128",
                           "--context", "64", "--out", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    assert report["record"]["snapshots"] == 41 and report["record"]["n_params"] > 1_500_000
    assert [e["dim"] for e in report["extract"]] == [40, 15]
    assert report["peak_rss_MiB_extraction_max"] <= 1024
    assert report["train_mmap"]["max_loss_diff_vs_resident"] == 0.0  # the same tiles: the same bits
    assert "P-SGD / AdamW" in proc.stdout
    assert not (tmp_path / "b").exists()  # the run folder is deleted without --keep
