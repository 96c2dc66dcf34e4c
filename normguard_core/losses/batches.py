"""The typed micro-batches the losses consume: one frozen type per kind of training point.

As in facebookresearch/flow_matching (``flow_matching/path/path.py``: ``ProbPath.sample`` returns one
typed ``PathSample`` and a loss is a function of it), each point source of the services emits its own
batch and each base loss reads the one it needs:

* :class:`SampleBatch`: forward-process points on the rollout's clean samples (DiffusionNFT, AWM);
* :class:`PairBatch`: the same for winner/loser pairs sharing sigma and eps (Flow-DPO);
* :class:`StepBatch`: stored SDE steps with their log-probs (Flow-GRPO, with :class:`GuardTerms`).

What NormGuard and the KL read beside the base loss is a separate :class:`Reference` (absent when
nothing reads the frozen reference), with the constraint mode's per-point :class:`BinWeights`.
All per-point tensors share the batch size B; ``*D`` is the per-sample data shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["BinWeights", "GuardTerms", "PairBatch", "Reference", "SampleBatch", "StepBatch"]


@dataclass(frozen=True)
class SampleBatch:
    """Forward-process points ``x_sigma = (1 - sigma) x0 + sigma noise`` on clean samples.

    Attributes:
        v_theta: ``(B, *D)`` current policy velocity (carries grad).
        x0: ``(B, *D)`` clean samples (the rollout's final latents).
        noise: ``(B, *D)`` the eps used to build ``x_sigma``.
        sigma: ``(B,)`` training sigmas.
        advantages: ``(B,)`` group-normalised advantages.
        reward_prob: ``(B,)`` rewards mapped to [0, 1] (DiffusionNFT's optimality probability).
        v_old: ``(B, *D)`` the sampling ("old") policy's velocity (no grad), or ``None`` where the learner
            keeps no such reading (the bound method does not read it and no metric tracks it).
        v_ema: ``(B, *D)`` AWM's lagged EMA copy's velocity (no grad), or ``None`` where no EMA copy is kept.
    """

    v_theta: Tensor
    x0: Tensor
    noise: Tensor
    sigma: Tensor
    advantages: Tensor
    reward_prob: Tensor
    v_old: Tensor | None
    v_ema: Tensor | None


@dataclass(frozen=True)
class PairBatch:
    """Winner/loser pairs: rows ``winners[p]`` and ``losers[p]`` share their sigma and noise.

    Attributes:
        v_theta: ``(B, *D)`` policy velocity; v_ref: ``(B, *D)`` frozen reference velocity (no grad).
        x0, noise: ``(B, *D)``; sigma: ``(B,)``.
        winners, losers: ``(P,)`` long row indices of the preferred and the rejected sample of each pair.
    """

    v_theta: Tensor
    v_ref: Tensor
    x0: Tensor
    noise: Tensor
    sigma: Tensor
    winners: Tensor
    losers: Tensor


@dataclass(frozen=True)
class GuardTerms:
    """GRPO-Guard's inputs: ``mean`` ``(B, *D)`` the current policy's SDE mean of the taken step (carries
    grad), ``old_mean`` the sampling policy's at the same state, ``step_std`` ``(B,)`` ``std_t sqrt(-dt)``."""

    mean: Tensor
    old_mean: Tensor
    step_std: Tensor


@dataclass(frozen=True)
class StepBatch:
    """Stored SDE steps ``x_t -> x_{t-1}`` of the rollout.

    Attributes:
        log_prob: ``(B,)`` the current policy's log-prob of the taken step (carries grad).
        old_log_prob: ``(B,)`` the same at sampling time (no grad).
        advantages: ``(B,)`` group-normalised advantages.
        guard: GRPO-Guard's terms, or ``None`` for the plain ratio (``loss.guard: false``).
    """

    log_prob: Tensor
    old_log_prob: Tensor
    advantages: Tensor
    guard: GuardTerms | None


@dataclass(frozen=True)
class BinWeights:
    """NormGuard's per-point multipliers in constraint mode (those of each point's sigma bin), ``(B,)``:
    ``normguard`` for the upper hinge, ``floor`` for the lower side (``None`` without a floor)."""

    normguard: Tensor
    floor: Tensor | None


@dataclass(frozen=True)
class Reference:
    """The frozen reference at a micro-batch's points: what NormGuard and the KL term read.

    Attributes:
        v_theta: ``(B, *D)`` policy velocity (carries grad); v_ref: ``(B, *D)`` reference velocity.
        kl_scale: ``(B,)`` per-point weight of the KL term (a method's sigma-dependent KL form, e.g.
            Flow-GRPO's ``1 / (2 std_t^2)``; ones for the plain KL).
        bins: the constraint mode's per-point multipliers, or ``None`` (the scalar ``NormGuardParams.weight``).
    """

    v_theta: Tensor
    v_ref: Tensor
    kl_scale: Tensor
    bins: BinWeights | None = None
