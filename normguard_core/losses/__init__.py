"""Losses: NormGuard, the base RL objectives (one file each, each a function of its typed batch) and
their composition. The methods that bind them to a config section live in ``services.methods``."""

from normguard_core.losses.awm import awm_loss, awm_objective, elbo_kl_scale, matching_log_prob
from normguard_core.losses.batches import BinWeights, GuardTerms, PairBatch, Reference, SampleBatch, StepBatch
from normguard_core.losses.compose import NormGuardParams, compose_objective, normguard_objective
from normguard_core.losses.diffusion_nft import diffusion_nft_loss, nft_objective
from normguard_core.losses.flow_dpo import dpo_objective, flow_dpo_loss
from normguard_core.losses.flow_grpo import flow_grpo_loss, grpo_objective
from normguard_core.losses.normguard import normguard_penalty

__all__ = [
    "BinWeights",
    "GuardTerms",
    "NormGuardParams",
    "PairBatch",
    "Reference",
    "SampleBatch",
    "StepBatch",
    "awm_loss",
    "awm_objective",
    "compose_objective",
    "diffusion_nft_loss",
    "dpo_objective",
    "elbo_kl_scale",
    "flow_dpo_loss",
    "flow_grpo_loss",
    "grpo_objective",
    "matching_log_prob",
    "nft_objective",
    "normguard_objective",
    "normguard_penalty",
]
