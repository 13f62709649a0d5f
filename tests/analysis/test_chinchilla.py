"""Approach 3: recovery of known laws, the Besiroglu et al. replication, bad input."""

from pathlib import Path

import numpy as np
import pytest

from orchestrator.analysis import _lse_solver as solver
from orchestrator.analysis import fit_chinchilla
from orchestrator.analysis.chinchilla import load_chinchilla_runs
from orchestrator.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "../shared/data/chinchilla_svg_extracted.csv"

# Besiroglu et al. 2024, Table 1 of the data README.
REFERENCE = {"E": 1.817, "alpha": 0.3478, "beta": 0.3658}
REFERENCE_STD_ERR = {"E": 0.03, "alpha": 0.02, "beta": 0.02}


def synthetic_runs(seed: int, noise: float = 0.005) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    n = np.repeat(np.geomspace(1e7, 3e9, 8), 6)
    d = np.tile(np.geomspace(1e9, 3e11, 6), 8)
    loss = 1.7 + 400.0 * n**-0.34 + 1800.0 * d**-0.28
    return n, d, loss * np.exp(rng.normal(0.0, noise, size=loss.shape))


def load_chinchilla() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not DATA.exists():
        pytest.skip(f"reference data absent: {DATA}")
    return load_chinchilla_runs(DATA)


def test_recovers_known_law() -> None:
    n, d, loss = synthetic_runs(seed=1)
    fit = fit_chinchilla(n, d, loss, bootstrap=100, seed=3)

    assert fit.converged
    assert fit.alpha == pytest.approx(0.34, abs=0.03)
    assert fit.beta == pytest.approx(0.28, abs=0.03)
    assert abs(fit.E - 1.7) < 0.05
    assert fit.ci["alpha"][0] < fit.alpha < fit.ci["alpha"][1]
    assert np.abs(fit.residuals).max() < 0.05


def test_matches_besiroglu_replication() -> None:
    n, d, loss = load_chinchilla()
    fit = fit_chinchilla(n, d, loss, bootstrap=300, seed=0)

    assert fit.converged
    assert fit.alpha == pytest.approx(REFERENCE["alpha"], abs=0.005)
    assert fit.beta == pytest.approx(REFERENCE["beta"], abs=0.005)
    assert abs(fit.E - REFERENCE["E"]) < 0.02

    # A 95% interval of a normal estimate is about 3.9 standard errors wide.
    for name in ("E", "alpha", "beta"):
        low, high = fit.ci[name]
        expected = 2 * 1.96 * REFERENCE_STD_ERR[name]
        assert 0.5 * expected < high - low < 2.0 * expected, name


def test_perturbed_bootstrap_starts_agree_with_optimum_starts() -> None:
    n, d, loss = synthetic_runs(seed=2, noise=0.01)
    fit = fit_chinchilla(n, d, loss)
    log_x = np.log(np.stack([n, d], axis=1))
    optimum = np.array([np.log(fit.A), np.log(fit.B), fit.alpha, fit.beta, np.log(fit.E)])

    plain, _ = solver.bootstrap_refits(
        optimum, log_x, np.log(loss), delta=1e-3, num_replicates=200, seed=5, num_perturbed=0
    )
    perturbed, _ = solver.bootstrap_refits(
        optimum, log_x, np.log(loss), delta=1e-3, num_replicates=200, seed=5, num_perturbed=3
    )

    # Same resamples (same seed): most replicates land on the same optimum either way,
    # and the intervals agree, so a cheap start from the optimum loses little.
    same = np.all(np.abs(plain[:, 2:4] - perturbed[:, 2:4]) < 1e-3, axis=1)
    assert same.mean() > 0.9
    for column in (2, 3):
        np.testing.assert_allclose(
            np.percentile(plain[:, column], [2.5, 97.5]),
            np.percentile(perturbed[:, column], [2.5, 97.5]),
            atol=0.01,
        )


def test_nan_losses_are_excluded_and_counted() -> None:
    n, d, loss = synthetic_runs(seed=4)
    loss = loss.copy()
    loss[[0, 7, 19]] = np.nan
    fit = fit_chinchilla(n, d, loss)

    assert fit.num_excluded == 3
    assert fit.num_points == len(loss) - 3


def test_too_few_points_is_one_clear_error() -> None:
    n, d, loss = synthetic_runs(seed=5)
    with pytest.raises(UserError, match="too few points"):
        fit_chinchilla(n[:5], d[:5], loss[:5])
