"""Analyses of trained generators (pure torch)."""

from normguard_core.analysis.adjoint import AdjointSensitivity, magnitude_sensitivity

__all__ = ["AdjointSensitivity", "magnitude_sensitivity"]
