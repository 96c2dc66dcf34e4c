"""Rewards to learning signals: group advantages, NFT's optimality probability, DPO pairs."""

from __future__ import annotations

import torch
from torch import Tensor

from normguard_core.types import PairResult

__all__ = [
    "group_advantages",
    "nft_reward_prob",
    "nonzero_advantage_mask",
    "preference_pairs",
]


def group_advantages(rewards: Tensor, group_ids: Tensor, *, eps: float = 1e-4, std: str = "global") -> Tensor:
    """Per-prompt advantages ``(r - mean_g) / (std + eps)``, computed in float64.

    Source: the per-prompt stat tracker of flow_grpo / DiffusionNFT (``flow_grpo/stat_tracking.py``):
    the mean is the prompt group's, the std (population, ``np.std``) is that of ALL rewards of the
    step with ``std="global"`` (``sample.global_std=True``, the default of every SD3 config of
    Flow-GRPO, DiffusionNFT and AWM) or the group's own with ``std="group"``. The per-group std
    turns tiny reward differences inside a saturated group into full-scale advantages; the global
    one keeps them tiny, which is why the sources use it.

    A group whose rewards are all equal (or a group of one) gets advantages of exactly 0: they are
    set, not computed, so float rounding of the group mean cannot leave a made-up signal.

    Args:
        rewards: ``(B,)`` rewards.
        group_ids: ``(B,)`` long, samples of the same prompt share an id.
        eps: added to the std (1e-4 in the sources).
        std: ``"global"`` (default, the sources) or ``"group"``.

    Returns:
        ``(B,)`` float64 advantages.
    """
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    if std not in ("global", "group"):
        raise ValueError(f"std must be 'global' or 'group', got {std!r}")
    r = rewards.detach().to(torch.float64).cpu()
    _, inverse = torch.unique(group_ids.cpu(), return_inverse=True)
    num_groups = int(inverse.max()) + 1
    ones = torch.ones_like(r)
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, ones)
    means = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, r) / counts
    gmax = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce_(0, inverse, r, "amax")
    gmin = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce_(0, inverse, r, "amin")
    centered = r - means[inverse]
    if std == "global":
        scale = r.std(unbiased=False).expand_as(r)
    else:
        var = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, centered**2) / counts
        scale = var.sqrt()[inverse]
    adv = centered / (scale + eps)
    return torch.where((gmax == gmin)[inverse], torch.zeros_like(adv), adv)


def nonzero_advantage_mask(advantages: Tensor) -> Tensor:
    """``(B,)`` bool: samples whose advantage is not exactly 0 (Flow-GRPO drops the others).

    Source: flow_grpo ``train_sd3.py`` filters samples whose advantages are all zero before
    training (it then re-admits some at random so the count divides its batches; here the
    learner's mini-batches take any count, so nothing is re-admitted).
    """
    return advantages != 0


def nft_reward_prob(advantages: Tensor, *, adv_clip_max: float = 5.0) -> Tensor:
    """DiffusionNFT's optimality probability ``r = clip(A, +-m) / m / 2 + 1/2`` in [0, 1].

    Source: NVlabs/DiffusionNFT ``train_nft_sd3.py`` (``normalized_advantages_clip``).
    """
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max}")
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def preference_pairs(rewards: Tensor, group_ids: Tensor, *, min_gap: float = 0.0, ties: str = "skip") -> PairResult:
    """One (best, worst) pair per prompt group; ties are counted, and skipped by default.

    A group whose best and worst rewards differ by ``<= min_gap`` (e.g. all equal) is a tie. With
    ``ties="skip"`` (default) it yields no pair and is counted in ``num_ties``. With
    ``ties="flow_grpo"`` it is paired the way flow_grpo's DPO stat tracker does
    (``stat_tracking.py``, ``type='dpo'``): the group's second sample as winner, its first as
    loser, and still counted. We default to skipping: a tie carries no preference, and training
    on an index-made one pushes the two samples apart for no reason.

    Args:
        rewards: ``(B,)``.
        group_ids: ``(B,)`` long.
        min_gap: smallest reward difference that counts as a preference.
        ties: ``"skip"`` or ``"flow_grpo"``.

    Returns:
        PairResult with ``(P,)`` winner and loser indices, P <= number of groups.
    """
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be (B,)")
    if ties not in ("skip", "flow_grpo"):
        raise ValueError(f"ties must be 'skip' or 'flow_grpo', got {ties!r}")
    winners, losers, num_ties = [], [], 0
    groups = torch.unique(group_ids)
    for g in groups.tolist():
        idx = torch.nonzero(group_ids == g).flatten()
        r = rewards[idx]
        best, worst = int(torch.argmax(r)), int(torch.argmin(r))
        if float(r[best] - r[worst]) <= min_gap:
            num_ties += 1
            if ties == "skip" or len(idx) < 2:
                continue
            best, worst = 1, 0
        winners.append(int(idx[best]))
        losers.append(int(idx[worst]))
    return PairResult(
        winners=torch.tensor(winners, dtype=torch.long),
        losers=torch.tensor(losers, dtype=torch.long),
        num_groups=len(groups),
        num_ties=num_ties,
    )
