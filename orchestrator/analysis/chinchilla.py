"""Chinchilla approach 3: the joint law L(N, D) = E + A / N^alpha + B / D^beta.

The fit follows Hoffmann et al. (2022) as replicated by Besiroglu et al. (2024): in log
space, log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b),
E = exp(e), minimising the summed Huber loss (delta 1e-3) of the log residuals from a grid
of 4500 starts. The solver runs all starts as one batch (see ``_lse_solver``), and the
bootstrap refits all replicates as one batch too, each a multinomial reweighting of the
points started from the full-data optimum and one perturbation of it.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.analysis import _lse_solver as solver
from orchestrator.analysis._common import clean_points, logger, percentile_ci

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")
MIN_POINTS = 6
"""Five parameters need at least one point more to leave a residual."""

EXPONENT_STARTS = np.arange(0.0, 2.01, 0.5)
SCALE_STARTS = np.arange(0.0, 25.1, 5.0)
IRREDUCIBLE_STARTS = np.arange(-1.0, 1.01, 0.5)


@dataclass(frozen=True, eq=False)
class ChinchillaFit:
    """A fitted L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    """Irreducible loss, in the units of the loss (nats per token for an LM)."""
    A: float
    """Scale of the parameter term."""
    B: float
    """Scale of the data term."""
    alpha: float
    """Exponent of the parameter count N."""
    beta: float
    """Exponent of the training tokens D."""
    ci: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """95% percentile bootstrap interval per name in PARAM_NAMES; empty without bootstrap."""
    huber_loss: float = float("nan")
    """Summed Huber loss of the log residuals at the optimum."""
    huber_delta: float = 1e-3
    """Huber threshold on log residuals."""
    converged: bool = False
    """Whether the solver met its stopping rule; an unconverged fit is no result."""
    num_points: int = 0
    """Points fitted, after exclusions."""
    num_excluded: int = 0
    """Rows dropped for a NaN, infinite or non-positive N, D or loss."""
    num_starts: int = 0
    """Starts in the grid."""
    num_at_best: int = 0
    """Finalist starts that ended at the optimum; 1 means a lonely, fragile optimum."""
    residuals: np.ndarray = field(default_factory=lambda: np.empty(0))
    """log L_fit - log L per fitted point, in the order of the kept inputs."""
    bootstrap_samples: np.ndarray = field(default_factory=lambda: np.empty((0, 5)))
    """(replicates, 5) columns E, A, B, alpha, beta of the converged bootstrap refits."""
    num_bootstrap_failed: int = 0
    """Bootstrap replicates that hit the iteration cap; excluded from the intervals."""

    def predict(self, num_params: np.ndarray, num_tokens: np.ndarray) -> np.ndarray:
        """Predicted loss at N = ``num_params`` parameters and D = ``num_tokens`` tokens."""
        n = np.asarray(num_params, dtype=np.float64)
        d = np.asarray(num_tokens, dtype=np.float64)
        return self.E + self.A * n**-self.alpha + self.B * d**-self.beta

    def as_dict(self) -> dict[str, float]:
        """The five parameters by name."""
        return {name: float(getattr(self, name)) for name in PARAM_NAMES}


def _to_named(params: np.ndarray) -> np.ndarray:
    """Solver rows (a, b, alpha, beta, e) to columns (E, A, B, alpha, beta)."""
    params = np.atleast_2d(params)
    return np.stack(
        [
            np.exp(params[:, 4]),
            np.exp(params[:, 0]),
            np.exp(params[:, 1]),
            params[:, 2],
            params[:, 3],
        ],
        axis=1,
    )


def load_chinchilla_runs(
    path: Path, num_dropped: int = 5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, loss) of the Hoffmann et al. runs as Besiroglu et al. extracted them.

    The ``num_dropped`` highest-loss runs are left out, as in their replication, and
    D = C / (6 N).
    """
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    n = np.array([float(r["Model Size"]) for r in rows])
    flops = np.array([float(r["Training FLOP"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    keep = np.argsort(loss)[: len(loss) - num_dropped]
    return n[keep], flops[keep] / (6 * n[keep]), loss[keep]


def chinchilla_starts() -> np.ndarray:
    """The 4500-start grid of Hoffmann et al.: a, b in 0..25, alpha, beta in 0..2, e in -1..1."""
    return solver.start_grid(2, EXPONENT_STARTS, SCALE_STARTS, IRREDUCIBLE_STARTS)


def fit_chinchilla(
    N: np.ndarray,  # noqa: N803 - the law's own symbols
    D: np.ndarray,  # noqa: N803
    loss: np.ndarray,
    *,
    huber_delta: float = 1e-3,
    bootstrap: int = 0,
    seed: int = 0,
) -> ChinchillaFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta to runs of N parameters and D tokens.

    Rows with a NaN, infinite or non-positive N, D or loss are excluded and counted in
    ``num_excluded``. With ``bootstrap`` > 0, that many resampled refits give ``ci``, the
    2.5 and 97.5 percentiles of each parameter. Raises UserError for fewer than 6 points.
    """
    points, num_excluded = clean_points("L(N, D) fit", MIN_POINTS, N=N, D=D, loss=loss)
    log_x = np.log(np.stack([points["N"], points["D"]], axis=1))
    log_loss = np.log(points["loss"])

    started = time.perf_counter()
    best = solver.multistart(chinchilla_starts(), log_x, log_loss, delta=huber_delta)
    residual, _ = solver.residuals_and_jacobian(
        best.params[None, :], log_x, log_loss, jacobian=False
    )
    named = _to_named(best.params)[0]
    logger.info(
        "L(N, D) fit: %d points, %d starts, %.2f s, converged=%s",
        len(log_loss),
        best.num_starts,
        time.perf_counter() - started,
        best.converged,
    )

    ci: dict[str, tuple[float, float]] = {}
    samples = np.empty((0, 5))
    num_failed = 0
    if bootstrap > 0 and best.converged:
        started = time.perf_counter()
        params, ok = solver.bootstrap_refits(
            best.params, log_x, log_loss, delta=huber_delta, num_replicates=bootstrap, seed=seed
        )
        samples = _to_named(params[ok])
        num_failed = int((~ok).sum())
        ci = {name: percentile_ci(samples[:, i]) for i, name in enumerate(PARAM_NAMES)}
        logger.info(
            "L(N, D) bootstrap: %d replicates (%d unconverged) in %.2f s",
            bootstrap,
            num_failed,
            time.perf_counter() - started,
        )

    return ChinchillaFit(
        E=float(named[0]),
        A=float(named[1]),
        B=float(named[2]),
        alpha=float(named[3]),
        beta=float(named[4]),
        ci=ci,
        huber_loss=best.objective,
        huber_delta=huber_delta,
        converged=best.converged,
        num_points=len(log_loss),
        num_excluded=num_excluded,
        num_starts=best.num_starts,
        num_at_best=best.num_at_best,
        residuals=residual[0],
        bootstrap_samples=samples,
        num_bootstrap_failed=num_failed,
    )
