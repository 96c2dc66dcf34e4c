"""Flow-DPO: Diffusion-DPO transferred to flow-matching velocities.

Papers: B. Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization"
(Diffusion-DPO), CVPR 2024, arXiv:2311.12908; its flow-matching form as used by J. Liu et al.,
"Improving Video Generation with Human Feedback" (Flow-DPO), arXiv:2501.13918. Reference code
followed: Flow-Factory ``trainers/dpo.py`` (online pairs, ``beta`` on mean-squared errors).

For a pair (winner w, loser l) noised with the SAME (sigma, eps), with per-sample errors
``e(v) = mean_D (v - (eps - x0))^2`` for the policy and the frozen reference::

    delta = (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))
    L     = mean_pairs  -log sigmoid(-beta / 2 * delta)

Lowering the winner's error relative to the reference (and raising the loser's) lowers the
loss. The implicit reward accuracy is the fraction of pairs with ``delta < 0``.

Source defaults: flow_grpo ``train_sd3_dpo.py`` / ``config/dpo.py`` (the velocity form, errors in
float32, winner and loser noised with the same eps and sigma) uses ``beta = 100``, the default
here; Diffusion-DPO (eps-prediction, SD1.5 / SDXL launchers) 5000 and Flow-Factory 2000. The
pairing (best vs worst per prompt; ties skipped, or flow_grpo's index pairing as an option) is
``advantages.preference_pairs``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from normguard_core.conventions import velocity_target
from normguard_core.losses.batches import PairBatch
from normguard_core.types import LossOutput

__all__ = ["dpo_objective", "flow_dpo_loss"]


def flow_dpo_loss(
    *,
    v_theta: Tensor,
    v_ref: Tensor,
    x0: Tensor,
    noise: Tensor,
    sigma: Tensor,
    winners: Tensor,
    losers: Tensor,
    beta: float = 100.0,
) -> LossOutput:
    """Flow-DPO objective over index pairs of one batch.

    Args:
        v_theta: ``(B, *D)`` policy velocity.
        v_ref: ``(B, *D)`` frozen reference velocity at the same points (detached here).
        x0: ``(B, *D)`` clean samples.
        noise: ``(B, *D)`` eps; winner and loser of a pair must share it.
        sigma: ``(B,)``; winner and loser of a pair must share it.
        winners: ``(P,)`` long indices of preferred samples.
        losers: ``(P,)`` long indices of rejected samples.
        beta: inverse temperature > 0 (flow_grpo: 100 on per-element means).

    Returns:
        LossOutput with metrics ``loss/dpo_accuracy``, ``loss/dpo_delta``, ``loss/dpo_mse_w``,
        ``loss/dpo_mse_l``.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if winners.shape != losers.shape or winners.ndim != 1 or winners.numel() == 0:
        raise ValueError(
            f"winners {tuple(winners.shape)} and losers {tuple(losers.shape)} must be equal, non-empty (P,)"
        )
    if not (torch.equal(noise[winners], noise[losers]) and torch.equal(sigma[winners], sigma[losers])):
        raise ValueError("each DPO pair must share its noise and sigma (build pairs with shared eps)")
    dims = tuple(range(1, v_theta.ndim))
    target = velocity_target(x0, noise)
    e_theta = (v_theta - target).pow(2).mean(dim=dims)  # (B,)
    e_ref = (v_ref.detach() - target).pow(2).mean(dim=dims)  # (B,)
    delta = (e_theta[winners] - e_ref[winners]) - (e_theta[losers] - e_ref[losers])  # (P,)
    loss = -F.logsigmoid(-0.5 * beta * delta).mean()
    metrics = {
        "loss/dpo_accuracy": (delta < 0).float().mean().detach(),
        "loss/dpo_delta": delta.mean().detach(),
        "loss/dpo_mse_w": e_theta[winners].mean().detach(),
        "loss/dpo_mse_l": e_theta[losers].mean().detach(),
    }
    return LossOutput(loss=loss, metrics=metrics)


def dpo_objective(batch: PairBatch, **options: Any) -> LossOutput:
    """:func:`flow_dpo_loss` on a :class:`PairBatch`; ``options`` are its keyword options (``beta``)."""
    return flow_dpo_loss(
        v_theta=batch.v_theta,
        v_ref=batch.v_ref,
        x0=batch.x0,
        noise=batch.noise,
        sigma=batch.sigma,
        winners=batch.winners,
        losers=batch.losers,
        **options,
    )
