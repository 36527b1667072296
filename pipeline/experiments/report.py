"""report.json, report.md and the PNG plots of a finished run."""
from __future__ import annotations

import json
from dataclasses import asdict

import torch

from ..plots import curves_plot, spectrum_plot, trajectory_plot
from ..subspace import open_subspace
from .paths import recorded_paths

_XLABEL = "epoch (subspace methods: epochs after the sampling phase)"
LABELS = {"sample": "SGD (sampling)", "sgd": "SGD (full space)", "psgd": "DLDR P-SGD",
          "pbfgs": "DLDR P-BFGS", "random-subspace": "random subspace P-SGD"}


def summarize(history: dict, timing: dict) -> dict:
    """Final and best test accuracy, and wall time, per method."""
    out = {}
    for method, epochs in history.items():
        if not epochs:
            continue
        out[method] = {"label": LABELS.get(method, method), "epochs": len(epochs),
                       "final_test_acc": epochs[-1]["test_acc"], "best_test_acc": max(e["test_acc"] for e in epochs),
                       "final_test_loss": epochs[-1]["test_loss"], "seconds": timing.get(method, 0.0)}
        if "test_perplexity" in epochs[-1]:  # a language model: perplexity = exp(mean held-out next-token loss)
            out[method]["final_test_perplexity"] = epochs[-1]["test_perplexity"]
            out[method]["best_test_perplexity"] = min(e["test_perplexity"] for e in epochs)
    return out


def write_report(run) -> dict:
    """Write the run's report files and return the report dict."""
    state = torch.load(run.ckpt_path, weights_only=True)
    history, timing = state["history"], state["timing"]
    sub = open_subspace(run.store_path, "dldr")
    plots = {
        "accuracy": curves_plot(_curves(history, "test_acc"), run.dir / "accuracy.png", ylabel="test accuracy",
                                title="Test accuracy per epoch", xlabel=_XLABEL),
        "loss": curves_plot(_curves(history, "train_loss"), run.dir / "loss.png", ylabel="train loss",
                            title="Training loss per epoch", xlabel=_XLABEL),
        "spectrum": spectrum_plot(sub.spanned_variance_ratio(), run.dir / "spectrum.png", dim=sub.dim),
    }
    if sub.dim >= 2:
        plots["trajectory"] = trajectory_plot(sub.coordinates(), sub.explained_variance_ratio,
                                              run.dir / "trajectory.png", steps=sub.attrs.get("steps"))
    report = {"config": asdict(run.config), "methods": summarize(history, timing), "history": history,
              "timing": timing, "subspace": {k: v for k, v in sub.summary().items() if k != "path"},
              "plots": {k: str(v) for k, v in plots.items()},
              "paths": {m: str(v.relative_to(run.dir)) for m, v in recorded_paths(run.dir).items()}}
    _write_atomic(run.dir / "report.md", markdown(report))
    _write_atomic(run.dir / "report.json", json.dumps(report, indent=2))  # last: its presence means complete
    return report


def _write_atomic(path, text: str) -> None:
    """Replace ``path`` with ``text`` whole: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _curves(history: dict, key: str) -> dict:
    curves = {}
    sample = [e[key] for e in history.get("sample", [])]
    for method, epochs in history.items():
        values = [e[key] for e in epochs]
        if method == "sgd":
            values = sample + values
        curves[LABELS.get(method, method)] = values
    if "sgd" in history:
        curves.pop(LABELS["sample"], None)
    return curves


def markdown(report: dict) -> str:
    lm = any("final_test_perplexity" in m for m in report["methods"].values())
    lines = ["# trajstore run report", ""]
    if lm:  # a language model: held-out perplexity first; "accuracy" is next-token accuracy
        lines += ["| method | epochs | final test perplexity | best test perplexity | final next-token acc | time (s) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for m in report["methods"].values():
            lines.append(f"| {m['label']} | {m['epochs']} | {m['final_test_perplexity']:.3f} | "
                         f"{m['best_test_perplexity']:.3f} | {m['final_test_acc']:.2%} | {m['seconds']:.1f} |")
    else:
        lines += ["| method | epochs | final test acc | best test acc | time (s) |", "|---|---:|---:|---:|---:|"]
        for m in report["methods"].values():
            lines.append(f"| {m['label']} | {m['epochs']} | {m['final_test_acc']:.2%} | {m['best_test_acc']:.2%} | "
                         f"{m['seconds']:.1f} |")
    s = report["subspace"]
    lines += ["", f"Subspace: d = {s['dim']} from {len(s['snapshots'])} snapshots, explained variance "
              f"{s['explained_variance']:.2%}, ‖PᵀP − I‖ = {s['orthonormality_error']:.1e}.", ""]
    if report.get("paths"):
        lines += ["Subspace-training paths (weights at the start and after every epoch, trajectory stores): "
                  + ", ".join(f"`{p}` ({LABELS.get(m, m)})" for m, p in report["paths"].items())
                  + ". `trajstore landscape RUN` draws them on the loss landscape; `trajstore info` reads them.", ""]
    for name, path in report["plots"].items():
        lines.append(f"![{name}]({path.rsplit('/', 1)[-1]})")
    lines += ["", "Configuration:", "", "```json", json.dumps(report["config"], indent=2), "```", ""]
    return "\n".join(lines)
