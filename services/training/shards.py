"""Step 4 of the recipe: the method's targets (advantages, NFT's r, or DPO pairs) from the rewards,
split over the learner ranks by training unit (samples, or pairs for pair methods).

Every rank gets its shard and every rank's unit count (``TrainBatch.shard_units``), so each
mini-batch's loss is the mean over its points on all ranks. A step with no unit to train on
(e.g. Flow-GRPO with every group's rewards equal) yields no shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from services.training.experience import Experience
from services.types import TrainBatch

if TYPE_CHECKING:
    from services.config import ExperimentConfig
    from services.methods import Method

__all__ = ["build_shards"]


def build_shards(
    method: Method, exp: Experience, *, step: int, world: int, cfg: ExperimentConfig
) -> tuple[list[TrainBatch], dict[str, float]]:
    """The method's targets (``services.methods``), split over the learner ranks by training unit."""
    rollout, reward = exp.rollout, exp.rewards
    targets = method.targets(reward, rollout.group_ids, cfg.advantages)
    adv, prob = targets.advantages.float(), targets.reward_prob
    sde = rollout.states is not None

    def shard(idx: torch.Tensor, rank: int, units: tuple[int, ...], num_pairs: int = 0) -> TrainBatch:
        return TrainBatch(
            latents=rollout.latents[idx],
            prompts=[rollout.prompts[i] for i in idx],
            advantages=adv[idx],
            reward_prob=prob[idx],
            step=step,
            rank=rank,
            shard_units=units,
            num_pairs=num_pairs,
            states=rollout.states[:, idx] if sde else None,
            log_probs=rollout.log_probs[:, idx] if sde else None,
            sigmas=rollout.sigmas if sde else None,
            versions=rollout.versions[idx],
        )

    if targets.winners is not None:  # pair methods: a unit is a (winner, loser) pair
        parts = torch.tensor_split(torch.arange(len(targets.winners)), world)
        units = tuple(len(p) for p in parts)
        if not sum(units):
            return [], targets.metrics
        return [
            shard(torch.cat([targets.winners[p], targets.losers[p]]), r, units, num_pairs=len(p))
            for r, p in enumerate(parts)
        ], targets.metrics
    parts = torch.tensor_split(targets.train_idx, world)
    units = tuple(len(p) for p in parts)
    if not sum(units):  # e.g. Flow-GRPO with every group's rewards equal
        return [], targets.metrics
    return [shard(idx, rank, units) for rank, idx in enumerate(parts)], targets.metrics
