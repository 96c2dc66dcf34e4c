"""Velocity-norm statistics: the paper's structural signature of RL-induced degradation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NormInflation", "norm_inflation", "per_step_norm_stats", "velocity_norm"]


def velocity_norm(v: Tensor, *, batch_dims: int = 1) -> Tensor:
    """L2 norm over every dim after the first ``batch_dims``.

    Args:
        v: ``(B, *D)`` (``batch_dims=1``) or ``(T, B, *D)`` (``batch_dims=2``).
        batch_dims: number of leading dims that are kept.

    Returns:
        ``(B,)`` or ``(T, B)``.
    """
    return v.flatten(start_dim=batch_dims).norm(dim=-1)


def per_step_norm_stats(norms: Tensor) -> dict[str, Tensor]:
    """Mean and std over the batch of per-step norms.

    Args:
        norms: ``(T, B)`` velocity norms.

    Returns:
        ``{"mean": (T,), "std": (T,)}``.
    """
    return {"mean": norms.mean(dim=1), "std": norms.std(dim=1, unbiased=norms.shape[1] > 1)}


@dataclass(frozen=True)
class NormInflation:
    """Norm inflation of a policy over a reference along matched trajectories.

    Attributes:
        ratio_per_step: ``(T,)`` mean over the batch of ``||v_theta|| / ||v_ref||``.
        ratio_p95_per_step: ``(T,)`` 95th percentile over the batch.
        ratio_mean: ``()`` mean over steps and batch.
        inflation: ``()`` ``ratio_mean - 1`` (0.05 = 5 % inflation).
    """

    ratio_per_step: Tensor
    ratio_p95_per_step: Tensor
    ratio_mean: Tensor
    inflation: Tensor


def norm_inflation(norms_theta: Tensor, norms_ref: Tensor) -> NormInflation:
    """Per-step ratio statistics of policy over reference norms at the same points.

    Args:
        norms_theta: ``(T, B)`` policy velocity norms.
        norms_ref: ``(T, B)`` reference velocity norms at the same (x, sigma, c).

    Returns:
        NormInflation.
    """
    if norms_theta.shape != norms_ref.shape:
        raise ValueError(f"shapes differ: {tuple(norms_theta.shape)} vs {tuple(norms_ref.shape)}")
    ratio = norms_theta / norms_ref.clamp_min(1e-12)  # (T, B)
    ratio_mean = ratio.mean()
    return NormInflation(
        ratio_per_step=ratio.mean(dim=1),
        ratio_p95_per_step=torch.quantile(ratio, 0.95, dim=1),
        ratio_mean=ratio_mean,
        inflation=ratio_mean - 1.0,
    )
