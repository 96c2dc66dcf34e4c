"""The one controller of a training run: ``while not state.terminal: state = controller.step(state)``.

The shape of Ray Train v2's ``TrainController`` (``python/ray/train/v2/_internal/execution/controller/
controller.py``): the run is a sequence of states (``services.training.state``, after its ``state.py``);
:meth:`TrainController.step` does what the current state says and returns the next one, every change checked
against the one transition table. The controller is the only decider: it holds the policies and carries out
the typed decisions they return, each in one method (Ray's ``_execute_failure_decision`` /
``_execute_resize_decision``): the failure policy (:meth:`~services.training.failure.FailurePolicy.decide`,
Ray's ``FailurePolicy.make_decision``, ``failure_handling/``) turns an error into a restart or the end of the
run (:meth:`_decide`); the guard policy (:class:`~services.training.failure.GuardPolicy`) and the cadence
(:class:`~services.training.cadence.Cadence`: evaluations, checkpoints, the last step, the reward target)
say when training ends and why (a :class:`~services.training.state.TrainingEnd` that travels in the states,
carried out by :meth:`_training_ended`: a rollback or the evaluation after training). The run's record is
a callback told of each state change, step report and evaluation (``services.training.callbacks``, Ray's
``after_controller_state_update`` run from ``_set_state``); every checkpoint and the ``latest`` pointer are
written through the one :class:`~services.checkpoints.CheckpointStore`, and each build starts from a
:class:`~services.training.resume.ResumeState` read once from the checkpoint the controller verified.
Restarting and rolling back are states, not loops around the training loop. So is preemption: a SIGTERM /
SIGINT (:class:`~services.training.preemption.StopSignals`, installed once the backend has connected) is a
request the controller reads after every transition; inside an attempt the run goes to :class:`Stopping`
(the finished steps checkpointed, the workers released) and ends :class:`Preempted`, which ``run`` raises
as :class:`RunStopped` (``normguard train`` exits 128 + the signal).

An *attempt* is what one build made (the worker group from the injected backend, the coordinator, the
evaluator, the run's record): a restart ends it and builds the next from the newest intact checkpoint,
exactly as a rerun would resume (``metrics.jsonl`` keeps each step once, the restart is counted as
``faults/learner_restarts``); a rollback swaps in a build from the guard's target checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from services.checkpoints import CheckpointStore
from services.training.backends import Backend
from services.training.build import Built, build_run
from services.training.cadence import Cadence
from services.training.callbacks import Evaluation
from services.training.failure import FailureDecision, FailurePolicy, GuardPolicy
from services.training.nodes import NodeLost
from services.training.preemption import StepAbandoned, StopSignals
from services.training.record import RunRecord, finished_summary
from services.training.resume import ResumeState
from services.training.state import (
    Building,
    Checkpointing,
    ControllerState,
    Errored,
    Evaluating,
    Finished,
    Initializing,
    Preempted,
    Restarting,
    RollingBack,
    Running,
    RunState,
    Stopping,
    TrainingEnd,
    check_transition,
)

if TYPE_CHECKING:
    from services.config import ExperimentConfig

__all__ = ["Attempt", "RunStopped", "TrainController"]

log = logging.getLogger(__name__)


class RunStopped(Exception):  # noqa: N818 - it is how a preempted run ends, not an error of it
    """The run was stopped by a signal (``state``: the :class:`Preempted` it ended in); rerun it to resume."""

    def __init__(self, state: Preempted, *, total_steps: int) -> None:
        kept = f"checkpoint {state.checkpoint.name} holds them" if state.checkpoint else "no checkpoint yet"
        lost = f"; the step in flight was abandoned ({state.abandoned})" if state.abandoned else ""
        super().__init__(f"stopped by {state.request.name} after step {state.step} of {total_steps} ({kept}{lost})")
        self.state = state


@dataclass
class Attempt:
    """What one build made from ``resume``, the record of the run it writes to, the guard policy (built on the
    before-training metrics, ``before``: the checkpoint's, or the evaluation's once it ran)."""

    built: Built
    resume: ResumeState
    record: RunRecord | None = None  # opened after the build (it may fail: the build is released then)
    guards: GuardPolicy | None = None
    before: dict = field(default_factory=dict)

    @property
    def coord(self):
        return self.built.coord


class TrainController:
    """Carries a run from :class:`Initializing` to :class:`Finished` or :class:`Errored`.

    ``build(cfg, backend=..., resume=..., cadence=...)`` makes an attempt's workers (:func:`build_run`, or
    dummies in tests); ``on_step(step, metrics)`` sees every RL step; ``on_finish(coord)`` runs once training and the
    after-training evaluation are done, before the workers are released (an error in it fails the run).
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        backend: Backend,
        progress: bool = True,
        on_step: Callable | None = None,
        on_finish: Callable | None = None,
        build: Callable[..., Built] = build_run,
        stop: StopSignals | None = None,
    ) -> None:
        self.cfg, self.backend, self._build = cfg, backend, build
        # injected: its owner (``train_and_report``, over both of its runs) installs and restores it
        self.stop, self._owns_stop = stop or StopSignals(cfg.train.stop_wait_s), stop is None
        self._saved_step = -1  # the step of the attempt's newest checkpoint (-1: none)
        self.progress, self.on_step, self.on_finish = progress, on_step, on_finish
        self.policy = FailurePolicy(cfg.train.max_failures)
        self.cadence = Cadence(cfg.train)
        self.store = CheckpointStore(cfg.run_dir, on_corrupt=cfg.train.on_corrupt_checkpoint)
        self.nodes = backend.node_watch()
        self.restarts = 0
        self.attempt: Attempt | None = None
        self.state: ControllerState = Initializing()

    def run(self):
        """Step until a terminal state; the run's summary, or its error (or :class:`RunStopped`) raised."""
        state = self.state
        while not state.terminal:
            state = self.step(state)
        if isinstance(state, Errored):
            raise state.error
        if isinstance(state, Preempted):
            raise RunStopped(state, total_steps=self.cfg.train.steps)
        return state.summary

    def step(self, state: ControllerState) -> ControllerState:
        """One transition: do what ``state`` says; an error inside an attempt goes to the failure policy."""
        try:
            try:
                new = self._step(state)
            except BaseException as err:  # noqa: BLE001 - decided below: restart, or the run's error
                new = self._failed(state, err)
            if self.stop.request is not None and not new.terminal:
                new = self._stop_at(new)
            check_transition(state.kind, new.kind)
        except BaseException:
            self._release_signals()
            raise
        if new.terminal:
            self._release_signals()
        self.state = new
        self._report("after_state_update", state, new)
        return new

    def _report(self, hook: str, *args) -> None:
        """Tell the attempt's record (the run's one callback) what happened."""
        if self.attempt is not None and self.attempt.record is not None:
            getattr(self.attempt.record, hook)(*args)

    def _release_signals(self) -> None:
        """The run is over: no stop deadline interrupts what follows, and the handlers it installed go back."""
        self.stop.disarm()
        if self._owns_stop:
            self.stop.restore()

    def _step(self, state: ControllerState) -> ControllerState:
        handlers = {
            RunState.INITIALIZING: self._initialize,
            RunState.BUILDING: self._start_attempt,
            RunState.EVALUATING: self._evaluate,
            RunState.RUNNING: self._run_step,
            RunState.CHECKPOINTING: self._checkpoint,
            RunState.ROLLING_BACK: self._roll_back,
            RunState.RESTARTING: self._restart,
            RunState.STOPPING: self._stop_run,
        }
        return handlers[state.kind](state)

    # ---- the states ----------------------------------------------------------------------------
    def _initialize(self, _: Initializing) -> ControllerState:
        self.backend.connect()  # joined before the first attempt, so its nodes are known when one is lost
        self.stop.install()  # after Ray's own SIGTERM handlers (ray.init's sys.exit, the core worker's stack dump)
        return Building()

    def _start_attempt(self, _: Building) -> ControllerState:
        """Resume from the newest intact checkpoint (a finished run: nothing re-evaluated)."""
        cfg = self.cfg
        self.nodes.attempt_started()
        # verified once (checksums read every byte of the checkpoint), read once: everything below starts from it
        resume = ResumeState.of(self.store.latest_intact(), learner_restarts=self.restarts)
        if (finished := finished_summary(cfg, resume)) is not None:
            return Finished(finished)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        built = self._build(cfg, backend=self.backend, resume=resume, cadence=self.cadence)
        self.attempt = Attempt(built, resume, before=dict(resume.before))
        self._saved_step = resume.step if resume.checkpoint is not None else -1
        self.attempt.record = RunRecord(cfg, resume, progress=self.progress, on_step=self.on_step)
        return Evaluating("before")

    def _evaluate(self, state: Evaluating) -> ControllerState:
        when = {"before": self._evaluate_before, "along": self._evaluate_along, "after": self._evaluate_after}
        return when[state.when](state)

    def _evaluation(self, when: Literal["before", "along", "after"]) -> Evaluation:
        """Run the evaluation (after training, and along it with ``eval.renorm_along``, the renormalised
        baseline too) and report it."""
        evaluate, step = self.attempt.built.evaluator, self.attempt.coord.step_idx
        metrics, ratios, images = evaluate()
        renorm = None
        if when == "after" or (when == "along" and self.cfg.eval.renorm_along):
            renorm, _, _ = evaluate(renormalize=True)
        evaluation = Evaluation(when, step, metrics, ratios, images, renorm)
        self._report("after_evaluation", evaluation)
        return evaluation

    def _evaluate_before(self, _: Evaluating) -> ControllerState:
        """Skipped when the checkpoint has it; the guards are built on it; a run already at its end goes on
        to the last evaluation."""
        attempt = self.attempt
        if not attempt.before:
            attempt.before = self._evaluation("before").metrics
        attempt.guards = GuardPolicy(self.cfg.train.guards, before=attempt.before)
        end = self.cadence.end_after(attempt.coord.step_idx, attempt.record.rewards)
        return self._training_ended(end) if end is not None else Running()

    def _evaluate_along(self, _: Evaluating) -> ControllerState:
        """A guard on the evaluation's metrics may end training (a checkpoint first, as at every end)."""
        evaluation = self._evaluation("along")
        end = self.attempt.guards.decide(evaluation.step, evaluation.with_renorm, evaluation=True)
        return Checkpointing(end) if self.cadence.checkpoints_after(evaluation.step) or end else Running()

    def _evaluate_after(self, state: Evaluating) -> ControllerState:
        """The last evaluation, ``on_finish``, the workers released, the summary written."""
        attempt = self.attempt
        self._evaluation("after")
        attempt.coord.finish()
        if self.on_finish is not None:
            self.on_finish(attempt.coord)
        self._end_attempt()
        by_guard = state.end is not None and state.end.by_guard
        return Finished(attempt.record.summarize(guards=attempt.guards.record(), stopped_by_guard=by_guard))

    def _run_step(self, _: Running) -> ControllerState:
        """One RL step, then what follows it: the end of training (a guard, the reward target, the last step),
        an evaluation every ``train.eval_every`` steps, a checkpoint every ``train.checkpoint_every`` steps.
        Experience made ahead is dropped when the run stops between drain points; evaluations and
        checkpoints happen with nothing in flight."""
        attempt = self.attempt
        coord = attempt.coord
        report = coord.step()
        self._report("after_report", report)
        end = attempt.guards.decide(report.step, report.metrics)
        end = end or self.cadence.end_after(coord.step_idx, attempt.record.rewards)
        if end is not None:
            coord.drain()
            return Checkpointing(end)
        if self.cadence.evaluates_after(coord.step_idx):
            return Evaluating("along")
        return Checkpointing() if self.cadence.checkpoints_after(coord.step_idx) else Running()

    def _checkpoint(self, state: Checkpointing) -> ControllerState:
        self.attempt.coord.checkpoint(self.store, {"before": self.attempt.before})
        self._saved_step = self.attempt.coord.step_idx
        return self._training_ended(state.end) if state.end is not None else Running()

    def _training_ended(self, end: TrainingEnd) -> ControllerState:
        """Carry out the end of training: a ``rollback`` guard's goes back to the newest checkpoint inside
        every bound (the checkpoint store finds it); every other end goes to the evaluation after training."""
        if end.why != "rollback":
            return Evaluating("after", end)
        target = self.store.rollback_target(self.attempt.guards.last_ok_step)
        if target is None:
            log.warning("rollback: no intact checkpoint inside the bounds; the run ends where the guard fired")
            return Evaluating("after", end)
        return RollingBack(target, end)

    def _roll_back(self, state: RollingBack) -> ControllerState:
        """Restore the target (``checkpoints/latest`` then names it, so a rerun finds the run finished there)."""
        log.warning("rollback: restoring %s", state.target)
        self.attempt.coord.shutdown()
        resume = ResumeState.of(state.target, learner_restarts=self.restarts)
        self.attempt.built = self._build(self.cfg, backend=self.backend, resume=resume, cadence=self.cadence)
        self.attempt.resume = resume
        self.store.point_latest(state.target)
        return Evaluating("after", state.end)

    def _restart(self, state: Restarting) -> ControllerState:
        """After a lost node, first wait (``train.node_wait_s``) until the alive nodes can hold the run again."""
        self.restarts += 1
        log.warning(
            "%s%s; restart %d of train.max_failures=%d from the newest intact checkpoint",
            state.error,
            _where(state.lost_nodes),
            self.restarts,
            self.cfg.train.max_failures,
        )
        self.backend.await_placement(self.cfg, self.nodes)
        return Building()

    # ---- stopping (services.training.preemption) --------------------------------------------------
    def _stop_at(self, new: ControllerState) -> ControllerState:
        """Where a stop request sends the run instead of ``new``: inside an attempt, to :class:`Stopping`
        (a rollback under way restores its target first); with no attempt (joining, restarting), it ends."""
        if new.kind is RunState.STOPPING or new.kind is RunState.ROLLING_BACK:
            return new
        if self.attempt is None or new.kind in (RunState.BUILDING, RunState.RESTARTING):
            if self.attempt is not None:
                self._end_attempt(failed=True)
            return self._preempted()
        return Stopping()

    def _stop_run(self, _: Stopping) -> ControllerState:
        """Checkpoint the steps finished since the newest checkpoint (experience made ahead is dropped, not
        waited for: a rerun makes it again), release the workers, say where the run stopped."""
        coord = self.attempt.coord
        coord.fail()  # drops the rollout in flight (pipelined) without waiting for it
        if coord.step_idx > self._saved_step:
            self.stop.saving(True)
            try:
                self._checkpoint(Checkpointing())
            finally:
                self.stop.saving(False)
        self._end_attempt()
        return self._preempted()

    def _preempted(self, abandoned: str | None = None) -> Preempted:
        """The end state, naming the checkpoint ``checkpoints/latest`` points at (read, not verified: the
        grace period is short, and the rerun verifies it)."""
        ckpt = self.store.latest()
        state = Preempted(self.stop.request, step=_step_of(ckpt), checkpoint=ckpt, abandoned=abandoned)
        log.debug("%s", RunStopped(state, total_steps=self.cfg.train.steps))  # said once, by whoever catches it
        return state

    # ---- failures --------------------------------------------------------------------------------
    def _failed(self, state: ControllerState, err: BaseException) -> ControllerState:
        """End the attempt; an error while joining or restarting ends the run, one inside an attempt is the
        failure policy's (a lost learner worker or a lost node is restarted, ``train.max_failures`` times)."""
        try:
            self._end_attempt(failed=True)
        except Exception as later:  # noqa: BLE001 - the teardown's error is the one raised, as a `finally`'s
            err = later
        if isinstance(err, StepAbandoned):  # the stop's deadline passed, or a second signal came
            return self._preempted(abandoned=err.why)
        if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit: out at once
            raise err
        if state.kind in (RunState.INITIALIZING, RunState.RESTARTING):
            return Errored(err)
        return self._decide(err)

    def _decide(self, err: Exception) -> ControllerState:
        try:
            lost = tuple(self.nodes.newly_lost())
        except Exception as probe_err:  # noqa: BLE001 - the GCS itself unreachable (head restarting): keep the run's error
            log.warning("could not check the cluster's nodes after %s: %s", type(err).__name__, probe_err)
            lost = ()
        if self.policy.decide(err, self.restarts, nodes_lost=len(lost)) is FailureDecision.RESTART:
            return Restarting(err, lost)
        if not lost:
            return Errored(err)
        spent = f"train.max_failures={self.policy.max_failures} restarts spent"
        stopped = NodeLost(f"{type(err).__name__}: {err}{_where(lost)}; {spent}")
        stopped.__cause__ = err
        return Errored(stopped)

    def _end_attempt(self, *, failed: bool = False) -> None:
        """Release the attempt's workers and close its record (once)."""
        attempt, self.attempt = self.attempt, None
        if attempt is None:
            return
        if failed:
            attempt.coord.fail()
        attempt.coord.shutdown()
        if attempt.record is not None:
            attempt.record.close()


def _step_of(ckpt) -> int:
    """The RL step a checkpoint directory holds (``step_000006`` -> 6); 0 without one."""
    return int(ckpt.name.split("_")[-1]) if ckpt is not None else 0


def _where(lost) -> str:
    return f" (lost node(s): {', '.join(map(str, lost))})" if lost else ""
