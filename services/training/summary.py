"""The main job's printed summary: a short table that fits 100 columns, and one sentence saying what it shows.

``normguard train`` ends with this; the full table (every evaluation metric, before / after / after the
inference-time renormalisation) stays in each run's ``summary.json``. The columns are the task's reward
proxy, its judges (the independent classifier, FD in the judge's features at the full and the few-step
sampler), the velocity-norm ratio and, where the task has them, its colour statistics' gaps to the real
data; each row is one run before or after training (``+renorm``: the after weights sampled with the
velocity rescaled to the reference's norm, the paper's inference-time baseline).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Column", "summary_columns", "short_summary", "what_it_shows"]

WIDTH = 100
_SHORT = {  # the colour statistics' gaps to the data's means
    "colour_brightness": "d_bright",
    "colour_saturation": "d_satur",
    "colour_contrast": "d_contr",
    "colour_texture": "d_texture",
}


@dataclass(frozen=True)
class Column:
    """One printed column: ``label`` (at most 9 characters) over the metric ``key`` (without ``eval/``)."""

    label: str
    key: str
    digits: int = 3


def summary_columns(
    *, reward: str, judge: str | None, full: int, few: int, extra: tuple[str, ...] = ()
) -> list[Column]:
    """The columns of a task: proxy and judge at ``full`` steps, FD at ``full`` and ``few``, the norm ratio
    at ``full``, then ``extra`` metric names at ``full`` (e.g. a colour statistic's gap to the data)."""
    cols = [Column("proxy", f"{reward}_{full}steps")]
    if judge:
        cols.append(Column("judge", f"{judge}_{full}steps"))
    cols += [
        Column(f"FD@{full}", f"frechet_{full}steps", 4),
        Column(f"FD@{few}", f"frechet_{few}steps", 4),
        Column("|v|/|vref|", f"norm_ratio_{full}steps", 4),
    ]
    cols += [Column(_SHORT.get(name, name.split("_", 1)[-1][:9]), f"{name}_{full}steps") for name in extra]
    return cols


def _cell(v: float | None, digits: int) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.{digits}g}"


def _rows(summaries: Mapping[str, object], cols: list[Column]) -> list[list[str]]:
    rows = []
    for name, s in summaries.items():
        after = {k.removeprefix("eval/"): v for k, v in s.after.items() if k.startswith("eval/")}
        renorm = {k.removeprefix("eval_renorm/"): v for k, v in s.after.items() if k.startswith("eval_renorm/")}
        before = {k.removeprefix("eval/"): v for k, v in s.before.items() if k.startswith("eval/")}
        for when, m in (("before", before), ("after", after), ("+renorm", renorm)):
            if m:
                rows.append([name, when, *(_cell(m.get(c.key), c.digits) for c in cols)])
    return rows


def short_summary(summaries: Mapping[str, object], cols: list[Column], *, width: int = WIDTH) -> str:
    """The table of ``summaries`` (run name -> an object with ``before`` / ``after`` metric dicts); columns
    from the right are left out (and named under the table) until it fits ``width``; the run name is cut to
    fit too."""
    rows = _rows(summaries, cols)
    shown = list(cols)
    while True:
        header = ["run", "when", *(c.label for c in shown)]
        body = [r[: 2 + len(shown)] for r in rows]
        widths = [max(len(x) for x in col) for col in zip(header, *body)]
        name_w = min(widths[0], 28)
        total = name_w + sum(w + 2 for w in widths[1:])
        if total <= width or len(shown) <= 3:
            break
        shown.pop()
    widths[0] = name_w

    def line(cells: list[str]) -> str:
        first = cells[0] if len(cells[0]) <= name_w else cells[0][: name_w - 1] + "~"
        return "  ".join([first.ljust(name_w), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    out = [line(header), *(line(r) for r in body)]
    if len(shown) < len(cols):
        note = "(left out to fit: " + ", ".join(c.label for c in cols[len(shown) :]) + "; see summary.json)"
        out += textwrap.wrap(note, width)
    return "\n".join(out)


def what_it_shows(
    summaries: Mapping[str, object], *, guarded: str, baseline: str | None, reward: str, full: int
) -> str:
    """One sentence, from the figures, comparing the NormGuard run ``guarded`` with ``baseline`` (or, alone,
    with its own before) in proxy, FD at ``full`` steps and the norm ratio."""
    g = summaries[guarded]
    key = lambda name: f"eval/{name}_{full}steps"  # noqa: E731
    p0, fd0 = g.before.get(key(reward)), g.before.get(key("frechet"))
    pg, fdg, rg = g.after.get(key(reward)), g.after.get(key("frechet")), g.after.get(key("norm_ratio"))
    if None in (p0, fd0, pg, fdg, rg):
        return "What it shows: the evaluation metrics needed for a comparison are missing (see summary.json)."
    if baseline is None:
        return (
            f"What it shows: the proxy went {p0:.3f} -> {pg:.3f}, FD {fd0:.1f} -> {fdg:.1f}"
            f" (lower is better) and |v|/|v_ref| ended at {rg:.3f}."
        )
    b = summaries[baseline].after
    pb, fdb, rb = b.get(key(reward)), b.get(key("frechet")), b.get(key("norm_ratio"))
    if None in (pb, fdb, rb):
        return "What it shows: the baseline's evaluation metrics are missing (see summary.json)."
    verdict = "NormGuard kept quality better" if fdg < fdb else "NormGuard did not keep quality better"
    return (
        f"What it shows: proxy {p0:.3f} -> {pg:.3f} with NormGuard, {pb:.3f} without; |v|/|v_ref| {rg:.3f} vs"
        f" {rb:.3f}; FD@{full} {fdg:.1f} vs {fdb:.1f} (base {fd0:.1f}, lower is better): {verdict} here"
        f" (one seed: an anecdote; docs/results.md has the seeded comparison)."
    )
