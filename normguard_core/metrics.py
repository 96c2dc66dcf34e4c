"""Velocity-norm statistics: the paper's structural signature of RL-induced degradation.

:func:`norm_ratio` is the one place the project divides a velocity norm by a reference norm
(NormGuard's hinge and its metrics, the constraint's per-bin ratios, the samplers' ratio probe, the
learner's old-policy gap), with the one guard :data:`NORM_EPS` against a zero reference norm.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["NORM_EPS", "norm_ratio", "velocity_norm"]

NORM_EPS = 1e-12
"""Added to a reference norm before dividing by it: it only matters for an all-zero reference (in
float32 ``n + 1e-12 == n`` for any norm of at least 2**-15 ~ 3.1e-5, so a ratio of such norms is the
plain quotient)."""


def velocity_norm(v: Tensor, *, batch_dims: int = 1) -> Tensor:
    """L2 norm over every dim after the first ``batch_dims``.

    Args:
        v: ``(B, *D)`` (``batch_dims=1``) or ``(T, B, *D)`` (``batch_dims=2``).
        batch_dims: number of leading dims that are kept.

    Returns:
        ``(B,)`` or ``(T, B)``.
    """
    return v.flatten(start_dim=batch_dims).norm(dim=-1)


def norm_ratio(norm: Tensor, ref_norm: Tensor) -> Tensor:
    """``norm / (ref_norm + NORM_EPS)``: a per-sample norm in units of the reference's.

    Differentiable in ``norm`` (NormGuard's hinge and floor back-propagate through it); ``ref_norm``
    is used as given (callers pass the norm of a detached reference).

    Args:
        norm: ``(B,)`` (or ``(T, B)``) norms, e.g. ``velocity_norm(v_theta)``, or an excess over a
            threshold in the same units.
        ref_norm: the same shape, ``velocity_norm(v_ref)``.

    Returns:
        the same shape as ``norm``.
    """
    return norm / (ref_norm + NORM_EPS)
