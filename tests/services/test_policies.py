"""The controller's policies and its checkpoint store on their own (no workers, no model): the guard policy's
typed decisions, the cadence, the store's writes, ``latest`` pointer and rollback target, the frozen resume
state."""

import dataclasses
import json
from pathlib import Path

import pytest

from services.checkpoints import CheckpointStore, verify_checkpoint
from services.config import load_config
from services.training.cadence import Cadence
from services.training.failure import GuardPolicy
from services.training.guards import Firing
from services.training.resume import ResumeState
from services.training.state import TrainingEnd

pytestmark = pytest.mark.unit


def _train(*over):
    return load_config(None, list(over)).train


def test_the_guard_policy_decides_stop_or_rollback_with_the_firing_as_its_reason():
    train = _train(
        "train.guards=[{metric: m, max: 1.0, action: warn}, {metric: m, max: 2.0, action: rollback},"
        " {metric: r, max_rise: 0.5, action: stop}]"
    )
    policy = GuardPolicy(train.guards, before={"r": 1.0})
    assert policy.decide(1, {"m": 1.5}) is None  # a warn is recorded, training goes on
    end = policy.decide(2, {"m": 3.0, "r": 2.0})  # all three fire: the rollback is the strongest
    assert end.why == "rollback" and end.by_guard and (end.firing.step, end.firing.metric) == (2, "m")
    stop = Firing(step=3, metric="r", value=1.6, bound="> before 1 + max_rise 0.5", action="stop")
    assert policy.decide(3, {"r": 1.6}) == TrainingEnd("stop", stop)
    assert [f["action"] for f in policy.record()] == ["warn", "warn", "rollback", "stop", "stop"]
    assert policy.decide(4, {"r": 1.2}, evaluation=True) is None and policy.last_ok_step == 4
    policy.decide(5, {"m": 1.5}, evaluation=True)  # an evaluation where a warn fired is not inside the bounds
    assert policy.last_ok_step == 4


def test_the_cadence_evaluates_checkpoints_drains_and_ends():
    cadence = Cadence(_train("train.steps=6", "train.eval_every=2", "train.checkpoint_every=3"))
    assert [s for s in range(1, 7) if cadence.evaluates_after(s)] == [2, 4, 6]
    assert [s for s in range(1, 7) if cadence.checkpoints_after(s)] == [3, 6]
    assert [s for s in range(1, 7) if cadence.drains_after(s)] == [2, 3, 4, 6]
    assert cadence.end_after(5, [0.1] * 5) is None and cadence.end_after(6, [0.1] * 6) == TrainingEnd("steps")
    early = Cadence(_train("train.steps=6", "train.stop_at_reward=0.5", "train.stop_window=2"))
    assert early.end_after(2, [0.6, 0.2]) is None and early.end_after(3, [0.6, 0.2, 0.9]) == TrainingEnd("reward")


def test_the_store_writes_points_latest_and_finds_a_rollback_target(tmp_path):
    store = CheckpointStore(tmp_path)
    assert store.latest() is None and store.latest_intact() is None

    def write(path: str, state: dict) -> None:  # the learner's files
        Path(path).mkdir(parents=True)
        (Path(path) / "weights.bin").write_text(f"w{state['step']}")

    for step in (2, 4, 6):
        path = store.save(step, {"step": step, "before": {"eval/x": 0.5}}, write)
        assert verify_checkpoint(path) is None and store.latest() == path
    assert not (tmp_path / "checkpoints" / "latest.tmp").exists()
    assert json.loads((store.path(6) / "coordinator.json").read_text())["step"] == 6
    (store.path(4) / "weights.bin").write_text("cut")  # corrupt: skipped
    assert store.rollback_target(5) == store.path(2) and store.rollback_target(6) == store.path(6)
    assert store.rollback_target(1) is None
    store.point_latest(store.path(2))
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000002" and store.latest_intact() == store.path(2)
    resume = ResumeState.of(store.latest_intact(), learner_restarts=1)
    assert (resume.step, resume.before, resume.learner_restarts) == (2, {"eval/x": 0.5}, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        resume.step = 3  # built once, frozen
    with pytest.raises(TypeError):
        resume.before["eval/x"] = 1.0
    assert ResumeState.of(None) == ResumeState()
