"""Scaling-law fits with bootstrap intervals and residuals."""

from orchestrator.analysis.chinchilla import ChinchillaFit, fit_chinchilla

__all__ = ["ChinchillaFit", "fit_chinchilla"]
