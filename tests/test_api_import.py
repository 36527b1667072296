"""Importing Hugging Face output folders and tied-weight models (issue 12: items 4, 5 and 10).

Real torch models, real checkpoint files (torch.save, safetensors) in tmp_path, the real CLI.
"""
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn
from typer.testing import CliRunner

from cli.main import app
from trajstore import TrajectoryStore
from trajstore.errors import InvalidArgumentError, LayoutMismatchError
from trajstore.importers import import_checkpoints
from trajstore.layout import ParamLayout
from trajstore.maintenance import repair

runner = CliRunner()
HF_PATTERN = "checkpoint-*/model.safetensors"


class TinyGPT(nn.Module):
    """GPT-2 in miniature: the token embedding is tied to the output head; ``pe`` is a float buffer."""

    def __init__(self, vocab: int = 40, dim: int = 8, ctx: int = 6):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.register_buffer("pe", torch.randn(ctx, dim))  # (ctx, dim) positional encoding, not trained
        self.block = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.ln = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2's lm_head and wte

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx (B, T) -> logits (B, T, vocab)
        h = self.wte(idx) + self.pe[: idx.shape[1]]
        return self.lm_head(self.ln(self.block(h)))


def tiny_gpt_recipe(seed: int):
    """A recipe for ``--like tests.test_api_import:tiny_gpt_recipe`` (only the model is used)."""
    return TinyGPT(), None, None, None


def train(model: TinyGPT, k: int, seed: int = 0) -> None:
    """k real SGD steps of next-token prediction on random tokens."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(k):
        idx = torch.randint(0, 40, (4, 6), generator=g)
        loss = nn.functional.cross_entropy(model(idx)[:, :-1].reshape(-1, 40), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def save(model: nn.Module, file: Path, style: str) -> None:
    """``pt``: torch.save of the state_dict (tied keys share storage); ``hf``: safetensors without the tied
    ``lm_head.weight``, as transformers' save_pretrained writes it; ``save_model``: safetensors' own
    dedupe (it keeps ``lm_head.weight`` and drops ``wte.weight``)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    if style == "pt":
        torch.save(model.state_dict(), file)
    elif style == "hf":
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(file))
    else:
        save_model(model, str(file))


def hf_folder(root: Path, steps=(7, 14, 21, 28, 30), order=(28, 7, 30, 21, 14), model=None, trainer_state=True):
    """A Trainer output folder ``root/checkpoint-<step>/model.safetensors`` (+ ``trainer_state.json``),
    written in the scrambled ``order``. Returns the model and the parameters at each step."""
    torch.manual_seed(0)
    model = model or TinyGPT()
    snaps, done = {}, 0
    for step in sorted(steps):
        train(model, step - done, seed=step)
        done = step
        snaps[step] = (params_of(model), {k: v.clone() for k, v in model.state_dict().items()})
    for step in [s for s in order if s in snaps] + [s for s in steps if s not in order]:
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        sd = {k: v.contiguous() for k, v in snaps[step][1].items() if k != "lm_head.weight"}
        save_file(sd, str(folder / "model.safetensors"))
        if trainer_state:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": step / 10}))
    return model, {s: p for s, (p, _) in snaps.items()}


def pt_folder(root: Path, k: int = 3, style: str = "pt"):
    """Files ``0.pt``/``0.safetensors`` .. of a TinyGPT trained between saves; returns model and parameters."""
    torch.manual_seed(0)
    model, snaps = TinyGPT(), []
    for i in range(k):
        snaps.append(params_of(model))
        save(model, root / f"{i}.{'pt' if style == 'pt' else 'safetensors'}", style)
        train(model, 3, seed=i)
    return model, snaps


# -- 4: Hugging Face output folders ------------------------------------------------------------

def test_hf_folder_is_ordered_by_whole_path_and_steps_come_from_trainer_state(tmp_path):
    _, snaps = hf_folder(tmp_path / "out")
    result = runner.invoke(app, ["import", str(tmp_path / "out"), str(tmp_path / "run.zarr"), "--pattern", HF_PATTERN])
    assert result.exit_code == 0, result.output
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == [7, 14, 21, 28, 30]
        for i, step in enumerate([7, 14, 21, 28, 30]):
            assert torch.equal(store.state_dict(i)["wte.weight"], snaps[step]["wte.weight"])


def test_step_from_folder_name_without_trainer_state_and_natural_order_of_folders(tmp_path):
    _, snaps = hf_folder(tmp_path / "out", steps=(2, 10, 100), order=(100, 2, 10), trainer_state=False)
    import_checkpoints(tmp_path / "out", tmp_path / "run.zarr", HF_PATTERN)
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == [2, 10, 100]  # checkpoint-10 after checkpoint-2
        assert torch.equal(store.state_dict(2)["block.0.weight"], snaps[100]["block.0.weight"])


def test_trainer_state_global_step_wins_over_the_folder_number(tmp_path):
    hf_folder(tmp_path / "out", steps=(1, 2, 10), order=(10, 1, 2))
    for epoch, folder in enumerate(["checkpoint-1", "checkpoint-2", "checkpoint-10"], start=1):
        (tmp_path / "out" / folder).rename(tmp_path / "out" / f"epoch-{epoch}")
        (tmp_path / "out" / f"epoch-{epoch}" / "trainer_state.json").write_text(json.dumps({"global_step": 250 * epoch}))
    import_checkpoints(tmp_path / "out", tmp_path / "run.zarr", "epoch-*/model.safetensors")
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == [250, 500, 750]


def test_steps_that_do_not_increase_are_refused_before_anything_is_written(tmp_path):
    hf_folder(tmp_path / "out", steps=(3, 4), order=(3, 4))
    (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    with pytest.raises(InvalidArgumentError, match=r"checkpoint-4.*step 3"):
        import_checkpoints(tmp_path / "out", tmp_path / "run.zarr", HF_PATTERN)
    assert not (tmp_path / "run.zarr").exists()


def test_resume_continues_an_hf_import_and_refuses_a_rotated_folder(tmp_path):
    model, snaps = hf_folder(tmp_path / "out", steps=(7, 14, 21), order=(21, 7, 14))
    import_checkpoints(tmp_path / "out", tmp_path / "run.zarr", HF_PATTERN)
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        first = store.read(slice(None))
    _, later = hf_folder(tmp_path / "more", steps=(7, 14, 21, 28, 30, 35, 40), order=(28, 30))  # training went on
    for step in (28, 30):
        (tmp_path / "more" / f"checkpoint-{step}").rename(tmp_path / "out" / f"checkpoint-{step}")
    result = runner.invoke(app, ["import", str(tmp_path / "out"), str(tmp_path / "run.zarr"), "--pattern", HF_PATTERN,
                                 "--resume"])
    assert result.exit_code == 0, result.output
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.steps.tolist() == [7, 14, 21, 28, 30]
        assert (store.read(slice(0, 3)) == first).all()
        assert torch.equal(store.state_dict(4)["ln.weight"], later[30]["ln.weight"])
    # a Trainer with save_total_limit deletes old checkpoints as it saves new ones: five files again, but the
    # fifth is step 40, not the committed step 30, so resume must refuse rather than skip 35 and 40
    for step in (7, 14):
        shutil.rmtree(tmp_path / "out" / f"checkpoint-{step}")
    for step in (35, 40):
        (tmp_path / "more" / f"checkpoint-{step}").rename(tmp_path / "out" / f"checkpoint-{step}")
    with pytest.raises(InvalidArgumentError, match="resume only continues the same import"):
        import_checkpoints(tmp_path / "out", tmp_path / "run.zarr", HF_PATTERN, resume=True)


# -- 5: tied weights and parameter-like buffers ------------------------------------------------

def assert_matches_model(store: TrajectoryStore, model: TinyGPT, snaps: list) -> None:
    """The store's layout is the model's: same n, load_into and a strict load_state_dict give the values."""
    assert store.n_params == sum(p.numel() for p in model.parameters())
    assert store.layout == ParamLayout.from_module(model)
    for i, expected in enumerate(snaps):
        fresh = TinyGPT()
        store.load_into(fresh, i)
        assert all(torch.equal(p, expected[k]) for k, p in fresh.named_parameters())
        assert fresh.lm_head.weight is fresh.wte.weight
        strict = TinyGPT()
        strict.load_state_dict(store.state_dict(i))
        assert torch.equal(strict.lm_head.weight, expected["wte.weight"])


@pytest.mark.parametrize("style", ["pt", "hf", "save_model"])
def test_import_like_a_model_gives_its_layout_whatever_the_file_kept_of_the_tie(tmp_path, style):
    model, snaps = pt_folder(tmp_path / "ckpts", style=style)
    pattern = "*.pt" if style == "pt" else "*.safetensors"
    import_checkpoints(tmp_path / "ckpts", tmp_path / "run.zarr", pattern, like=TinyGPT())
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.layout.aliases == {"lm_head.weight": "wte.weight"}
        assert store.buffer_layout.names == ["pe"]
        assert torch.equal(store.read_buffers(2)["pe"], model.pe)
        assert_matches_model(store, model, snaps)


def test_import_without_a_model_dedupes_tied_tensors_of_a_pt_file(tmp_path):
    model, snaps = pt_folder(tmp_path / "ckpts")
    import_checkpoints(tmp_path / "ckpts", tmp_path / "run.zarr")
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        # the embedding counts once; a float buffer cannot be told from a parameter in a bare file (use like=)
        assert store.n_params == sum(p.numel() for p in model.parameters()) + model.pe.numel()
        assert "lm_head.weight" not in store.layout.names
        assert store.layout.aliases == {"lm_head.weight": "wte.weight"}
        sd = store.state_dict(1)
        assert sd["lm_head.weight"] is sd["wte.weight"] and torch.equal(sd["wte.weight"], snaps[1]["wte.weight"])


def test_param_names_are_honoured_and_missing_ones_named(tmp_path):
    model, snaps = pt_folder(tmp_path / "ckpts")
    names = [k for k, _ in model.named_parameters()]
    import_checkpoints(tmp_path / "ckpts", tmp_path / "run.zarr", param_names=names)
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.buffer_layout.names == ["pe"]
        assert_matches_model(store, model, snaps)
    with pytest.raises(LayoutMismatchError, match=r"head\.bias"):
        import_checkpoints(tmp_path / "ckpts", tmp_path / "bad.zarr", param_names=names + ["head.bias"])
    assert not (tmp_path / "bad.zarr").exists()


def test_cli_like_a_store_or_a_recipe(tmp_path):
    model, snaps = pt_folder(tmp_path / "ckpts")
    with TrajectoryStore.create(tmp_path / "ref.zarr", TinyGPT(), buffers=True):
        pass
    _, hf = hf_folder(tmp_path / "out", steps=(5, 10), order=(10, 5))
    for like in (str(tmp_path / "ref.zarr"), "tests.test_api_import:tiny_gpt_recipe"):
        target = tmp_path / f"{re.sub(r'[^a-z]', '', like)[-8:]}.zarr"
        result = runner.invoke(app, ["import", str(tmp_path / "out"), str(target), "--pattern", HF_PATTERN,
                                     "--like", like, "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["parameters"] == sum(p.numel() for p in model.parameters())
        with TrajectoryStore.open(target) as store:
            assert store.steps.tolist() == [5, 10]
            assert_matches_model(store, model, [hf[5], hf[10]])
    result = runner.invoke(app, ["import", str(tmp_path / "ckpts"), str(tmp_path / "x.zarr"), "--like",
                                 str(tmp_path / "nope.zarr")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_like_a_different_model_is_refused_naming_the_file(tmp_path):
    pt_folder(tmp_path / "ckpts")
    with pytest.raises(LayoutMismatchError, match=r"0\.pt.*fc\.weight"):
        import_checkpoints(tmp_path / "ckpts", tmp_path / "run.zarr", like=Other())
    with pytest.raises(InvalidArgumentError, match="like.*param_names"):
        import_checkpoints(tmp_path / "ckpts", tmp_path / "run.zarr", like=TinyGPT(), param_names=["wte.weight"])


class Other(nn.Module):
    """A model whose parameters the TinyGPT checkpoints lack."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)


# -- 10: state_dict of a tied model ------------------------------------------------------------

def test_state_dict_of_a_recorded_tied_model_loads_strictly(tmp_path):
    torch.manual_seed(0)
    model = TinyGPT()
    store = TrajectoryStore.create(tmp_path / "run.zarr", model, buffers=True)
    expected = []
    for step in (0, 5, 10):
        store.append(model, step=step)
        expected.append(params_of(model))
        train(model, 5, seed=step)
    store.close()
    with TrajectoryStore.open(tmp_path / "run.zarr") as store:
        assert store.attrs["layout"][0] == {"name": "wte.weight", "shape": [40, 8], "dtype": "float32",
                                            "aliases": ["lm_head.weight"]}
        for i in range(3):
            sd = store.state_dict(i)
            assert sd["lm_head.weight"] is sd["wte.weight"]
            fresh = TinyGPT()
            fresh.load_state_dict(sd)  # strict
            assert fresh.lm_head.weight is fresh.wte.weight
            assert all(torch.equal(p, expected[i][k]) for k, p in fresh.named_parameters())


def test_layouts_without_aliases_read_and_write_as_before():
    plain = nn.Sequential(nn.Linear(3, 2))
    items = ParamLayout.from_module(plain).to_json()
    assert items == [{"name": "0.weight", "shape": [2, 3], "dtype": "float32"},
                     {"name": "0.bias", "shape": [2], "dtype": "float32"}]
    assert ParamLayout.from_json(items).aliases == {}
    tied = ParamLayout.from_json(ParamLayout.from_module(TinyGPT()).to_json())
    assert tied == ParamLayout.from_module(TinyGPT()) and tied.aliases == {"lm_head.weight": "wte.weight"}


def test_repair_compaction_keeps_aliases_and_float_buffers(tmp_path):
    torch.manual_seed(0)
    model = TinyGPT()
    path = tmp_path / "run.zarr"
    with TrajectoryStore.create(path, model, buffers=True, chunk_size=64, shard_size=128) as store:
        for step in range(4):
            store.append(model, step=step)
            train(model, 2, seed=step)
    with TrajectoryStore.open(path) as store:
        fixed = {k: store.attrs[k] for k in ("layout", "buffer_layout")}
    f = path / "params" / "c" / "1" / "0"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    report = repair(path, drop_bad_only=True)
    assert report.ok and report.action == "compact"
    with TrajectoryStore.open(path) as store:
        assert {k: store.attrs[k] for k in ("layout", "buffer_layout")} == fixed
        assert len(store) == 3 and "lm_head.weight" in store.state_dict(2)
