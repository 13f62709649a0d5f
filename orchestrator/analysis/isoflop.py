"""Compute-optimal allocation: N_opt ~ C^a and D_opt ~ C^b by Chinchilla approaches 1-3.

- approach 1: the lower envelope of all training curves over FLOPs gives, per FLOP bin,
  the run (N) and step (D) that reached the lowest loss;
- approach 2: a parabola in log N (and one in log D) per isoFLOP profile gives its minimum;
- approach 3: the minimiser of the fitted L(N, D) under C = 6 N D, in closed form.

Each gives a, b by least squares of log N_opt and log D_opt on log C, the tokens per
parameter D_opt / N_opt at the largest budget, and bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from orchestrator.analysis._common import bootstrap_counts, logger, percentile_ci
from orchestrator.analysis.chinchilla import ChinchillaFit
from orchestrator.errors import UserError

MIN_PROFILES = 2
"""A slope needs two budgets; three or more leave a residual."""
MIN_PROFILE_POINTS = 3
"""A parabola needs three distinct model sizes."""


@dataclass(frozen=True, eq=False)
class Allocation:
    """Compute-optimal N_opt = G_N C^a and D_opt = G_D C^b."""

    method: str
    """"approach 1", "approach 2" or "approach 3"."""
    a: float
    """Exponent of C in N_opt."""
    b: float
    """Exponent of C in D_opt."""
    tokens_per_param: float
    """D_opt / N_opt at ``reference_flops``."""
    reference_flops: float
    """The budget (FLOPs) at which ``tokens_per_param`` is read: the largest one studied."""
    log_n_intercept: float
    """log G_N, so that log N_opt = log G_N + a log C."""
    log_d_intercept: float
    """log G_D, so that log D_opt = log G_D + b log C."""
    ci: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    """95% bootstrap intervals of "a", "b" and "tokens_per_param"; empty without bootstrap."""
    flops: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Budgets (FLOPs) of the optima below (approaches 1 and 2)."""
    n_opt: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Loss-minimising parameters per budget."""
    d_opt: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Loss-minimising tokens per budget."""
    loss_opt: np.ndarray = field(default_factory=lambda: np.empty(0))
    """Loss at the optimum per budget (the parabola's minimum for approach 2)."""
    residuals: np.ndarray = field(default_factory=lambda: np.empty(0))
    """log N_opt - fitted log N_opt per budget."""
    converged: bool = True
    """False when the optima could not be located (e.g. a profile without a minimum)."""

    def n_opt_at(self, flops: np.ndarray) -> np.ndarray:
        return np.exp(self.log_n_intercept + self.a * np.log(flops))

    def d_opt_at(self, flops: np.ndarray) -> np.ndarray:
        return np.exp(self.log_d_intercept + self.b * np.log(flops))


def _slopes(log_c: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """Least-squares (a, intercept_n, b, intercept_d) along the last axis; batched."""
    centred = log_c - log_c.mean(axis=-1, keepdims=True)
    denom = (centred**2).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (centred * log_n).sum(axis=-1) / denom
        b = (centred * log_d).sum(axis=-1) / denom
    mean_c = log_c.mean(axis=-1)
    return np.stack(
        [a, log_n.mean(axis=-1) - a * mean_c, b, log_d.mean(axis=-1) - b * mean_c], axis=-1
    )


def _parabola_vertex(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Vertex (x_min, y_min) of weighted least-squares parabolas, one per row of weights.

    NaN where the fit is not convex or where fewer than three distinct x carry weight.
    """
    design = np.stack([x**2, x, np.ones_like(x)], axis=1)
    normal = np.einsum("ri,ij,ik->rjk", weights, design, design)
    rhs = np.einsum("ri,ij,i->rj", weights, design, y)
    distinct = np.array([len(np.unique(x[row > 0])) for row in weights])
    ok = distinct >= MIN_PROFILE_POINTS
    coef = np.full((len(weights), 3), np.nan)
    if ok.any():
        coef[ok] = np.linalg.solve(normal[ok], rhs[ok][:, :, None])[:, :, 0]
    curvature, slope, offset = coef[:, 0], coef[:, 1], coef[:, 2]
    convex = curvature > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        x_min = np.where(convex, -slope / (2 * curvature), np.nan)
    y_min = offset + slope * x_min + curvature * x_min**2
    return x_min, y_min


def fit_isoflop_profiles(
    flop_budget: np.ndarray,
    N: np.ndarray,  # noqa: N803 - the law's own symbols
    D: np.ndarray,  # noqa: N803
    loss: np.ndarray,
    *,
    bootstrap: int = 0,
    seed: int = 0,
) -> Allocation:
    """Approach 2: a parabola of loss in log N (and in log D) per budget, then the slopes.

    KNOWN BIAS: at a fixed budget the profile E + A N^-alpha + B (C/6N)^-beta is not
    symmetric in log N unless alpha = beta, so a parabola's vertex sits off the true
    minimum, to the flatter side, by an amount that grows with the width of the sampled
    window and with how far the window's centre is from the optimum. When the window moves
    relative to the optimum from budget to budget (the usual case for a grid planned
    before the optimum was known), that offset changes with C and biases a and b; Besiroglu
    et al. (2024) report this as one reason approach 2 disagrees with approach 3. Nothing
    here corrects it; compare with the approach-3 allocation and look at the profiles.

    Budgets with fewer than three distinct N, or whose parabola opens downward, are
    skipped and logged. Bootstrap resamples points within each profile.
    """
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in (flop_budget, N, D, loss)]
    keep = np.logical_and.reduce([np.isfinite(v) & (v > 0) for v in arrays])
    budget, n, d, loss_ = (v[keep] for v in arrays)
    budgets = np.unique(budget)

    rows = []
    for c in budgets:
        mask = budget == c
        ones = np.ones((1, mask.sum()))
        log_n_min, loss_min = _parabola_vertex(np.log(n[mask]), loss_[mask], ones)
        log_d_min, _ = _parabola_vertex(np.log(d[mask]), loss_[mask], ones)
        if np.isfinite(log_n_min[0]) and np.isfinite(log_d_min[0]):
            rows.append((c, log_n_min[0], log_d_min[0], loss_min[0]))
        else:
            logger.warning(
                "isoFLOP profile at C=%.3g: no minimum (fewer than %d sizes or not convex);"
                " skipped",
                c,
                MIN_PROFILE_POINTS,
            )
    if len(rows) < MIN_PROFILES:
        raise UserError(
            f"isoFLOP fit: too few profiles with a minimum ({len(rows)} of {len(budgets)}"
            f" budgets, at least {MIN_PROFILES} needed); add sizes around each optimum"
        )
    c_opt, log_n_opt, log_d_opt, loss_opt = (np.array(v) for v in zip(*rows, strict=True))
    log_c = np.log(c_opt)
    a, n0, b, d0 = _slopes(log_c, log_n_opt, log_d_opt)

    ci: dict[str, tuple[float, float]] = {}
    if bootstrap > 0:
        ci = _profile_bootstrap(c_opt, budget, n, d, loss_, bootstrap, seed)

    largest = int(np.argmax(c_opt))
    return Allocation(
        method="approach 2",
        a=float(a),
        b=float(b),
        tokens_per_param=float(np.exp(log_d_opt[largest] - log_n_opt[largest])),
        reference_flops=float(c_opt[largest]),
        log_n_intercept=float(n0),
        log_d_intercept=float(d0),
        ci=ci,
        flops=c_opt,
        n_opt=np.exp(log_n_opt),
        d_opt=np.exp(log_d_opt),
        loss_opt=loss_opt,
        residuals=log_n_opt - (n0 + a * log_c),
    )


def _profile_bootstrap(
    c_opt: np.ndarray,
    budget: np.ndarray,
    n: np.ndarray,
    d: np.ndarray,
    loss: np.ndarray,
    num_replicates: int,
    seed: int,
) -> dict[str, tuple[float, float]]:
    """Resample each profile's points; refit all parabolas and slopes per replicate."""
    rng = np.random.default_rng(seed)
    log_n_opt, log_d_opt = [], []
    for c in c_opt:
        mask = budget == c
        counts = bootstrap_counts(int(mask.sum()), num_replicates, rng)
        log_n_opt.append(_parabola_vertex(np.log(n[mask]), loss[mask], counts)[0])
        log_d_opt.append(_parabola_vertex(np.log(d[mask]), loss[mask], counts)[0])
    log_n, log_d = np.stack(log_n_opt, axis=1), np.stack(log_d_opt, axis=1)
    ok = np.all(np.isfinite(log_n) & np.isfinite(log_d), axis=1)
    slopes = _slopes(np.log(c_opt)[None, :], log_n[ok], log_d[ok])
    largest = int(np.argmax(c_opt))
    ratio = np.exp(log_d[ok, largest] - log_n[ok, largest])
    if (~ok).any():
        logger.info("isoFLOP bootstrap: %d replicates without a minimum dropped", (~ok).sum())
    return {
        "a": percentile_ci(slopes[:, 0]),
        "b": percentile_ci(slopes[:, 2]),
        "tokens_per_param": percentile_ci(ratio),
    }


def _envelope(
    log_c: np.ndarray,
    loss: np.ndarray,
    trial: np.ndarray,
    edges: np.ndarray,
    trial_weight: np.ndarray,
) -> np.ndarray:
    """Index of the lowest-loss point per FLOP bin among trials of positive weight; -1 if
    fewer than two trials reach the bin."""
    bins = np.digitize(log_c, edges) - 1
    alive = trial_weight[trial] > 0
    best = np.full(len(edges) - 1, -1)
    for k in range(len(edges) - 1):
        members = np.flatnonzero((bins == k) & alive)
        if len(np.unique(trial[members])) >= 2:
            best[k] = members[np.argmin(loss[members])]
    return best


def fit_envelope(
    flops: np.ndarray,
    N: np.ndarray,  # noqa: N803 - the law's own symbols
    D: np.ndarray,  # noqa: N803
    loss: np.ndarray,
    trial: np.ndarray,
    *,
    num_bins: int = 20,
    bootstrap: int = 0,
    seed: int = 0,
) -> Allocation:
    """Approach 1: per log-spaced FLOP bin, the curve point of lowest loss gives N_opt, D_opt.

    Inputs are the points of all training curves: FLOPs and tokens so far, the run's N,
    the loss, and the run's id (any hashable) in ``trial``. A bin counts only when at least
    two runs reach it.

    NOTE: Hoffmann et al. ran a cosine schedule matched to each run's length, so that an
    intermediate step was close to a finished shorter run. Our curves come from one
    schedule per run, so an intermediate point is a run cut mid-schedule and its loss is
    too high; that favours the runs whose full length ends near the bin, and the envelope
    is only approximate until the workloads train one schedule per horizon.
    """
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in (flops, N, D, loss)]
    keep = np.logical_and.reduce([np.isfinite(v) & (v > 0) for v in arrays])
    flops_, n, d, loss_ = (v[keep] for v in arrays)
    _, trial_idx = np.unique(np.asarray(trial)[keep], return_inverse=True)
    num_trials = int(trial_idx.max()) + 1 if len(trial_idx) else 0
    if num_trials < 2:
        raise UserError("envelope fit: curves of at least 2 runs are needed")

    log_c = np.log(flops_)
    edges = np.linspace(log_c.min(), log_c.max() + 1e-9, num_bins + 1)
    best = _envelope(log_c, loss_, trial_idx, edges, np.ones(num_trials))
    best = best[best >= 0]
    if len(np.unique(n[best])) < 2 or len(best) < 3:
        raise UserError(
            "envelope fit: the lower envelope touches fewer than 2 model sizes or 3 FLOP bins;"
            " train sizes whose curves cross"
        )
    a, n0, b, d0 = _slopes(log_c[best], np.log(n[best]), np.log(d[best]))

    ci: dict[str, tuple[float, float]] = {}
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        counts = bootstrap_counts(num_trials, bootstrap, rng)
        samples = []
        for weight in counts:
            picked = _envelope(log_c, loss_, trial_idx, edges, weight)
            picked = picked[picked >= 0]
            if len(picked) >= 3 and len(np.unique(n[picked])) >= 2:
                slope = _slopes(log_c[picked], np.log(n[picked]), np.log(d[picked]))
                top = picked[np.argmax(log_c[picked])]
                samples.append((slope[0], slope[2], d[top] / n[top]))
        if samples:
            arr = np.array(samples)
            ci = {
                k: percentile_ci(arr[:, i]) for i, k in enumerate(("a", "b", "tokens_per_param"))
            }

    top = best[np.argmax(log_c[best])]
    return Allocation(
        method="approach 1",
        a=float(a),
        b=float(b),
        tokens_per_param=float(d[top] / n[top]),
        reference_flops=float(flops_[top]),
        log_n_intercept=float(n0),
        log_d_intercept=float(d0),
        ci=ci,
        flops=flops_[best],
        n_opt=n[best],
        d_opt=d[best],
        loss_opt=loss_[best],
        residuals=np.log(n[best]) - (n0 + a * log_c[best]),
    )


def allocation_from_chinchilla(fit: ChinchillaFit, reference_flops: float) -> Allocation:
    """Approach 3: minimise E + A/N^alpha + B/D^beta subject to C = 6 N D.

    N_opt = G (C/6)^(beta/(alpha+beta)) with G = (alpha A / (beta B))^(1/(alpha+beta)),
    D_opt = (C/6) / N_opt. Intervals come from the fit's bootstrap samples.
    """

    def solve(e_a_b_alpha_beta: np.ndarray) -> np.ndarray:
        _, big_a, big_b, alpha, beta = e_a_b_alpha_beta.T
        total = alpha + beta
        a, b = beta / total, alpha / total
        with np.errstate(divide="ignore", invalid="ignore"):
            log_g = (np.log(alpha * big_a) - np.log(beta * big_b)) / total
        log_n = log_g + a * (np.log(reference_flops) - np.log(6.0))
        log_d = np.log(reference_flops / 6.0) - log_n
        return np.stack([a, b, np.exp(log_d - log_n), log_g - a * np.log(6.0)], axis=-1)

    point = solve(np.array([[fit.E, fit.A, fit.B, fit.alpha, fit.beta]]))[0]
    ci: dict[str, tuple[float, float]] = {}
    if len(fit.bootstrap_samples):
        samples = solve(fit.bootstrap_samples)
        ci = {
            k: percentile_ci(samples[:, i]) for i, k in enumerate(("a", "b", "tokens_per_param"))
        }
    log_n0 = point[3]
    return Allocation(
        method="approach 3",
        a=float(point[0]),
        b=float(point[1]),
        tokens_per_param=float(point[2]),
        reference_flops=float(reference_flops),
        log_n_intercept=float(log_n0),
        log_d_intercept=float(-np.log(6.0) - log_n0),
        ci=ci,
        converged=fit.converged,
    )
