"""H3 as registered (docs/tasks/colour.md): is NormGuard's gain larger at few sampling steps than at many?

The registered test is the per-seed difference of two paired differences, each read at its own
matched reward level (``comparison.matched_level``):

    H3_s = [FD(constraint, s) - FD(none, s)] at 4 steps  -  [FD(constraint, s) - FD(none, s)] at 20 steps

with its 95 % t-interval over the seeds that are in both pairs. H3 says ``H3_s < 0``: the constraint's
FD advantage over no regulariser is larger (more negative) at 4 steps. Each step count has its own
matched level because the proxy itself is read at that step count. The table gives every NormGuard arm
(constraint, penalty) against ``none``, under each matched-reward rule, so the registered rule's
numbers stand beside the rule that one weak run cannot collapse:

    python -m services.sweeps.h3 runs/sweeps/colour_comparison --out docs/comparison_colour/h3.csv

Comparing the two step counts' tables by eye (as docs/results.md did before issue #36) ignores that
the two differences share their seeds; this pairs them.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from services.sweeps.comparison import MATCH_RULES, _arms, _matched_rows, _series, mean_ci
from services.sweeps.keys import ArmRuns, quality_keys
from services.sweeps.trials import load_runs as _load

__all__ = ["h3_rows"]


def _per_seed_diffs(
    by: ArmRuns, method: str, steps: int, keys: tuple[str, ...], rule: str, ng: str, other: str, metric: str
) -> dict:
    """seed -> ``metric(ng) - metric(other)`` at the method's matched level at ``steps`` under ``rule``."""
    _, per_arm = _matched_rows(_series(by, method, steps, keys), method, keys, rule)
    a, b = per_arm.get(ng, {}).get(metric, {}), per_arm.get(other, {}).get(metric, {})
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def h3_rows(
    sweep_dir: str | Path,
    *,
    few: int = 4,
    full: int = 20,
    metric: str = "frechet",
    rules: tuple[str, ...] = MATCH_RULES,
    arms: tuple[str, ...] = ("constraint", "penalty"),
    vs: str = "none",
) -> list[dict]:
    """One row per method, NormGuard arm and rule: the paired difference at ``few`` and ``full`` steps and
    their per-seed difference ``h3`` (mean, 95 % half-width, seeds, seeds with ``h3 < 0``)."""
    runs = _load(Path(sweep_dir))
    if not runs:
        raise FileNotFoundError(f"no finished trials under {Path(sweep_dir) / 'trials'}")
    by, keys = _arms(runs), quality_keys(runs)
    rows = []
    for method in sorted({m for m, _ in by}):
        for ng in arms:
            if (method, ng) not in by or (method, vs) not in by:
                continue
            for rule in rules:
                d_few = _per_seed_diffs(by, method, few, keys, rule, ng, vs, metric)
                d_full = _per_seed_diffs(by, method, full, keys, rule, ng, vs, metric)
                both = sorted(set(d_few) & set(d_full))
                h3 = [d_few[s] - d_full[s] for s in both]
                row: dict[str, object] = {"method": method, "normguard": ng, "vs": vs, "metric": metric, "rule": rule}
                for name, vals in ((f"diff_{few}", list(d_few.values())), (f"diff_{full}", list(d_full.values()))):
                    row[name], row[f"{name}_ci95"], row[f"{name}_seeds"] = mean_ci(vals)
                row["h3"], row["h3_ci95"], row["seeds"] = mean_ci(h3)
                row["seeds_h3_negative"] = sum(d < 0 for d in h3)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--few", type=int, default=4)
    ap.add_argument("--full", type=int, default=20)
    ap.add_argument("--metric", default="frechet")
    ap.add_argument("--out", help="write the rows to this CSV too")
    args = ap.parse_args(argv)
    rows = h3_rows(args.sweep_dir, few=args.few, full=args.full, metric=args.metric)
    for r in rows:
        print(
            f"{r['method']} {r['normguard']} - {r['vs']} [{r['rule']}]: {args.metric} "
            f"{r[f'diff_{args.few}']:+.3g} ± {r[f'diff_{args.few}_ci95']:.2g} at {args.few} steps, "
            f"{r[f'diff_{args.full}']:+.3g} ± {r[f'diff_{args.full}_ci95']:.2g} at {args.full}; "
            f"H3 {r['h3']:+.3g} ± {r['h3_ci95']:.2g} (n = {r['seeds']}, {r['seeds_h3_negative']} < 0)"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
            w.writeheader()
            w.writerows({k: f"{v:.5g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)


if __name__ == "__main__":
    main()
