"""``normguard compare``: matched-reward interpolation, t-intervals, pairing by seed, on a synthetic sweep."""

import csv
import json

import pytest

from services.sweeps.archive import archive_sweep
from services.sweeps.comparison import compare_sweep, interpolate_at, mean_ci
from services.sweeps.trials import whole_seeds


def test_interpolation_reads_the_polyline_where_it_first_reaches_the_level():
    assert interpolate_at([0.5, 0.6, 0.8], [10.0, 20.0, 40.0], 0.7) == pytest.approx(30.0)
    assert interpolate_at([0.5, 0.6], [10.0, 20.0], 0.5) == 10.0
    assert interpolate_at([0.5, 0.6], [10.0, 20.0], 0.9) is None


def test_mean_ci_is_the_t_interval():
    m, h, n = mean_ci([1.0, 2.0, 3.0])
    assert (m, n) == (2.0, 3) and h == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-5)
    assert mean_ci([5.0])[0] == 5.0 and mean_ci([])[2] == 0


def _trial(root, method, arm, seed, rewards, fds, ratio):
    d = root / "trials" / f"{arm}-{method}-{seed}"
    d.mkdir(parents=True)
    rows = []
    for step, (r, fd) in enumerate(zip(rewards, fds)):
        row = {"step": step * 3, "eval/digits_ink_20steps": r, "eval/frechet_20steps": fd, "eval/kid_20steps": fd / 10}
        if arm == "none" and step > 0:
            row.update({"eval_renorm/digits_ink_20steps": r - 0.01, "eval_renorm/frechet_20steps": fd - 1.0})
        rows.append(row)
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    params = {"loss.name": method, "arm": arm, "train.seed": seed}
    (d / "trial.json").write_text(json.dumps({"params": params, "ratio_per_step": {"policy": ratio}}))
    cfg = {"normguard": {"margin": 0.0}, "reward": {"scorers": [{"name": "digits_ink"}]}, "eval": {"full_steps": 20}}
    (d / "config.json").write_text(json.dumps(cfg))


def test_compare_matches_reward_pairs_seeds_and_writes_plots(tmp_path):
    for seed in range(3):
        # the unregularised arm climbs to 0.8 with FD rising fast; the constraint arm to 0.7 with FD rising slowly
        _trial(tmp_path, "awm", "none", seed, [0.5, 0.6, 0.7, 0.8], [10, 20 + seed, 30 + seed, 50], [1.1, 1.05])
        _trial(tmp_path, "awm", "constraint", seed, [0.5, 0.6, 0.7], [10, 12, 14 + seed], [1.0, 0.99])
    out = compare_sweep(tmp_path, tmp_path / "cmp")
    matched = {r["arm"]: r for r in out["matched"]}
    matched["none"] = matched.pop("none = early stop")
    assert set(matched) == {"none", "constraint", "renorm"}
    # the level every arm's every seed reaches: none 0.8, renormalised 0.79, constraint 0.7
    assert matched["none"]["reward_level"] == 0.7
    assert matched["none"]["frechet"] == pytest.approx(31.0) and matched["constraint"]["frechet"] == pytest.approx(15.0)
    assert matched["renorm"]["frechet"] == pytest.approx(31.9)  # (29 + s) + (20 - s) * 0.01 / 0.1, mean over s
    pair = next(p for p in out["paired"] if p["vs"] == "none" and p["metric"] == "frechet")
    assert pair["seeds"] == 3 and pair["seeds_favouring_normguard"] == 3 and pair["diff_mean"] < 0
    final = {r["arm"]: r for r in out["final"]}
    assert final["none"]["ratio_max_step"] == pytest.approx(1.1) and final["constraint"]["reward"] == pytest.approx(0.7)
    with (tmp_path / "cmp" / "paired.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(out["paired"])
    assert (tmp_path / "cmp" / "reward_vs_quality.png").stat().st_size > 0
    assert (tmp_path / "cmp" / "ratio_per_step.png").stat().st_size > 0
    # the bound: none [1.1, 1.05] -> floor min(none, 1) = [1, 1]; constraint [1.0, 0.99]: deficit [0, 0.01]
    (bound,) = out["bound"]
    assert bound["arm"] == "constraint" and bound["max_step"] == pytest.approx(1.0)
    assert bound["worst_deficit"] == pytest.approx(0.01) and bound["mean_deficit"] == pytest.approx(0.005)
    assert "How each arm holds the bound" in (tmp_path / "cmp" / "tables.md").read_text()


def test_a_part_run_seed_is_left_out_of_every_arm(tmp_path):
    """docs/tasks/colour.md registers that a seed enters the tables only when all its trials finished."""
    assert whole_seeds([("awm", "none", 0), ("awm", "kl", 0), ("awm", "none", 1), ("nft", "none", 0)]) == {0}
    for seed in range(3):
        _trial(tmp_path, "awm", "none", seed, [0.5, 0.8], [10, 20 + seed], [1.1])
        if seed < 2:  # seed 2: the constraint arm never finished (the clock stopped the sweep)
            _trial(tmp_path, "awm", "constraint", seed, [0.5, 0.8], [10, 12], [1.0])
    out = compare_sweep(tmp_path, tmp_path / "cmp")
    pair = next(p for p in out["paired"] if p["vs"] == "none" and p["metric"] == "frechet")
    assert pair["seeds"] == 2
    final = {r["arm"]: r for r in out["final"]}
    assert final["none"]["seeds"] == 2 and final["none"]["frechet"] == pytest.approx(20.5)


def test_the_archive_keeps_what_the_comparison_reads(tmp_path):
    for seed in range(2):
        _trial(tmp_path / "sweep", "awm", "none", seed, [0.5, 0.6, 0.8], [10, 20, 30 + seed], [1.1])
        _trial(tmp_path / "sweep", "awm", "constraint", seed, [0.5, 0.7], [10, 11 + seed], [1.0])
    with (tmp_path / "sweep" / "trials" / "none-awm-0" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 7, "train/loss": 0.3}) + "\n")  # a training row: not analysed, not kept
    (tmp_path / "sweep" / "trials" / "unfinished").mkdir()
    assert len(archive_sweep(tmp_path / "sweep", tmp_path / "arch")) == 4
    kept = (tmp_path / "arch" / "trials" / "none-awm-0" / "metrics.jsonl").read_text()
    assert "train/loss" not in kept and kept.count("\n") == 3
    a = compare_sweep(tmp_path / "sweep", tmp_path / "c1")
    b = compare_sweep(tmp_path / "arch", tmp_path / "c2")
    for table in ("matched", "paired", "final"):  # json: a missing metric reads NaN in both
        assert json.dumps(a[table]) == json.dumps(b[table]) and a[table]
