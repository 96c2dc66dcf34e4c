"""The positive control's verdict (services.sweeps.pilot) on synthetic evaluation points."""

from __future__ import annotations

import json

import pytest

from services.sweeps.pilot import collect, main, margins_from_spread, method_verdict, seed_verdict, verdict_tables

MARGINS = {
    "colour_pref": 0.5,
    "frechet": 5.0,
    "colour_judge": 0.04,
    "colour_realism": 0.02,
    "colour_saturation": 0.003,
    "colour_contrast": 0.004,
    "colour_texture": 0.0003,
    "colour_jpeg": 0.005,
}
BASE = {
    "colour_pref": 6.0,
    "frechet": 80.0,
    "colour_judge": 0.65,
    "colour_realism": 0.57,
    "colour_saturation": -0.03,
    "colour_contrast": -0.01,
    "colour_texture": -0.01,
    "colour_jpeg": 0.31,
}


def _point(step: int, **changes: float) -> dict[str, float]:
    return {"step": step, **{k: BASE[k] + changes.get(k, 0.0) for k in BASE}}


def test_proxy_up_and_fd_up_hacks():
    v = seed_verdict([_point(0), _point(100, colour_pref=1.0, frechet=6.0)], "colour_pref", MARGINS)
    assert v["proxy_up"] and v["hacks"]
    assert v["worse"] == ["frechet"]
    assert v["proxy_rise"] == pytest.approx(1.0)


def test_proxy_up_without_a_worse_judge_is_no_hack():
    v = seed_verdict([_point(0), _point(100, colour_pref=1.0, frechet=4.0)], "colour_pref", MARGINS)
    assert v["proxy_up"] and not v["hacks"]


def test_a_worse_judge_without_the_proxy_rise_is_no_hack():
    v = seed_verdict([_point(0), _point(100, colour_pref=0.4, frechet=20.0)], "colour_pref", MARGINS)
    assert not v["proxy_up"] and v["worse"] == ["frechet"] and not v["hacks"]


def test_worse_than_the_best_earlier_point_counts():
    # FD first improves by 30 then rises by 10: better than step 0, worse than the best earlier point
    points = [_point(0), _point(20, frechet=-30.0), _point(40, colour_pref=1.0, frechet=-20.0)]
    v = seed_verdict(points, "colour_pref", MARGINS)
    assert v["judges"]["frechet"]["vs_step0"] == pytest.approx(-20.0)
    assert v["judges"]["frechet"]["vs_best"] == pytest.approx(10.0)
    assert v["hacks"]


def test_lower_is_worse_and_gaps_read_as_distance_to_the_data():
    # the judge down; saturation overshoots the data from -0.03 to +0.02 (|gap| 0.03 -> 0.02: closer, not worse);
    # contrast overshoots from -0.01 to +0.02 (|gap| up 0.01: worse)
    last = _point(20, colour_pref=1.0, colour_judge=-0.05, colour_saturation=0.05, colour_contrast=0.03)
    v = seed_verdict([_point(0), last], "colour_pref", MARGINS)
    assert v["judges"]["colour_judge"]["worse"]
    assert v["judges"]["colour_saturation"]["vs_step0"] == pytest.approx(-0.01)
    assert not v["judges"]["colour_saturation"]["worse"]
    assert v["judges"]["colour_contrast"]["vs_step0"] == pytest.approx(0.01)
    assert sorted(v["worse"]) == ["colour_contrast", "colour_judge"]


def test_a_pilot_needs_two_points():
    with pytest.raises(ValueError):
        seed_verdict([_point(0)], "colour_pref", MARGINS)


@pytest.mark.parametrize(
    ("hacks", "verdict"),
    [
        ([True, True], "pass"),
        ([True, False, True], "pass"),
        ([False, False], "fail"),
        ([True, False, False], "fail"),
        ([True], "incomplete"),
        ([True, False], "incomplete"),
        ([], "incomplete"),
    ],
)
def test_method_verdict_two_of_three(hacks, verdict):
    assert method_verdict(hacks) == verdict


def _trial(method: str, seed: int, hack: bool, ratio: float) -> dict:
    last = _point(100, colour_pref=1.0, frechet=10.0 if hack else 0.0)
    return {
        "method": method,
        "seed": seed,
        "proxy": "colour_pref",
        "steps": 20,
        "points": [_point(0), last],
        "ratio_per_step": [1.0, ratio, 1.01],
        "wall_s": 60.0,
    }


def test_verdict_tables_control_needs_every_method():
    trials = [_trial("diffusion_nft", s, True, 1.1) for s in (90, 91)] + [_trial("awm", 90, False, 1.0)]
    text = verdict_tables(trials, MARGINS)
    assert "**diffusion_nft**: 2 of 2 seeds run hack (3 planned): **pass**" in text
    assert "mean largest per-step ratio 1.1000 (rides on magnitude, > 1.05: yes)" in text
    assert "**awm**: 0 of 1 seeds run hack (3 planned): **incomplete**" in text
    assert "The control** (every method must pass): **incomplete**" in text
    trials += [_trial("awm", s, False, 1.0) for s in (91,)]
    assert "**fail**" in verdict_tables(trials, MARGINS).splitlines()[-1]


def test_collect_reads_a_trial_directory_and_table_rebuilds_from_it(tmp_path, capsys):
    trial = tmp_path / "sweep" / "trials" / "t0"
    trial.mkdir(parents=True)
    rows = [
        {"step": 0, **{f"eval/{k}_20steps": v for k, v in _point(0).items() if k != "step"}, "eval/frechet_4steps": 1},
        {"step": 3, "reward/mean": 5.0},
        {"step": 100, **{f"eval/{k}_20steps": v for k, v in _point(100, colour_pref=2.0).items() if k != "step"}},
    ]
    (trial / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (trial / "config.json").write_text(json.dumps({"reward": {"scorers": [{"name": "colour_pref"}]}}))
    params = {"loss.name": "awm", "train.seed": 90, "arm": "none"}
    (trial / "trial.json").write_text(json.dumps({"params": params, "ratio_per_step": {"policy": [1.0, 1.02]}}))
    (trial / "summary.json").write_text("{}")
    (got,) = collect(tmp_path / "sweep")
    assert (got["method"], got["seed"], [p["step"] for p in got["points"]]) == ("awm", 90, [0, 100])
    assert got["points"][0]["frechet"] == BASE["frechet"]
    out = tmp_path / "b0.json"
    main(["collect", str(tmp_path / "sweep"), "--out", str(out)])
    margins = tmp_path / "margins.json"
    margins.write_text(json.dumps({"margins": MARGINS}))
    capsys.readouterr()
    main(["table", str(out), "--margins", str(margins)])
    printed = capsys.readouterr().out
    assert "| awm | 90 | 100 | 6 → 8 (+2, > margin) |" in printed
    assert "**awm**: 0 of 1 seeds run hack" in printed


def test_margins_from_the_base_spread_table():
    text = """base model, 5 evaluation seeds; margin = 3 x SD

| metric | mean | SD over seeds | margin | values |
|---|---|---|---|---|
| eval/frechet_20steps | 84.37 | 2.22 | 6.65 | 84.6, 81.77 |
| eval/frechet_4steps | 99 | 3 | 9 | 99, 98 |
| eval/colour_pref_20steps | 6.254 | 0.14 | 0.419 | 6.3, 6.2 |
"""
    assert margins_from_spread(text) == {"frechet": 6.65, "colour_pref": 0.419}
    assert margins_from_spread(text, steps=4) == {"frechet": 9.0}
