"""RL methods as plug-ins: what each one trains on and how, one instance bound to its loss section (P8).

A method is one objective in the core (``normguard_core/losses/<name>.py``, a function of its typed batch)
plus one :class:`Method` here, built once from its config section (``get_method(cfg.loss)``, as torchtune's
recipes bind their config once in ``setup()``: ``recipes/full_finetune_single_device.py``), that owns
everything else about it:

* ``points``: its point source (``services.points``): the training data it consumes and the typed loss
  batch of a micro-batch: :class:`SamplePoints` (forward-process points on the rollout's clean samples,
  ``SampleBatch``: NFT, AWM), :class:`PairPoints` (the same, for winner/loser pairs sharing sigma and eps,
  ``PairBatch``: Flow-DPO) or :class:`TrajectoryPoints` (the stored SDE steps with their log-probs,
  ``StepBatch``: Flow-GRPO);
* ``loss``: its core objective with the hyperparameters of its section bound;
* ``targets``: rewards -> advantages / optimality probabilities / pairs, and which samples train;
* its training-loop defaults as its source uses them (optimiser steps per RL step, training points
  per sample and how their sigmas are drawn, which lagged weight copies it keeps, whether it trains
  on the CFG velocity).

Its config cross-checks sit on its loss section (``services.config.losses``, ``check``), so that the
config validates a run without importing this module, which imports the config.

Only the plug-ins read their loss config section; the learner and the coordinator ask them the same
questions for every method, and never which kind of data a method trains on. Adding a method is one
file in the core and one class here (registered with :func:`register_method`): the one registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from normguard_core.advantages import group_advantages, nft_reward_prob, nonzero_advantage_mask, preference_pairs
from normguard_core.lagged import LAG_SCHEDULES, LagSchedule
from normguard_core.losses import (
    PairBatch,
    SampleBatch,
    StepBatch,
    awm_objective,
    dpo_objective,
    elbo_kl_scale,
    grpo_objective,
    nft_objective,
)
from normguard_core.samplers import sde_kl_scale
from normguard_core.types import LossOutput
from services.config.losses import ADV_CLIP_MAX, AWMLoss, DPOLoss, GRPOLoss, LossConfig, NFTLoss
from services.points import PairPoints, PointSource, PointSpec, SamplePoints, SigmaSchedule, TrajectoryPoints

if TYPE_CHECKING:
    from services.config import AdvantageConfig, RolloutConfig

__all__ = ["Method", "Targets", "available_methods", "get_method", "register_method"]

C = TypeVar("C", NFTLoss, AWMLoss, DPOLoss, GRPOLoss)  # the method's own loss section
B = TypeVar("B", SampleBatch, PairBatch, StepBatch)  # the batch its loss reads


@dataclass(frozen=True)
class Targets:
    """Learning signals of one RL step over the whole rollout batch (B samples).

    Attributes:
        advantages: ``(B,)`` float64 advantages.
        reward_prob: ``(B,)`` DiffusionNFT's r in [0, 1] (0.5 where unused).
        train_idx: ``(N,)`` long, the samples that train (all, or those with a non-zero advantage).
        winners: ``(P,)`` long winner indices (pair methods), else ``None``.
        losers: ``(P,)`` long loser indices, else ``None``.
        metrics: what the coordinator logs about them.
    """

    advantages: Tensor
    reward_prob: Tensor
    train_idx: Tensor
    winners: Tensor | None = None
    losers: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


class Method(Generic[C, B]):
    """One method bound to its loss section ``cfg``. Defaults are the source's; subclasses override what
    differs."""

    name: ClassVar[str]
    updates_per_step: ClassVar[int] = 1

    def __init__(self, cfg: C) -> None:
        self.cfg = cfg

    def loss(self, batch: B) -> LossOutput:
        """The core objective of one micro-batch, with this section's hyperparameters."""
        raise NotImplementedError

    def point_source(self, spec: PointSpec, schedule: SigmaSchedule) -> PointSource:
        """The learner's source of training points (``spec``: a ``LearnerSpec``; ``schedule``: the
        generator's sigma schedule, ``gen.schedule``)."""
        return SamplePoints(spec, self, schedule)

    @property
    def kl_weight(self) -> float:
        """Weight of the velocity KL to the reference (every section has one)."""
        return self.cfg.kl_weight

    def train_guidance(self, rollout: RolloutConfig) -> float:
        """The CFG scale of the training velocity (1: the conditional velocity alone)."""
        return 1.0

    def adv_clip_max(self) -> float:
        """The advantage clip that maps advantages to DiffusionNFT's r (the sources' default where a
        section has none)."""
        return ADV_CLIP_MAX

    def reads_v_old(self) -> bool:
        """Whether the objective reads the old policy's velocity ``v_old`` at the training points."""
        return False

    def timesteps_per_sample(self, rollout: RolloutConfig) -> int:
        """Training points per sample: ``int(0.99 * T)`` of a T-step rollout (``timestep_fraction``)."""
        return max(1, int(rollout.num_steps * 0.99))

    def train_sigmas(self) -> str:
        """How training sigmas are drawn (forward / pair methods; their sections name it)."""
        raise NotImplementedError(f"method {self.name} trains on no forward-process points")

    def old_schedule(self) -> LagSchedule:
        """Decay of the old (sampling) policy copy; ``none`` = on-policy (old = theta after each step)."""
        return LAG_SCHEDULES["none"]

    def ema_schedule(self) -> LagSchedule | None:
        """Decay of an extra EMA copy whose velocity the loss reads (``v_ema``), or ``None``."""
        return None

    def needs_ref(self) -> bool:
        """Whether the objective itself reads ``v_ref`` (NormGuard and tracking add their own need)."""
        return self.kl_weight > 0

    def kl_scale(self, sigma: Tensor, sigma_next: Tensor | None, noise_level: float) -> Tensor:
        """``(B,)`` per-point weight of the KL term (ones: the plain KL)."""
        return torch.ones_like(sigma)

    def targets(self, reward: Tensor, group_ids: Tensor, adv: AdvantageConfig) -> Targets:
        """Group advantages (sources' stat tracker) and NFT's r; every sample trains."""
        a = group_advantages(reward, group_ids, eps=adv.eps, std=adv.std)
        prob = nft_reward_prob(a, adv_clip_max=self.adv_clip_max()).float()
        metrics = {
            "advantages/abs_mean": float(a.abs().mean()),
            "advantages/zero_frac": float((a == 0).double().mean()),
        }
        return Targets(advantages=a, reward_prob=prob, train_idx=torch.arange(len(reward)), metrics=metrics)


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def get_method(cfg: LossConfig) -> Method:
    """The method of the loss section ``cfg`` (its ``name``), bound to it; the error lists the known ones."""
    try:
        cls = _METHODS[cfg.name]
    except KeyError:
        raise KeyError(f"unknown method {cfg.name!r}; known: {available_methods()}") from None
    return cls(cfg)


def available_methods() -> list[str]:
    """Sorted names."""
    return sorted(_METHODS)


@register_method
class DiffusionNFT(Method[NFTLoss, SampleBatch]):
    """NVlabs/DiffusionNFT: the old policy is a lagging EMA copy that also samples (decay_type 1);
    one optimiser step per RL step (``gradient_step_per_epoch=1`` in the PickScore / GenEval configs, 2 for
    OCR); training points on the sampler's own grid, fresh noise; KL ``train.beta = 1e-4``."""

    name = "diffusion_nft"

    def loss(self, batch: SampleBatch) -> LossOutput:
        c = self.cfg
        scale = c.adv_clip_max if c.loss_scale == "adv_clip_max" else 1.0
        return nft_objective(batch, beta=c.beta, adaptive_weighting=c.adaptive_weighting, loss_scale=scale)

    def adv_clip_max(self) -> float:
        return self.cfg.adv_clip_max

    def train_sigmas(self) -> str:
        return self.cfg.train_sigmas

    def reads_v_old(self) -> bool:
        return True

    def old_schedule(self) -> LagSchedule:
        return LAG_SCHEDULES[self.cfg.old_policy_decay]


@register_method
class AdvantageWeightedMatching(Method[AWMLoss, SampleBatch]):
    """scxue/advantage_weighted_matching (``dgx_awm.py``): on-policy, one optimiser step per RL step
    (``gradient_accumulation_steps`` = all training batches of the epoch), 6 stratified grid sigmas,
    ghuber weighting, PPO clip 1 (inactive on-policy), EMA-KL to a ``min(0.3, 0.001 k)`` EMA copy."""

    name = "awm"

    def loss(self, batch: SampleBatch) -> LossOutput:
        c = self.cfg
        return awm_objective(
            batch,
            weighting=c.weighting,
            ghuber_power=c.ghuber_power,
            clip_range=c.clip_range,
            adv_clip_max=c.adv_clip_max,
            advantage_max=c.advantage_max,
            ema_kl_weight=c.ema_kl_weight,
        )

    def adv_clip_max(self) -> float:
        return self.cfg.adv_clip_max

    def train_sigmas(self) -> str:
        return self.cfg.train_sigmas

    def timesteps_per_sample(self, rollout: RolloutConfig) -> int:
        return 6

    def ema_schedule(self) -> LagSchedule | None:
        return LAG_SCHEDULES[self.cfg.ema_decay] if self.cfg.ema_kl_weight > 0 else None

    def kl_scale(self, sigma: Tensor, sigma_next: Tensor | None, noise_level: float) -> Tensor:
        return elbo_kl_scale(sigma) if self.cfg.kl_form == "elbo" else torch.ones_like(sigma)

    def reads_v_old(self) -> bool:
        return self.cfg.clip_range is not None


@register_method
class FlowDPO(Method[DPOLoss, PairBatch]):
    """flow_grpo ``train_sd3_dpo.py``: per prompt the best and worst sample, sharing sigma (logit-normal,
    shifted) and eps; ``int(0.99 T)`` points per pair; one optimiser step per RL step; beta 100. Its
    section has no advantage clip: r is unused, mapped with the sources' default (the base's)."""

    name = "flow_dpo"

    def loss(self, batch: PairBatch) -> LossOutput:
        return dpo_objective(batch, beta=self.cfg.beta)

    def point_source(self, spec: PointSpec, schedule: SigmaSchedule) -> PointSource:
        return PairPoints(spec, self, schedule)

    def train_sigmas(self) -> str:
        return self.cfg.train_sigmas

    def needs_ref(self) -> bool:
        return True

    def targets(self, reward: Tensor, group_ids: Tensor, adv: AdvantageConfig) -> Targets:
        base = super().targets(reward, group_ids, adv)
        pairs = preference_pairs(reward, group_ids, min_gap=self.cfg.min_gap, ties=self.cfg.ties)
        metrics = {**base.metrics, "dpo/pairs": float(pairs.num_pairs), "dpo/ties": float(pairs.num_ties)}
        return Targets(
            advantages=base.advantages,
            reward_prob=base.reward_prob,
            train_idx=torch.unique(torch.cat([pairs.winners, pairs.losers])),
            winners=pairs.winners,
            losers=pairs.losers,
            metrics=metrics,
        )


@register_method
class FlowGRPO(Method[GRPOLoss, StepBatch]):
    """yifan123/flow_grpo ``train_sd3.py``: PPO-clip on the stored SDE steps' log-probs, two optimiser
    steps per RL step (asserted in its configs), ``int(0.99 T)`` of the T steps per sample, KL divided by
    ``2 std_t^2``, zero-advantage samples dropped, training on the CFG velocity (uncond detached)."""

    name = "flow_grpo"
    updates_per_step = 2

    def loss(self, batch: StepBatch) -> LossOutput:
        return grpo_objective(batch, clip_range=self.cfg.clip_range, adv_clip_max=self.cfg.adv_clip_max)

    def point_source(self, spec: PointSpec, schedule: SigmaSchedule) -> PointSource:
        return TrajectoryPoints(spec, self, schedule, guard=self.cfg.guard)

    def adv_clip_max(self) -> float:
        return self.cfg.adv_clip_max

    def train_guidance(self, rollout: RolloutConfig) -> float:
        return rollout.guidance_scale if self.cfg.train_cfg else 1.0

    def reads_v_old(self) -> bool:
        return self.cfg.guard  # GRPO-Guard's ratio reads the sampling policy's SDE mean

    def kl_scale(self, sigma: Tensor, sigma_next: Tensor | None, noise_level: float) -> Tensor:
        if sigma_next is None:
            raise ValueError("Flow-GRPO's SDE KL weight needs the step's next sigma")
        return sde_kl_scale(sigma, sigma_next, noise_level=noise_level)

    def targets(self, reward: Tensor, group_ids: Tensor, adv: AdvantageConfig) -> Targets:
        base = super().targets(reward, group_ids, adv)
        if not self.cfg.drop_zero_advantages:
            return base
        keep = torch.nonzero(nonzero_advantage_mask(base.advantages)).flatten()
        metrics = {**base.metrics, "advantages/dropped": float(len(reward) - len(keep))}
        return Targets(base.advantages, base.reward_prob, keep, metrics=metrics)
