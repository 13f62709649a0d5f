"""MoE against dense: the effective parameter multiplier, and Clark et al.'s (2022) law.

Effective multiplier: an MoE run with N_active active parameters and loss L is worth the
N_eff dense parameters at which the dense law reaches L: with L(N) = E + A N^-alpha fitted at
the MoE runs' token count, N_eff = (A / (L - E))^(1/alpha); with the joint dense law
L(N, D), N_eff = (A / (L - E - B D^-beta))^(1/alpha) at the run's own D. The multiplier is
the geometric mean of N_eff / N_active over the MoE runs.

Clark et al. (2022), eq. (1): log L = a log N + b log X + c log N log X + d, with X the
number of experts (1 for dense), fitted by least squares.

NOTE: Clark et al. also replace X by a saturating transform X_hat (their eq. 2) that flattens
the gain at many experts; with the few expert counts a study here sweeps, its two extra
parameters are not identifiable, so the plain bilinear form is fitted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from orchestrator.analysis import _lse_solver as solver
from orchestrator.analysis._common import bootstrap_counts, clean_points, percentile_ci
from orchestrator.analysis.chinchilla import ChinchillaFit
from orchestrator.analysis.power_law import PowerLawFit, fit_power_law, to_named
from orchestrator.errors import UserError

CLARK_NAMES = ("a", "b", "c", "d")


@dataclass(frozen=True, eq=False)
class EffectiveMultiplier:
    """How many dense parameters one active MoE parameter is worth, at equal loss."""

    multiplier: float
    """Geometric mean of N_eff / N_active over MoE runs above the dense law's floor E."""
    ci: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """95% bootstrap interval under "multiplier" (dense and MoE runs both resampled)."""
    dense: PowerLawFit | None = None
    """The dense L(N) fit that defines N_eff."""
    ratios: np.ndarray = field(default_factory=lambda: np.empty(0))
    """N_eff / N_active per MoE run used."""
    num_below_floor: int = 0
    """MoE runs with a loss at or below the dense E, where N_eff is undefined; left out."""
    converged: bool = False
    """Whether the dense fit converged."""


@dataclass(frozen=True, eq=False)
class ClarkFit:
    """log L = a log N + b log X + c log N log X + d (Clark et al. 2022, eq. 1)."""

    a: float
    """Exponent of N (negative: loss falls with size)."""
    b: float
    """Exponent of the expert count X at N = 1."""
    c: float
    """Interaction: how the expert gain changes with log N (positive: it shrinks)."""
    d: float
    """Log-loss offset."""
    ci: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """95% bootstrap intervals per name in CLARK_NAMES; empty without bootstrap."""
    num_points: int = 0
    """Runs fitted."""
    residuals: np.ndarray = field(default_factory=lambda: np.empty(0))
    """log L_fit - log L per run."""
    converged: bool = True
    """Least squares always has a solution; False only if the design is rank-deficient."""


def effective_multiplier(
    dense_params: np.ndarray,
    dense_loss: np.ndarray,
    moe_active_params: np.ndarray,
    moe_loss: np.ndarray,
    *,
    bootstrap: int = 0,
    seed: int = 0,
) -> EffectiveMultiplier:
    """The effective parameter multiplier of MoE runs against a dense L(N) law.

    Compare runs trained on the same tokens: a dense law fitted at one D says nothing about
    MoE runs at another.
    """
    dense = fit_power_law(dense_params, dense_loss, resource="N")
    moe, _ = clean_points("MoE multiplier", 1, n=moe_active_params, loss=moe_loss)

    def ratios_of(e: np.ndarray, a: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        excess = moe["loss"][None, :] - e[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            n_eff = np.where(excess > 0, (a[:, None] / excess) ** (1 / alpha[:, None]), np.nan)
        return n_eff / moe["n"][None, :]

    ratios = ratios_of(np.array([dense.E]), np.array([dense.A]), np.array([dense.alpha]))[0]
    usable = np.isfinite(ratios)
    if not usable.any():
        raise UserError("MoE multiplier: every MoE loss is below the dense law's floor E")
    estimate = float(np.exp(np.log(ratios[usable]).mean()))

    ci: dict[str, tuple[float, float]] = {}
    if bootstrap > 0 and dense.converged:
        points, _ = clean_points("dense L(N)", 1, n=dense_params, loss=dense_loss)
        log_x, log_loss = np.log(points["n"])[:, None], np.log(points["loss"])
        optimum = np.array([np.log(dense.A), dense.alpha, np.log(dense.E)])
        params, ok = solver.bootstrap_refits(
            optimum, log_x, log_loss, delta=1e-3, num_replicates=bootstrap, seed=seed
        )
        named = to_named(params[ok])
        boot = ratios_of(named[:, 0], named[:, 1], named[:, 2])
        counts = bootstrap_counts(len(moe["n"]), len(boot), np.random.default_rng(seed + 1))
        log_ratio = np.where(np.isfinite(boot), np.log(boot), 0.0)
        used = counts * np.isfinite(boot)
        with np.errstate(invalid="ignore", divide="ignore"):
            geo = np.exp((used * log_ratio).sum(axis=1) / used.sum(axis=1))
        ci = {"multiplier": percentile_ci(geo)}

    return EffectiveMultiplier(
        multiplier=estimate,
        ci=ci,
        dense=dense,
        ratios=ratios[usable],
        num_below_floor=int((~usable).sum()),
        converged=dense.converged,
    )


def fit_clark(
    active_params: np.ndarray,
    num_experts: np.ndarray,
    loss: np.ndarray,
    *,
    bootstrap: int = 0,
    seed: int = 0,
) -> ClarkFit:
    """Fit Clark et al.'s bilinear law; dense runs enter with ``num_experts`` 1.

    Needs at least two model sizes, two expert counts and five runs.
    """
    points, _ = clean_points("Clark MoE law", 5, n=active_params, x=num_experts, loss=loss)
    if len(np.unique(points["n"])) < 2 or len(np.unique(points["x"])) < 2:
        raise UserError(
            "Clark MoE law: the grid must vary both the model size and the number of experts"
        )
    log_n, log_x = np.log(points["n"]), np.log(points["x"])
    design = np.stack([log_n, log_x, log_n * log_x, np.ones_like(log_n)], axis=1)
    log_loss = np.log(points["loss"])
    coef, _, rank, _ = np.linalg.lstsq(design, log_loss, rcond=None)

    ci: dict[str, tuple[float, float]] = {}
    if bootstrap > 0 and rank == 4:
        counts = bootstrap_counts(len(log_loss), bootstrap, np.random.default_rng(seed))
        normal = np.einsum("ri,ij,ik->rjk", counts, design, design)
        rhs = np.einsum("ri,ij,i->rj", counts, design, log_loss)
        well_posed = np.linalg.matrix_rank(normal) == 4
        samples = np.linalg.solve(normal[well_posed], rhs[well_posed][:, :, None])[:, :, 0]
        ci = {name: percentile_ci(samples[:, i]) for i, name in enumerate(CLARK_NAMES)}

    return ClarkFit(
        a=float(coef[0]),
        b=float(coef[1]),
        c=float(coef[2]),
        d=float(coef[3]),
        ci=ci,
        num_points=len(log_loss),
        residuals=design @ coef - log_loss,
        converged=bool(rank == 4),
    )


def effective_multiplier_joint(
    dense: ChinchillaFit,
    moe_active_params: np.ndarray,
    moe_tokens: np.ndarray,
    moe_loss: np.ndarray,
    *,
    seed: int = 0,
) -> EffectiveMultiplier:
    """The multiplier against a dense L(N, D) fit, each MoE run at its own token count.

    The interval combines the dense fit's bootstrap samples (if any) with a resample of
    the MoE runs, one per dense replicate.
    """
    moe, _ = clean_points("MoE multiplier", 1, n=moe_active_params, d=moe_tokens, loss=moe_loss)

    def ratios_of(law: np.ndarray) -> np.ndarray:
        e, a, b, alpha, beta = (law[:, k, None] for k in range(5))
        excess = moe["loss"][None, :] - e - b * moe["d"][None, :] ** -beta
        with np.errstate(invalid="ignore", divide="ignore"):
            n_eff = np.where(excess > 0, (a / excess) ** (1 / alpha), np.nan)
        return n_eff / moe["n"][None, :]

    point = np.array([[dense.E, dense.A, dense.B, dense.alpha, dense.beta]])
    ratios = ratios_of(point)[0]
    usable = np.isfinite(ratios)
    if not usable.any():
        raise UserError("MoE multiplier: every MoE loss is below the dense law at its D")

    ci: dict[str, tuple[float, float]] = {}
    if len(dense.bootstrap_samples):
        boot = ratios_of(dense.bootstrap_samples)
        rng = np.random.default_rng(seed)
        counts = bootstrap_counts(len(moe["n"]), len(boot), rng) * np.isfinite(boot)
        log_ratio = np.where(np.isfinite(boot), np.log(boot), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            geo = np.exp((counts * log_ratio).sum(axis=1) / counts.sum(axis=1))
        ci = {"multiplier": percentile_ci(geo)}

    return EffectiveMultiplier(
        multiplier=float(np.exp(np.log(ratios[usable]).mean())),
        ci=ci,
        ratios=ratios[usable],
        num_below_floor=int((~usable).sum()),
        converged=dense.converged,
    )
