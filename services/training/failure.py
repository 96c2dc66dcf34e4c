"""What a run does when something fails: a policy returns a decision, the controller carries it out
(the shape of Ray Train v2's ``FailurePolicy.make_decision`` -> ``FailureDecision`` -> controller:
``services.training.controller`` goes to its ``Restarting`` or ``Errored`` state).

Lost learner workers (preempted, OOM-killed, node gone: :class:`LearnerLost`) and lost nodes are survived
up to ``train.max_failures`` times by rebuilding everything from the newest intact checkpoint, exactly as
a rerun would resume. A node is lost when a node alive at the start of the attempt is dead when it fails:
whatever error the attempt met first (a sampler that cannot restart, the policy weights gone with learner
rank 0, the learner group), it is the node's, and the restart waits (``train.node_wait_s``) until the
alive nodes can hold the run again (``services.training.nodes``). Any other error, an exception inside
the learner's or a scorer's code, a timeout after every retry, would fail again on a retry and ends the
run. Ray Train itself restarts no running worker group (``LearnerGroup``): the driver's command protocol
would not survive a group rebuilt behind its back, so the run's policy owns every restart.

Beside it, :class:`GuardPolicy` turns the guards' metrics (``services.training.guards``) into the decision
that training ends (:class:`~services.training.state.TrainingEnd`, ``stop`` or ``rollback``, with the guard
that fired as its reason); the controller carries it out (its ``Checkpointing`` then ``RollingBack`` state),
as Ray Train v2's controller holds its failure and scaling policies and executes each decision in one
``_execute_*`` method (``_internal/execution/controller/controller.py``, ``failure_handling/``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.training.guards import GuardMonitor
from services.training.learner_group import LearnerLost
from services.training.state import TrainingEnd

__all__ = ["FailureDecision", "FailurePolicy", "GuardPolicy"]


class FailureDecision(enum.Enum):
    RESTART = "restart"  # rebuild from the newest intact checkpoint and go on
    RAISE = "raise"  # end the run with this error


@dataclass(frozen=True)
class FailurePolicy:
    """``max_failures`` lost learner groups or nodes are restarted; everything else is raised."""

    max_failures: int

    def decide(self, err: BaseException, restarts_so_far: int, *, nodes_lost: int = 0) -> FailureDecision:
        if (isinstance(err, LearnerLost) or nodes_lost) and restarts_so_far < self.max_failures:
            return FailureDecision.RESTART
        return FailureDecision.RAISE


class GuardPolicy:
    """``train.guards`` over one attempt, built on its before-training metrics (``max_rise`` bounds rise over
    them). :meth:`decide` records what fired; ``warn`` guards never end training."""

    def __init__(self, specs: Sequence, *, before: Mapping[str, float]) -> None:
        self.monitor = GuardMonitor(specs, before=before)

    def decide(self, step: int, metrics: Mapping[str, float], *, evaluation: bool = False) -> TrainingEnd | None:
        """After a step's metrics (or an evaluation's): ``stop`` / ``rollback`` if such a guard fired (the
        strongest), else ``None`` (train on)."""
        firing = self.monitor.check(step, metrics, evaluation=evaluation)
        if firing is None or firing.action not in ("stop", "rollback"):
            return None
        return TrainingEnd(firing.action, firing)

    @property
    def last_ok_step(self) -> int:
        """The last evaluation at which every guard held (0: the base model): a rollback's bound."""
        return self.monitor.last_ok_eval_step

    def record(self) -> list[dict]:
        """What fired, for ``summary.json``."""
        return self.monitor.record()
