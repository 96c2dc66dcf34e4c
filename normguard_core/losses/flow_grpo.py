"""Flow-GRPO: PPO-clip on the Gaussian log-probs of SDE sampling steps.

Paper: J. Liu et al., "Flow-GRPO: Training Flow Matching Models via Online RL",
arXiv:2505.05470 (2025). Reference code followed: yifan123/flow_grpo ``train_sd3.py`` and
``diffusers_patch/sd3_sde_with_logprob.py`` (the step lives in ``normguard_core.samplers``).

With ``log p`` the log-density of the taken step x_t -> x_{t-1} under the current policy
(recomputed from the stored states and noise), ``log p_old`` the same under the sampling
policy, group-normalised advantages A and clip eps::

    ratio = exp(log p - log p_old)
    L     = mean_b max(-A_b * ratio_b, -A_b * clip(ratio_b, 1 - eps, 1 + eps))

Flow-GRPO's KL to the reference is a separate term (``compose.compose_objective``'s ``kl_weight``
with the per-sample scale ``samplers.sde_kl_scale``), as in verl-omni where it is registered
separately. Source: ``kl = mean_D (mean_theta - mean_ref)^2 / (2 std_t^2)`` on the SDE means, which
in velocity terms is ``sde_kl_scale * mean_D (v_theta - v_ref)^2``.

GRPO-Guard (Wang et al., arXiv:2510.22319; read in X-GenGroup/Flow-Factory
``trainers/rl/grpo.py`` ``GRPOGuardTrainer._guard_ratio``) replaces the ratio with one normalised per
timestep. With ``s`` the step std ``std_t sqrt(-dt)`` and ``mu`` / ``mu_old`` the SDE means of the
current and the sampling policy at the stored state::

    log ratio_guard = s * (log p - log p_old) + mean_D (mu - mu_old)^2 / (2 s)

The first factor undoes the ``1 / s^2`` scale of the log-density difference, which makes late steps
(small ``s``) dominate the gradient (the 1/dt reweighting); the second removes the mean shift that
leaves the plain ratio left of 1, so the clip acts symmetrically. Pass ``mean``, ``old_mean`` and
``step_std`` (a ``StepBatch``'s ``GuardTerms``) to get it (``loss.guard: true`` in the service).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normguard_core.losses.batches import StepBatch
from normguard_core.types import LossOutput

__all__ = ["flow_grpo_loss", "grpo_objective"]


def flow_grpo_loss(
    *,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    mean: Tensor | None = None,
    old_mean: Tensor | None = None,
    step_std: Tensor | None = None,
) -> LossOutput:
    """PPO-clipped policy-gradient loss on SDE-step log-probs.

    Args:
        log_prob: ``(B,)`` current-policy log-prob of the taken step (carries grad).
        old_log_prob: ``(B,)`` sampling-policy log-prob of the same step.
        advantages: ``(B,)`` group-normalised advantages.
        clip_range: ratio clip eps > 0 (Flow-GRPO's SD3 config uses 1e-4).
        adv_clip_max: advantage clip.
        mean: ``(B, *D)`` current-policy SDE mean of the step (GRPO-Guard only, carries grad).
        old_mean: ``(B, *D)`` the sampling policy's SDE mean at the same state (GRPO-Guard).
        step_std: ``(B,)`` the step std ``std_t sqrt(-dt)`` (GRPO-Guard).

    Returns:
        LossOutput with metrics ``loss/ratio_mean``, ``loss/clip_frac`` (the same names as AWM's
        clipped variant) and ``loss/grpo_approx_kl``.
    """
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob.detach()
    guard = mean is not None
    if guard:
        if old_mean is None or step_std is None:
            raise ValueError("GRPO-Guard needs mean, old_mean and step_std together")
        s = step_std.float()
        mse = (mean.float() - old_mean.detach().float()).pow(2).flatten(1).mean(dim=1)  # (B,)
        log_ratio = s * log_ratio + mse / (2.0 * s)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(-adv * ratio, -adv * clipped).mean()
    metrics = {
        "loss/ratio_mean": ratio.mean().detach(),
        "loss/clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
        # Schulman's k3 estimator of KL(old || new), for monitoring only.
        "loss/grpo_approx_kl": (ratio - 1.0 - log_ratio).mean().detach(),
    }
    return LossOutput(loss=loss, metrics=metrics)


def grpo_objective(batch: StepBatch, **options: Any) -> LossOutput:
    """:func:`flow_grpo_loss` on a :class:`StepBatch` (GRPO-Guard's ratio when it carries ``guard``);
    ``options`` are its keyword options (``clip_range``, ``adv_clip_max``)."""
    g = batch.guard
    return flow_grpo_loss(
        log_prob=batch.log_prob,
        old_log_prob=batch.old_log_prob,
        advantages=batch.advantages,
        mean=g.mean if g is not None else None,
        old_mean=g.old_mean if g is not None else None,
        step_std=g.step_std if g is not None else None,
        **options,
    )
