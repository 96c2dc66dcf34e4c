"""What a run does when something fails: a policy returns a decision, the run loop carries it out
(the shape of Ray Train v2's ``FailurePolicy`` -> ``FailureDecision`` -> controller).

Lost learner workers (preempted, OOM-killed, node gone: :class:`LearnerLost`) are survived up to
``train.max_failures`` times by rebuilding everything from the newest intact checkpoint, exactly as
a rerun would resume. Any other error, an exception inside the learner's or a scorer's code, a
timeout after every retry, would fail again on a retry and ends the run.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.training.learner_group import LearnerLost

__all__ = ["FailureDecision", "FailurePolicy"]


class FailureDecision(enum.Enum):
    RESTART = "restart"  # rebuild from the newest intact checkpoint and go on
    RAISE = "raise"  # end the run with this error


@dataclass(frozen=True)
class FailurePolicy:
    """``max_failures`` lost learner groups are restarted; everything else is raised."""

    max_failures: int

    def decide(self, err: BaseException, restarts_so_far: int) -> FailureDecision:
        if isinstance(err, LearnerLost) and restarts_so_far < self.max_failures:
            return FailureDecision.RESTART
        return FailureDecision.RAISE
