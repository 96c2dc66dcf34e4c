"""Rewards to learning signals: group advantages, NFT's optimality probability, DPO pairs."""

from __future__ import annotations

import torch
from torch import Tensor

from normguard_core.types import PairResult

__all__ = ["group_advantages", "nft_reward_prob", "preference_pairs", "rewards_to_unit"]


def group_advantages(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-4, global_std: bool = False) -> Tensor:
    """GRPO advantages ``(r - mean_g) / (std_g + eps)`` within each prompt group.

    Uses the population std (Flow-GRPO's ``np.std``). A group of one sample, or one whose
    rewards are all equal, gets zero advantages: no signal, rather than a made-up one.

    Args:
        rewards: ``(B,)`` rewards.
        group_ids: ``(B,)`` long, samples of the same prompt share an id.
        eps: added to the std.
        global_std: divide by the batch std instead of each group's (Flow-Factory's
            ``global_std``; more stable with small groups).

    Returns:
        ``(B,)`` float32 advantages.
    """
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    rewards = rewards.float()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1
    counts = torch.zeros(num_groups).index_add_(0, inverse, torch.ones_like(rewards))
    means = torch.zeros(num_groups).index_add_(0, inverse, rewards) / counts
    centered = rewards - means[inverse]
    if global_std:
        std = rewards.std(unbiased=False).expand_as(rewards)
    else:
        var = torch.zeros(num_groups).index_add_(0, inverse, centered**2) / counts
        std = var.sqrt()[inverse]
    return centered / (std + eps)


def nft_reward_prob(advantages: Tensor, *, adv_clip_max: float = 5.0) -> Tensor:
    """DiffusionNFT's optimality probability ``r = clip(A, +-m) / m / 2 + 1/2`` in [0, 1].

    Source: NVlabs/DiffusionNFT ``train_nft_sd3.py`` (``normalized_advantages_clip``).
    """
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def rewards_to_unit(rewards: Tensor, *, low: float, high: float) -> Tensor:
    """Affine map of raw rewards with known range ``[low, high]`` to [0, 1] (clamped)."""
    if high <= low:
        raise ValueError(f"need high > low, got low={low}, high={high}")
    return ((rewards.float() - low) / (high - low)).clamp(0.0, 1.0)


def preference_pairs(rewards: Tensor, group_ids: Tensor, *, min_gap: float = 0.0) -> PairResult:
    """One (best, worst) pair per prompt group; ties are skipped and counted.

    A group whose best and worst rewards differ by ``<= min_gap`` (e.g. all equal) yields no
    pair; it is counted in ``num_ties`` instead of being paired by index (the silent
    tie-breaking of some research code).

    Args:
        rewards: ``(B,)``.
        group_ids: ``(B,)`` long.
        min_gap: smallest reward difference that counts as a preference.

    Returns:
        PairResult with ``(P,)`` winner and loser indices, P <= number of groups.
    """
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    winners, losers, ties = [], [], 0
    groups = torch.unique(group_ids)
    for g in groups.tolist():
        idx = torch.nonzero(group_ids == g).flatten()
        r = rewards[idx]
        best, worst = int(torch.argmax(r)), int(torch.argmin(r))
        if float(r[best] - r[worst]) <= min_gap:
            ties += 1
            continue
        winners.append(int(idx[best]))
        losers.append(int(idx[worst]))
    return PairResult(
        winners=torch.tensor(winners, dtype=torch.long),
        losers=torch.tensor(losers, dtype=torch.long),
        num_groups=len(groups),
        num_ties=ties,
    )
