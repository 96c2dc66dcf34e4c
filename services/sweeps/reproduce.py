"""Do two runs of a comparison sweep reach the same verdicts? Their ``paired.csv`` files side by side.

Runs of one sweep on two machines agree in their verdicts, not to the digit: the float kernels round
differently on another CPU (docs/results.md sections 2b and 3). For each paired difference in both
files (method, NormGuard arm, alternative, metric), the verdict is "for" or "against" NormGuard's arm
when the 95 % interval excludes 0, and "level" when it contains 0:

    python -m services.sweeps.reproduce docs/comparison/paired.csv \\
        docs/comparison/rerun_2026-12-03/steps20/paired.csv --metrics frechet,recall,digits_judge

It prints, per metric, the cells whose verdict changed and how many of the shared cells kept it.
Two intervals that both contain 0 "keep" the verdict "level", yet they say nothing decisive in either
run; with ``--strict`` it also prints the stricter count (issue #36): agreement only where both
intervals exclude 0 with the same sign, out of the cells where at least one of the two excludes 0.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

__all__ = ["verdict", "load_paired", "agreement", "decisive_agreement"]

Key = tuple[str, str, str, str]


def verdict(mean: float, half_width: float) -> int:
    """+1 when the interval lies above 0, -1 below, 0 when it contains 0 (the sign of ``a - b``)."""
    return 1 if mean > half_width else -1 if mean < -half_width else 0


def load_paired(path: str | Path) -> dict[Key, tuple[float, float]]:
    """``(method, normguard, vs, metric) -> (diff_mean, diff_ci95)`` of a ``normguard compare`` paired.csv."""
    with open(path, newline="") as f:
        return {
            (r["method"], r["normguard"], r["vs"], r["metric"]): (float(r["diff_mean"]), float(r["diff_ci95"]))
            for r in csv.DictReader(f)
        }


def agreement(old: dict[Key, tuple[float, float]], new: dict[Key, tuple[float, float]], metric: str):
    """The shared cells of one metric and those whose verdict changed: ``(n_shared, [(key, old, new)])``."""
    shared = sorted(k for k in old.keys() & new.keys() if k[3] == metric)
    changed = [(k, old[k], new[k]) for k in shared if verdict(*old[k]) != verdict(*new[k])]
    return len(shared), changed


def decisive_agreement(old: dict[Key, tuple[float, float]], new: dict[Key, tuple[float, float]], metric: str):
    """Agreement counted only where an interval excludes 0: ``(n_agree, n_decisive, n_both_level)``.

    ``n_decisive`` is the number of shared cells of ``metric`` where at least one of the two intervals
    excludes 0; ``n_agree`` those of them where both exclude 0 with the same sign; ``n_both_level``
    the shared cells where both contain 0 (agreement in :func:`agreement`, not here).
    """
    shared = [k for k in old.keys() & new.keys() if k[3] == metric]
    pairs = [(verdict(*old[k]), verdict(*new[k])) for k in shared]
    decisive = [(a, b) for a, b in pairs if a != 0 or b != 0]
    return sum(a == b for a, b in decisive), len(decisive), len(pairs) - len(decisive)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--metrics", default="frechet", help="comma-separated metric names of paired.csv")
    ap.add_argument("--strict", action="store_true", help="also count agreement only where an interval excludes 0")
    args = ap.parse_args(argv)
    old, new = load_paired(args.old), load_paired(args.new)
    for metric in args.metrics.split(","):
        n, changed = agreement(old, new, metric)
        print(f"{metric}: the same verdict in {n - len(changed)} / {n}")
        for (method, ng, vs, _), (om, oc), (nm, nc) in changed:
            print(f"  {method} {ng} - {vs}: {om:+.3g} ± {oc:.2g} -> {nm:+.3g} ± {nc:.2g}")
        if args.strict:
            agree, decisive, level = decisive_agreement(old, new, metric)
            print(f"  where an interval excludes 0: the same sign, both excluding 0, in {agree} / {decisive}")
            print(f"  ({level} / {n} cells have both intervals containing 0)")


if __name__ == "__main__":
    main()
