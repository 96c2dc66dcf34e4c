"""Reward scorers behind one protocol, in a registry, with weighted combination."""

from services.rewards.base import (
    RewardScorer,
    available_scorers,
    build_scorer,
    combine_scores,
    register_scorer,
    validate_images,
)

__all__ = ["RewardScorer", "available_scorers", "build_scorer", "combine_scores", "register_scorer", "validate_images"]
