"""Paired after-training differences of a comparison sweep's arms, by seed, with 95 % t-intervals.

``normguard compare`` matches arms at a reward level that every seed of every arm reaches. When training
does not raise the evaluation proxy above the base model's (the colour task at its session-sized scale),
that level is the base model itself and the matched tables compare identical models. This module reads
each trial's ``summary.json`` after the last step instead and pairs the arms by seed:

    python -m services.sweeps.final_paired runs/sweeps/colour_comparison --steps 20

It prints one markdown table per method: the arm means, then ``a - b`` for constraint / penalty / kl
against none and constraint against kl (mean +- the 95 % t-interval half-width over the paired seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from services.sweeps.comparison import mean_ci
from services.sweeps.trials import whole_seeds

__all__ = ["load_trials", "paired_table"]

PAIRS = (("constraint", "none"), ("penalty", "none"), ("kl", "none"), ("constraint", "kl"))
METRICS = (
    "colour_pref",
    "colour_clip",
    "frechet",
    "colour_judge",
    "colour_realism",
    "colour_saturation",
    "colour_brightness",
)


def load_trials(sweep_dir: str | Path) -> dict[tuple[str, str, int], dict[str, float]]:
    """``(method, arm, seed) -> the 'after' metrics`` of every finished trial of a whole seed (its params from
    ``trial.json``, as ``services.sweeps.comparison`` reads them; ``comparison.whole_seeds``)."""
    out = {}
    for f in sorted(Path(sweep_dir).glob("trials/*/summary.json")):
        params = json.loads((f.parent / "trial.json").read_text())["params"]
        key = (params["loss.name"], params["arm"], int(params["train.seed"]))
        out[key] = json.loads(f.read_text())["after"]
    keep = whole_seeds(list(out))
    return {k: v for k, v in out.items() if k[2] in keep}


def _interval(xs: list[float]) -> str:
    mean, half, _ = mean_ci(xs)
    return f"{mean:+.4g} ± {half:.3g}"


def paired_table(trials: dict[tuple[str, str, int], dict[str, float]], method: str, steps: int) -> str:
    """The markdown table of one method at ``steps`` sampling steps (arm means, then the paired differences)."""
    ran = [after for (m, _, _), after in trials.items() if m == method]
    metrics = [m for m in (*METRICS, "norm_ratio") if all(f"eval/{m}_{steps}steps" in a for a in ran)]
    keys = ["train/final_reward"] + [f"eval/{m}_{steps}steps" for m in metrics]  # those every trial evaluated
    heads = ["final_reward", *metrics]
    lines = ["| | " + " | ".join(heads) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm in ("none", "penalty", "constraint", "kl", "grpo_guard"):
        seeds = sorted(s for m, a, s in trials if (m, a) == (method, arm))
        if seeds:
            means = [statistics.mean(trials[(method, arm, s)][k] for s in seeds) for k in keys]
            lines.append(f"| {arm} (n={len(seeds)}) | " + " | ".join(f"{v:.4g}" for v in means) + " |")
    for a, b in PAIRS:
        seeds = sorted(s for m, x, s in trials if (m, x) == (method, a) and (method, b, s) in trials)
        if len(seeds) >= 2:
            diffs = [_interval([trials[(method, a, s)][k] - trials[(method, b, s)][k] for s in seeds]) for k in keys]
            lines.append(f"| {a} − {b} (n={len(seeds)}) | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("sweep_dir")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    trials = load_trials(args.sweep_dir)
    for method in sorted({m for m, _, _ in trials}):
        print(f"\n{method}, {args.steps} sampling steps, after the last step\n")
        print(paired_table(trials, method, args.steps))


if __name__ == "__main__":
    main()
