"""The run's controller one transition at a time (the shape of Ray Train v2's ``test_controller.py``): the
real Coordinator and ExperienceSource over dummy in-process workers (no Ray, no model), so a whole run
(start, steps, a lost learner restarted, a guard's rollback, the end) takes well under a second."""

import json
import os
import signal
import time

import pytest
import torch
from conftest import tiny_overrides

from services.config import load_config
from services.training.backends import LocalBackend
from services.training.build import Built
from services.training.controller import RunStopped, TrainController
from services.training.coordinator import Coordinator
from services.training.failure import FailureDecision, FailurePolicy
from services.training.guards import Firing
from services.training.learner_group import LearnerLost
from services.training.preemption import StepAbandoned, StopRequest, StopSignals, exit_code
from services.training.state import (
    ALLOWED,
    Building,
    Checkpointing,
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
from services.training.workers import InlineExecutor, LocalPool, WorkerGroup
from services.types import RolloutBatch, ScoreResult

pytestmark = pytest.mark.unit


# ---- dummy workers ----------------------------------------------------------------------------------
class DummySampler:
    def __init__(self) -> None:
        self.version = 0

    def set_weights(self, state, version: int) -> int:
        self.version = version
        return version

    def get_version(self) -> int:
        return self.version

    def generate(self, req) -> RolloutBatch:
        n = len(req.prompts)
        gen = torch.Generator().manual_seed(req.seeds[0])
        return RolloutBatch(
            latents=torch.randn(n, 1, 2, 2, generator=gen),
            images=torch.rand(n, 3, 2, 2, generator=gen),
            prompts=list(req.prompts),
            group_ids=torch.tensor(req.group_ids),
            seeds=list(req.seeds),
            versions=torch.full((n,), self.version),
            norm_ratio=torch.ones(req.num_steps, n),
            sigmas=torch.linspace(1, 0, req.num_steps + 1),
        )


class DummyScorer:
    def __init__(self, names) -> None:
        self.names = list(names)

    def score_batch(self, req) -> ScoreResult:
        return ScoreResult(scores={k: req.images.mean(dim=(1, 2, 3)) for k in self.names}, seconds=0.0)


class DummyLearner:
    """Loses its workers at ``lose_at`` (the learner version it would reach), once per run."""

    world_size = 1

    def __init__(self, extra: dict, lost: list) -> None:
        self.extra, self.version, self.lost, self.stopped = extra, extra.get("version", 0), lost, False

    def weights(self) -> dict:
        return {"w": torch.tensor(float(self.version))}

    def update(self, shards):
        if self.version + 1 == 2 and not self.lost:
            self.lost.append(self.version)
            raise LearnerLost("a learner worker was preempted")
        self.version += 1
        return {"learner/updates": 1.0, "loss/total": 0.1}, self.weights()

    def save(self, path: str, extra: dict) -> str:
        from pathlib import Path

        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "weights.json").write_text(json.dumps({"version": self.version}))
        return path

    def check(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True


class Builds:
    """The injected build: dummy workers resumed from the controller's resume state (a checkpoint's
    ``coordinator.json``); the evaluator's guard metric crosses its bound at step ``bad_at``."""

    def __init__(self, bad_at: int) -> None:
        self.bad_at, self.lost, self.made = bad_at, [], []

    def __call__(self, cfg, *, backend, resume, cadence) -> Built:
        checkpoint = resume.checkpoint
        extra = json.loads((checkpoint / "coordinator.json").read_text()) if checkpoint else {}
        assert dict(resume.state) == extra  # the state the controller read once is the checkpoint's
        learner = DummyLearner(extra, self.lost)
        names = [s.name for s in cfg.reward.scorers]
        workers = WorkerGroup(LocalPool([DummySampler()]), LocalPool([DummyScorer(names)]), learner)
        coord = Coordinator(cfg, workers=workers, resume=resume, drains_after=cadence.drains_after)
        assert coord.step_idx == extra.get("step", 0)
        coord.sync_samplers()

        def evaluate(*, renormalize: bool = False):
            bad = 1.0 if coord.step_idx == self.bad_at else 0.0
            return {"eval/bad": bad}, {cfg.eval.full_steps: [1.0] * cfg.eval.full_steps}, {}

        self.made.append((checkpoint, coord))
        return Built(coord, evaluate)


def _cfg(tmp_path, **more):
    over = {
        "train.steps": 5,
        "train.eval_every": 1,
        "train.checkpoint_every": 1,
        "train.max_failures": 1,
        "logging.backends": "[]",
        **more,
    }
    return load_config(None, [*tiny_overrides(tmp_path, "ctl", **over), _GUARD])


_GUARD = "train.guards=[{metric: eval/bad, max: 0.5, action: rollback}]"


# ---- the controller, one transition at a time -------------------------------------------------------
def test_start_run_restart_after_a_lost_learner_rollback_done(tmp_path):
    cfg = _cfg(tmp_path)
    builds = Builds(bad_at=3)
    ctl = TrainController(cfg, backend=LocalBackend(), progress=False, build=builds)
    seen = [ctl.state]
    while not seen[-1].terminal:
        seen.append(ctl.step(seen[-1]))
        assert ctl.state is seen[-1]
    first = [Initializing(), Building(), Evaluating("before"), Running(), Evaluating("along"), Checkpointing()]
    assert seen[:6] == first
    assert isinstance(seen[7], Restarting) and isinstance(seen[7].error, LearnerLost)  # step 2's update lost
    assert seen[6] == Running() and ctl.restarts == 1
    assert builds.made[0][1].learner.stopped  # the lost attempt's workers released
    # the restart resumes from step 1's checkpoint: the before-evaluation is in it, step 2 is redone
    assert seen[8:12] == [Building(), Evaluating("before"), Running(), Evaluating("along")]
    assert builds.made[1][0].name == "step_000001"
    # the guard fired at step 3's evaluation: its decision (and the firing, its reason) travels in the states
    fired = Firing(step=3, metric="eval/bad", value=1.0, bound="> max 0.5", action="rollback")
    end = TrainingEnd("rollback", fired)
    assert seen[12:16] == [Checkpointing(), Running(), Evaluating("along"), Checkpointing(end)]
    assert seen[15].done and end.by_guard
    # back to step 2, the last one inside the bounds
    assert seen[16] == RollingBack(cfg.run_dir / "checkpoints" / "step_000002", end)
    assert seen[17:] == [Evaluating("after", end), seen[-1]] and isinstance(seen[-1], Finished)
    assert builds.made[2][0].name == "step_000002" and builds.made[1][1].learner.stopped
    assert (cfg.run_dir / "checkpoints" / "latest").read_text() == "step_000002"
    summary = seen[-1].summary
    assert summary.after["train/steps_done"] == 2.0
    assert [g["step"] for g in summary.guards] == [3] and json.loads((cfg.run_dir / "summary.json").read_text())[
        "stopped_by_guard"
    ]
    rows = [r for r in summary.history if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # each step once, the redone step 2 included
    assert rows[1]["faults/learner_restarts"] == 1.0 and rows[2]["faults/learner_restarts"] == 0.0
    # a rerun finds the run finished where it was rolled back to
    again = TrainController(cfg, backend=LocalBackend(), progress=False, build=Builds(bad_at=-1))
    state = again.step(again.step(Initializing()))
    assert isinstance(state, Finished) and state.summary.after == summary.after


def test_a_lost_learner_past_max_failures_ends_the_run_with_its_error(tmp_path):
    cfg = _cfg(tmp_path, **{"train.max_failures": 0})
    ctl = TrainController(cfg, backend=LocalBackend(), progress=False, build=Builds(bad_at=-1))
    with pytest.raises(LearnerLost, match="preempted"):
        ctl.run()
    assert isinstance(ctl.state, Errored) and ctl.attempt is None


def test_an_error_while_restarting_is_not_the_failure_policys(tmp_path):
    class NoPlace(LocalBackend):
        def await_placement(self, cfg, nodes):
            raise LearnerLost("still no node")  # would be restarted if the policy saw it

    ctl = TrainController(_cfg(tmp_path), backend=NoPlace(), progress=False, build=Builds(bad_at=-1))
    state = ctl.step(Restarting(LearnerLost("x")))
    assert isinstance(state, Errored) and str(state.error) == "still no node"


def test_a_keyboard_interrupt_releases_the_attempt_and_is_raised(tmp_path):
    builds = Builds(bad_at=-1)
    ctl = TrainController(_cfg(tmp_path), backend=LocalBackend(), progress=False, build=builds)
    state = ctl.step(ctl.step(ctl.step(Initializing())))
    assert state == Running()

    def interrupted():
        raise KeyboardInterrupt

    ctl.attempt.coord.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        ctl.step(state)
    assert ctl.attempt is None and builds.made[0][1].learner.stopped


# ---- stop signals (services.training.preemption) -------------------------------------------------------
def _trained(ctl, steps: int):
    """Step ``ctl`` from the start until ``steps`` RL steps are done; the state it is in then."""
    state = ctl.state
    while not (isinstance(state, Running) and ctl.attempt and ctl.attempt.coord.step_idx == steps):
        state = ctl.step(state)
    return state


def _steps(run_dir) -> list[int]:
    return [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "reward/mean" in line
    ]


def test_sigterm_finishes_the_step_in_flight_checkpoints_it_and_a_rerun_ends_as_the_calm_run(tmp_path):
    """A SIGTERM after step 3 (checkpoints every 2): step 4 finishes, is checkpointed, the run ends Preempted and
    says so; the rerun resumes at step 4 and ends with the calm run's metrics, every step once."""
    over = {"train.checkpoint_every": 2, "train.eval_every": 0}
    calm_cfg = _cfg(tmp_path / "calm", **over)
    calm_builds = Builds(bad_at=-1)
    calm_builds.lost.append(None)  # no lost learner in these runs
    calm = TrainController(calm_cfg, backend=LocalBackend(), progress=False, build=calm_builds).run()
    cfg = _cfg(tmp_path / "stopped", **over)
    builds = Builds(bad_at=-1)
    builds.lost.append(None)
    stop = StopSignals(wait_s=30.0)
    ctl = TrainController(cfg, backend=LocalBackend(), progress=False, build=builds, stop=stop)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        state = _trained(ctl, 3)
        assert stop.installed and (cfg.run_dir / "checkpoints" / "latest").read_text() == "step_000002"
        os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread at once: a request, no exit
        assert stop.request is not None and stop.request.name == "SIGTERM"
        assert ctl.step(state) == Stopping()  # step 4 ran to its end first
        end = ctl.step(Stopping())
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert isinstance(end, Preempted) and end.step == 4 and end.abandoned is None
    assert end.checkpoint == cfg.run_dir / "checkpoints" / "step_000004"
    assert (cfg.run_dir / "checkpoints" / "latest").read_text() == "step_000004"
    assert ctl.attempt is None and builds.made[0][1].learner.stopped and _steps(cfg.run_dir) == [1, 2, 3, 4]
    assert "after step 4 of 5" in str(RunStopped(end, total_steps=5)) and exit_code(end.request) == 143
    again = TrainController(cfg, backend=LocalBackend(), progress=False, build=Builds(bad_at=-1)).run()
    assert builds.made[0][0] is None and _steps(cfg.run_dir) == [1, 2, 3, 4, 5]
    keys = ("reward/mean", "loss/total", "step")
    assert [{k: r[k] for k in keys} for r in again.history if "reward/mean" in r] == [
        {k: r[k] for k in keys} for r in calm.history if "reward/mean" in r
    ]
    assert again.after == calm.after


def test_a_step_past_the_stop_deadline_is_abandoned_and_the_run_ends_at_its_newest_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, **{"train.checkpoint_every": 2, "train.eval_every": 0})
    builds = Builds(bad_at=-1)
    builds.lost.append(None)
    stop = StopSignals(wait_s=0.2)
    ctl = TrainController(cfg, backend=LocalBackend(), progress=False, build=builds, stop=stop)
    state = _trained(ctl, 2)

    def hangs():  # a step stuck in Python (a remote wait polls for signals the same way)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(3000):
            time.sleep(0.01)

    ctl.attempt.coord.step = hangs
    t0 = time.monotonic()
    try:
        with pytest.raises(RunStopped, match=r"after step 2 of 5 .*abandoned \(not finished 0 s after the signal"):
            _run_from(ctl, state)
    finally:
        stop.restore()
    assert time.monotonic() - t0 < 5, "the deadline did not interrupt the step"
    assert isinstance(ctl.state, Preempted) and ctl.state.checkpoint.name == "step_000002"
    assert (cfg.run_dir / "checkpoints" / "latest").read_text() == "step_000002" and ctl.attempt is None


def _run_from(ctl, state):
    ctl.state = state
    return ctl.run()


def test_a_second_signal_abandons_at_once_and_handlers_are_given_back():
    # the handlers found before (SIG_IGN for SIGINT where the suite runs in a background job, as `cmd &` does)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop = StopSignals(wait_s=60.0).install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.request.name == "SIGINT" and exit_code(stop.request) == 130
        with pytest.raises(StepAbandoned, match="a second signal, SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        stop.restore()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_stop_before_the_first_attempt_ends_the_run_with_nothing_built(tmp_path):
    builds = Builds(bad_at=-1)
    stop = StopSignals(wait_s=30.0)
    stop.request = StopRequest(signal.SIGTERM, time.monotonic())
    ctl = TrainController(_cfg(tmp_path), backend=LocalBackend(), progress=False, build=builds, stop=stop)
    try:
        with pytest.raises(RunStopped, match="after step 0 of 5 .no checkpoint yet"):
            ctl.run()
    finally:
        stop.restore()
    assert builds.made == [] and isinstance(ctl.state, Preempted) and ctl.state.checkpoint is None


# ---- the state table and the failure policy on their own ---------------------------------------------
def test_run_states_terminal_and_transitions():
    assert {s for s in RunState if s.terminal} == {RunState.FINISHED, RunState.ERRORED, RunState.PREEMPTED}
    assert all(not ALLOWED[s] for s in RunState if s.terminal)
    assert set(ALLOWED) == set(RunState)
    check_transition(RunState.RUNNING, RunState.CHECKPOINTING)
    check_transition(RunState.RESTARTING, RunState.BUILDING)
    for inside in (RunState.BUILDING, RunState.RUNNING, RunState.EVALUATING, RunState.CHECKPOINTING):
        check_transition(inside, RunState.RESTARTING)  # an error anywhere in an attempt goes to the policy
        check_transition(inside, RunState.ERRORED)
    with pytest.raises(RuntimeError, match="finished -> running"):
        check_transition(RunState.FINISHED, RunState.RUNNING)
    with pytest.raises(RuntimeError, match="initializing -> running"):
        check_transition(RunState.INITIALIZING, RunState.RUNNING)
    with pytest.raises(RuntimeError, match="restarting -> restarting"):
        check_transition(RunState.RESTARTING, RunState.RESTARTING)
    assert Evaluating("after").kind is RunState.EVALUATING and not Running().terminal and Finished().terminal


def test_failure_policy_decisions():
    policy = FailurePolicy(max_failures=2)
    assert policy.decide(LearnerLost("x"), 0) is FailureDecision.RESTART
    assert policy.decide(LearnerLost("x"), 1) is FailureDecision.RESTART
    assert policy.decide(LearnerLost("x"), 2) is FailureDecision.RAISE  # spent
    assert policy.decide(TimeoutError("a sampler"), 0, nodes_lost=1) is FailureDecision.RESTART  # the node's
    assert policy.decide(TimeoutError("a sampler"), 0) is FailureDecision.RAISE
    assert policy.decide(ValueError("a bug"), 0) is FailureDecision.RAISE
    assert FailurePolicy(max_failures=0).decide(LearnerLost("x"), 0) is FailureDecision.RAISE


def test_pools_on_plain_objects_call_at_once():
    pool, s = LocalPool([DummySampler()]), DummySampler()
    assert pool.call(s, "set_weights", {}, 3, timeout_s=1) == 3
    assert pool.result(pool.submit(s, "get_version", now=lambda: 7), timeout_s=1) == 7
    assert pool.put(d := {"w": 1}) is d
    with pytest.raises(ZeroDivisionError):  # raised where it was submitted, not stored in the future
        InlineExecutor().submit(lambda: 1 / 0)
