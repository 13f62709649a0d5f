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

_CHUNK_ROWS = 256
"""Rows solved together. Every step is a few dozen elementwise passes over (rows, n) arrays;
at 256 rows and 240 points they stay near the 2 MiB L2 cache, where 2048 rows spilled to
memory and ran 1.5-2x slower on a 2-core EPYC. Retune for much larger data sets."""


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
    """Elementwise Huber loss: quadratic inside +-delta, linear outside.

    Written as c (r - c/2) with c the residual clipped to +-delta: two passes fewer than a
    ``where`` over both branches, and bit for bit the same values (r - r/2 is exact).
    """
    clipped = np.maximum(residual, -delta)
    np.minimum(clipped, delta, out=clipped)
    loss = np.multiply(clipped, -0.5)
    loss += residual
    loss *= clipped
    return loss


def _weighted_huber_sum(
    residual: np.ndarray, weights: np.ndarray | None, delta: float
) -> np.ndarray:
    """Per-row sum of the Huber loss, weighted per point; None means unit weights."""
    loss = huber(residual, delta)
    if weights is not None:
        loss *= weights
    return loss.sum(axis=1)


_SAFE_EXPONENT = 500.0
"""Terms within +-this are exponentiated directly: no overflow, and the sum stays normal."""


def _evaluate_direct(
    params: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``_evaluate`` without the max shift, for rows whose terms are all of moderate size.

    It spends two exp passes instead of three (the irreducible term is one exp per row) and
    skips the max and the shifts; it agrees with the shifted form to rounding.
    """
    m = log_x.shape[1]
    shares = np.empty((m + 1, params.shape[0], log_x.shape[0]))
    for k in range(m):
        np.multiply(params[:, m + k, None], log_x[None, :, k], out=shares[k])
        np.subtract(params[:, k, None], shares[k], out=shares[k])
    np.exp(shares[:m], out=shares[:m])
    irreducible = np.exp(params[:, 2 * m, None])
    total = np.add(shares[0], irreducible)
    for k in range(1, m):
        total += shares[k]
    residual = np.log(total)
    residual -= log_loss
    np.divide(shares[:m], total, out=shares[:m])
    np.divide(irreducible, total, out=shares[m])
    return residual, shares


def _evaluate(
    params: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Log residuals (rows, n) and the softmax shares (m+1, rows, n) of the terms.

    The shares are all the Jacobian needs, so the solver keeps them with an accepted step
    instead of evaluating the same point again for the next Jacobian. Rows whose terms are
    bounded take the direct form; the rest the max-shifted log-sum-exp.
    """
    m = log_x.shape[1]
    bound = np.abs(params[:, 2 * m])
    for k in range(m):
        size = np.abs(params[:, k]) + np.abs(params[:, m + k]) * np.abs(log_x[:, k]).max()
        np.maximum(bound, size, out=bound)
    safe = bound < _SAFE_EXPONENT
    if safe.all():
        return _evaluate_direct(params, log_x, log_loss)
    if not safe.any():
        return _evaluate_shifted(params, log_x, log_loss)
    residual = np.empty((params.shape[0], log_x.shape[0]))
    shares = np.empty((m + 1, *residual.shape))
    for rows, evaluate in ((safe, _evaluate_direct), (~safe, _evaluate_shifted)):
        residual[rows], shares[:, rows] = evaluate(params[rows], log_x, log_loss)
    return residual, shares


def _evaluate_shifted(
    params: np.ndarray, log_x: np.ndarray, log_loss: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Residuals and shares by the max-shifted log-sum-exp, safe for any finite terms.

    The arithmetic is that of ``residuals_and_jacobian`` operation for operation.
    """
    m = log_x.shape[1]
    shares = np.empty((m + 1, params.shape[0], log_x.shape[0]))
    for k in range(m):
        np.multiply(params[:, m + k, None], log_x[None, :, k], out=shares[k])
        np.subtract(params[:, k, None], shares[k], out=shares[k])
    # Each pass below writes its result where it is needed next, to save memory traffic.
    irreducible = params[:, 2 * m, None]
    top = np.maximum(shares[0], irreducible)
    for k in range(1, m):
        np.maximum(top, shares[k], out=top)
    np.subtract(shares[:m], top, out=shares[:m])
    np.subtract(irreducible, top, out=shares[m])
    np.exp(shares, out=shares)
    total = np.add(shares[0], shares[1]) if m else shares[0].copy()
    for k in range(2, m + 1):
        total += shares[k]
    residual = np.log(total)
    residual += top
    residual -= log_loss
    np.divide(shares, total, out=shares)
    return residual, shares


class _NormalEquations:
    """Gradient and Gauss-Newton matrix of the IRLS model from the softmax shares.

    Every Jacobian column is a share p_k times 1 or -z_k, with z_k a per-point log
    resource. So each entry of J^T W J is a weighted sum over points of p_i p_j times a
    monomial of degree <= 2 in the z's, and each gradient entry one of p_k r times 1 or z_k.
    Products that need the same monomials are stored next to each other and reduced by one
    plain matrix product, (products, n) @ (n, monomials), instead of one small product per
    row; only the monomials a product needs are multiplied (20 columns of 54 for m = 2).
    """

    def __init__(self, log_x: np.ndarray) -> None:
        m = log_x.shape[1]
        self.num_params = 2 * m + 1
        # Per term: (parameter index, sign, z index or None) of its Jacobian columns.
        term_params: list[list[tuple[int, float, int | None]]] = [
            [(k, 1.0, None), (m + k, -1.0, k)] for k in range(m)
        ]
        term_params.append([(2 * m, 1.0, None)])

        def monomial(*zs: int | None) -> tuple[int, ...]:
            return tuple(sorted(z for z in zs if z is not None))

        # products: (i, j) share pairs of the matrix, then (k, None) for the gradient.
        products: list[tuple[int, int | None]] = [
            (i, j) for i in range(m + 1) for j in range(i, m + 1)
        ] + [(k, None) for k in range(m + 1)]
        needs: dict[tuple[int, int | None], tuple[tuple[int, ...], ...]] = {}
        for i, j in products:
            pairs = itertools.product(term_params[i], term_params[j] if j is not None else [None])
            found = {monomial(a[2], None if b is None else b[2]) for a, b in pairs}
            needs[(i, j)] = tuple(sorted(found))

        # Group products by the monomials they need; each group is one matrix product.
        self.order: list[tuple[int, int | None]] = []
        self.groups: list[tuple[int, int, np.ndarray]] = []
        position: dict[tuple[tuple[int, int | None], tuple[int, ...]], int] = {}
        width = 0
        for mono_set in sorted(set(needs.values())):
            members = [prod for prod in products if needs[prod] == mono_set]
            features = np.stack(
                [np.prod(log_x[:, list(mono)], axis=1) for mono in mono_set], axis=1
            )
            lo = len(self.order)
            self.order += members
            self.groups.append((lo, len(self.order), features))
            for q, prod in enumerate(members):
                for c, mono in enumerate(mono_set):
                    position[(prod, mono)] = width + q * len(mono_set) + c
            width += len(members) * len(mono_set)

        # Where each entry of the flattened matrix and of the gradient is found, and its sign.
        size = self.num_params
        self.hess_src = np.zeros(size * size, dtype=np.intp)
        self.hess_sign = np.zeros(size * size)
        for i in range(m + 1):
            for j in range(i, m + 1):
                for a, sign_a, za in term_params[i]:
                    for b, sign_b, zb in term_params[j]:
                        src = position[((i, j), monomial(za, zb))]
                        for flat in (a * size + b, b * size + a):
                            self.hess_src[flat], self.hess_sign[flat] = src, sign_a * sign_b
        self.grad_src = np.zeros(size, dtype=np.intp)
        self.grad_sign = np.zeros(size)
        for k in range(m + 1):
            for a, sign_a, za in term_params[k]:
                self.grad_src[a] = position[((k, None), monomial(za))]
                self.grad_sign[a] = sign_a

    def __call__(
        self, shares: np.ndarray, residual: np.ndarray, irls: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, P) gradient and (rows, P, P) matrix of the weighted least-squares model."""
        _, rows, num_points = shares.shape
        weighted = shares * irls
        products = np.empty((len(self.order), rows, num_points))
        for p, (i, j) in enumerate(self.order):
            other = residual if j is None else shares[j]
            np.multiply(weighted[i], other, out=products[p])
        sums = np.concatenate(
            [
                (products[lo:hi].reshape(-1, num_points) @ features)
                .reshape(hi - lo, rows, -1)
                .transpose(1, 0, 2)
                .reshape(rows, -1)
                for lo, hi, features in self.groups
            ],
            axis=1,
        )
        hess = (sums[:, self.hess_src] * self.hess_sign).reshape(rows, *2 * (self.num_params,))
        return sums[:, self.grad_src] * self.grad_sign, hess


def _solve_chunk(
    params: np.ndarray,
    log_x: np.ndarray,
    log_loss: np.ndarray,
    weights: np.ndarray | None,
    delta: float,
    max_iter: int,
    ftol: float,
) -> BatchResult:
    """LM on every row of ``params``; ``weights`` (rows, n), or None for unit weights."""
    params = params.copy()
    rows, num_params = params.shape
    objective = np.empty(rows)
    converged = np.zeros(rows, dtype=bool)
    normal_equations = _NormalEquations(log_x)
    eye = np.eye(num_params)

    # The live state holds only the rows still iterating, compacted when rows finish.
    live = np.arange(rows)
    theta, w = params.copy(), weights
    damping = np.full(rows, 1e-3)
    residual, shares = _evaluate(theta, log_x, log_loss)
    current = _weighted_huber_sum(residual, w, delta)

    for _ in range(max_iter):
        if live.size == 0:
            break

        # IRLS weights turn the Huber loss into a weighted least-squares model.
        # delta / max(|r|, delta) is exactly 1 inside +-delta, so no branch is needed.
        irls = np.abs(residual)
        np.maximum(irls, delta, out=irls)
        np.divide(delta, irls, out=irls)
        if w is not None:
            irls *= w
        grad, hess = normal_equations(shares, residual, irls)
        diag = np.diagonal(hess, axis1=1, axis2=2)
        lam = damping[:, None, None]
        system = hess + lam * (diag[:, :, None] * eye + 1e-12 * eye)
        try:
            step = -np.linalg.solve(system, grad[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            # A singular row (a term that vanished to zero everywhere) fails the batch.
            step = -np.matmul(np.linalg.pinv(system), grad[:, :, None])[:, :, 0]
        step = np.where(np.isfinite(step), step, 0.0)

        trial = theta + step
        trial_res, trial_shares = _evaluate(trial, log_x, log_loss)
        trial_obj = _weighted_huber_sum(trial_res, w, delta)
        trial_obj = np.where(np.isfinite(trial_obj), trial_obj, np.inf)

        # An accepted step carries its residuals and shares into the next iteration.
        better = trial_obj < current
        decrease = current - trial_obj
        theta[better] = trial[better]
        current[better] = trial_obj[better]
        np.copyto(residual, trial_res, where=better[:, None])
        np.copyto(shares, trial_shares, where=better[:, None])
        damping = np.where(better, np.maximum(damping * 0.3, 1e-12), damping * 8)

        small_step = better & (decrease <= ftol * np.maximum(current, 1e-300))
        stuck = ~better & (damping > 1e8)
        done = small_step | stuck
        if done.any():
            finished = live[done]
            params[finished] = theta[done]
            objective[finished] = current[done]
            converged[finished] = True
            keep = ~done
            live, theta, damping = live[keep], theta[keep], damping[keep]
            w = None if w is None else w[keep]
            current, residual, shares = current[keep], residual[keep], shares[:, keep]

    params[live] = theta
    objective[live] = current
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
    if weights is not None:
        weights = np.broadcast_to(np.asarray(weights, dtype=np.float64), (len(starts), num_points))

    parts = [
        _solve_chunk(
            starts[lo : lo + _CHUNK_ROWS],
            log_x,
            log_loss,
            None if weights is None else weights[lo : lo + _CHUNK_ROWS],
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
