"""What the coordinator holds, as structure only (P7): a :class:`Sampler`, a :class:`Scorer`, a :class:`Learner`.

The plain classes implement them (``RolloutSampler``, ``ColocatedRollouts``; ``ScorerWorker``;
``LocalLearner``, ``LearnerGroup``). A Ray actor handle of a sampler or scorer has the same methods behind
``.remote``: the :mod:`~services.training.workers` pool it sits in makes the call, so the coordinator,
the experience source and the evaluator never look at which it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor

from services.types import RolloutBatch, RolloutRequest, ScoreRequest, ScoreResult, TrainBatch

__all__ = ["Learner", "Sampler", "Scorer"]


class Sampler(Protocol):
    """Makes samples with the policy it was last set to."""

    def generate(self, req: RolloutRequest) -> RolloutBatch:
        """The request's samples, each tagged with the policy version that made it."""

    def eval_samples(self, prompts: list[str], **kwargs: Any) -> dict[str, Tensor]:
        """Fixed-noise evaluation samples: ``latents``, ``images`` and the per-step norm ``ratio``."""

    def set_weights(self, state: Any, version: int) -> int:
        """Load policy ``version``; returns the version it holds."""

    def get_version(self) -> int:
        """The policy version it holds."""


class Scorer(Protocol):
    """Scores images with the run's reward (and evaluation) scorers."""

    def score_batch(self, req: ScoreRequest) -> ScoreResult:
        """Every training scorer's ``(B,)`` scores of one request."""

    def score(self, images: Tensor, prompts: Sequence[str], **kwargs: Any) -> dict[str, Tensor]:
        """The named scorers' ``(B,)`` scores (evaluation)."""

    def features(self, name: str, images: Tensor) -> Tensor:
        """Scorer ``name``'s ``(B, D)`` features (the set-level evaluation metrics)."""


class Learner(Protocol):
    """Trains the policy on the shards of one RL step (one shard per rank)."""

    world_size: int
    extra: dict  # the coordinator's state stored in the checkpoint it resumed from ({} without one)

    @property
    def version(self) -> int:
        """The policy version after the last update."""

    def weights(self) -> Any:
        """The current policy weights (a dict, or a Ray object ref of one)."""

    def update(self, shards: list[TrainBatch]) -> tuple[dict[str, float], Any]:
        """One update; returns its metrics and the new policy weights."""

    def save(self, path: str, extra: dict) -> str:
        """An atomic checkpoint at ``path`` with the coordinator's state ``extra``."""

    def check(self) -> None:
        """Raise ``LearnerLost`` once the learner's workers are gone."""

    def stop(self) -> None:
        """Release its workers."""
