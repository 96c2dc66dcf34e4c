"""Advantage Weighted Matching (AWM).

Paper: S. Xue et al., "Advantage Weighted Matching: Aligning RL with Pretraining in Diffusion
Models", arXiv:2509.25050 (2025). Reference code followed: scxue/advantage_weighted_matching
@ be51372 ``scripts/train_sd3_awm.py`` (``compute_log_prob_awm``, the loss around L1262-1352) and
``config/dgx_awm.py``; Flow-Factory ``trainers/awm.py`` agrees.

AWM replaces the intractable diffusion log-likelihood in a policy gradient by a weighted
flow-matching surrogate on the policy's own samples (float64, as the source)::

    mse_b  = mean_D (v_theta(x_sigma, sigma, c) - (eps - x0))^2
    lp_b   = -w(sigma_b) * mse_b                               (uniform / sigma / sigma2)
    lp_b   = -(sqrt(mse_b + 1e-10) - 1e-5) * sigma_b           (huber)
    lp_b   = -((mse_b + 1e-10)^p - (1e-10)^p) * sigma_b / p    (ghuber, p = ghuber_power)

With ``A = clip(A, -m, m)`` (then ``A <- A / m * advantage_max`` when set) and the sampling policy's
surrogate ``lp_old`` (from ``v_old`` at the same points), the objective is PPO-clipped on
``ratio = exp(lp - lp_old)`` per point (the source's ``loss_type='exp_first'``)::

    L = mean_b max(-A_b * ratio_b, -A_b * clip(ratio_b, 1 - eps, 1 + eps))

On-policy (the released configs) ``lp_old`` equals ``lp`` at the first update, the ratio is 1 and
the gradient is ``-A d lp``: plain advantage-weighted matching (``clip_range=None`` computes that
form directly). The EMA-KL regulariser ``ema_kl_weight * mean_b mean_D (v_theta - v_ema)^2`` pulls
toward a lagged EMA copy of the policy (``normguard_core.lagged``, ``awm_linear``); the KL to the
reference is ``compose_objective``'s term (``elbo_kl_scale`` gives the source's ``ELBO`` form).

The function's defaults are the plain formula; the released defaults (``dgx_awm.py``: ``ghuber``
with p = 0.25, ``advantage_max = 1``, ``clip_range = 1``, ``ema_beta = 1``) are the service config's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normguard_core.conventions import velocity_target
from normguard_core.losses.batches import SampleBatch
from normguard_core.types import LossOutput

__all__ = ["awm_loss", "awm_objective", "elbo_kl_scale", "matching_log_prob"]

_WEIGHTINGS = ("uniform", "sigma", "sigma2", "huber", "ghuber")


def matching_log_prob(
    *,
    v: Tensor,
    x0: Tensor,
    noise: Tensor,
    sigma: Tensor,
    weighting: str = "uniform",
    ghuber_power: float = 0.25,
) -> Tensor:
    """AWM's surrogate log-likelihood ``(B,)`` (see the module docstring for each weighting).

    Computed in float64 as the reference code does: differences of near-equal log-probs feed
    an exponential in the clipped ratio.
    """
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"unknown AWM weighting {weighting!r}; known: {list(_WEIGHTINGS)}")
    err = (v.double() - velocity_target(x0.double(), noise.double())).pow(2).mean(dim=tuple(range(1, v.ndim)))
    s = sigma.double()
    if weighting == "huber":
        return -(torch.sqrt(err + 1e-10) - 1e-5) * s
    if weighting == "ghuber":
        if ghuber_power <= 0:
            raise ValueError(f"ghuber_power must be > 0, got {ghuber_power}")
        return -((err + 1e-10) ** ghuber_power - 1e-10**ghuber_power) * s / ghuber_power
    w = {"uniform": torch.ones_like(err), "sigma": s, "sigma2": s**2}[weighting]
    return -(w * err)


def elbo_kl_scale(sigma: Tensor) -> Tensor:
    """``(B,)`` AWM's ``ELBO`` KL weight ``1 / (2 std_t^2)``, ``std_t = 0.7 sqrt(s / (1 - clamp(s, 0, 0.99)))``."""
    std_t = 0.7 * torch.sqrt(sigma.double() / (1.0 - sigma.double().clamp(0.0, 0.99)))
    return (1.0 / (2.0 * std_t**2)).float()


def _ppo_clipped(log_p: Tensor, log_p_old: Tensor, adv: Tensor, *, clip_range: float, metrics: dict) -> Tensor:
    """``mean_b max(-A r, -A clip(r, 1 - eps, 1 + eps))`` with ``r = exp(log_p - log_p_old)`` (all ``(B,)``);
    adds ``loss/ratio_mean`` and ``loss/clip_frac`` to ``metrics``."""
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    ratio = torch.exp(log_p - log_p_old)
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    metrics["loss/ratio_mean"] = ratio.mean().float().detach()
    metrics["loss/clip_frac"] = ((ratio - 1.0).abs() > clip_range).float().mean().detach()
    return torch.maximum(-adv * ratio, -adv * clipped).mean()


def awm_loss(
    *,
    v_theta: Tensor,
    x0: Tensor,
    noise: Tensor,
    sigma: Tensor,
    advantages: Tensor,
    v_old: Tensor | None = None,
    v_ema: Tensor | None = None,
    weighting: str = "uniform",
    ghuber_power: float = 0.25,
    clip_range: float | None = None,
    adv_clip_max: float = 5.0,
    advantage_max: float | None = None,
    ema_kl_weight: float = 0.0,
) -> LossOutput:
    """AWM objective, PPO-clipped (the source) or plain.

    Args:
        v_theta: ``(B, *D)`` current policy velocity at ``x_sigma``.
        x0: ``(B, *D)`` the policy's own clean samples.
        noise: ``(B, *D)`` eps used to noise them.
        sigma: ``(B,)`` training sigmas.
        advantages: ``(B,)`` group-normalised advantages.
        v_old: ``(B, *D)`` sampling-policy velocity; required when ``clip_range`` is set.
        v_ema: ``(B, *D)`` lagged EMA velocity; required when ``ema_kl_weight > 0``.
        weighting: ``"uniform"``, ``"sigma"``, ``"sigma2"``, ``"huber"`` or ``"ghuber"``.
        ghuber_power: p of ``ghuber``.
        clip_range: PPO ratio clip eps, or ``None`` for the plain advantage-weighted loss.
        adv_clip_max: advantage clip m.
        advantage_max: rescale clipped advantages to ``[-advantage_max, advantage_max]``, or ``None``.
        ema_kl_weight: weight of the EMA-KL (the source's ``ema_beta``).

    Returns:
        LossOutput with metrics ``loss/awm_mse``, with clipping ``loss/ratio_mean`` and
        ``loss/clip_frac``, and ``loss/awm_ema_kl`` when the EMA-KL is on.
    """
    adv = advantages.double().clamp(-adv_clip_max, adv_clip_max)
    if advantage_max is not None:
        adv = adv / adv_clip_max * advantage_max
    log_p = matching_log_prob(
        v=v_theta, x0=x0, noise=noise, sigma=sigma, weighting=weighting, ghuber_power=ghuber_power
    )
    dims = tuple(range(1, v_theta.ndim))
    mse = (v_theta.detach().double() - velocity_target(x0.double(), noise.double())).pow(2).mean(dim=dims)
    metrics = {"loss/awm_mse": mse.mean().float()}
    if clip_range is None:
        loss = -(adv * log_p).mean()
    else:
        if v_old is None:
            raise ValueError("awm with clip_range needs v_old (the sampling policy's velocity)")
        with torch.no_grad():
            log_p_old = matching_log_prob(
                v=v_old, x0=x0, noise=noise, sigma=sigma, weighting=weighting, ghuber_power=ghuber_power
            )
        loss = _ppo_clipped(log_p, log_p_old, adv, clip_range=clip_range, metrics=metrics)
    loss = loss.float()
    if ema_kl_weight < 0:
        raise ValueError(f"ema_kl_weight must be >= 0, got {ema_kl_weight}")
    if ema_kl_weight > 0:
        if v_ema is None:
            raise ValueError("awm with ema_kl_weight > 0 needs v_ema (the lagged EMA policy's velocity)")
        ema_kl = (v_theta - v_ema.detach()).pow(2).mean(dim=dims).mean()
        loss = loss + ema_kl_weight * ema_kl
        metrics["loss/awm_ema_kl"] = ema_kl.detach()
    return LossOutput(loss=loss, metrics=metrics)


def awm_objective(batch: SampleBatch, **options: Any) -> LossOutput:
    """:func:`awm_loss` on a :class:`SampleBatch` (its ``v_old`` / ``v_ema`` where the options read them);
    ``options`` are :func:`awm_loss`'s keyword options, whose defaults stay there alone."""
    return awm_loss(
        v_theta=batch.v_theta,
        x0=batch.x0,
        noise=batch.noise,
        sigma=batch.sigma,
        advantages=batch.advantages,
        v_old=batch.v_old,
        v_ema=batch.v_ema,
        **options,
    )
