"""The matched-reward rules of ``normguard compare`` and H3's per-seed difference, on synthetic trials."""

import csv
import json

import pytest

from services.sweeps.comparison import compare_sweep, matched_level
from services.sweeps.h3 import h3_rows


def _trial(root, arm, seed, curves, method="awm"):
    """``curves``: steps -> (rewards, fds), one entry per evaluation point."""
    d = root / "trials" / f"{arm}-{method}-{seed}"
    d.mkdir(parents=True)
    points = len(next(iter(curves.values()))[0])
    rows = []
    for i in range(points):
        row = {"step": 6 * i}
        for steps, (rewards, fds) in curves.items():
            row.update({f"eval/colour_clip_{steps}steps": rewards[i], f"eval/frechet_{steps}steps": fds[i]})
        rows.append(row)
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    params = {"loss.name": method, "arm": arm, "train.seed": seed}
    (d / "trial.json").write_text(json.dumps({"params": params, "ratio_per_step": {"policy": [1.0, 1.0]}}))
    cfg = {
        "normguard": {"margin": 0.0},
        "reward": {"scorers": [{"name": "colour_clip"}], "eval_scorers": [{"name": "colour_judge"}]},
        "eval": {"full_steps": 20},
    }
    (d / "config.json").write_text(json.dumps(cfg))


def _series(bests_by_arm):
    return {arm: [(s, {"reward": [0.1, b]}) for s, b in enumerate(bests)] for arm, bests in bests_by_arm.items()}


def test_majority_level_is_reached_by_most_seeds_of_every_arm():
    # one weak seed of `none` (never above the base model's 0.1) collapses the registered rule only
    series = _series({"none": [0.5, 0.1, 0.4], "constraint": [0.6, 0.3, 0.45]})
    assert matched_level(series, "all") == pytest.approx(0.1)
    assert matched_level(series, "majority") == pytest.approx(0.4)  # none: 2 of 3 reach 0.4; constraint 0.45
    five = _series({"none": [0.9, 0.1, 0.1, 0.7, 0.8]})
    assert matched_level(five, "majority") == pytest.approx(0.7)  # 3 of 5 reach 0.7
    assert matched_level(_series({"none": [0.3, 0.5]}), "majority") == pytest.approx(0.3)  # 2 seeds: both
    with pytest.raises(ValueError, match="majority"):
        matched_level(series, "median")


def test_compare_writes_both_rules_and_drops_seeds_below_the_majority_level(tmp_path):
    up = ([0.5, 0.6, 0.7], [10.0, 20.0, 30.0])
    for seed in range(3):
        _trial(tmp_path, "constraint", seed, {20: ([0.5, 0.6, 0.7], [10.0, 15.0, 20.0 + seed])})
        _trial(tmp_path, "none", seed, {20: up if seed < 2 else ([0.5, 0.45, 0.4], [10.0, 12.0, 14.0])})
    out = compare_sweep(tmp_path, tmp_path / "cmp", steps=20)
    old = {r["arm"]: r for r in out["by_rule"]["all"]["matched"]}
    new = {r["arm"]: r for r in out["by_rule"]["majority"]["matched"]}
    assert old["constraint"]["reward_level"] == 0.5 and old["constraint"]["frechet"] == pytest.approx(10.0)
    assert new["constraint"]["reward_level"] == 0.7 and new["constraint"]["seeds"] == 3
    assert new["none = early stop"]["seeds"] == 2 and new["none = early stop"]["frechet"] == pytest.approx(30.0)
    pair = next(p for p in out["by_rule"]["majority"]["paired"] if p["vs"] == "none" and p["metric"] == "frechet")
    assert pair["seeds"] == 2 and pair["diff_mean"] == pytest.approx(-9.5)  # (20 - 30 + 21 - 30) / 2
    assert out["matched"] == out["by_rule"]["all"]["matched"]  # the first rule is the registered one
    with (tmp_path / "cmp" / "paired_majority.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(out["by_rule"]["majority"]["paired"])
    with (tmp_path / "cmp" / "matched.csv").open() as f:
        assert {r["reward_level"] for r in csv.DictReader(f)} == {"0.5"}
    text = (tmp_path / "cmp" / "tables.md").read_text()
    assert "every seed of every arm reaches" in text and "(rule majority)" in text


def test_h3_is_the_per_seed_difference_of_the_two_paired_differences(tmp_path):
    for s in range(3):
        _trial(tmp_path, "none", s, {20: ([0.5, 0.6, 0.7], [10, 20, 30]), 4: ([0.5, 0.6, 0.7], [20, 40, 60])})
        constraint = {20: ([0.5, 0.6, 0.7], [10, 18, 26 - s]), 4: ([0.5, 0.6, 0.7], [20, 30, 40 - 2 * s])}
        _trial(tmp_path, "constraint", s, constraint)
    rows = {r["rule"]: r for r in h3_rows(tmp_path) if r["normguard"] == "constraint"}
    assert set(rows) == {"all", "majority"}
    r = rows["all"]
    assert r["diff_20"] == pytest.approx(-5.0) and r["diff_4"] == pytest.approx(-22.0)  # -4 - s, -20 - 2 s
    assert r["h3"] == pytest.approx(-17.0) and r["seeds"] == 3 and r["seeds_h3_negative"] == 3  # -16 - s
    assert r["h3_ci95"] == pytest.approx(4.302653 / 3**0.5, rel=1e-5)  # sd 1 over 3 seeds
    assert not [x for x in h3_rows(tmp_path) if x["normguard"] == "penalty"]  # no penalty arm in this sweep


def test_a_weighted_sum_of_proxies_is_the_reward_the_arms_are_matched_on(tmp_path):
    for arm in ("none", "constraint"):
        d = tmp_path / "trials" / f"{arm}-awm-0"
        d.mkdir(parents=True)
        rows = [
            {"step": 0, "eval/colour_jpeg_20steps": 0.3, "eval/colour_clip_20steps": 0.1, "eval/frechet_20steps": 10},
            {"step": 6, "eval/colour_jpeg_20steps": 0.5, "eval/colour_clip_20steps": 0.1, "eval/frechet_20steps": 30},
        ]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        params = {"loss.name": "awm", "arm": arm, "train.seed": 0}
        (d / "trial.json").write_text(json.dumps({"params": params, "ratio_per_step": {"policy": [1.0]}}))
        scorers = [{"name": "colour_jpeg", "weight": 1.0}, {"name": "colour_clip", "weight": 2.0}]
        cfg = {"normguard": {"margin": 0.0}, "reward": {"scorers": scorers}, "eval": {"full_steps": 20}}
        (d / "config.json").write_text(json.dumps(cfg))
    out = compare_sweep(tmp_path, tmp_path / "cmp", steps=20, rules=("all",))
    assert {r["reward_level"] for r in out["matched"]} == {0.7}  # 0.5 + 2 x 0.1
    assert {r["arm"]: r["reward"] for r in out["final"]} == {"constraint": 0.7, "none": 0.7}
