"""When a run evaluates, checkpoints and ends: the controller's cadence.

:class:`Cadence` is held by the controller (``services.training.controller``), which decides after every
step what follows it; the coordinator is only told where the pipeline must drain (``drains_after``: no
experience is made ahead across an evaluation, a checkpoint or the end, so a checkpoint is taken with
nothing in flight). As Ray Train v2's controller holds its policies and carries out what they return
(``python/ray/train/v2/_internal/execution/controller/controller.py``), the end of training is a typed
decision here, :class:`~services.training.state.TrainingEnd`, that travels in the controller's states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.training.state import TrainingEnd

if TYPE_CHECKING:
    from services.config import TrainConfig

__all__ = ["Cadence", "reached", "window_mean"]


@dataclass(frozen=True)
class Cadence:
    """``train.eval_every`` / ``train.checkpoint_every`` (0: never), ``train.steps`` and the early-stopping
    control (``train.stop_at_reward`` over the last ``train.stop_window`` training rewards)."""

    train: TrainConfig

    def evaluates_after(self, step: int) -> bool:
        """An evaluation follows step ``step``."""
        every = self.train.eval_every
        return bool(every and step % every == 0)

    def checkpoints_after(self, step: int) -> bool:
        """A checkpoint follows step ``step``."""
        every = self.train.checkpoint_every
        return bool(every and step % every == 0)

    def drains_after(self, step: int) -> bool:
        """The pipeline stops once ``step`` steps are done (an evaluation, a checkpoint or the last step follows)."""
        return step >= self.train.steps or self.evaluates_after(step) or self.checkpoints_after(step)

    def end_after(self, step: int, rewards: Sequence[float]) -> TrainingEnd | None:
        """Training ends after ``step`` (``rewards``: the training rewards so far): the reward target reached,
        or the last step done; ``None``: it goes on."""
        if reached(rewards, self.train):
            return TrainingEnd("reward")
        if step >= self.train.steps:
            return TrainingEnd("steps")
        return None


def window_mean(rewards: Sequence[float], window: int) -> float:
    """Mean of the last ``window`` values (NaN for none)."""
    tail = rewards[-window:]
    return sum(tail) / len(tail) if tail else float("nan")


def reached(rewards: Sequence[float], train: TrainConfig) -> bool:
    """The early-stopping control's test: the windowed training reward reached ``stop_at_reward``."""
    if train.stop_at_reward is None or len(rewards) < train.stop_window:
        return False
    return window_mean(rewards, train.stop_window) >= train.stop_at_reward
