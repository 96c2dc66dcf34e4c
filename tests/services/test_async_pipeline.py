"""The pipelined loop (train.pipeline: async): which policy samples which step, exactness, faults."""

import json

import pytest
from conftest import tiny_overrides

from services.config import load_config
from services.training.build import build_coordinator
from services.training.run import run_training

pytestmark = [pytest.mark.service, pytest.mark.slow]

KEYS = (
    "reward/mean",
    "reward/std",
    "loss/total",
    "normguard/ratio_mean",
    "rollout/norm_ratio_mean",
    "rollout/version_lag",
    "learner/old_policy_gap",
)
ASYNC = {"train.pipeline": "async", "rollout.max_staleness": 1}


def _rows(summary) -> list[dict]:
    return [{k: r[k] for k in KEYS if k in r} for r in summary.history if "reward/mean" in r]


def test_async_with_staleness_0_is_the_sync_loop_and_with_1_trains_one_version_behind(digits_assets, tmp_path):
    """In-process (the same code path as on actors: calls are ordered, not timed). Steps 1-4 with a
    checkpoint after step 2: the pipeline drains there, so steps 1 and 3 sample the newest policy."""
    common = {"train.steps": 4, "train.checkpoint_every": 2}

    def run(name, **extra):
        cfg = load_config(None, tiny_overrides(tmp_path, name, **common, **extra))
        return run_training(cfg, local=True, progress=False)

    sync = run("sync")
    zero = run("async0", **{"train.pipeline": "async", "rollout.max_staleness": 0})
    assert _rows(zero) == _rows(sync)
    assert zero.after == sync.after

    ahead = run("async1", **ASYNC)
    assert [r["rollout/version_lag"] for r in _rows(sync)] == [0.0] * 4
    assert [r["rollout/version_lag"] for r in _rows(ahead)] == [0.0, 1.0, 0.0, 1.0]
    # step 1 is the same in both (nothing was made ahead yet); from step 2 on the samples differ
    assert _rows(ahead)[0] == _rows(sync)[0]
    assert _rows(ahead)[1]["rollout/norm_ratio_mean"] != _rows(sync)[1]["rollout/norm_ratio_mean"]


def test_async_resume_reproduces_the_uninterrupted_run(digits_assets, tmp_path):
    inner = {"train.checkpoint_every": 3, "learner.updates_per_step": 2, **ASYNC}
    straight = run_training(
        load_config(None, tiny_overrides(tmp_path, "straight", **{"train.steps": 6, **inner})),
        local=True,
        progress=False,
    )
    for steps in (3, 6):
        cut = load_config(None, tiny_overrides(tmp_path, "cut", **{"train.steps": steps, **inner}))
        resumed = run_training(cut, local=True, progress=False)
    assert [r["rollout/version_lag"] for r in _rows(straight)] == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert _rows(resumed) == _rows(straight)
    assert resumed.after == straight.after
    ckpt = json.loads((tmp_path / "cut" / "checkpoints" / "step_000006" / "coordinator.json").read_text())
    assert ckpt["step"] == 6


def test_on_actors_async_overlaps_and_killed_actors_leave_the_uninterrupted_metrics(ray_local, digits_assets, tmp_path):
    """Kill a sampler while the next step's rollout is in flight, and the scorer later: the redone
    work (re-synced to the policy it was asked to sample with) gives exactly the calm run's metrics."""

    def three_steps(name, kill):
        cfg = load_config(None, tiny_overrides(tmp_path, name, **{"train.steps": 3, **ASYNC}))
        coord, _, _ = build_coordinator(cfg)
        try:
            rows = []
            for step in range(3):
                kill(coord, step)
                m = coord.step().metrics
                rows.append({k: m[k] for k in KEYS if k in m})
                assert m["faults/failures"] == 0
            coord.finish()
            versions = ray_local.get([s.get_version.remote() for s in coord.samplers], timeout=60)
            assert versions == [coord.version] * len(coord.samplers)
            return rows, coord.stats
        finally:
            coord.shutdown()

    def chaos(coord, step):
        if step == 1:  # this step's rollout was submitted before the previous update: in flight now
            ray_local.kill(coord.samplers[0], no_restart=False)
        if step == 2:
            ray_local.kill(coord.scorers[0], no_restart=False)

    calm, calm_stats = three_steps("calm", lambda coord, step: None)
    rough, rough_stats = three_steps("chaos", chaos)
    assert [r["rollout/version_lag"] for r in calm] == [0.0, 1.0, 1.0]
    assert rough == calm
    assert calm_stats.restarts == 0 and rough_stats.restarts >= 1
