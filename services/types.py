"""Typed messages between the coordinator and its actors (P5)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

__all__ = [
    "EmbeddedAssets",
    "RolloutBatch",
    "RolloutRequest",
    "ScoreRequest",
    "ScoreResult",
    "ScorerBuild",
    "StaleSamplerError",
    "TrainBatch",
]


@dataclass(frozen=True)
class RolloutRequest:
    """Work for one RolloutSampler: one entry per sample.

    Attributes:
        prompts: B prompts (a prompt repeats ``group_size`` times).
        group_ids: B prompt-group ids.
        seeds: B per-sample seeds: the noise (and SDE noise) of a sample depends only on its
            seed, so a redone request after an actor restart reproduces the same samples.
        num_steps: sampler steps.
        guidance_scale: CFG scale.
        shift: grid shift.
        sde_noise_level: 0 for ODE rollouts.
        min_version: the sampler must hold at least this policy version.
    """

    prompts: list[str]
    group_ids: list[int]
    seeds: list[int]
    num_steps: int
    guidance_scale: float = 1.0
    shift: float = 1.0
    sde_noise_level: float = 0.0
    min_version: int = 0


@dataclass(frozen=True)
class RolloutBatch:
    """Samples from one sampler, each tagged with the policy version that made it.

    Attributes:
        latents: ``(B, *D)`` final samples x0.
        images: ``(B, 3, H, W)`` decoded, in [0, 1].
        prompts: B prompts.
        group_ids: ``(B,)``.
        seeds: B seeds (for bookkeeping and dedup).
        versions: ``(B,)`` policy version per sample.
        norm_ratio: ``(T, B)`` ``||v_theta|| / ||v_ref||`` along the rollout.
        states: ``(T + 1, B, *D)`` trajectory (SDE rollouts only).
        log_probs: ``(T, B)`` step log-probs (SDE rollouts only).
        sigmas: ``(T + 1,)`` grid used.
    """

    latents: Tensor
    images: Tensor
    prompts: list[str]
    group_ids: Tensor
    seeds: list[int]
    versions: Tensor
    norm_ratio: Tensor
    sigmas: Tensor
    states: Tensor | None = None
    log_probs: Tensor | None = None


@dataclass(frozen=True)
class ScorerBuild:
    """How a scorer worker builds one scorer (resolved once by the driver from ``reward.scorers``).

    Attributes:
        path: its checkpoint directory (the embedded default's: the prepared scorers), or ``None``.
        options: scorer-specific keyword arguments.
        impl: ``module:Class`` of a user scorer, or ``None`` for a registered one.
        required: ``reward.scorers[].required``: its failure fails the call (and, after ``reward.retries``,
            the step); an optional scorer's failure leaves it out of the reply (``ScoreResult.failed``).
    """

    path: str | None = None
    options: dict = field(default_factory=dict)
    impl: str | None = None
    required: bool = True


@dataclass(frozen=True)
class ScoreRequest:
    """Work for one scorer worker: whole prompt groups of a rollout.

    Attributes:
        images: ``(B, 3, H, W)`` in [0, 1].
        prompts: B prompts.
        group_ids: ``(B,)`` prompt-group ids (group-wise scorers normalise within a group).
        metadata: B prompt-file rows (rule-based rewards), or ``None``.
    """

    images: Tensor
    prompts: Sequence[str]
    group_ids: Tensor | None = None
    metadata: Sequence[dict | None] | None = None


@dataclass(frozen=True)
class ScoreResult:
    """A scorer worker's reply.

    Attributes:
        scores: ``{scorer name: (B,) scores}``.
        seconds: wall time the worker spent scoring.
        failed: ``{optional scorer name: its last error}`` for those left out of ``scores``.
    """

    scores: dict[str, Tensor]
    seconds: float
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainBatch:
    """One learner worker's shard of an RL step.

    Attributes:
        latents: ``(N, *D)`` clean samples (DPO: winners then losers, N = 2P).
        prompts: N prompts.
        advantages: ``(N,)``.
        reward_prob: ``(N,)`` DiffusionNFT's r in [0, 1].
        step: the RL step (seeds the training sigmas / noise).
        rank: the worker's rank (seeds, too).
        shard_units: training units (samples, or pairs for pair methods) of every rank's shard, in
            rank order. Each rank splits its units into the same number of mini-batches, so every
            rank knows how many points each global mini-batch holds (gradients average over them).
        num_pairs: DPO pairs in this shard (winners are rows ``[:P]``, losers ``[P:]``).
        states: ``(T + 1, N, *D)`` SDE trajectory (GRPO).
        log_probs: ``(T, N)`` rollout log-probs (GRPO).
        sigmas: ``(T + 1,)`` grid (GRPO).
        versions: ``(N,)`` the policy version that sampled each row (the pipelined loop trains on
            samples one version behind; the learner reads each row's ``v_old`` from that version).
    """

    latents: Tensor
    prompts: list[str]
    advantages: Tensor
    reward_prob: Tensor
    step: int
    rank: int
    shard_units: tuple[int, ...]
    num_pairs: int = 0
    states: Tensor | None = None
    log_probs: Tensor | None = None
    sigmas: Tensor | None = None
    versions: Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def units(self) -> int:
        """Training units in this shard (pairs for pair methods, else samples)."""
        return self.num_pairs or self.latents.shape[0]


class StaleSamplerError(RuntimeError):
    """The sampler holds an older policy than the request needs (e.g. it was restarted)."""


@dataclass(frozen=True)
class EmbeddedAssets:
    """Paths of an embedded task's cached generator and scorer directories (digits, colour)."""

    model_path: Path
    scorer_path: Path
