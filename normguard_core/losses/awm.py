"""Advantage Weighted Matching (AWM).

Paper: S. Xue et al., "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion
Models", arXiv:2509.25050 (2025). Reference code followed: Flow-Factory ``trainers/awm.py``
(``compute_weighted_log_prob`` and the PPO-style clipped update).

AWM replaces the intractable diffusion log-likelihood in a policy gradient by the (weighted)
flow-matching log-likelihood surrogate on the policy's own samples::

    log p_theta(x0 | c)  ~=  - w(sigma) * mean_D (v_theta(x_sigma, sigma, c) - (eps - x0))^2

so the plain objective is the advantage-weighted flow-matching loss
``L = mean_b A_b * w(sigma_b) * mse_b`` (= - mean_b A_b log p_b). With the sampling policy's
surrogate ``log p_old`` (from ``v_old`` at the same points) and ``clip_range`` eps, the
stabilised variant is PPO-clipped on ``ratio = exp(log p_theta - log p_old)``::

    L = mean_b max(-A_b * ratio_b, -A_b * clip(ratio_b, 1 - eps, 1 + eps))

Weightings ``w``: ``uniform`` (1), ``sigma`` (sigma), ``sigma2`` (sigma^2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normguard_core.losses.registry import register_loss
from normguard_core.types import LossOutput

__all__ = ["awm_loss", "matching_log_prob"]

_WEIGHTINGS = ("uniform", "sigma", "sigma2")


def matching_log_prob(*, v: Tensor, x0: Tensor, noise: Tensor, sigma: Tensor, weighting: str = "uniform") -> Tensor:
    """AWM's surrogate log-likelihood ``-w(sigma) * mean_D (v - (eps - x0))^2``, shape ``(B,)``.

    Computed in float64 as the reference code does: differences of near-equal log-probs feed
    an exponential in the clipped ratio.
    """
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"unknown AWM weighting {weighting!r}; known: {list(_WEIGHTINGS)}")
    err = (v.double() - (noise.double() - x0.double())).pow(2).mean(dim=tuple(range(1, v.ndim)))
    w = {"uniform": torch.ones_like(err), "sigma": sigma.double(), "sigma2": sigma.double() ** 2}[weighting]
    return -(w * err)


@register_loss("awm", required=("v_theta", "x0", "noise", "sigma", "advantages"), optional=("v_old",))
def awm_loss(
    *,
    v_theta: Tensor,
    x0: Tensor,
    noise: Tensor,
    sigma: Tensor,
    advantages: Tensor,
    v_old: Tensor | None = None,
    weighting: str = "uniform",
    clip_range: float | None = None,
    adv_clip_max: float = 5.0,
) -> LossOutput:
    """AWM objective, plain or PPO-clipped.

    Args:
        v_theta: ``(B, *D)`` current policy velocity at ``x_sigma``.
        x0: ``(B, *D)`` the policy's own clean samples.
        noise: ``(B, *D)`` eps used to noise them.
        sigma: ``(B,)`` training sigmas.
        advantages: ``(B,)`` group-normalised advantages (clipped to +-``adv_clip_max``).
        v_old: ``(B, *D)`` sampling-policy velocity; required when ``clip_range`` is set.
        weighting: ``"uniform"``, ``"sigma"`` or ``"sigma2"``.
        clip_range: PPO ratio clip eps, or ``None`` for the plain advantage-weighted loss.
        adv_clip_max: advantage clip.

    Returns:
        LossOutput with metrics ``loss/awm_mse``, and with clipping ``loss/awm_ratio_mean``,
        ``loss/awm_clip_frac``.
    """
    adv = advantages.double().clamp(-adv_clip_max, adv_clip_max)
    log_p = matching_log_prob(v=v_theta, x0=x0, noise=noise, sigma=sigma, weighting=weighting)
    metrics = {"loss/awm_mse": (-log_p).mean().float().detach()}
    if clip_range is None:
        loss = -(adv * log_p).mean()
    else:
        if v_old is None:
            raise ValueError("awm with clip_range needs v_old (the sampling policy's velocity)")
        if clip_range <= 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        with torch.no_grad():
            log_p_old = matching_log_prob(v=v_old, x0=x0, noise=noise, sigma=sigma, weighting=weighting)
        ratio = torch.exp(log_p - log_p_old)
        clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        loss = torch.maximum(-adv * ratio, -adv * clipped).mean()
        metrics["loss/awm_ratio_mean"] = ratio.mean().float().detach()
        metrics["loss/awm_clip_frac"] = ((ratio - 1.0).abs() > clip_range).float().mean().detach()
    return LossOutput(loss=loss.float(), metrics=metrics)
