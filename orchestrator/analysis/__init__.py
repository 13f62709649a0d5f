"""Scaling-law fits with bootstrap intervals and residuals.

One module per concern: ``chinchilla`` (approach 3, the joint L(N, D)), ``power_law`` (one
resource), ``isoflop`` (approaches 1 and 2 and the compute-optimal allocation), ``moe``
(MoE against dense). ``_lse_solver`` is the batched solver they share.
"""

from orchestrator.analysis.chinchilla import ChinchillaFit, fit_chinchilla
from orchestrator.analysis.isoflop import (
    Allocation,
    allocation_from_chinchilla,
    fit_envelope,
    fit_isoflop_profiles,
)
from orchestrator.analysis.moe import (
    ClarkFit,
    EffectiveMultiplier,
    effective_multiplier,
    effective_multiplier_joint,
    fit_clark,
)
from orchestrator.analysis.power_law import PowerLawFit, fit_power_law

__all__ = [
    "Allocation",
    "ChinchillaFit",
    "ClarkFit",
    "EffectiveMultiplier",
    "PowerLawFit",
    "allocation_from_chinchilla",
    "effective_multiplier",
    "effective_multiplier_joint",
    "fit_chinchilla",
    "fit_clark",
    "fit_envelope",
    "fit_isoflop_profiles",
    "fit_power_law",
]
