"""Reward scorers behind one protocol, in a registry, with weighted combination."""

from services.rewards.base import (
    GroupRewardScorer,
    RewardScorer,
    available_scorers,
    build_scorer,
    combine_scores,
    is_groupwise,
    register_scorer,
    validate_images,
)

__all__ = [
    "GroupRewardScorer",
    "RewardScorer",
    "available_scorers",
    "build_scorer",
    "combine_scores",
    "is_groupwise",
    "register_scorer",
    "validate_images",
]
