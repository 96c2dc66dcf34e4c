"""What the learner's loop over one RL step carries: the inputs every micro-batch of an epoch reads
(:class:`EpochData`) and the step's running tallies (:class:`StepTally`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from services.points import LaggedVelocities, TrainingPoints
from services.types import TrainBatch

__all__ = ["EpochData", "StepTally"]


@dataclass(frozen=True)
class EpochData:
    """One epoch's inputs, shared by its mini-batches.

    Attributes:
        batch: the shard.
        points: the epoch's training points (the method's point source).
        lagged: the lagged copies' velocities at them.
        cond: the shard's prompt embeddings (a ``Condition``, one row per sample).
        null: the empty prompt's, one row per sample (train-time CFG), or ``None``.
        epoch: its index in the RL step (seeds the probes).
    """

    batch: TrainBatch
    points: TrainingPoints
    lagged: LaggedVelocities
    cond: object
    null: object | None
    epoch: int


@dataclass
class StepTally:
    """Point-weighted metric sums and the optimiser steps of one RL step."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    updates: int = 0
    skipped: int = 0
    grad_norms: list[float] = field(default_factory=list)

    def add(self, metrics: dict[str, Tensor], points: int) -> None:
        """A micro-batch's metrics (means over its ``points``)."""
        for key, v in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(v) * points
        self.count += points

    def applied(self, grad_norm: float | None) -> None:
        """An optimiser step's outcome: its gradient norm, or ``None`` when it was skipped (non-finite)."""
        if grad_norm is None:
            self.skipped += 1
        else:
            self.updates += 1
            self.grad_norms.append(grad_norm)

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def counts(self) -> dict[str, float]:
        out = {
            "learner/updates": float(self.updates),
            "learner/skipped_nonfinite": self.skipped / max(self.updates + self.skipped, 1),
        }
        if self.grad_norms:
            out["learner/grad_norm"] = float(np.mean(self.grad_norms))
        return out
