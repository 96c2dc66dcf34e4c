"""Guards that catch reward hacking (warn / stop / rollback), NormGuard's constraint mode in the
learner, the digits_ink proxy, and sweep arms."""

import json
import math

import pytest
import torch
from conftest import tiny_overrides

from services.config import load_config
from services.training.run import run_training

pytestmark = [pytest.mark.service, pytest.mark.slow]


def _train_rows(summary):
    return [r for r in summary.history if "reward/mean" in r]


def test_a_warn_guard_records_every_crossing_and_trains_on(digits_assets, tmp_path):
    over = tiny_overrides(tmp_path, "warn", **{"train.steps": 3})
    over.append("train.guards=[{metric: reward/mean, min: 2.0, action: warn}]")  # a reward is never >= 2
    summary = run_training(load_config(None, over), local=True, progress=False)
    assert summary.after["train/steps_done"] == 3
    assert [(g["step"], g["metric"], g["action"]) for g in summary.guards] == [
        (s, "reward/mean", "warn") for s in (1, 2, 3)
    ]
    stored = json.loads((tmp_path / "warn" / "summary.json").read_text())
    assert stored["guards"] == summary.guards and stored["stopped_by_guard"] is False


def test_a_stop_guard_ends_training_where_it_fires_and_the_rerun_is_finished(digits_assets, tmp_path):
    over = tiny_overrides(tmp_path, "stop", **{"train.steps": 4})
    over.append("train.guards=[{metric: normguard/ratio_mean, max: 0.0, action: stop}]")
    summary = run_training(load_config(None, over), local=True, progress=False)
    assert len(_train_rows(summary)) == 1 and summary.after["train/steps_done"] == 1
    assert summary.guards[0]["step"] == 1 and summary.guards[0]["bound"] == "> max 0.0"
    again = run_training(load_config(None, over), local=True, progress=False)  # idempotent: not resumed
    assert len(_train_rows(again)) == 1 and again.after == summary.after


def test_a_rollback_guard_restores_the_last_checkpoint_inside_the_bounds(digits_assets, tmp_path):
    """NFT's old-policy decay is 0.001 k after k optimiser steps: a guard at 0.0015 fires at step 2, after
    the evaluation at step 1 held every bound. The run rolls back to step 1 and its final evaluation
    equals that of a run trained for exactly one step."""
    inner = {"train.eval_every": 1, "train.checkpoint_every": 1}
    over = tiny_overrides(tmp_path, "rolled", **{"train.steps": 4, **inner})
    over.append("train.guards=[{metric: learner/old_policy_decay, max: 0.0015, action: rollback}]")
    rolled = run_training(load_config(None, over), local=True, progress=False)
    assert [(g["step"], g["action"]) for g in rolled.guards] == [(2, "rollback")]
    assert len(_train_rows(rolled)) == 2 and rolled.after["train/steps_done"] == 1
    one = run_training(
        load_config(None, tiny_overrides(tmp_path, "one", **{"train.steps": 1, **inner})), local=True, progress=False
    )
    assert rolled.after == one.after
    assert (tmp_path / "rolled" / "checkpoints" / "latest").read_text() == "step_000001"
    again = run_training(load_config(None, over), local=True, progress=False)
    assert again.after == rolled.after


def test_a_guard_needs_a_bound():
    with pytest.raises(ValueError, match="give max, min or max_rise"):
        load_config(None, ["train.guards=[{metric: reward/mean}]"])


def test_constraint_mode_moves_each_bins_multiplier_by_its_measured_violation(digits_assets, tmp_path):
    over = tiny_overrides(
        tmp_path,
        "constraint",
        **{
            "train.steps": 3,
            "normguard.mode": "constraint",
            "normguard.bins": 4,
            "normguard.lambda_init": 0.5,
            "normguard.dual_rate": 0.7,
            "normguard.tolerance": 0.01,
            "normguard.dual_kd": 0.5,
            "normguard.margin": 0.0,
        },
    )
    rows = _train_rows(run_training(load_config(None, over), local=True, progress=False))
    last_ratio: dict[int, float] = {}
    for r in rows:  # the logged multiplier is the one after this step's ascent on this step's ratio
        for b in range(4):
            prev = 0.5 if r["step"] == 1 else rows[r["step"] - 2][f"normguard/lambda_bin{b}"]
            if f"normguard/ratio_bin{b}" not in r:
                assert r[f"normguard/lambda_bin{b}"] == pytest.approx(prev)
                continue
            ratio = r[f"normguard/ratio_bin{b}"]
            trend = (ratio - last_ratio[b]) / 0.01 if b in last_ratio else 0.0
            err = max(-1.0, min(1.0, (ratio - 1.0) / 0.01 + 0.5 * trend))
            expected = min(100.0, max(1e-3, prev * math.exp(0.7 * err)))
            assert r[f"normguard/lambda_bin{b}"] == pytest.approx(expected, rel=1e-6)
            last_ratio[b] = ratio
    assert rows[-1]["normguard/lambda"] != pytest.approx(0.5)


def test_the_ink_proxy_is_the_class_probability_times_the_capped_ink(digits_assets):
    from services.rewards import build_scorer

    path = str(digits_assets.scorer_path)
    ink = build_scorer("digits_ink", path=path, options={"ink_target": 0.5})
    clf = build_scorer("digits_classifier", path=path)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 16, 16, generator=g) * torch.tensor([0.2, 0.6, 1.0, 1.6])[:, None, None, None]
    images = images.clamp(0, 1)
    prompts = [f"a handwritten digit {d}" for d in range(4)]
    factor = (images.mean(dim=(1, 2, 3)) / 0.5).clamp(max=1.0)
    assert torch.allclose(ink.score(images, prompts), clf.score(images, prompts) * factor, atol=1e-6)
    assert ink.score(torch.zeros(1, 3, 16, 16), prompts[:1]).item() == 0.0
    with pytest.raises(ValueError, match="ink_target"):
        build_scorer("digits_ink", path=path, options={"ink_target": 0.0})


def test_sweep_arms_expand_per_method_and_skip_arms_of_other_methods(tmp_path):
    from services.sweeps.config import SweepConfig

    sweep = SweepConfig.model_validate(
        {
            "name": "arms",
            "output_dir": str(tmp_path),
            "base": {"train.steps": 2},
            "by_method": {"flow_grpo": {"rollout.sde_noise_level": 0.7}},
            "arms": {
                "none": {},
                "kl": {"by_method": {"awm": {"loss.kl_weight": 1.0}, "flow_grpo": {"loss.kl_weight": 4.0}}},
                "grpo_guard": {"overrides": {"loss.guard": True}, "methods": ["flow_grpo"]},
            },
            "axes": [
                {"key": "loss.name", "grid": ["awm", "flow_grpo"]},
                {"key": "arm", "grid": ["none", "kl", "grpo_guard"]},
            ],
        }
    )
    trials = sweep.grid_trials()
    assert [(t["loss.name"], t["arm"]) for t in trials] == [
        ("awm", "none"),
        ("awm", "kl"),
        ("flow_grpo", "none"),
        ("flow_grpo", "kl"),
        ("flow_grpo", "grpo_guard"),
    ]
    cfg = sweep.trial_config({"loss.name": "flow_grpo", "arm": "kl"}, "t")
    assert cfg.loss.kl_weight == 4.0 and cfg.rollout.sde_noise_level == 0.7 and not cfg.loss.guard
    assert sweep.trial_config({"loss.name": "flow_grpo", "arm": "grpo_guard"}, "t").loss.guard
    assert sweep.trial_config({"loss.name": "awm", "arm": "kl"}, "t").loss.kl_weight == 1.0
    with pytest.raises(ValueError, match="undeclared arms"):
        SweepConfig.model_validate(
            {**sweep.model_dump(), "axes": [{"key": "arm", "grid": ["none", "typo"]}], "arms": {"none": {}}}
        )


def test_constraint_probes_reach_the_bins_no_training_point_reaches(digits_assets, tmp_path):
    """AWM's stratified sigmas leave the grid's ends empty: from step 2 on, probe points carry the
    force there, so those bins get a measured ratio and a multiplier that moves; without probes
    they never do."""
    common = {
        "loss.name": "awm",
        "train.steps": 3,
        "rollout.num_steps": 10,
        "normguard.mode": "constraint",
        "normguard.bins": 10,
        "normguard.tolerance": 0.005,
    }
    rows = _train_rows(
        run_training(load_config(None, tiny_overrides(tmp_path, "probe", **common)), local=True, progress=False)
    )
    first = {b for b in range(10) if f"normguard/ratio_bin{b}" in rows[0]}
    empty = set(range(10)) - first
    assert empty, "AWM's training sigmas were expected to leave some bins empty"
    for r in rows[1:]:
        assert {f"normguard/ratio_bin{b}" for b in empty} <= r.keys()
    assert any(rows[-1][f"normguard/lambda_bin{b}"] != pytest.approx(0.5) for b in empty)
    off = _train_rows(
        run_training(
            load_config(None, tiny_overrides(tmp_path, "noprobe", **common, **{"normguard.probe_uncovered": False})),
            local=True,
            progress=False,
        )
    )
    assert all(f"normguard/ratio_bin{b}" not in r for r in off for b in empty)
    assert all(off[-1][f"normguard/lambda_bin{b}"] == pytest.approx(0.5) for b in empty)


def test_the_floor_has_its_own_multiplier_per_bin_moved_by_the_lower_side_rule(digits_assets, tmp_path):
    over = tiny_overrides(
        tmp_path,
        "floor",
        **{
            "train.steps": 2,
            "normguard.mode": "constraint",
            "normguard.bins": 4,
            "normguard.floor": 0.99,
            "normguard.tolerance": 0.01,
            "normguard.dual_rate": 0.5,
            "normguard.dual_kd": 0.0,
        },
    )
    rows = _train_rows(run_training(load_config(None, over), local=True, progress=False))
    for r in rows:
        for b in range(4):
            prev = 0.5 if r["step"] == 1 else rows[r["step"] - 2][f"normguard/floor_mu_bin{b}"]
            if f"normguard/ratio_bin{b}" not in r:
                continue
            err = max(-1.0, min(1.0, (0.99 - r[f"normguard/ratio_bin{b}"]) / 0.01))
            assert r[f"normguard/floor_mu_bin{b}"] == pytest.approx(min(100.0, max(1e-3, prev * math.exp(0.5 * err))))
    with pytest.raises(ValueError, match="normguard.floor\n  Input should be less than 1"):
        load_config(None, ["normguard.mode=constraint", "normguard.floor=1.0"])  # a floor below every bound
