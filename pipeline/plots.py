"""Figures people would rather look at than read: PCA ratio, trajectory on the PC plane, curves."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spectrum_plot(explained_variance_ratio: np.ndarray, path: "str | os.PathLike", *, dim: int | None = None,
                  title: str = "PCA ratio of the training trajectory", max_components: int = 30) -> str:
    """Per-component (bars) and cumulative (line) explained variance, as in the paper's PCA-ratio figure."""
    plt = _pyplot()
    evr = np.asarray(explained_variance_ratio)[:max_components]
    k = np.arange(1, len(evr) + 1)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.bar(k, evr, color="#4C72B0", label="per component")
    ax.set_xlabel("principal direction")
    ax.set_ylabel("explained variance ratio")
    ax2 = ax.twinx()
    cumulative = np.cumsum(np.asarray(explained_variance_ratio))[: len(evr)]
    ax2.plot(k, cumulative, color="#DD8452", marker="o", ms=3, label="cumulative")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("cumulative")
    if dim:
        ax.axvline(dim + 0.5, color="gray", ls="--", lw=1)
        ax2.annotate(f"d = {dim}: {cumulative[min(dim, len(cumulative)) - 1]:.1%}", (dim + 0.5, 0.05),
                     xytext=(-4, 0), textcoords="offset points", ha="right", color="gray")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, ["per component", "cumulative"], loc="center right")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def trajectory_plot(coordinates: np.ndarray, explained_variance_ratio: np.ndarray, path: "str | os.PathLike", *,
                    steps: Sequence[int] | None = None, title: str = "Training trajectory on the first two principal directions") -> str:
    """The trajectory (t, ≥2) drawn in the plane of PC1 and PC2, coloured by step."""
    plt = _pyplot()
    xy = np.asarray(coordinates)[:, :2]
    steps = np.arange(len(xy)) if steps is None else np.asarray(steps)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    ax.plot(xy[:, 0], xy[:, 1], color="lightgray", lw=1, zorder=1)
    points = ax.scatter(xy[:, 0], xy[:, 1], c=steps, cmap="viridis", s=18, zorder=2)
    ax.annotate("start", xy[0], textcoords="offset points", xytext=(5, 5))
    ax.annotate("end", xy[-1], textcoords="offset points", xytext=(5, 5))
    fig.colorbar(points, ax=ax, label="step")
    evr = np.asarray(explained_variance_ratio)
    ax.set_xlabel(f"PC1 ({evr[0]:.1%} of variance)")
    ax.set_ylabel(f"PC2 ({evr[1]:.1%} of variance)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def curves_plot(series: Mapping[str, Sequence[float]], path: "str | os.PathLike", *, ylabel: str, title: str,
                xlabel: str = "epoch") -> str:
    """One line per method (e.g. test accuracy per epoch)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, values in series.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
