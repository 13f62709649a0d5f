"""Input checks and interval helpers shared by the fits."""

from __future__ import annotations

import logging

import numpy as np

from orchestrator.errors import UserError

logger = logging.getLogger("frontier.analysis")

CI_PERCENTILES = (2.5, 97.5)
"""The 95% bootstrap interval is the percentile interval between these."""


def clean_points(
    law: str, min_points: int, **columns: np.ndarray
) -> tuple[dict[str, np.ndarray], int]:
    """Drop rows with a non-finite or non-positive value in any column and count them.

    Raises UserError when fewer than ``min_points`` rows remain, naming the law.
    """
    arrays = {name: np.asarray(v, dtype=np.float64).ravel() for name, v in columns.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        shapes = ", ".join(f"{name}: {len(a)}" for name, a in arrays.items())
        raise UserError(f"{law}: inputs differ in length ({shapes}); pass one value per run")

    keep = np.ones(lengths.pop(), dtype=bool)
    for values in arrays.values():
        keep &= np.isfinite(values) & (values > 0)
    num_excluded = int((~keep).sum())
    if num_excluded:
        logger.info(
            "%s: excluded %d rows with a NaN, infinite or non-positive value", law, num_excluded
        )
    if keep.sum() < min_points:
        raise UserError(
            f"{law}: too few points for a fit ({int(keep.sum())} usable, at least "
            f"{min_points} needed); add runs to the grid"
        )
    return {name: a[keep] for name, a in arrays.items()}, num_excluded


def percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap samples, ignoring non-finite ones."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return (float("nan"), float("nan"))
    low, high = np.percentile(finite, CI_PERCENTILES)
    return (float(low), float(high))


def bootstrap_counts(num_points: int, num_replicates: int, rng: np.random.Generator) -> np.ndarray:
    """(replicates, points) integer weights: each row is one resample with replacement."""
    return rng.multinomial(
        num_points, np.full(num_points, 1.0 / num_points), size=num_replicates
    ).astype(np.float64)
