"""The landscape figure: loss and accuracy contours with the paths overlaid, and the projection error."""
from __future__ import annotations

import os

import numpy as np

from .landscape import Landscape
from .plots import _pyplot

_OVERLAY_COLOURS = ("#C44E52", "#DD8452", "#8172B3", "#937860")
_RUN_PATHS = ("P-SGD", "P-BFGS")  # a run directory's recorded paths (pipeline/experiments/paths.py)


def landscape_plot(land: Landscape, path: "str | os.PathLike", *, title: str | None = None) -> str:
    """Three panels: loss contours (log-spaced levels), accuracy contours, each with the trajectory's
    projection (start ▲, end ★, centre ✕) and the overlaid paths (a recorded path: a marker per epoch or
    snapshot, its end ◆; a start → final segment: dashed); and each snapshot's relative residual
    (the part of its displacement from the centre that the plane hides). Written as PNG (Agg)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=110, gridspec_kw={"width_ratios": [1, 1, 0.8]})
    aa, bb = np.meshgrid(land.a, land.b)  # (g, g): loss[i, j] at a[j], b[i]
    evr = land.plane.explained_variance_ratio
    _contours(axes[0], aa, bb, land.loss, "loss", log=True, cmap="viridis")
    _contours(axes[1], aa, bb, land.accuracy, "accuracy", log=False, cmap="magma")
    for ax in axes[:2]:
        _paths(ax, land)
        ax.set_xlabel(f"a along u1 (PC1, {evr[0]:.1%} of variance)")
        ax.set_ylabel(f"b along u2 (PC2, {evr[1]:.1%} of variance)")
        ax.set_xlim(land.a[0], land.a[-1])
        ax.set_ylim(land.b[0], land.b[-1])
    axes[0].legend(loc="best", fontsize=7, framealpha=0.8)
    err = axes[2]
    x = np.arange(len(land.trajectory.a))
    err.bar(x, land.trajectory.relative_residual, color="#4C72B0", label="snapshots")
    err.axvline(land.plane.snapshot, color="gray", ls="--", lw=1)
    for k, (label, proj) in enumerate(land.overlays.items()):  # a path's own points have no snapshot index
        last = float(proj.relative_residual[-1])
        err.axhline(last, color=_OVERLAY_COLOURS[k % len(_OVERLAY_COLOURS)], ls=":", lw=1.5,
                    label=f"{label}: last point {last:.0%}")
    lasts = [float(proj.relative_residual[-1]) for proj in land.overlays.values()]  # every drawn line stays in view
    top = max([float(land.trajectory.relative_residual.max()), *lasts])
    err.set_ylim(0, min(1.02, max(0.05, 1.15 * top)))
    err.set_xlabel(f"snapshot (centre: {land.plane.snapshot}, dashed)")
    err.set_ylabel("‖d − proj(d)‖ / ‖d‖,  d = w − w_K")
    err.set_title("hidden by the plane (relative residual)")
    err.legend(loc="best", fontsize=7)
    fig.suptitle(title or f"Loss landscape around snapshot {land.plane.snapshot} (step {land.plane.step}), "
                 f"{land.settings['data']['set']} set, {land.settings['data']['samples']} samples")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _contours(ax, aa: np.ndarray, bb: np.ndarray, values: np.ndarray, label: str, *, log: bool, cmap: str) -> None:
    z = np.ma.masked_invalid(values)
    if z.count() < 4 or float(z.max() - z.min()) == 0.0:
        ax.set_title(f"{label}: {'not a classification' if z.count() == 0 else 'constant'}")
        return
    if log and float(z.min()) > 0:
        levels = np.geomspace(float(z.min()), float(z.max()), 25)
    else:
        levels = np.linspace(float(z.min()), float(z.max()), 25)
    filled = ax.contourf(aa, bb, z, levels=levels, cmap=cmap)
    ax.contour(aa, bb, z, levels=levels[::3], colors="white", linewidths=0.4, alpha=0.6)
    ax.figure.colorbar(filled, ax=ax, label=label, format="%.3g")
    ax.set_title(label + (" (log-spaced levels)" if log and float(z.min()) > 0 else ""))


def _paths(ax, land: Landscape) -> None:
    t = land.trajectory
    ax.plot(t.a, t.b, color="white", lw=1.2, zorder=3)
    ax.scatter(t.a, t.b, color="white", edgecolor="black", s=14, zorder=4, label="SGD trajectory")
    ax.scatter(t.a[:1], t.b[:1], marker="^", color="#55A868", edgecolor="black", s=70, zorder=5, label="start")
    ax.scatter(t.a[-1:], t.b[-1:], marker="*", color="#FFD700", edgecolor="black", s=120, zorder=5, label="end")
    ax.scatter([0], [0], marker="x", color="black", s=50, zorder=5, label=f"centre (snapshot {land.plane.snapshot})")
    for k, (label, proj) in enumerate(land.overlays.items()):
        colour = _OVERLAY_COLOURS[k % len(_OVERLAY_COLOURS)]
        if proj.steps is None:  # only its ends are known (a run directory without recorded paths)
            ax.plot(proj.a, proj.b, color=colour, lw=1.5, ls="--", marker="o", ms=3, zorder=4,
                    label=f"{label} (start → final)")
            continue
        if label in _RUN_PATHS:  # a run's recorded path: its start, then one point per epoch
            text = f"{label} path (start + {len(proj.a) - 1} epochs, a marker per epoch)"
        else:
            text = f"{label} ({len(proj.a)} snapshots)"
        ax.plot(proj.a, proj.b, color=colour, lw=1.5, ls="-", marker="o", ms=4, markeredgecolor="black",
                markeredgewidth=0.4, zorder=4, label=text)
        ax.scatter(proj.a[-1:], proj.b[-1:], marker="D", color=colour, edgecolor="black", s=40, zorder=5)
