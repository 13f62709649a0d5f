"""The report's figures: loss against resources, isoFLOP profiles, frontier, residuals.

Every figure has labelled axes, log scales where the quantity spans decades, and a legend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from orchestrator.analysis.isoflop import Allocation
from orchestrator.analysis.power_law import PowerLawFit

RESOURCE_LABELS = {
    "N": "parameters N (active)",
    "D": "training tokens D",
    "C": "training compute C (FLOPs)",
}


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_against_resources(
    path: Path,
    title: str,
    points: Mapping[str, Mapping[str, np.ndarray]],
    fits: Mapping[tuple[str, str], PowerLawFit],
) -> Path:
    """One panel per resource; ``points[family]`` has arrays N, D, C, loss."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, resource in zip(axes, ("N", "D", "C"), strict=True):
        for colour, (family, cols) in zip(plt.cm.tab10.colors, points.items(), strict=False):
            ax.scatter(cols[resource], cols["loss"], s=14, alpha=0.6, color=colour, label=family)
            fit = fits.get((family, resource))
            if fit is not None:
                grid = np.geomspace(cols[resource].min(), cols[resource].max(), 100)
                ax.plot(
                    grid,
                    fit.predict(grid),
                    color=colour,
                    label=f"{family}: E + A {resource}^-{fit.alpha:.3f}",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(RESOURCE_LABELS[resource])
        ax.set_ylabel("final loss")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def isoflop_profiles(
    path: Path,
    title: str,
    budget: np.ndarray,
    n: np.ndarray,
    loss: np.ndarray,
    allocation: Allocation,
) -> Path:
    """Loss against N per budget with a parabola in log N and its minimum."""
    fig, ax = plt.subplots(figsize=(7, 5))
    budgets = np.unique(budget)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    for colour, c in zip(colours, budgets, strict=True):
        mask = budget == c
        ax.scatter(n[mask], loss[mask], s=16, color=colour, label=f"C = {c:.2g} FLOPs")
        if mask.sum() >= 3:
            log_n = np.log(n[mask])
            coef = np.polyfit(log_n, loss[mask], 2)
            grid = np.linspace(log_n.min(), log_n.max(), 100)
            ax.plot(np.exp(grid), np.polyval(coef, grid), color=colour, lw=1)
    ax.scatter(
        allocation.n_opt,
        allocation.loss_opt,
        marker="*",
        s=120,
        color="red",
        zorder=3,
        label="profile minima",
    )
    ax.set_xscale("log")
    ax.set_xlabel(RESOURCE_LABELS["N"])
    ax.set_ylabel("final loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def compute_optimal_frontier(
    path: Path, title: str, allocations: Sequence[tuple[str, Allocation]]
) -> Path:
    """N_opt and D_opt against C for each approach, with the fitted power laws."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    flops = np.concatenate(
        [a.flops for _, a in allocations] + [[a.reference_flops] for _, a in allocations]
    )
    grid = np.geomspace(flops.min() / 2, flops.max() * 2, 50)
    for colour, (family, allocation) in zip(plt.cm.tab10.colors, allocations, strict=False):
        for ax, optimum, line, exponent in (
            (axes[0], allocation.n_opt, allocation.n_opt_at, allocation.a),
            (axes[1], allocation.d_opt, allocation.d_opt_at, allocation.b),
        ):
            if len(optimum):
                ax.scatter(allocation.flops, optimum, color=colour, s=18)
            ax.plot(
                grid,
                line(grid),
                color=colour,
                label=f"{family} {allocation.method}: C^{exponent:.3f}",
            )
    for ax, name in zip(axes, ("N", "D"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(RESOURCE_LABELS["C"])
        ax.set_ylabel(f"compute-optimal {RESOURCE_LABELS[name]}")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def residual_panels(
    path: Path, title: str, panels: Sequence[tuple[str, str, np.ndarray, np.ndarray]]
) -> Path:
    """One panel per fit: (label, x-axis label, x, log residual)."""
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (label, x_label, x, residual) in zip(axes.flat, panels, strict=False):
        ax.scatter(x, residual, s=12, label=label)
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("log residual (fit - data)")
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)
