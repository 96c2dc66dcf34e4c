"""Adjoint sensitivity of a reward to the per-step velocity magnitude.

Question (the paper's): is there a coherent first-order reward signal in velocity magnitude?
Scale the velocity of step k of sample b by ``s_{k,b}`` and differentiate the reward of the
final sample through the whole sampler at ``s = 1``::

    g_{k,b} = d R(x0_b) / d s_{k,b} |_{s = 1}

computed by reverse-mode autodiff through :func:`normguard_core.samplers.sample_trajectory`
(equivalent to the discrete adjoint pass). If ``g_k`` has a consistent sign across the batch,
inflating the magnitude at step k raises the reward to first order, and RL can exploit it.
The returned statistics say how coherent that signal is: per-step batch mean, std, sign
agreement (fraction of samples sharing the sign of the mean) and a t-statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from normguard_core.conventions import broadcast_sigma
from normguard_core.samplers import VelocityFn, sample_trajectory

__all__ = ["AdjointSensitivity", "magnitude_sensitivity"]


@dataclass(frozen=True)
class AdjointSensitivity:
    """Per-step sensitivities of the reward to velocity magnitude at s = 1.

    Attributes:
        grad: ``(T, B)`` d reward_b / d s_{k,b}.
        mean: ``(T,)`` batch mean.
        std: ``(T,)`` batch std.
        sign_agreement: ``(T,)`` fraction of samples whose gradient has the sign of the mean.
        t_stat: ``(T,)`` ``mean / (std / sqrt(B))``.
        reward: ``(B,)`` the reward of the unscaled samples.
    """

    grad: Tensor
    mean: Tensor
    std: Tensor
    sign_agreement: Tensor
    t_stat: Tensor
    reward: Tensor


def magnitude_sensitivity(
    velocity_fn: VelocityFn,
    reward_fn: Callable[[Tensor], Tensor],
    noise: Tensor,
    sigmas: Tensor,
) -> AdjointSensitivity:
    """Gradient of a differentiable reward w.r.t. per-step, per-sample velocity scales.

    Samples must not interact inside ``velocity_fn`` (no batch statistics), so that
    ``d sum_b R_b / d s_{k,b} = d R_b / d s_{k,b}``.

    Args:
        velocity_fn: ``(x, sigma) -> v`` (guided); parameters need not require grad.
        reward_fn: ``x0 (B, *D) -> (B,)``, differentiable.
        noise: ``(B, *D)`` initial noise.
        sigmas: ``(T + 1,)`` grid.

    Returns:
        AdjointSensitivity.
    """
    num_steps, batch = sigmas.numel() - 1, noise.shape[0]
    scales = torch.ones(num_steps, batch, device=noise.device, requires_grad=True)

    def scaled(k: int, x: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        return v * broadcast_sigma(scales[k], v)

    with torch.enable_grad():
        traj = sample_trajectory(velocity_fn, noise, sigmas, transform=scaled)
        reward = reward_fn(traj.x0)
        if reward.shape != (batch,):
            raise ValueError(f"reward_fn must return ({batch},), got {tuple(reward.shape)}")
        (grad,) = torch.autograd.grad(reward.sum(), scales)
    mean = grad.mean(dim=1)
    std = grad.std(dim=1, unbiased=batch > 1)
    agreement = (torch.sign(grad) == torch.sign(mean)[:, None]).float().mean(dim=1)
    t_stat = mean / (std / batch**0.5).clamp_min(1e-12)
    return AdjointSensitivity(
        grad=grad.detach(), mean=mean, std=std, sign_agreement=agreement, t_stat=t_stat, reward=reward.detach()
    )
