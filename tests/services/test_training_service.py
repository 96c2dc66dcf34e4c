"""The training service on a local Ray cluster: every loss, weight sync, faults, resume."""

import json

import pytest
import torch
from conftest import tiny_overrides, train_worker_pids

from services.config import load_config
from services.training.build import build_coordinator
from services.training.run import run_training

pytestmark = [pytest.mark.service, pytest.mark.slow]

# Each method once through the whole Ray service, NormGuard on for two and off for two (each ~45 s of CI:
# the product of the two was 8 runs); lambda = 0 equals the base loss bit for bit in tests/core, and
# each method's loss with and without NormGuard is checked in process in test_methods_faithful.py.
ARMS = [
    ("diffusion_nft", [], 1.0),
    ("awm", ["loss.clip_range=0.2"], 0.0),
    ("flow_dpo", ["loss.beta=50"], 1.0),
    ("flow_grpo", ["rollout.sde_noise_level=0.7"], 0.0),
]


@pytest.mark.parametrize("loss,extra,weight", ARMS, ids=[f"{a[0]}-{a[2]}" for a in ARMS])
def test_two_step_run_of_each_loss(ray_local, digits_assets, tmp_path, loss, extra, weight):
    over = tiny_overrides(
        tmp_path,
        f"{loss}-{weight}",
        **{"loss.name": loss, "normguard.weight": weight, "resources.num_learners": 2, "resources.learner_cpus": 0.5},
    )
    cfg = load_config(None, over + extra)
    summary = run_training(cfg, progress=False)
    steps = [r for r in summary.history if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["normguard/ratio_mean"] > 0
        assert r["faults/failures"] == 0
    assert "eval/norm_ratio_6steps" in summary.after and "eval/digits_judge_2steps" in summary.before
    assert (cfg.run_dir / "checkpoints" / "latest").is_file()
    assert (cfg.run_dir / "training.png").is_file() and (cfg.run_dir / "grids" / "after_6steps.png").is_file()
    assert any(p.name.startswith("events") for p in (cfg.run_dir / "tensorboard").iterdir())


def test_samplers_generate_with_synced_weights(ray_local, digits_assets, tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "sync", **{"learner.lr": 5e-3}))
    coord, _, _ = build_coordinator(cfg)
    try:
        import ray

        from services.training.experience import PolicyRef

        def rollout_of_step_0():
            return coord.source.produce(0, PolicyRef(coord.weights_ref, coord.version), min_version=0).rollout

        before = rollout_of_step_0()
        coord.step()
        sums = ray.get([s.weights_checksum.remote() for s in coord.samplers], timeout=60)
        learner_sum = float(sum(t.double().sum() for t in ray.get(coord.weights_ref).values()))
        assert all(s == pytest.approx(learner_sum, rel=1e-12) for s in sums)
        after = rollout_of_step_0()  # same prompts and seeds: only the weights differ
        assert (after.versions == 1).all() and (before.versions == 0).all()
        assert not torch.allclose(after.latents, before.latents)
    finally:
        coord.shutdown()


def test_killed_sampler_is_restarted_and_its_work_redone(ray_local, digits_assets, tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "fault"))
    coord, _, _ = build_coordinator(cfg)
    try:
        coord.step()
        ray_local.kill(coord.samplers[1], no_restart=False)
        prompts, _, seeds, _ = coord.source.prompts(coord.step_idx)
        report = coord.step()
        m = report.metrics
        assert m["faults/restarts"] >= 1 and m["faults/retries"] >= 1 and m["faults/failures"] == 0, coord.stats
        versions = ray_local.get([s.get_version.remote() for s in coord.samplers], timeout=60)
        assert versions == [coord.version, coord.version]  # the restarted actor was re-synced
        # the step consumed exactly the requested samples (bookkeeping check inside _rollout)
        assert len(seeds) == cfg.samples_per_step
        # a killed scorer is counted too, in its own step only (faults/* are per step, totals separate)
        ray_local.kill(coord.scorers[0], no_restart=False)
        scored = coord.step().metrics
        assert scored["faults/retries"] >= 1 and scored["faults/restarts"] >= 1 and scored["faults/failures"] == 0
        assert scored["faults_total/retries"] == m["faults_total/retries"] + scored["faults/retries"]
        quiet = coord.step().metrics
        assert quiet["faults/retries"] == quiet["faults/restarts"] == 0
        assert quiet["faults_total/restarts"] == scored["faults_total/restarts"]
    finally:
        coord.shutdown()


def test_killed_sampler_and_scorer_leave_the_metrics_of_the_uninterrupted_run(ray_local, digits_assets, tmp_path):
    """Kill a sampler before step 2 and the scorer before step 3: the redone work gives exactly the
    per-step metrics of a run where nothing was killed (no sample lost, none counted twice)."""
    keys = ("reward/mean", "reward/std", "loss/total", "normguard/ratio_mean", "rollout/norm_ratio_mean")

    def three_steps(name, kill):
        coord, _, _ = build_coordinator(load_config(None, tiny_overrides(tmp_path, name, **{"train.steps": 3})))
        try:
            rows = []
            for step in range(3):
                kill(coord, step)
                rows.append({k: coord.step().metrics[k] for k in keys})
            return rows
        finally:
            coord.shutdown()

    def chaos(coord, step):
        if step == 1:
            ray_local.kill(coord.samplers[0], no_restart=False)
        if step == 2:
            ray_local.kill(coord.scorers[0], no_restart=False)

    assert three_steps("chaos", chaos) == three_steps("calm", lambda coord, step: None)


def test_resume_reproduces_the_uninterrupted_run(digits_assets, tmp_path):
    """In-process (same code path as the actors): 4 steps straight vs 2 + resume + 2, with NFT's
    lagging old policy (the sampling policy) and two optimiser steps per RL step."""
    inner = {"train.checkpoint_every": 2, "learner.updates_per_step": 2}
    over = tiny_overrides(tmp_path, "straight", **{"train.steps": 4, **inner})
    straight = run_training(load_config(None, over), local=True, progress=False)
    over_a = tiny_overrides(tmp_path, "resumed", **{"train.steps": 2, **inner})
    run_training(load_config(None, over_a), local=True, progress=False)
    over_b = tiny_overrides(tmp_path, "resumed", **{"train.steps": 4, **inner})
    resumed = run_training(load_config(None, over_b), local=True, progress=False)

    def train_rows(s):
        keys = (
            "reward/mean",
            "loss/total",
            "normguard/ratio_mean",
            "rollout/norm_ratio_mean",
            "learner/old_policy_gap",
            "learner/old_policy_decay",
            "learner/updates",
        )
        return [{k: r[k] for k in keys} for r in s.history if "reward/mean" in r]

    assert len(train_rows(straight)) == 4
    assert all(r["learner/updates"] == 2 and r["learner/old_policy_gap"] > 0 for r in train_rows(straight))
    assert train_rows(resumed) == train_rows(straight)
    assert resumed.after == straight.after
    ckpt = json.loads((tmp_path / "resumed" / "checkpoints" / "step_000004" / "coordinator.json").read_text())
    assert ckpt["step"] == 4 and ckpt["version"] == 4


def test_a_corrupt_latest_checkpoint_falls_back_to_the_newest_intact_one(digits_assets, tmp_path, caplog):
    """A truncated learner.pt in the latest checkpoint: reported by path; the run resumes from the
    previous, intact checkpoint and ends identical to an uninterrupted run (or stops, when told to)."""
    from services.checkpoints import CheckpointError, verify_checkpoint

    inner = {"train.checkpoint_every": 2}
    straight = run_training(
        load_config(None, tiny_overrides(tmp_path, "straight", **{"train.steps": 4, **inner})),
        local=True,
        progress=False,
    )
    over = tiny_overrides(tmp_path, "broken", **{"train.steps": 4, **inner})
    run_training(load_config(None, over), local=True, progress=False)
    ckpts = tmp_path / "broken" / "checkpoints"
    assert verify_checkpoint(ckpts / "step_000002") is None and verify_checkpoint(ckpts / "step_000004") is None
    pt = ckpts / "step_000004" / "weights.safetensors"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])  # a write cut off half-way
    with pytest.raises(CheckpointError, match="step_000004.*weights.safetensors has"):
        run_training(load_config(None, [*over, "train.on_corrupt_checkpoint=stop"]), local=True, progress=False)
    with caplog.at_level("WARNING"):
        resumed = run_training(load_config(None, over), local=True, progress=False)
    assert "step_000004 is corrupt or partial" in caplog.text and "step_000002" in caplog.text
    keys = ("reward/mean", "loss/total", "normguard/ratio_mean")
    rows = lambda s: [{k: r[k] for k in keys} for r in s.history if "reward/mean" in r]  # noqa: E731
    assert rows(resumed) == rows(straight) and resumed.after == straight.after
    assert verify_checkpoint(ckpts / "step_000004") is None  # rewritten, intact


def test_early_stopping_control_stops_at_the_reward_level(digits_assets, tmp_path):
    """``train.stop_at_reward``: training ends once the windowed reward reaches the level, then the
    final eval runs; an unreachable level trains all the steps."""
    over = tiny_overrides(tmp_path, "stop", **{"train.steps": 4, "train.stop_at_reward": 0.0, "train.stop_window": 2})
    stopped = run_training(load_config(None, over), local=True, progress=False)
    rewards = [r["reward/mean"] for r in stopped.history if "reward/mean" in r]
    assert stopped.after["train/steps_done"] == 2 == len(rewards)
    assert stopped.after["train/final_reward"] == pytest.approx(sum(rewards) / 2)
    assert "eval/norm_ratio_6steps" in stopped.after
    over = tiny_overrides(tmp_path, "full", **{"train.steps": 3, "train.stop_at_reward": 2.0})
    full = run_training(load_config(None, over), local=True, progress=False)
    assert full.after["train/steps_done"] == 3


def test_a_lost_learner_worker_is_recovered_and_the_run_equals_the_uninterrupted_one(
    ray_local, digits_assets, tmp_path
):
    """SIGKILL one Ray Train worker process after step 3 (as an OOM kill or a preemption would): the run
    restarts the learner group from the step-2 checkpoint, redoes step 3, and ends with every step once in
    metrics.jsonl and the same metrics as the uninterrupted run; the restart is counted in its step."""
    import os
    import signal

    inner = {
        "train.steps": 4,
        "train.checkpoint_every": 2,
        "resources.num_learners": 2,
        "resources.learner_cpus": 0.5,
        "rollout.num_samplers": 1,
    }
    straight = run_training(load_config(None, tiny_overrides(tmp_path, "straight", **inner)), progress=False)
    killed = []

    def kill_after_step_3(step, _metrics):
        if step == 3 and not killed:
            pids = train_worker_pids()
            os.kill(max(pids), signal.SIGKILL)
            killed.append(max(pids))

    over = tiny_overrides(tmp_path, "lost", **inner)
    recovered = run_training(load_config(None, over), progress=False, on_step=kill_after_step_3)
    assert killed
    rows = [r for r in recovered.history if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["faults/learner_restarts"] for r in rows] == [0, 0, 1, 0]
    assert rows[-1]["faults_total/learner_restarts"] == 1
    keys = ("reward/mean", "loss/total", "normguard/ratio_mean", "learner/updates")
    base = [r for r in straight.history if "reward/mean" in r]
    assert [{k: r[k] for k in keys} for r in rows] == [{k: r[k] for k in keys} for r in base]
    assert recovered.after == straight.after
    with pytest.raises(Exception, match="learner"):  # max_failures=0: a lost worker ends the run, clearly
        killed.clear()
        run_training(
            load_config(None, [*tiny_overrides(tmp_path, "fatal", **inner), "train.max_failures=0"]),
            progress=False,
            on_step=kill_after_step_3,
        )


def test_a_run_the_cluster_can_never_hold_fails_before_any_actor_starts(ray_local, digits_assets, tmp_path):
    """The local cluster has 2 CPUs; 3 learner CPUs can never be placed: a clear error, not a hang."""
    from services.cluster.plan import ClusterTooSmall

    cfg = load_config(None, tiny_overrides(tmp_path, "too-big", **{"resources.learner_cpus": 3}))
    with pytest.raises(ClusterTooSmall, match=r"learner #0 \(3 CPU, 0 GPU\)"):
        build_coordinator(cfg)
    warn = load_config(
        None,
        tiny_overrides(tmp_path, "too-big-warn", **{"resources.learner_cpus": 3, "resources.check_cluster": "off"}),
    )
    from services.cluster.plan import nodes_from_ray, plan_run, run_demand

    assert not plan_run(run_demand(warn), nodes_from_ray()).ok  # the check is off, not wrong


def test_a_prompt_file_with_metadata_trains_evaluates_on_its_own_set_and_resumes_on_the_same_prompts(
    digits_assets, tmp_path
):
    """Training prompts from a .jsonl file (metadata reaches the rule-based scorer), evaluation prompts
    from a separate .txt, the per-epoch order kept across a resume, and a changed file refused."""
    import user_rewards

    from services.checkpoints import CheckpointError
    from services.training.prompts import load_prompt_file

    rows = [{"prompt": f"a handwritten digit {d}", "target": d if d % 2 else -1} for d in range(10)]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("a handwritten digit 4\na handwritten digit 9\n")
    scorer = "[{name: target_digit, impl: 'user_rewards:TargetDigitScorer'}]"
    extra = {
        "data.train_prompts": str(train_file),
        "data.eval_prompts": str(eval_file),
        "reward.scorers": scorer,
        "train.steps": 4,
        "train.checkpoint_every": 2,
        "rollout.prompts_per_step": 3,
        "rollout.group_size": 2,
    }
    user_rewards.TargetDigitScorer.seen.clear()
    straight = run_training(
        load_config(None, tiny_overrides(tmp_path, "straight", **extra)), local=True, progress=False
    )
    pset = load_prompt_file(train_file, shuffle=True, seed=0)
    seen_prompts = [pset.row(g)[0] for g in range(12)]  # 4 steps x 3 groups: crosses into epoch 2
    assert sorted(seen_prompts[:10]) == sorted(r["prompt"] for r in rows)  # every prompt once in epoch 1
    train_calls = [m for m in user_rewards.TargetDigitScorer.seen if m is not None and len(m) == 6]
    assert train_calls and all(set(r) == {"target"} for m in train_calls for r in m)  # metadata arrived
    expected = [float(r["target"] >= 0) for g in range(3) for r in [pset.row(g)[1]] for _ in range(2)]
    first = next(r for r in straight.history if "reward/mean" in r)
    assert first["reward/target_digit"] == pytest.approx(sum(expected) / 6)
    assert any(m is None for m in user_rewards.TargetDigitScorer.seen)  # the .txt eval set carries no metadata

    over = tiny_overrides(tmp_path, "cut", **{**extra, "train.steps": 2})
    run_training(load_config(None, over), local=True, progress=False)
    resumed = run_training(load_config(None, tiny_overrides(tmp_path, "cut", **extra)), local=True, progress=False)
    keys = ("reward/mean", "loss/total")
    assert [{k: r[k] for k in keys} for r in resumed.history if "reward/mean" in r] == [
        {k: r[k] for k in keys} for r in straight.history if "reward/mean" in r
    ]
    train_file.write_text("\n".join(json.dumps(r) for r in rows[:5]) + "\n")  # the file changes under the run
    with pytest.raises(CheckpointError, match="training prompts changed"):
        run_training(
            load_config(None, tiny_overrides(tmp_path, "cut", **{**extra, "train.steps": 6})),
            local=True,
            progress=False,
        )
