"""The comparison's tables as markdown (mean ± 95 % t half-width over seeds), for docs/results.md."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

from services.sweeps.keys import QUALITY, judge_key, paired_keys

__all__ = ["markdown_tables", "matched_markdown"]

HIGH_LEVEL_EXCLUDES = ("kl",)  # arms left out of the second, higher matched level


def _pm(row: dict, key: str, digits: int = 3) -> str:
    m, h = row.get(key), row.get(f"{key}_ci95")
    if m is None or not math.isfinite(m):
        return "-"
    return f"{m:.{digits}g} ± {h:.2g}" if h is not None and math.isfinite(h) else f"{m:.{digits}g}"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(r)} |" for r in rows)]


def _label(key: str) -> str:
    """A task metric's column label: ``colour_saturation_gap`` -> ``saturation gap``."""
    return key.split("_", 1)[-1].replace("_", " ")


def _matched_md(title: str, matched: list[dict], paired: list[dict], judge: str, extra: tuple[str, ...]) -> list[str]:
    lines = [f"### {title}", ""]
    header = ["method", "arm", "reward level", "FD", "KID", "diversity", "recall", "precision", "judge"]
    lines += _table(
        [*header, *map(_label, extra), "seeds"],
        (
            [r["method"], r["arm"], f"{r['reward_level']:.3f}", _pm(r, "frechet"), _pm(r, "kid"), _pm(r, "diversity")]
            + [_pm(r, "recall", 2), _pm(r, "precision", 2), _pm(r, judge), *(_pm(r, k) for k in extra)]
            + [str(r["seeds"])]
            for r in matched
        ),
    )
    lines += ["", "Paired by seed, NormGuard minus the alternative at that level:", ""]
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for p in paired:
        groups[(p["method"], p["normguard"], p["vs"])][p["metric"]] = p
    rows = []
    for (method, ng, vs), by_metric in groups.items():
        cells = []
        for k in ("frechet", "kid", "diversity", "recall", judge, *extra):
            p = by_metric.get(k)
            cells.append(_pm({"d": p["diff_mean"], "d_ci95": p["diff_ci95"]}, "d") if p else "-")
        fd = by_metric.get("frechet", {})
        rows.append([method, ng, vs, *cells, f"{fd.get('seeds_favouring_normguard', '-')} / {fd.get('seeds', '-')}"])
    header = ["method", "NormGuard", "vs", "ΔFD", "ΔKID", "Δdiversity", "Δrecall", "Δjudge"]
    header += [f"Δ{_label(k)}" for k in extra]
    lines += _table([*header, "seeds favouring NormGuard (FD)"], rows)
    return lines + [""]


_RULE_TITLES = {
    "all": "the level every seed of every arm reaches",
    "majority": "the level every arm reaches in most of its seeds (rule majority)",
}


def _matched_sections(
    matched: list[dict],
    paired: list[dict],
    high: list[dict] | None,
    high_paired: list[dict] | None,
    judge: str,
    extra: tuple[str, ...],
    at: str,
    rule: str,
) -> list[str]:
    lines = _matched_md(f"At matched reward{at}: {_RULE_TITLES[rule]}", matched, paired, judge, extra)
    if high:
        excluded = ", ".join(HIGH_LEVEL_EXCLUDES)
        rule_note = "" if rule == "all" else f" (rule {rule})"
        title = f"At a higher matched reward{at}: every arm but {excluded}{rule_note}"
        lines += _matched_md(title, high, high_paired or [], judge, extra)
    return lines


def matched_markdown(
    matched: list[dict],
    paired: list[dict],
    high: list[dict] | None = None,
    high_paired: list[dict] | None = None,
    *,
    keys: tuple[str, ...] | None = None,
    steps: int | None = None,
    rule: str = "majority",
) -> str:
    """The matched-reward sections alone, under another rule than the first (``comparison.matched_level``)."""
    keys = keys or QUALITY
    at = f" ({steps} sampling steps)" if steps else ""
    lines = _matched_sections(matched, paired, high, high_paired, judge_key(keys), paired_keys(keys)[5:], at, rule)
    return "\n" + "\n".join(lines) + "\n"


def _span(r: dict, k: str) -> str:
    return f"{r[k]:.3f} [{r[k + '_min']:.3f}, {r[k + '_max']:.3f}]" if k in r else "-"


# the same keyword parameters as matched_markdown (``duplicates`` pairs the signatures): it passes them on
def markdown_tables(
    matched: list[dict],
    paired: list[dict],
    final: list[dict],
    *,
    high: list[dict] | None = None,
    high_paired: list[dict] | None = None,
    bound: list[dict] | None = None,
    keys: tuple[str, ...] | None = None,
    steps: int | None = None,
    rule: str = "all",
) -> str:
    """The matched-reward tables (and the higher level's), the after-training table and the bound table, in
    the task's judges (``keys``: ``comparison.quality_keys``; default the digits task's) at ``steps``."""
    keys = keys or QUALITY
    judge = judge_key(keys)
    extra = paired_keys(keys)[5:]
    at = f" ({steps} sampling steps)" if steps else ""
    lines = _matched_sections(matched, paired, high, high_paired, judge, extra, at, rule)
    lines += [f"### After the last step{at} (no matching)", ""]
    header = ["method", "arm", "reward", "FD", "KID", "diversity", "recall", "judge", *map(_label, extra)]
    lines += _table(
        [*header, "ratio min step", "ratio max step"],
        (
            [r["method"], r["arm"], _pm(r, "reward"), _pm(r, "frechet"), _pm(r, "kid"), _pm(r, "diversity")]
            + [_pm(r, "recall", 2), _pm(r, judge), *(_pm(r, k) for k in extra)]
            + [_pm(r, "ratio_min_step"), _pm(r, "ratio_max_step")]
            for r in final
        ),
    )
    if bound:
        lines += ["", "### How each arm holds the bound (per sampling step, after training)", ""]
        header = ["method", "arm", "largest step ratio: mean [min, max]", "worst-step deficit: mean [min, max]"]
        lines += _table(
            [*header, "mean deficit over steps", "seeds"],
            (
                [r["method"], r["arm"], _span(r, "max_step"), _span(r, "worst_deficit")]
                + [f"{r['mean_deficit']:.3f}" if "mean_deficit" in r else "-", str(r["seeds"])]
                for r in bound
            ),
        )
    return "\n".join(lines) + "\n"
