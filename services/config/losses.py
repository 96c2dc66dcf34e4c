"""The per-loss sections, a discriminated union on ``loss.name`` (defaults are the sources', see
../shared/ALGORITHMS.md and ``services.methods``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal, TypeAlias

from pydantic import Field

from services.config.base import Section

if TYPE_CHECKING:
    from services.config.sections import RolloutConfig

__all__ = ["ADV_CLIP_MAX", "AWMLoss", "DPOLoss", "GRPOLoss", "LossConfig", "NFTLoss"]

ADV_CLIP_MAX = 5.0  # the sources' advantage clip (NFT, AWM, Flow-GRPO); Flow-DPO maps its unused r with it too


TrainSigmas = Literal["sampler_grid", "grid_stratified", "uniform", "logit_normal"]


class _LossSection(Section):
    """What every method's section shares: its cross-checks against the rollout. They sit here, beside the
    fields they read, so that the experiment config validates a run without importing a method plug-in
    (``services.methods`` imports this module)."""

    # Each method narrows ``name`` to its Literal (the union's discriminator). The sections are frozen, so the
    # field is read-only and the narrowing sound; pyright does not read pydantic's ``frozen`` and takes the
    # field for a mutable one (invariant), hence the ignore on each override.
    name: str

    def check(self, rollout: RolloutConfig) -> None:
        """Raise ``ValueError`` for a rollout this method cannot train on."""
        if rollout.group_size < 2:
            raise ValueError(f"loss {self.name} compares samples within a prompt group: rollout.group_size >= 2")


class NFTLoss(_LossSection):
    """DiffusionNFT (NVlabs/DiffusionNFT ``train_nft_sd3.py``, ``config/nft.py``); defaults are the source's."""

    name: Literal["diffusion_nft"] = "diffusion_nft"  # pyright: ignore[reportIncompatibleVariableOverride] - frozen
    beta: float = Field(default=1.0, gt=0, description="DiffusionNFT mixing strength (1.0 in the SD3 configs, 0.1 OCR)")
    adv_clip_max: float = Field(default=ADV_CLIP_MAX, gt=0, description="advantage clip, maps A to r in [0, 1]")
    adaptive_weighting: bool = Field(default=True, description="x0-space self-normalised error (reference code)")
    loss_scale: Literal["adv_clip_max", "unit"] = Field(
        default="adv_clip_max", description="'adv_clip_max': the source's mean(loss * adv_clip_max); 'unit': no factor"
    )
    old_policy_decay: Literal["nft_linear", "nft_delayed", "none"] = Field(
        default="nft_linear",
        description="the old (sampling) policy's EMA schedule: decay_type 1 (min(0.001 k, 0.5)), 2 (OCR) or "
        "none (old = theta after every RL step)",
    )
    kl_weight: float = Field(default=1e-4, ge=0, description="velocity KL to the reference (the source's train.beta)")
    train_sigmas: TrainSigmas = Field(
        default="sampler_grid", description="training sigmas: the sampler's grid (source)"
    )


class AWMLoss(_LossSection):
    """AWM (scxue/advantage_weighted_matching ``train_sd3_awm.py``); defaults are ``config/dgx_awm.py``'s."""

    name: Literal["awm"] = "awm"  # pyright: ignore[reportIncompatibleVariableOverride] - frozen
    weighting: Literal["uniform", "sigma", "sigma2", "huber", "ghuber"] = "ghuber"
    ghuber_power: float = Field(default=0.25, gt=0, description="p of the ghuber weighting")
    clip_range: float | None = Field(default=1.0, gt=0, description="PPO ratio clip; None = plain AWM")
    adv_clip_max: float = Field(default=ADV_CLIP_MAX, gt=0)
    advantage_max: float | None = Field(default=1.0, gt=0, description="rescale clipped advantages to +-advantage_max")
    kl_weight: float = Field(default=1e-4, ge=0, description="KL to the reference (1e-4 PickScore, 1e-3 GenEval)")
    kl_form: Literal["uniform", "elbo"] = Field(
        default="uniform", description="'elbo' divides by 2 std_t^2 (source option)"
    )
    ema_kl_weight: float = Field(default=1.0, ge=0, description="EMA-KL weight (the source's ema_beta)")
    ema_decay: Literal["awm_linear", "none"] = Field(default="awm_linear", description="EMA-KL copy: min(0.3, 0.001 k)")
    train_sigmas: TrainSigmas = Field(
        default="grid_stratified",
        description="training sigmas: stratified indices into the sampler's grid (discrete_wo_init)",
    )


class DPOLoss(_LossSection):
    """Flow-DPO (flow_grpo ``train_sd3_dpo.py``, ``config/dpo.py``)."""

    name: Literal["flow_dpo"] = "flow_dpo"  # pyright: ignore[reportIncompatibleVariableOverride] - frozen
    beta: float = Field(default=100.0, gt=0, description="inverse temperature on per-element MSEs (flow_grpo SD3: 100)")
    min_gap: float = Field(default=0.0, ge=0, description="reward gap below which a group is a tie")
    ties: Literal["skip", "flow_grpo"] = Field(
        default="skip", description="a tie: skipped and counted, or paired index 1 over 0 as flow_grpo does"
    )
    kl_weight: float = Field(default=0.0, ge=0, description="velocity KL to the reference (none in the source)")
    train_sigmas: TrainSigmas = Field(
        default="logit_normal", description="logit-normal(0, 1), shifted by rollout.shift"
    )


class GRPOLoss(_LossSection):
    """Flow-GRPO (flow_grpo ``train_sd3.py``, ``config/grpo.py``)."""

    name: Literal["flow_grpo"] = "flow_grpo"  # pyright: ignore[reportIncompatibleVariableOverride] - frozen
    clip_range: float = Field(default=1e-4, gt=0)
    adv_clip_max: float = Field(default=ADV_CLIP_MAX, gt=0)
    kl_weight: float = Field(
        default=0.04, ge=0, description="KL beta (0.04 OCR/GenEval, 0.01 PickScore), sigma-dependent"
    )
    drop_zero_advantages: bool = Field(default=True, description="train only on samples with a non-zero advantage")
    train_cfg: bool = Field(
        default=True, description="train on the CFG velocity of rollout.guidance_scale (uncond detached)"
    )
    guard: bool = Field(
        default=False,
        description="GRPO-Guard (arXiv 2510.22319): the ratio normalised per timestep (x step std, mean-shift "
        "corrected), as in Flow-Factory's grpo-guard trainer",
    )

    def check(self, rollout: RolloutConfig) -> None:
        super().check(rollout)
        if rollout.sde_noise_level <= 0:
            raise ValueError("loss flow_grpo needs SDE rollouts: set rollout.sde_noise_level > 0 (e.g. 0.7)")


LossConfig: TypeAlias = Annotated[NFTLoss | AWMLoss | DPOLoss | GRPOLoss, Field(discriminator="name")]
