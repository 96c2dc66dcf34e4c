"""DiffusionNFT: negative-aware fine-tuning on the forward process.

Paper: K. Zheng, H. Chen, H. Ye, H. Wang, Q. Zhang, K. Jiang, H. Su, S. Ermon, J. Zhu, M.-Y. Liu,
"DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv:2509.16117 (2025).
Reference code followed: NVlabs/DiffusionNFT ``train_nft_sd3.py`` (as mirrored in verl-omni's
``diffusion_algos.py`` and Flow-Factory's ``trainers/nft.py``).

With the sampling ("old") policy v_old, the current policy v_theta and beta > 0, the implicit
positive and negative policies are::

    v+ = beta * v_theta + (1 - beta) * v_old
    v- = (1 + beta) * v_old - beta * v_theta

and with the optimality probability r in [0, 1] (``advantages.nft_reward_prob``)::

    L = loss_scale * mean_b [ r_b * l(v+_b) + (1 - r_b) * l(v-_b) ] / beta

The reference code multiplies the mean by ``adv_clip_max`` (``policy_loss = (ori_policy_loss *
config.train.adv_clip_max).mean()``, also in Flow-Factory's ``trainers/nft.py``); the services pass
``loss_scale = adv_clip_max`` by default so that NormGuard's and the KL's weights mean what they
mean next to the source's loss.

Velocity form (paper, eq. for L(theta)): ``l(v) = mean_D (v - v*)^2`` with ``v* = eps - x0``.
Reference-code form (``adaptive_weighting=True``, the default): the error is measured on the
implied data prediction ``x0_hat = x_sigma - sigma * v`` and self-normalised per sample by the
detached mean absolute error, ``l(v) = mean_D (x0_hat - x0)^2 / sg(mean_D |x0_hat - x0|)``.
Since ``x0_hat - x0 = sigma * (v - v*)``, both forms have the same minimiser; the adaptive one
rescales each sample's gradient to unit-order magnitude.

At beta -> 0 the gradient of L reduces to the reward-weighted flow-matching gradient
``(2r - 1) * d l(v_theta)``: positives are pulled toward v*, negatives pushed away.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normguard_core.conventions import interpolate, velocity_target, x0_from_velocity
from normguard_core.losses.batches import SampleBatch
from normguard_core.types import LossOutput

__all__ = ["diffusion_nft_loss", "nft_objective"]


def _per_sample_error(
    v: Tensor, *, x0: Tensor, noise: Tensor, sigma: Tensor, adaptive: bool, weight_min: float
) -> Tensor:
    """``(B,)`` NFT error of velocity ``v``; see the module docstring for both forms."""
    dims = tuple(range(1, v.ndim))
    if not adaptive:
        return (v - velocity_target(x0, noise)).pow(2).mean(dim=dims)
    x0_hat = x0_from_velocity(interpolate(x0, noise, sigma), v, sigma)  # (B, *D)
    with torch.no_grad():  # float64 as in the reference code: the mean |err| can be tiny
        w = (x0_hat.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(weight_min)
    return ((x0_hat - x0).pow(2) / w.to(x0_hat.dtype)).mean(dim=dims)


def diffusion_nft_loss(
    *,
    v_theta: Tensor,
    v_old: Tensor,
    x0: Tensor,
    noise: Tensor,
    sigma: Tensor,
    reward_prob: Tensor,
    beta: float = 1.0,
    adaptive_weighting: bool = True,
    weight_min: float = 1e-5,
    loss_scale: float = 1.0,
) -> LossOutput:
    """DiffusionNFT objective.

    Args:
        v_theta: ``(B, *D)`` current policy velocity at ``x_sigma``.
        v_old: ``(B, *D)`` sampling-policy velocity at the same points (detached here).
        x0: ``(B, *D)`` clean rollout samples.
        noise: ``(B, *D)`` eps with ``x_sigma = (1 - sigma) x0 + sigma eps``.
        sigma: ``(B,)`` training sigmas.
        reward_prob: ``(B,)`` r in [0, 1].
        beta: mixing strength > 0 (the reference code's ``beta``; 1.0 in its SD3 configs).
        adaptive_weighting: use the reference code's x0-space self-normalised error.
        weight_min: floor of the adaptive weight.
        loss_scale: factor on the mean (the reference code's ``adv_clip_max``, 5).

    Returns:
        LossOutput with metrics ``loss/nft_positive``, ``loss/nft_negative``,
        ``loss/nft_r_mean``, ``loss/nft_old_deviation``.
    """
    if beta <= 0 or loss_scale <= 0:
        raise ValueError(f"beta and loss_scale must be > 0, got beta={beta}, loss_scale={loss_scale}")
    if reward_prob.min() < 0 or reward_prob.max() > 1:
        raise ValueError("reward_prob must lie in [0, 1]; map rewards with advantages.nft_reward_prob")
    v_old = v_old.detach()
    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    l_pos = _per_sample_error(
        v_pos, x0=x0, noise=noise, sigma=sigma, adaptive=adaptive_weighting, weight_min=weight_min
    )  # (B,)
    l_neg = _per_sample_error(
        v_neg, x0=x0, noise=noise, sigma=sigma, adaptive=adaptive_weighting, weight_min=weight_min
    )  # (B,)
    r = reward_prob.to(l_pos.dtype)
    loss = loss_scale * ((r * l_pos + (1.0 - r) * l_neg) / beta).mean()
    metrics = {
        "loss/nft_positive": l_pos.mean().detach(),
        "loss/nft_negative": l_neg.mean().detach(),
        "loss/nft_r_mean": r.mean().detach(),
        "loss/nft_old_deviation": (v_theta.detach() - v_old).pow(2).mean(),
    }
    return LossOutput(loss=loss, metrics=metrics)


def nft_objective(batch: SampleBatch, **options: Any) -> LossOutput:
    """:func:`diffusion_nft_loss` on a :class:`SampleBatch` (which must carry ``v_old``); ``options`` are
    :func:`diffusion_nft_loss`'s keyword options (``beta``, ...), whose defaults stay there alone."""
    if batch.v_old is None:
        raise ValueError("diffusion_nft needs v_old (the sampling policy's velocity) in its SampleBatch")
    return diffusion_nft_loss(
        v_theta=batch.v_theta,
        v_old=batch.v_old,
        x0=batch.x0,
        noise=batch.noise,
        sigma=batch.sigma,
        reward_prob=batch.reward_prob,
        **options,
    )
