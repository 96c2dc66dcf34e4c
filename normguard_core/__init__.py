"""NormGuard's math core: pure torch (P1). Imports no ray, diffusers, pydantic or services."""

from normguard_core import advantages, analysis, conventions, lagged, losses, metrics, samplers, seeding
from normguard_core.losses import NormGuardParams, compose_objective, normguard_penalty
from normguard_core.types import LossOutput, PairResult, StepResult, Trajectory

__all__ = [
    "LossOutput",
    "NormGuardParams",
    "PairResult",
    "StepResult",
    "Trajectory",
    "advantages",
    "analysis",
    "compose_objective",
    "conventions",
    "lagged",
    "losses",
    "metrics",
    "normguard_penalty",
    "samplers",
    "seeding",
]
