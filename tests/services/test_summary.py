"""The main job's printed summary fits 100 columns and says, from its figures, what they show."""

from types import SimpleNamespace

import pytest

from services.training.summary import short_summary, summary_columns, what_it_shows

pytestmark = pytest.mark.unit


def _run(before_fd: float, fd: float, proxy: float, ratio: float, extra: int = 0) -> SimpleNamespace:
    many = {f"eval/other_metric_{i}_20steps": 0.123456 for i in range(extra)}  # what the full table holds
    before = {"eval/colour_clip_20steps": 0.125, "eval/frechet_20steps": before_fd, "eval/norm_ratio_20steps": 1.0}
    after = {
        "eval/colour_clip_20steps": proxy,
        "eval/colour_judge_20steps": 0.7,
        "eval/frechet_20steps": fd,
        "eval/frechet_4steps": fd * 1.3,
        "eval/norm_ratio_20steps": ratio,
        "eval/colour_saturation_20steps": 0.031,
        "eval/colour_brightness_20steps": -0.004,
        "eval_renorm/frechet_20steps": fd * 0.9,
        **many,
    }
    return SimpleNamespace(before={**before, **many}, after=after)


def test_the_summary_fits_100_columns_and_names_what_it_left_out():
    runs = {
        "colour-nft-normguard": _run(52.9, 60.0, 0.16, 0.99, 30),
        "colour-nft-normguard-baseline": _run(52.9, 80.0, 0.17, 1.09, 30),
    }
    extra = ("colour_brightness", "colour_saturation", "colour_contrast", "colour_texture")
    cols = summary_columns(reward="colour_clip", judge="colour_judge", full=20, few=4, extra=extra)
    text = short_summary(runs, cols)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert lines[0].split()[:4] == ["run", "when", "proxy", "judge"]
    assert len([line for line in lines if " after " in f" {line} "]) == 2  # one after row per run
    assert "+renorm" in text and "60" in text and "0.99" in text
    narrow = short_summary(runs, cols, width=70)
    assert max(len(line) for line in narrow.splitlines()) <= 70 and "left out to fit" in narrow


def test_the_sentence_reads_the_figures_either_way():
    good = {"ng": _run(52.9, 60.0, 0.16, 0.99), "base": _run(52.9, 80.0, 0.17, 1.09)}
    s = what_it_shows(good, guarded="ng", baseline="base", reward="colour_clip", full=20)
    assert "NormGuard kept quality better" in s and "60.0 vs 80.0" in s and "0.990 vs 1.090" in s
    bad = {"ng": _run(52.9, 90.0, 0.16, 0.99), "base": _run(52.9, 80.0, 0.17, 1.09)}
    assert "did not keep quality better" in what_it_shows(
        bad, guarded="ng", baseline="base", reward="colour_clip", full=20
    )
    alone = what_it_shows({"ng": good["ng"]}, guarded="ng", baseline=None, reward="colour_clip", full=20)
    assert "0.125 -> 0.160" in alone
