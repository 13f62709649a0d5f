"""One-resource laws, compute-optimal allocation (approaches 1-3) and the MoE fits."""

import numpy as np
import pytest

from orchestrator.analysis import (
    allocation_from_chinchilla,
    effective_multiplier,
    fit_chinchilla,
    fit_clark,
    fit_envelope,
    fit_isoflop_profiles,
    fit_power_law,
)
from orchestrator.errors import UserError

# A known joint law; its compute-optimal exponents are a = beta/(alpha+beta) etc.
E_TRUE, A_TRUE, B_TRUE, ALPHA_TRUE, BETA_TRUE = 1.8, 400.0, 1200.0, 0.34, 0.30
A_OPT = BETA_TRUE / (ALPHA_TRUE + BETA_TRUE)


def law(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return E_TRUE + A_TRUE * n**-ALPHA_TRUE + B_TRUE * d**-BETA_TRUE


def isoflop_grid(seed: int, noise: float = 0.002) -> tuple[np.ndarray, ...]:
    """Nine sizes centred on each budget's true optimum: the unbiased case for approach 2."""
    rng = np.random.default_rng(seed)
    budgets = np.geomspace(1e18, 1e21, 5)
    g = (ALPHA_TRUE * A_TRUE / (BETA_TRUE * B_TRUE)) ** (1 / (ALPHA_TRUE + BETA_TRUE))
    n = np.concatenate([g * (c / 6) ** A_OPT * np.geomspace(0.25, 4, 9) for c in budgets])
    c = np.repeat(budgets, 9)
    d = c / (6 * n)
    loss = law(n, d) * np.exp(rng.normal(0, noise, size=n.shape))
    return c, n, d, loss


def test_power_law_recovers_exponent_with_interval() -> None:
    rng = np.random.default_rng(0)
    n = np.geomspace(1e5, 1e9, 12)
    loss = (0.5 + 30.0 * n**-0.45) * np.exp(rng.normal(0, 0.005, size=n.shape))
    fit = fit_power_law(n, loss, bootstrap=200)

    assert fit.converged
    assert fit.alpha == pytest.approx(0.45, abs=0.05)
    assert fit.ci["alpha"][0] < 0.45 < fit.ci["alpha"][1]
    assert fit.inverse(fit.predict(1e7)) == pytest.approx(1e7, rel=1e-6)


def test_power_law_too_few_points_after_nan() -> None:
    with pytest.raises(UserError, match=r"L\(D\) fit: too few points"):
        fit_power_law([1e6, 1e7, 1e8, 1e9], [3.0, 2.5, np.nan, 2.0], resource="D")


def test_isoflop_profiles_recover_allocation() -> None:
    c, n, d, loss = isoflop_grid(seed=1)
    allocation = fit_isoflop_profiles(c, n, d, loss, bootstrap=200)

    assert allocation.a == pytest.approx(A_OPT, abs=0.03)
    assert allocation.b == pytest.approx(1 - A_OPT, abs=0.03)
    assert allocation.ci["a"][0] < allocation.a < allocation.ci["a"][1]
    assert len(allocation.flops) == 5


def test_isoflop_profile_without_minimum_is_skipped_then_refused() -> None:
    c, n, d, loss = isoflop_grid(seed=2)
    flat = c == c.max()
    loss = np.where(flat, 5.0 - 0.01 * (np.log(n) - np.log(n[flat]).mean()) ** 2, loss)
    assert len(fit_isoflop_profiles(c, n, d, loss).flops) == 4
    with pytest.raises(UserError, match="too few profiles"):
        fit_isoflop_profiles(c[:18], n[:18], d[:18], np.full(18, 2.0))


def test_approach_three_allocation_matches_closed_form() -> None:
    _, n, d, loss = isoflop_grid(seed=3, noise=0.001)
    fit = fit_chinchilla(n, d, loss, bootstrap=100)
    allocation = allocation_from_chinchilla(fit, reference_flops=1e21)

    assert allocation.a == pytest.approx(A_OPT, abs=0.04)
    assert allocation.a + allocation.b == pytest.approx(1.0)
    assert allocation.n_opt_at(1e21) * allocation.d_opt_at(1e21) * 6 == pytest.approx(1e21)
    assert allocation.ci["a"][0] <= allocation.a <= allocation.ci["a"][1]


def test_envelope_recovers_allocation_from_curves() -> None:
    sizes = np.geomspace(1e7, 1e10, 10)
    curves = []
    for trial, size in enumerate(sizes):
        tokens = np.geomspace(1e8, 1e13, 80)
        curves.append(
            (6 * size * tokens, np.full(80, size), tokens, law(size, tokens), np.full(80, trial))
        )
    flops, n, d, loss, trial = (np.concatenate(v) for v in zip(*curves, strict=True))
    allocation = fit_envelope(flops, n, d, loss, trial, num_bins=12, bootstrap=50)

    # Ten sizes a factor 2.15 apart quantise N_opt, so the slope is only roughly right.
    assert allocation.a == pytest.approx(A_OPT, abs=0.1)
    assert allocation.tokens_per_param > 1


def test_moe_multiplier_and_clark_law() -> None:
    rng = np.random.default_rng(4)
    n = np.geomspace(1e6, 1e9, 8)
    dense_loss = (1.5 + 50.0 * n**-0.3) * np.exp(rng.normal(0, 0.002, size=n.shape))
    # An MoE run with N active parameters behaves like a dense run with 4 N.
    moe_loss = (1.5 + 50.0 * (4 * n) ** -0.3) * np.exp(rng.normal(0, 0.002, size=n.shape))
    result = effective_multiplier(n, dense_loss, n, moe_loss, bootstrap=200)
    assert result.multiplier == pytest.approx(4.0, rel=0.25)
    assert result.ci["multiplier"][0] < 4.0 < result.ci["multiplier"][1]

    experts = np.array([1, 8, 32])
    grid_n = np.repeat(n, 3)
    grid_x = np.tile(experts, len(n))
    log_loss = -0.07 * np.log(grid_n) - 0.05 * np.log(grid_x)
    log_loss += 0.002 * np.log(grid_n) * np.log(grid_x) + 1.8
    clark = fit_clark(
        grid_n, grid_x, np.exp(log_loss + rng.normal(0, 1e-3, grid_n.shape)), bootstrap=200
    )
    assert clark.b == pytest.approx(-0.05, abs=0.01)
    assert clark.c == pytest.approx(0.002, abs=5e-4)
    assert clark.ci["c"][0] < 0.002 < clark.ci["c"][1]
