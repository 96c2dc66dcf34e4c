"""RL methods as plug-ins: what each one trains on and how, found by ``loss.name`` (P8).

A method is one objective in the core (``normguard_core/losses/<name>.py``) plus one
:class:`Method` here that owns everything else about it:

* ``points``: its point source (``services.points``): the training data it consumes and the
  loss fields of a micro-batch: :class:`SamplePoints` (forward-process points on the rollout's clean
  samples: NFT, AWM), :class:`PairPoints` (the same, for winner/loser pairs sharing sigma and eps:
  Flow-DPO) or :class:`TrajectoryPoints` (the stored SDE steps with their log-probs: Flow-GRPO);
* ``targets``: rewards -> advantages / optimality probabilities / pairs, and which samples train;
* its training-loop defaults as its source uses them (optimiser steps per RL step, training points
  per sample and how their sigmas are drawn, which lagged weight copies it keeps, whether it trains
  on the CFG velocity);
* ``loss_kwargs``: the core objective's hyperparameters from its config section.

Its config cross-checks sit on its loss section (``services.config.losses``, ``check``), so that the
config validates a run without importing this module, which imports the config.

Only the plug-ins read their loss config section; the learner and the coordinator ask them the same
questions for every method, and never which kind of data a method trains on. Adding a method is one
file in the core and one class here (registered with :func:`register_method`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from normguard_core.advantages import group_advantages, nft_reward_prob, nonzero_advantage_mask, preference_pairs
from normguard_core.lagged import LAG_SCHEDULES, LagSchedule
from normguard_core.losses import elbo_kl_scale
from normguard_core.samplers import sde_kl_scale
from services.config.losses import ADV_CLIP_MAX, AWMLoss, DPOLoss, GRPOLoss, LossConfig, NFTLoss
from services.points import PairPoints, PointSource, PointSpec, SamplePoints, SigmaSchedule, TrajectoryPoints

if TYPE_CHECKING:
    from services.config import ExperimentConfig, RolloutConfig

__all__ = ["Method", "Targets", "available_methods", "get_method", "register_method"]


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


class Method:
    """Defaults are the source's; subclasses override what differs."""

    name: ClassVar[str]
    points: ClassVar[type[PointSource]] = SamplePoints
    updates_per_step: ClassVar[int] = 1

    def point_source(self, spec: PointSpec, schedule: SigmaSchedule) -> PointSource:
        """The learner's source of training points (``spec``: a ``LearnerSpec``; ``schedule``: the
        generator's sigma schedule, ``gen.schedule``)."""
        return self.points(spec, self, schedule)

    def train_guidance(self, loss_cfg: LossConfig, rollout: RolloutConfig) -> float:
        """The CFG scale of the training velocity (1: the conditional velocity alone)."""
        return 1.0

    def adv_clip_max(self, loss_cfg: LossConfig) -> float:
        """The advantage clip that maps advantages to DiffusionNFT's r."""
        return loss_cfg.adv_clip_max

    def reads_v_old(self, loss_cfg: LossConfig) -> bool:
        """Whether the objective reads the old policy's velocity ``v_old`` at the training points."""
        return False

    def timesteps_per_sample(self, cfg: ExperimentConfig) -> int:
        """Training points per sample: ``int(0.99 * T)`` of a T-step rollout (``timestep_fraction``)."""
        return max(1, int(cfg.rollout.num_steps * 0.99))

    def train_sigmas(self, loss_cfg: LossConfig) -> str:
        """How training sigmas are drawn (forward / pair methods)."""
        return loss_cfg.train_sigmas

    def loss_kwargs(self, loss_cfg: LossConfig) -> dict:
        """The core objective's hyperparameters (explicit, no ``**cfg`` splat)."""
        raise NotImplementedError

    def old_schedule(self, loss_cfg: LossConfig) -> LagSchedule:
        """Decay of the old (sampling) policy copy; ``none`` = on-policy (old = theta after each step)."""
        return LAG_SCHEDULES["none"]

    def ema_schedule(self, loss_cfg: LossConfig) -> LagSchedule | None:
        """Decay of an extra EMA copy whose velocity the loss reads (``v_ema``), or ``None``."""
        return None

    def needs_ref(self, loss_cfg: LossConfig) -> bool:
        """Whether the objective itself reads ``v_ref`` (NormGuard and tracking add their own need)."""
        return loss_cfg.kl_weight > 0

    def kl_scale(
        self, loss_cfg: LossConfig, *, sigma: Tensor, sigma_next: Tensor | None, noise_level: float
    ) -> Tensor | None:
        """``(B,)`` per-point weight of the KL term, or ``None`` for 1."""
        return None

    def targets(self, reward: Tensor, group_ids: Tensor, cfg: ExperimentConfig) -> Targets:
        """Group advantages (sources' stat tracker) and NFT's r; every sample trains."""
        adv = group_advantages(reward, group_ids, eps=cfg.advantages.eps, std=cfg.advantages.std)
        prob = nft_reward_prob(adv, adv_clip_max=self.adv_clip_max(cfg.loss)).float()
        metrics = {
            "advantages/abs_mean": float(adv.abs().mean()),
            "advantages/zero_frac": float((adv == 0).double().mean()),
        }
        return Targets(advantages=adv, reward_prob=prob, train_idx=torch.arange(len(reward)), metrics=metrics)


# a registry by name as normguard_core.losses.registry's (``duplicates`` pairs the two): issue #39 item 1
# makes the method own its loss, one registry; until then each layer keeps its own
_METHODS: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance under ``cls.name``."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls()
    return cls


def get_method(name: str) -> Method:
    """The registered method ``name``; the error lists the known ones."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {available_methods()}") from None


def available_methods() -> list[str]:
    """Sorted names."""
    return sorted(_METHODS)


@register_method
class DiffusionNFT(Method):
    """NVlabs/DiffusionNFT: the old policy is a lagging EMA copy that also samples (decay_type 1);
    one optimiser step per RL step (``gradient_step_per_epoch=1`` in the PickScore / GenEval configs, 2 for
    OCR); training points on the sampler's own grid, fresh noise; KL ``train.beta = 1e-4``."""

    name = "diffusion_nft"

    def reads_v_old(self, loss_cfg: NFTLoss) -> bool:
        return True

    def loss_kwargs(self, loss_cfg: NFTLoss) -> dict:
        scale = loss_cfg.adv_clip_max if loss_cfg.loss_scale == "adv_clip_max" else 1.0
        return dict(beta=loss_cfg.beta, adaptive_weighting=loss_cfg.adaptive_weighting, loss_scale=scale)

    def old_schedule(self, loss_cfg: NFTLoss) -> LagSchedule:
        return LAG_SCHEDULES[loss_cfg.old_policy_decay]


@register_method
class AdvantageWeightedMatching(Method):
    """scxue/advantage_weighted_matching (``dgx_awm.py``): on-policy, one optimiser step per RL step
    (``gradient_accumulation_steps`` = all training batches of the epoch), 6 stratified grid sigmas,
    ghuber weighting, PPO clip 1 (inactive on-policy), EMA-KL to a ``min(0.3, 0.001 k)`` EMA copy."""

    name = "awm"

    def timesteps_per_sample(self, cfg: ExperimentConfig) -> int:
        return 6

    def loss_kwargs(self, loss_cfg: AWMLoss) -> dict:
        return dict(
            weighting=loss_cfg.weighting,
            ghuber_power=loss_cfg.ghuber_power,
            clip_range=loss_cfg.clip_range,
            adv_clip_max=loss_cfg.adv_clip_max,
            advantage_max=loss_cfg.advantage_max,
            ema_kl_weight=loss_cfg.ema_kl_weight,
        )

    def ema_schedule(self, loss_cfg: AWMLoss) -> LagSchedule | None:
        return LAG_SCHEDULES[loss_cfg.ema_decay] if loss_cfg.ema_kl_weight > 0 else None

    def kl_scale(
        self, loss_cfg: AWMLoss, *, sigma: Tensor, sigma_next: Tensor | None, noise_level: float
    ) -> Tensor | None:
        return elbo_kl_scale(sigma) if loss_cfg.kl_form == "elbo" else None

    def reads_v_old(self, loss_cfg: AWMLoss) -> bool:
        return loss_cfg.clip_range is not None


@register_method
class FlowDPO(Method):
    """flow_grpo ``train_sd3_dpo.py``: per prompt the best and worst sample, sharing sigma (logit-normal,
    shifted) and eps; ``int(0.99 T)`` points per pair; one optimiser step per RL step; beta 100."""

    name = "flow_dpo"
    points = PairPoints

    def adv_clip_max(self, loss_cfg: DPOLoss) -> float:
        return ADV_CLIP_MAX  # its section has no clip: r is unused, mapped with the sources' default

    def loss_kwargs(self, loss_cfg: DPOLoss) -> dict:
        return dict(beta=loss_cfg.beta)

    def needs_ref(self, loss_cfg: DPOLoss) -> bool:
        return True

    def targets(self, reward: Tensor, group_ids: Tensor, cfg: ExperimentConfig) -> Targets:
        base = super().targets(reward, group_ids, cfg)
        pairs = preference_pairs(reward, group_ids, min_gap=cfg.loss.min_gap, ties=cfg.loss.ties)
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
class FlowGRPO(Method):
    """yifan123/flow_grpo ``train_sd3.py``: PPO-clip on the stored SDE steps' log-probs, two optimiser
    steps per RL step (asserted in its configs), ``int(0.99 T)`` of the T steps per sample, KL divided by
    ``2 std_t^2``, zero-advantage samples dropped, training on the CFG velocity (uncond detached)."""

    name = "flow_grpo"
    points = TrajectoryPoints
    updates_per_step = 2

    def point_source(self, spec: PointSpec, schedule: SigmaSchedule) -> PointSource:
        return TrajectoryPoints(spec, self, schedule, guard=spec.loss.guard)

    def train_guidance(self, loss_cfg: GRPOLoss, rollout: RolloutConfig) -> float:
        return rollout.guidance_scale if loss_cfg.train_cfg else 1.0

    def loss_kwargs(self, loss_cfg: GRPOLoss) -> dict:
        return dict(clip_range=loss_cfg.clip_range, adv_clip_max=loss_cfg.adv_clip_max)

    def reads_v_old(self, loss_cfg: GRPOLoss) -> bool:
        return loss_cfg.guard  # GRPO-Guard's ratio reads the sampling policy's SDE mean

    def kl_scale(
        self, loss_cfg: GRPOLoss, *, sigma: Tensor, sigma_next: Tensor | None, noise_level: float
    ) -> Tensor | None:
        return sde_kl_scale(sigma, sigma_next, noise_level=noise_level)

    def targets(self, reward: Tensor, group_ids: Tensor, cfg: ExperimentConfig) -> Targets:
        base = super().targets(reward, group_ids, cfg)
        if not cfg.loss.drop_zero_advantages:
            return base
        keep = torch.nonzero(nonzero_advantage_mask(base.advantages)).flatten()
        metrics = {**base.metrics, "advantages/dropped": float(len(reward) - len(keep))}
        return Targets(base.advantages, base.reward_prob, keep, metrics=metrics)
