"""Which metrics a comparison reads: the set-level ones every task has and the task's own judges."""

from __future__ import annotations

from typing import TypeAlias

__all__ = [
    "ArmRuns",
    "GAP_STATS",
    "LOWER_IS_BETTER",
    "QUALITY",
    "SET_LEVEL",
    "judge_key",
    "paired_keys",
    "quality_keys",
]

ArmRuns: TypeAlias = "dict[tuple[str, str], list[dict]]"  # (method, arm) -> its trials' runs
SET_LEVEL = ("frechet", "kid", "diversity", "recall", "precision")  # in the judge's features, every task
QUALITY = (*SET_LEVEL, "digits_judge", "digits_classifier")  # the digits task's (the default)
LOWER_IS_BETTER = {"frechet", "kid"}
# signed gaps to the real data's mean (colour scorers with ``options: {relative: true}``): closer to 0 is better
GAP_STATS = {"colour_brightness", "colour_saturation", "colour_contrast", "colour_texture"}


def quality_keys(runs: list[dict]) -> tuple[str, ...]:
    """The set-level metrics and the trials' evaluation scorers (the task's judges), in config order."""
    names = dict.fromkeys(n for r in runs for n in r.get("eval_scorers", ()))
    return (*SET_LEVEL, *names) if names else QUALITY


def judge_key(keys: tuple[str, ...]) -> str:
    """The independent classifier among the quality keys (``<task>_judge``)."""
    return next((k for k in keys if k.endswith("_judge")), "digits_judge")


def paired_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    """What the paired differences report: FD, KID, diversity, recall, the judge, then the task's other
    judges (realism, the colour-statistic gaps); the digits task keeps its five."""
    extra = tuple(k for k in keys if k not in SET_LEVEL and k != judge_key(keys) and not k.startswith("digits_"))
    return ("frechet", "kid", "diversity", "recall", judge_key(keys), *extra)
