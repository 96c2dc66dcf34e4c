"""Losses: NormGuard, the base RL objectives (one file each) and their composition."""

from normguard_core.losses import awm, diffusion_nft, flow_dpo, flow_grpo  # noqa: F401  (registers)
from normguard_core.losses.awm import awm_loss, elbo_kl_scale, matching_log_prob
from normguard_core.losses.compose import NormGuardParams, compose_objective, normguard_objective
from normguard_core.losses.diffusion_nft import diffusion_nft_loss
from normguard_core.losses.flow_dpo import flow_dpo_loss
from normguard_core.losses.flow_grpo import flow_grpo_loss
from normguard_core.losses.normguard import normguard_penalty
from normguard_core.losses.registry import (
    LossBatch,
    LossSpec,
    available_losses,
    compute_loss,
    get_loss,
    register_loss,
)

__all__ = [
    "LossBatch",
    "LossSpec",
    "NormGuardParams",
    "available_losses",
    "awm_loss",
    "compose_objective",
    "compute_loss",
    "diffusion_nft_loss",
    "elbo_kl_scale",
    "flow_dpo_loss",
    "flow_grpo_loss",
    "get_loss",
    "matching_log_prob",
    "normguard_objective",
    "normguard_penalty",
    "register_loss",
]
