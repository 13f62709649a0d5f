"""One-resource laws: L(X) = E + A X^-alpha for X one of N (parameters), D (tokens), C (FLOPs).

Fitted like approach 3, in log space, log L = LSE(a - alpha log X, e), with a Huber loss on
the log residuals from a grid of starts, by the batched solver of ``_lse_solver``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from orchestrator.analysis import _lse_solver as solver
from orchestrator.analysis._common import clean_points, logger, percentile_ci

PARAM_NAMES = ("E", "A", "alpha")
MIN_POINTS = 4
"""Three parameters need at least one point more to leave a residual."""


@dataclass(frozen=True, eq=False)
class PowerLawFit:
    """A fitted L(X) = E + A X^-alpha."""

    resource: str
    """What X is: "N" (parameters), "D" (tokens) or "C" (FLOPs)."""
    E: float
    """Irreducible loss, in the units of the loss."""
    A: float
    """Scale of the reducible term."""
    alpha: float
    """Exponent of X."""
    ci: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """95% percentile bootstrap interval per name in PARAM_NAMES; empty without bootstrap."""
    converged: bool = False
    """Whether the solver met its stopping rule; an unconverged fit is no result."""
    num_points: int = 0
    """Points fitted, after exclusions."""
    num_excluded: int = 0
    """Rows dropped for a NaN, infinite or non-positive X or loss."""
    residuals: np.ndarray = field(default_factory=lambda: np.empty(0))
    """log L_fit - log L per fitted point."""
    bootstrap_samples: np.ndarray = field(default_factory=lambda: np.empty((0, 3)))
    """(replicates, 3) columns E, A, alpha of the converged bootstrap refits."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted loss at resource values ``x``."""
        return self.E + self.A * np.asarray(x, dtype=np.float64) ** -self.alpha

    def inverse(self, loss: np.ndarray) -> np.ndarray:
        """The resource at which the law reaches ``loss``; NaN at or below E."""
        excess = np.asarray(loss, dtype=np.float64) - self.E
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(excess > 0, (self.A / excess) ** (1.0 / self.alpha), np.nan)


def power_law_starts(log_loss_floor: float) -> np.ndarray:
    """Exponents 0..2, log scales 0..25 and irreducible logs at and below the lowest loss."""
    return solver.start_grid(
        1,
        exponents=np.arange(0.0, 2.01, 0.5),
        scales=np.arange(0.0, 25.1, 5.0),
        irreducible=log_loss_floor + np.array([-3.0, -1.5, -0.5, -0.1]),
    )


def to_named(params: np.ndarray) -> np.ndarray:
    """Solver rows (a, alpha, e) to columns (E, A, alpha)."""
    params = np.atleast_2d(params)
    return np.stack([np.exp(params[:, 2]), np.exp(params[:, 0]), params[:, 1]], axis=1)


def fit_power_law(
    x: np.ndarray,
    loss: np.ndarray,
    *,
    resource: str = "N",
    huber_delta: float = 1e-3,
    bootstrap: int = 0,
    seed: int = 0,
) -> PowerLawFit:
    """Fit L(X) = E + A X^-alpha; ``resource`` names X in messages and results.

    Non-finite or non-positive rows are excluded and counted. Raises UserError for fewer
    than 4 usable points.
    """
    points, num_excluded = clean_points(f"L({resource}) fit", MIN_POINTS, x=x, loss=loss)
    log_x = np.log(points["x"])[:, None]
    log_loss = np.log(points["loss"])

    best = solver.multistart(
        power_law_starts(float(log_loss.min())), log_x, log_loss, delta=huber_delta
    )
    residual, _ = solver.residuals_and_jacobian(
        best.params[None, :], log_x, log_loss, jacobian=False
    )
    named = to_named(best.params)[0]
    logger.info("L(%s) fit: %d points, converged=%s", resource, len(log_loss), best.converged)

    ci: dict[str, tuple[float, float]] = {}
    samples = np.empty((0, 3))
    if bootstrap > 0 and best.converged:
        params, ok = solver.bootstrap_refits(
            best.params, log_x, log_loss, delta=huber_delta, num_replicates=bootstrap, seed=seed
        )
        samples = to_named(params[ok])
        ci = {name: percentile_ci(samples[:, i]) for i, name in enumerate(PARAM_NAMES)}

    return PowerLawFit(
        resource=resource,
        E=float(named[0]),
        A=float(named[1]),
        alpha=float(named[2]),
        ci=ci,
        converged=best.converged,
        num_points=len(log_loss),
        num_excluded=num_excluded,
        residuals=residual[0],
        bootstrap_samples=samples,
    )
