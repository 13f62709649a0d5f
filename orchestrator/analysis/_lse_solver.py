"""A batched robust solver for saturating power laws written as a log-sum-exp.

Every law fitted here has the form

    log L = LSE(c_1 - s_1 z_1, ..., c_m - s_m z_m, e)

with z_k = log X_k a log resource (parameters, tokens, FLOPs), s_k its exponent and
exp(c_k), exp(e) the scale and the irreducible loss. The loss is a Huber loss on the log
residuals, weighted per point (bootstrap replicates are integer point counts).

Why a solver of our own: the usual recipe runs scipy's L-BFGS-B once per start of a grid of
thousands of starts, and that Python loop dominates the cost. Here every start (and every
bootstrap replicate) is one row of a batch, and all rows take Levenberg-Marquardt steps on
the iteratively reweighted least-squares model of the Huber loss at once, with analytic
Jacobians, in numpy. A step is kept only when it lowers the exact Huber objective of its
row, so each row decreases monotonically. The best few rows are then polished with scipy's
L-BFGS-B on the exact objective with its analytic gradient.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import scipy.optimize

from orchestrator.analysis._common import bootstrap_counts

_CHUNK_ROWS = 2048
"""Rows solved together; bounds the working set to a few hundred MB at 250 points."""


@dataclass(frozen=True)
class BatchResult:
    """The outcome of a batched solve, one row per start."""

    params: np.ndarray
    """(rows, 2m+1): c_1..c_m, s_1..s_m, e per row."""
    objective: np.ndarray
    """(rows,): the weighted Huber loss at ``params``."""
    converged: np.ndarray
    """(rows,): True where the stopping rule was met before the iteration cap."""


def start_grid(
    num_resources: int,
    exponents: np.ndarray,
    scales: np.ndarray,
    irreducible: np.ndarray,
) -> np.ndarray:
    """The Cartesian grid of starts: one scale and exponent per resource, one e."""
    axes = [scales] * num_resources + [exponents] * num_resources + [irreducible]
    return np.array(list(itertools.product(*axes)), dtype=np.float64)


def residuals_and_jacobian(
    params: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, *, jacobian: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Log residuals (rows, n) and their Jacobian (2m+1, rows, n) for a batch of params.

    Arrays are laid out term-major, (term, rows, n), so that the log-sum-exp over the few
    terms is elementwise work on large contiguous blocks rather than a reduction over a
    short trailing axis, which numpy does slowly.
    """
    num_resources = log_x.shape[1]
    terms = [
        params[:, k, None] - params[:, num_resources + k, None] * log_x[None, :, k]
        for k in range(num_resources)
    ]
    terms.append(np.broadcast_to(params[:, 2 * num_resources, None], terms[0].shape))
    top = terms[0].copy()
    for term in terms[1:]:
        np.maximum(top, term, out=top)
    shares = [np.exp(term - top) for term in terms]
    total = shares[0].copy()
    for share in shares[1:]:
        total += share
    residual = top + np.log(total) - log_loss[None, :]
    if not jacobian:
        return residual, None

    # d log_pred / d term_k is the softmax share of term k.
    jac = np.empty((2 * num_resources + 1, *residual.shape))
    for k in range(num_resources + 1):
        np.divide(shares[k], total, out=jac[k if k < num_resources else -1])
    for k in range(num_resources):
        np.multiply(jac[k], -log_x[None, :, k], out=jac[num_resources + k])
    return residual, jac


def huber(residual: np.ndarray, delta: float) -> np.ndarray:
    """Elementwise Huber loss: quadratic inside +-delta, linear outside."""
    size = np.abs(residual)
    return np.where(size <= delta, 0.5 * residual**2, delta * (size - 0.5 * delta))


def _solve_chunk(
    params: np.ndarray,
    log_x: np.ndarray,
    log_loss: np.ndarray,
    weights: np.ndarray,
    delta: float,
    max_iter: int,
    ftol: float,
) -> BatchResult:
    params = params.copy()
    rows, num_params = params.shape
    damping = np.full(rows, 1e-3)
    active = np.ones(rows, dtype=bool)
    converged = np.zeros(rows, dtype=bool)
    residual, _ = residuals_and_jacobian(params, log_x, log_loss, jacobian=False)
    objective = (weights * huber(residual, delta)).sum(axis=1)
    eye = np.eye(num_params)

    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        theta, w = params[idx], weights[idx]
        residual, jac = residuals_and_jacobian(theta, log_x, log_loss)
        assert jac is not None

        # IRLS weights turn the Huber loss into a weighted least-squares model.
        size = np.abs(residual)
        irls = w * np.where(size <= delta, 1.0, delta / np.maximum(size, delta))
        grad = np.einsum("rn,prn->rp", irls * residual, jac)
        jac_rows = jac.transpose(1, 0, 2)
        hess = np.matmul(jac_rows * irls[:, None, :], jac_rows.transpose(0, 2, 1))
        diag = np.diagonal(hess, axis1=1, axis2=2)
        lam = damping[idx, None, None]
        system = hess + lam * (diag[:, :, None] * eye + 1e-12 * eye)
        try:
            step = -np.linalg.solve(system, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            # A singular row (a term that vanished to zero everywhere) fails the batch.
            step = -np.matmul(np.linalg.pinv(system), grad[:, :, None])[:, :, 0]
        step = np.where(np.isfinite(step), step, 0.0)

        trial = theta + step
        trial_res, _ = residuals_and_jacobian(trial, log_x, log_loss, jacobian=False)
        trial_obj = (w * huber(trial_res, delta)).sum(axis=1)
        trial_obj = np.where(np.isfinite(trial_obj), trial_obj, np.inf)

        better = trial_obj < objective[idx]
        decrease = objective[idx] - trial_obj
        params[idx[better]] = trial[better]
        objective[idx[better]] = trial_obj[better]
        damping[idx] = np.where(better, np.maximum(damping[idx] * 0.3, 1e-12), damping[idx] * 8)

        small_step = better & (decrease <= ftol * np.maximum(objective[idx], 1e-300))
        stuck = ~better & (damping[idx] > 1e8)
        done = small_step | stuck
        converged[idx[done]] = True
        active[idx[done]] = False

    return BatchResult(params=params, objective=objective, converged=converged)


def solve_batch(
    starts: np.ndarray,
    log_x: np.ndarray,
    log_loss: np.ndarray,
    *,
    delta: float,
    weights: np.ndarray | None = None,
    max_iter: int = 400,
    ftol: float = 1e-12,
) -> BatchResult:
    """Minimise the weighted Huber loss from every row of ``starts`` at once.

    ``weights`` is (n,) for one data set or (rows, n) for one weighting per row (a
    bootstrap replicate per row).
    """
    starts = np.asarray(starts, dtype=np.float64)
    num_points = log_loss.shape[0]
    if weights is None:
        weights = np.ones(num_points)
    weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), (len(starts), num_points))

    parts = [
        _solve_chunk(
            starts[lo : lo + _CHUNK_ROWS],
            log_x,
            log_loss,
            weights[lo : lo + _CHUNK_ROWS],
            delta,
            max_iter,
            ftol,
        )
        for lo in range(0, len(starts), _CHUNK_ROWS)
    ]
    return BatchResult(
        params=np.concatenate([p.params for p in parts]),
        objective=np.concatenate([p.objective for p in parts]),
        converged=np.concatenate([p.converged for p in parts]),
    )


def objective_and_gradient(
    params: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """The exact Huber objective of one parameter vector and its analytic gradient."""
    residual, jac = residuals_and_jacobian(params[None, :], log_x, log_loss)
    assert jac is not None
    value = float(huber(residual, delta).sum())
    grad = jac[:, 0, :] @ np.clip(residual[0], -delta, delta)
    return value, grad


def polish(
    params: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray, delta: float
) -> tuple[np.ndarray, float]:
    """Refine one row with scipy's L-BFGS-B; keep the input if scipy makes it worse.

    scipy often stops with a line-search warning on the kinks of the Huber loss; that is
    expected here and not a failure, because the batched stage already met its own rule.
    """
    start_value, _ = objective_and_gradient(params, log_x, log_loss, delta)
    result = scipy.optimize.minimize(
        objective_and_gradient,
        params,
        args=(log_x, log_loss, delta),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
    )
    if np.all(np.isfinite(result.x)) and result.fun < start_value:
        return result.x, float(result.fun)
    return params, start_value


@dataclass(frozen=True)
class MultiStartResult:
    """The best point found from a grid of starts."""

    params: np.ndarray
    """(2m+1,): c_1..c_m, s_1..s_m, e of the best row after polishing."""
    objective: float
    """The Huber loss at ``params``."""
    converged: bool
    """Whether the best row met the batched stopping rule (not the iteration cap)."""
    num_starts: int
    """Rows in the start grid."""
    num_at_best: int
    """Finalists that ended within 1e-6 (relative) of the best objective."""


def multistart(
    starts: np.ndarray,
    log_x: np.ndarray,
    log_loss: np.ndarray,
    *,
    delta: float,
    screen_iter: int = 6,
    num_finalists: int = 16,
    num_polished: int = 3,
) -> MultiStartResult:
    """Screen every start for a few batched steps, finish the best, polish the top few.

    Screening keeps the ``num_finalists`` rows with the lowest loss after ``screen_iter``
    steps. NOTE: a start that descends slowly but would end in a lower basin than every
    finalist is dropped; with thousands of starts that share a handful of basins this has
    not happened on the data sets we tried, and `num_at_best` reports how many finalists
    agree on the optimum so that a lonely optimum is visible.
    """
    screened = solve_batch(starts, log_x, log_loss, delta=delta, max_iter=screen_iter)
    order = np.argsort(np.where(np.isfinite(screened.objective), screened.objective, np.inf))
    finalists = screened.params[order[:num_finalists]]
    final = solve_batch(finalists, log_x, log_loss, delta=delta)

    ranked = np.argsort(final.objective)
    best_params, best_value = final.params[ranked[0]], float(final.objective[ranked[0]])
    for row in ranked[:num_polished]:
        params, value = polish(final.params[row], log_x, log_loss, delta)
        if value < best_value:
            best_params, best_value = params, value

    near = final.objective <= best_value * (1 + 1e-6) + 1e-300
    return MultiStartResult(
        params=best_params,
        objective=best_value,
        converged=bool(final.converged[ranked[0]]) and bool(np.all(np.isfinite(best_params))),
        num_starts=len(starts),
        num_at_best=int(near.sum()),
    )


def bootstrap_refits(
    optimum: np.ndarray,
    log_x: np.ndarray,
    log_loss: np.ndarray,
    *,
    delta: float,
    num_replicates: int,
    seed: int,
    num_perturbed: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Refit every bootstrap replicate in one batch; returns (params, converged) per replicate.

    A replicate reweights the points by multinomial counts. It starts from the full-data
    optimum and ``num_perturbed`` random perturbations of it, and keeps its best row: a
    start from the optimum alone misses, in about one replicate in twenty, a lower basin
    that the resample opened.
    """
    rng = np.random.default_rng(seed)
    num_resources = log_x.shape[1]
    counts = bootstrap_counts(len(log_loss), num_replicates, rng)
    num_rows = 1 + num_perturbed
    starts = np.repeat(optimum[None, :], num_replicates * num_rows, axis=0)
    noise_scale = np.array([0.5] * num_resources + [0.03] * num_resources + [0.05])
    noise = rng.normal(size=(num_replicates, num_perturbed, len(optimum))) * noise_scale
    starts.reshape(num_replicates, num_rows, -1)[:, 1:, :] += noise

    batch = solve_batch(
        starts,
        log_x,
        log_loss,
        delta=delta,
        weights=np.repeat(counts, num_rows, axis=0),
        max_iter=200,
        ftol=1e-10,
    )
    objective = batch.objective.reshape(num_replicates, num_rows)
    rows = np.arange(num_replicates) * num_rows + np.argmin(objective, axis=1)
    converged = batch.converged.reshape(num_replicates, num_rows).any(axis=1)
    return batch.params[rows], converged & np.all(np.isfinite(batch.params[rows]), axis=1)
