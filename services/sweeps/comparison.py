"""``normguard compare SWEEP_DIR``: the comparison a reviewer asks for, from a sweep with arms and seeds.

Reads every trial's evaluation points along training (``metrics.jsonl``: before training, every
``train.eval_every`` steps, after) and writes, for each method:

* ``reward_vs_quality.png`` - the reward proxy on x; FD, KID, within-prompt diversity, recall and the
  independent judge on y; one curve per arm through its evaluation points (mean over seeds, band =
  min..max over seeds). Early stopping is the ``none`` arm's curve read at a lower reward, the
  inference-time renormalisation its ``eval_renorm`` points.
* ``matched.csv`` - every arm at one reward level per method (the highest level that every arm's
  every seed reaches): quality linearly interpolated between the two evaluation points around the
  level, mean and 95 % t-interval over seeds. Read there, the unregularised run (``none = early
  stop``) is early stopping at that reward; ``renorm`` is its renormalised evaluation at the level
  of the renormalised proxy.
* ``paired.csv`` - NormGuard (constraint and penalty) minus each alternative at the matched
  level, paired by seed (same seeds, same evaluation noise): mean difference, 95 % t-interval,
  and how many seeds favour NormGuard.
* ``matched_high.csv`` / ``paired_high.csv`` - the same at the higher level that every arm but the
  strong regularisers (``kl``) reaches: a strong KL caps the common level where the hack has barely
  started, and NormGuard against no regulariser matters most where it is under way.
* ``matched_majority.csv`` / ``paired_majority.csv`` (and ``*_high_majority.csv``) - the same under the
  matched-reward rule that one weak run cannot collapse (:func:`matched_level`, rule ``majority``); the
  files without a suffix keep the registered rule ``all``, so both sets of numbers stand side by side.
* ``tables.md`` - all of it as markdown tables.
* ``final.csv`` - every arm after its last step (no matching): reward, quality, and the minimum and
  maximum over sampling steps of the per-step norm ratio.
* ``bound.csv`` - how each arm holds the bound after training, per sampling step of the full-step
  sampler: the largest per-step ratio (mean, min and max over seeds), and the *deficit*
  ``min(ratio of the none arm, 1 + margin) - ratio``, paired by seed: how far the arm pushed a step
  below both the bound and where that step is without any regulariser (worst step, and the mean of
  its positive part over steps). A one-sided regulariser cannot raise a step the base method itself
  deflates, so the none arm's ratio, not the bound, is the floor it is measured against.
* ``ratio_per_step.png`` - the per-step norm ratio after training (full-step sampler), per arm,
  with the bound ``1 + margin``.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from services.sweeps.keys import GAP_STATS, LOWER_IS_BETTER, QUALITY, ArmRuns, judge_key, paired_keys, quality_keys
from services.sweeps.markdown import HIGH_LEVEL_EXCLUDES, markdown_tables, matched_markdown
from services.sweeps.plots import plot_frontiers, plot_ratios
from services.sweeps.trials import load_runs as _load

__all__ = ["MATCH_RULES", "compare_and_report", "compare_sweep", "interpolate_at", "matched_level", "mean_ci"]

MATCH_RULES = ("all", "majority")


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, int]:
    """Mean, half-width of the two-sided t-interval, and n (half-width NaN for n < 2)."""
    from scipy import stats

    vals = [v for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / n
    if n < 2:
        return mean, float("nan"), n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n), n


def interpolate_at(xs: list[float], ys: list[float], level: float) -> float | None:
    """``y`` where the polyline through ``(xs, ys)`` (in step order) first reaches ``x = level``."""
    for i in range(len(xs)):
        if xs[i] >= level:
            if i == 0:
                return ys[0]
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (level - x0) / (x1 - x0) if x1 != x0 else y1
    return None


def _curves(run: dict, steps: int, *, renorm: bool = False, keys: tuple[str, ...] = QUALITY) -> dict[str, list[float]]:
    """Metric -> values at the run's evaluation points (``eval_renorm`` ones with ``renorm``; the before
    point is the base model's, the same with and without renormalisation)."""
    prefix = "eval_renorm/" if renorm else "eval/"
    out: dict[str, list[float]] = defaultdict(list)
    names = ("reward", *keys)
    for i, p in enumerate(run["points"]):
        src = p if not renorm or i == 0 else {k.replace("eval_renorm/", "eval/"): v for k, v in p.items()}
        if renorm and i > 0 and not any(k.startswith(prefix) for k in p):
            continue
        for k in names:
            v = _reward_at(run, src, steps) if k == "reward" else src.get(f"eval/{k}_{steps}steps")
            if v is not None:
                out[k].append(float(v))
    return out


def _reward_at(run: dict, point: dict, steps: int) -> float | None:
    """The training reward at an evaluation point: its one proxy, or the weighted sum of several (as
    ``reward.scorers`` combines them), None unless every term was evaluated."""
    weights = run.get("reward_weights") or {run["reward"]: 1.0}
    values = [point.get(f"eval/{name}_{steps}steps") for name in weights]
    present = [v for v in values if v is not None]
    if len(present) != len(values):
        return None
    return sum(w * float(v) for w, v in zip(weights.values(), present))


def _arms(runs: list[dict]) -> ArmRuns:
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        by[(r["params"].get("loss.name", "?"), r["params"].get("arm", "?"))].append(r)
    return by


def _series(by: ArmRuns, method: str, steps: int, keys: tuple[str, ...] = QUALITY) -> dict[str, list]:
    """arm -> [(seed, curves)], with the derived early_stop (none arm) and renorm (none arm renormalised)."""
    out: dict[str, list] = {}
    for (m, arm), runs in sorted(by.items()):
        if m != method:
            continue
        out[arm] = [(r["params"].get("train.seed", 0), _curves(r, steps, keys=keys)) for r in runs]
        if arm == "none":
            renormed = [(r["params"].get("train.seed", 0), _curves(r, steps, renorm=True, keys=keys)) for r in runs]
            if all(len(c.get("reward", [])) > 1 for _, c in renormed):
                out["renorm"] = renormed
    return out


def matched_level(series: dict, rule: str = "all") -> float:
    """The reward level at which every arm is read, by ``rule``.

    * ``all`` (the registered rule of docs/tasks/colour.md and the digits sweep): the highest reward
      that every seed of every arm reaches, ``min over arms and seeds of max over points``. One run
      that never rises above the base model sends the level back to step 0 for every arm: at 20
      colour steps it did for DiffusionNFT, AWM and Flow-GRPO (issue #36).
    * ``majority``: the highest reward that every arm reaches in a strict majority of its seeds, ``min
      over arms of the (n // 2 + 1)-th largest per-seed best``. A seed whose run stays below the level
      is left out of that arm's cell (the ``seeds`` column shows it) and out of the pairs it is in, so
      no value is extrapolated. Chosen over a level per seed pair because it keeps one level per table:
      every arm of a method is still read at the same reward, which is what a matched table claims,
      while fewer than half of an arm's seeds cannot move the level. It still reads step 0 where most
      seeds of some arm never rise, and then it should: that arm did not raise the proxy.
    """
    if rule not in MATCH_RULES:
        raise ValueError(f"matched-reward rule must be one of {MATCH_RULES}, got {rule!r}")
    bests = [sorted((max(c["reward"]) for _, c in runs), reverse=True) for runs in series.values() if runs]
    if rule == "all":
        return min(b[-1] for b in bests)
    return min(b[len(b) // 2] for b in bests)


def compare_sweep(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    steps: int | None = None,
    rules: tuple[str, ...] = MATCH_RULES,
) -> dict:
    """Write the comparison's CSVs and plots (see the module docstring); returns the rows.

    ``rules``: the matched-reward rules to read (:func:`matched_level`); the first one's rows are the
    returned ``matched`` / ``paired`` / ``high`` / ``high_paired``, every rule's are under ``by_rule``.
    """
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir else sweep_dir / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    runs = _load(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no finished trials under {sweep_dir / 'trials'}")
    steps = int(steps or runs[0]["full_steps"])
    by, keys = _arms(runs), quality_keys(runs)
    methods = sorted({m for m, _ in by})
    final = [row for method in methods for row in _final_rows(by, method, steps, keys)]
    bound = [row for method in methods for row in _bound_rows(by, method)]
    by_rule = {rule: _matched_tables(by, methods, steps, keys, rule) for rule in rules}
    for rule, tables in by_rule.items():
        suffix = "" if rule == "all" else f"_{rule}"
        for name, rows in tables.items():
            _write_csv(out / f"{_FILES[name]}{suffix}.csv", rows)
    _write_csv(out / "final.csv", final)
    _write_csv(out / "bound.csv", bound)
    first = by_rule[rules[0]]
    (out / "tables.md").write_text(_tables_md(by_rule, rules, final, bound, keys, steps))
    plot_frontiers(by, methods, steps, out / "reward_vs_quality.png", keys, series=_series)
    plot_ratios(by, methods, out / "ratio_per_step.png")
    return {**first, "final": final, "bound": bound, "keys": keys, "out": out, "by_rule": by_rule}


def _tables_md(
    by_rule: dict, rules: tuple[str, ...], final: list[dict], bound: list[dict], keys: tuple[str, ...], steps: int
) -> str:
    """``tables.md``: the first rule's full tables, then the matched sections of every other rule."""
    first = by_rule[rules[0]]
    text = markdown_tables(
        first["matched"], first["paired"], final, high=first["high"], high_paired=first["high_paired"],
        bound=bound, keys=keys, steps=steps, rule=rules[0],
    )  # fmt: skip
    for rule in rules[1:]:
        t = by_rule[rule]
        text += matched_markdown(
            t["matched"], t["paired"], t["high"], t["high_paired"], keys=keys, steps=steps, rule=rule
        )
    return text


_FILES = {"matched": "matched", "paired": "paired", "high": "matched_high", "high_paired": "paired_high"}


def _matched_tables(
    by: ArmRuns, methods: list[str], steps: int, keys: tuple[str, ...], rule: str
) -> dict[str, list[dict]]:
    """The matched and paired rows of every method under ``rule``, at the common level and at the higher
    level without the strong regularisers (a strong KL caps the common level where the hack has barely
    started; NormGuard against the rest matters most where it is under way)."""
    out: dict[str, list[dict]] = {"matched": [], "paired": [], "high": [], "high_paired": []}
    for method in methods:
        series = _series(by, method, steps, keys)
        rows, per_arm = _matched_rows(series, method, keys, rule)
        out["matched"] += rows
        out["paired"] += _paired_rows(per_arm, method, keys)
        strong = {a: v for a, v in series.items() if a not in HIGH_LEVEL_EXCLUDES}
        if len(strong) < len(series):
            rows, per_arm = _matched_rows(strong, method, keys, rule)
            out["high"] += rows
            out["high_paired"] += _paired_rows(per_arm, method, keys)
    return out


def compare_and_report(sweep_dir: str | Path, out_dir: str | Path | None = None, *, steps: int | None = None) -> str:
    """``normguard compare``: :func:`compare_sweep`, and its matched table as text."""
    from services.report import format_table

    result = compare_sweep(sweep_dir, out_dir, steps=steps)
    cols = ["method", "arm", "reward_level", "frechet", "frechet_ci95", "kid", "diversity", "recall"]
    cols.append(judge_key(result["keys"]))
    return (
        format_table(result["matched"], cols)
        + f"\n\nwrote matched.csv, paired.csv, final.csv and plots to {result['out']}"
    )


def _bound_rows(by: ArmRuns, method: str) -> list[dict]:
    """Per arm: the largest per-step ratio and the deficit against ``min(none arm, bound)``, paired by seed."""
    none = {r["params"].get("train.seed", 0): r["ratio"] for r in by.get((method, "none"), []) if r["ratio"]}
    rows = []
    for (m, arm), rs in sorted(by.items()):
        if m != method or arm == "none":
            continue
        tops, worst, mean = [], [], []
        for r in rs:
            ref = none.get(r["params"].get("train.seed", 0))
            if not r["ratio"]:
                continue
            tops.append(max(r["ratio"]))
            if ref is not None and len(ref) == len(r["ratio"]):
                bound = 1.0 + r["margin"]
                gap = [min(n, bound) - x for n, x in zip(ref, r["ratio"])]
                worst.append(max(gap))
                mean.append(sum(max(g, 0.0) for g in gap) / len(gap))
        if not tops:
            continue
        row: dict[str, Any] = {"method": method, "arm": arm, "seeds": len(tops)}
        for key, vals in (("max_step", tops), ("worst_deficit", worst), ("mean_deficit", mean)):
            if vals:
                row[key], row[f"{key}_min"], row[f"{key}_max"] = sum(vals) / len(vals), min(vals), max(vals)
        rows.append(row)
    return rows


def _matched_rows(
    series: dict, method: str, keys: tuple[str, ...] = QUALITY, rule: str = "all"
) -> tuple[list[dict], dict]:
    """Every arm's quality at the method's matched reward level: rows (mean, CI) and the per-seed values."""
    level = matched_level(series, rule)
    rows, per_arm = [], {}
    for arm, seeds in series.items():
        per_arm[arm] = {k: {} for k in keys}
        for seed, c in seeds:
            for k in keys:
                y = interpolate_at(c["reward"], c[k], level) if c.get(k) else None
                if y is not None:
                    per_arm[arm][k][seed] = y
        # read at the matched level, the unregularised run IS early stopping at that reward
        label = "none = early stop" if arm == "none" else arm
        row: dict[str, Any] = {"method": method, "arm": label, "reward_level": round(level, 4)}
        for k in keys:
            m, h, n = mean_ci(list(per_arm[arm][k].values()))
            row[k], row[f"{k}_ci95"] = m, h
            row["seeds"] = max(n, row.get("seeds", 0))  # seeds read at the level (a metric may be missing)
        rows.append(row)
    return rows, per_arm


def _paired_rows(per_arm: dict, method: str, keys: tuple[str, ...] = QUALITY) -> list[dict]:
    """NormGuard (constraint, penalty) minus each other arm, per seed, at the matched level."""
    rows = []
    for ng in ("constraint", "penalty"):
        for other in per_arm if ng in per_arm else ():
            if other == ng or (ng == "penalty" and other == "constraint"):  # that pair is listed once
                continue
            for k in paired_keys(keys):
                common = sorted(set(per_arm[ng][k]) & set(per_arm[other][k]))
                diffs = [per_arm[ng][k][s] - per_arm[other][k][s] for s in common]
                m, h, n = mean_ci(diffs)
                better = sum(_better(k, d, per_arm[other][k].get(s)) for d, s in zip(diffs, common))
                rows.append(
                    {
                        "method": method,
                        "normguard": ng,
                        "vs": other,
                        "metric": k,
                        "diff_mean": m,
                        "diff_ci95": h,
                        "seeds": n,
                        "seeds_favouring_normguard": better,
                    }
                )
    return rows


def _better(key: str, diff: float, other: float | None) -> bool:
    """Whether NormGuard's value is the better one: lower FD / KID, a signed colour-statistic gap closer to
    0 (``|other + diff| < |other|``), higher for the rest."""
    if key.endswith("_gap") or key in GAP_STATS:
        return other is not None and abs(other + diff) < abs(other)
    return diff < 0 if key in LOWER_IS_BETTER else diff > 0


def _final_rows(by: ArmRuns, method: str, steps: int, keys: tuple[str, ...] = QUALITY) -> list[dict]:
    """Every arm after its last step: reward, quality, and the extremes of the per-step norm ratio."""
    rows = []
    for (m, arm), rs in sorted(by.items()):
        if m != method:
            continue
        row: dict[str, Any] = {"method": method, "arm": arm}
        last = [_curves(r, steps, keys=keys) for r in rs]
        for k in ("reward", *keys):
            mm, h, n = mean_ci([c[k][-1] for c in last if c.get(k)])
            row[k], row[f"{k}_ci95"] = mm, h
            row["seeds"] = max(n, row.get("seeds", 0))  # a metric the task lacks reads n = 0
        lo = mean_ci([min(r["ratio"]) for r in rs if r["ratio"]])
        hi = mean_ci([max(r["ratio"]) for r in rs if r["ratio"]])
        row["ratio_min_step"], row["ratio_min_step_ci95"] = lo[0], lo[1]
        row["ratio_max_step"], row["ratio_max_step_ci95"] = hi[0], hi[1]
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in r.items()})
