"""The states of a training run and the one table of the transitions between them (P13).

The shape of Ray Train v2's controller states (``python/ray/train/v2/_internal/execution/controller/
state.py``: a ``TrainControllerStateType`` enum with a terminal flag, one ``TrainControllerState`` subclass
per state carrying what the next step needs), here for an RL run: :class:`RunState` names the kinds and
whether they end the run, each state object carries its data (the error a restart is for, the checkpoint a
rollback restores, which evaluation is due), and :func:`check_transition` is the only place a change of
state is judged. :class:`~services.training.controller.TrainController` makes every change through it.

    Initializing -> Building -> Evaluating(before) -> Running <-> Evaluating(along) / Checkpointing
        -> [RollingBack] -> Evaluating(after) -> Finished     (the end of training's reason, TrainingEnd, in each)
    an error in an attempt -> Restarting -> Building (the failure policy said restart) | Errored
    a stop signal (services.training.preemption) -> Stopping (the step in flight finished: its checkpoint)
        -> Preempted; before an attempt is built, or with the step abandoned, -> Preempted at once
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

__all__ = [
    "Building",
    "Checkpointing",
    "ControllerState",
    "Errored",
    "Evaluating",
    "Finished",
    "Initializing",
    "Preempted",
    "Restarting",
    "RollingBack",
    "RunState",
    "Running",
    "Stopping",
    "TrainingEnd",
    "check_transition",
]


class RunState(enum.Enum):
    """The kinds of state of a run; ``terminal`` ones end it."""

    INITIALIZING = "initializing"  # joining the cluster, before the first attempt
    BUILDING = "building"  # an attempt starts: workers built, resumed from the newest intact checkpoint
    RUNNING = "running"  # one RL step and its cadence
    EVALUATING = "evaluating"  # before, along or after training
    CHECKPOINTING = "checkpointing"
    ROLLING_BACK = "rolling_back"  # a guard said rollback: restoring its target checkpoint
    RESTARTING = "restarting"  # the failure policy said restart: waiting until the cluster holds the run
    STOPPING = "stopping"  # a stop signal: the finished steps checkpointed, the workers released
    FINISHED = "finished"
    ERRORED = "errored"
    PREEMPTED = "preempted"  # stopped by a signal; the same command resumes from the newest checkpoint

    @property
    def terminal(self) -> bool:
        return self in (RunState.FINISHED, RunState.ERRORED, RunState.PREEMPTED)


_ATTEMPT_ENDS = {RunState.RESTARTING, RunState.ERRORED}  # an error inside an attempt goes to the failure policy
# a stop signal: inside an attempt the run stops at the next state boundary (its checkpoint first), elsewhere
# (before an attempt, while restarting, or with the step in flight abandoned) it ends at once
_STOPS = {RunState.STOPPING, RunState.PREEMPTED}
ALLOWED: dict[RunState, set[RunState]] = {
    RunState.INITIALIZING: {RunState.BUILDING, RunState.ERRORED, RunState.PREEMPTED},
    # finished: a rerun of a done run
    RunState.BUILDING: {RunState.EVALUATING, RunState.FINISHED, *_ATTEMPT_ENDS, *_STOPS},
    RunState.EVALUATING: {
        RunState.RUNNING,
        RunState.EVALUATING,  # nothing left to train: the after-training evaluation follows the one before
        RunState.CHECKPOINTING,
        RunState.ROLLING_BACK,
        RunState.FINISHED,
        *_ATTEMPT_ENDS,
        *_STOPS,
    },
    RunState.RUNNING: {RunState.RUNNING, RunState.EVALUATING, RunState.CHECKPOINTING, *_ATTEMPT_ENDS, *_STOPS},
    RunState.CHECKPOINTING: {
        RunState.RUNNING,
        RunState.EVALUATING,
        RunState.ROLLING_BACK,
        *_ATTEMPT_ENDS,
        *_STOPS,
    },
    RunState.ROLLING_BACK: {RunState.EVALUATING, *_ATTEMPT_ENDS, *_STOPS},
    RunState.RESTARTING: {RunState.BUILDING, RunState.ERRORED, RunState.PREEMPTED},
    RunState.STOPPING: {RunState.PREEMPTED, RunState.ERRORED},
    RunState.FINISHED: set(),
    RunState.ERRORED: set(),
    RunState.PREEMPTED: set(),
}


def check_transition(old: RunState, new: RunState) -> None:
    """Raise ``RuntimeError`` for a change of state the table does not allow."""
    if new not in ALLOWED[old]:
        allowed = ", ".join(sorted(s.value for s in ALLOWED[old])) or "none: it is terminal"
        raise RuntimeError(f"illegal run-state transition {old.value} -> {new.value} (allowed: {allowed})")


@dataclass(frozen=True)
class ControllerState:
    """One state of the run; subclasses carry what their step needs."""

    kind: ClassVar[RunState]

    @property
    def terminal(self) -> bool:
        return self.kind.terminal


@dataclass(frozen=True)
class TrainingEnd:
    """Why training ends, the decision the controller carries out (``services.training.cadence``,
    :class:`~services.training.failure.GuardPolicy`): ``steps`` (``train.steps`` done), ``reward``
    (``train.stop_at_reward`` reached), ``stop`` or ``rollback`` (a guard: ``firing``, the
    :class:`~services.training.guards.Firing` that said so)."""

    why: Literal["steps", "reward", "stop", "rollback"]
    firing: Any = None

    @property
    def by_guard(self) -> bool:
        return self.why in ("stop", "rollback")


# One frozen dataclass per state, as Ray Train v2's controller states: the alike declarations that
# ``duplicates`` pairs (a field, then ``kind``) are the shape of a state type, not logic to share.


@dataclass(frozen=True)
class Initializing(ControllerState):
    kind: ClassVar[RunState] = RunState.INITIALIZING


@dataclass(frozen=True)
class Building(ControllerState):
    kind: ClassVar[RunState] = RunState.BUILDING


@dataclass(frozen=True)
class Running(ControllerState):
    kind: ClassVar[RunState] = RunState.RUNNING


@dataclass(frozen=True)
class Evaluating(ControllerState):
    """``before`` training (skipped when the checkpoint has it), ``along`` it, or ``after`` it (``end``: why
    training ended, :class:`TrainingEnd`)."""

    when: Literal["before", "along", "after"]
    end: TrainingEnd | None = None
    kind: ClassVar[RunState] = RunState.EVALUATING


@dataclass(frozen=True)
class Checkpointing(ControllerState):
    """``end``: training ends with this checkpoint, and why (None: it goes on after it)."""

    end: TrainingEnd | None = None
    kind: ClassVar[RunState] = RunState.CHECKPOINTING

    @property
    def done(self) -> bool:
        return self.end is not None


@dataclass(frozen=True)
class RollingBack(ControllerState):
    """Restore ``target``, the newest intact checkpoint inside every guard's bounds (``end``: the guard's
    decision that training ends there)."""

    target: Path
    end: TrainingEnd | None = None
    kind: ClassVar[RunState] = RunState.ROLLING_BACK


@dataclass(frozen=True)
class Restarting(ControllerState):
    """The failure policy restarts the run after ``error``; ``lost_nodes`` are the nodes lost with it."""

    error: BaseException
    lost_nodes: tuple = ()
    kind: ClassVar[RunState] = RunState.RESTARTING


@dataclass(frozen=True)
class Finished(ControllerState):
    summary: Any = None  # services.training.run.RunSummary
    kind: ClassVar[RunState] = RunState.FINISHED


@dataclass(frozen=True)
class Errored(ControllerState):
    error: BaseException
    kind: ClassVar[RunState] = RunState.ERRORED


@dataclass(frozen=True)
class Stopping(ControllerState):
    """A stop signal came (``services.training.preemption``): checkpoint the finished steps, release the workers."""

    kind: ClassVar[RunState] = RunState.STOPPING


@dataclass(frozen=True)
class Preempted(ControllerState):
    """Stopped by ``request`` (a :class:`~services.training.preemption.StopRequest`) with ``step`` steps kept in
    ``checkpoint`` (None: no checkpoint yet, a rerun starts at step 0); ``abandoned``: why the step in flight
    was not waited for (None: it finished and is in the checkpoint)."""

    request: Any
    step: int
    checkpoint: Path | None
    abandoned: str | None = None
    kind: ClassVar[RunState] = RunState.PREEMPTED
