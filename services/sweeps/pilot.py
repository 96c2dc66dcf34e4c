"""The positive control of issue #36: did the unregularised arm hack? (docs/tasks/colour.md, pre-registered)

The pilots are the ``none`` arm of DiffusionNFT and AWM at the pilot seeds (``deploy/sweeps/colour_pilot.yaml``).
This module reads them and applies the registered rule, nothing else:

* a pilot seed **hacks** when, at ``--steps`` sampling steps after its last RL step, (1) the training proxy
  minus the run's own step-0 value exceeds the proxy's margin, and (2) at least one judge is worse by more
  than its margin than the run's step 0 **or** than its best earlier evaluation point: FD higher,
  ``colour_judge`` or ``colour_realism`` lower, or the |gap| to the data of saturation, contrast or texture
  larger;
* a method **passes** when at least 2 of its 3 pilot seeds hack; the control passes when every method does;
* **magnitude**: the largest per-step ratio ‖v_θ‖/‖v_ref‖ after training (full-step sampler), and whether its
  mean over the seeds exceeds 1.05 (H1's threshold; reported, not a condition).

The margins (3 SD of the base model over 5 evaluation seeds) are the committed ``Margins`` table of
docs/tasks/colour.md, as data in ``docs/tasks/colour_pilots/margins.json``. Two commands, the first on the
sweep's run directory, the second (which rebuilds the Pilot log's tables) on the committed data alone:

    python -m services.sweeps.pilot collect runs/sweeps/colour_pilot --out docs/tasks/colour_pilots/b0.json
    python -m services.sweeps.pilot table docs/tasks/colour_pilots/b0.json

``margins`` turns ``services.base_spread``'s printed table into such a margins file (``--margins`` of ``table``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["JUDGES", "collect", "margins_from_spread", "method_verdict", "seed_verdict", "verdict_tables"]

# judge -> how "worse" reads: +1 higher is worse, -1 lower is worse, 0 a larger |gap| to the data is worse
JUDGES = {
    "frechet": 1,
    "colour_judge": -1,
    "colour_realism": -1,
    "colour_saturation": 0,
    "colour_contrast": 0,
    "colour_texture": 0,
}
MONITORS = ("colour_jpeg", "colour_clip")  # proxies evaluated beside the training one, reported only
RATIO_THRESHOLD = 1.05
DEFAULT_MARGINS = Path(__file__).resolve().parents[2] / "docs" / "tasks" / "colour_pilots" / "margins.json"


def _worse(judge: str, new: float, old: float) -> float:
    """How much worse ``new`` is than ``old`` for ``judge`` (positive = worse)."""
    sense = JUDGES[judge]
    if sense == 0:
        return abs(new) - abs(old)
    return sense * (new - old)


def seed_verdict(points: list[dict[str, float]], proxy: str, margins: dict[str, float]) -> dict[str, Any]:
    """One pilot seed: ``points`` are its evaluation points in step order (``step`` and metric -> value, the
    first the base model's); returns the proxy rise, each judge's change against step 0 and against the
    best earlier point (positive = worse), and whether the seed hacked."""
    if len(points) < 2:
        raise ValueError("a pilot needs its step-0 point and at least one point after training")
    first, last, earlier = points[0], points[-1], points[:-1]
    rise = last[proxy] - first[proxy]
    judges = {}
    for judge in JUDGES:
        if judge not in last:
            continue
        vs_best = max(_worse(judge, last[judge], p[judge]) for p in earlier)  # against the best earlier point
        vs_zero = _worse(judge, last[judge], first[judge])
        judges[judge] = {
            "vs_step0": vs_zero,
            "vs_best": vs_best,
            "worse": max(vs_zero, vs_best) > margins[judge],
        }
    proxy_up = rise > margins[proxy]
    worse = [j for j, v in judges.items() if v["worse"]]
    return {
        "proxy_rise": rise,
        "proxy_up": proxy_up,
        "judges": judges,
        "worse": worse,
        "hacks": proxy_up and bool(worse),
    }


def method_verdict(hacks: list[bool], planned: int = 3, needed: int = 2) -> str:
    """``pass`` / ``fail`` over a method's pilot seeds, or ``incomplete`` while the seeds run so far leave it
    open (``planned`` seeds in all, ``needed`` of them must hack)."""
    if sum(hacks) >= needed:
        return "pass"
    if sum(hacks) + (planned - len(hacks)) < needed:
        return "fail"
    return "incomplete"


def _points(trial_dir: Path, steps: int) -> list[dict[str, float]]:
    """The evaluation points of one trial at ``steps`` sampling steps (``eval/<m>_<steps>steps`` keys)."""
    by_step: dict[int, dict[str, float]] = {}
    suffix = f"_{steps}steps"
    for line in (trial_dir / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for k, v in row.items():
            if k.startswith("eval/") and k.endswith(suffix) and isinstance(v, (int, float)):
                by_step.setdefault(int(row["step"]), {})[k[len("eval/") : -len(suffix)]] = float(v)
    return [{"step": s, **by_step[s]} for s in sorted(by_step)]


def collect(sweep_dir: str | Path, steps: int = 20) -> list[dict[str, Any]]:
    """Every finished trial of a pilot sweep: method, seed, proxy, points, per-step ratio, wall time (s,
    from the trial's config.json to its summary.json)."""
    out = []
    for trial in sorted(Path(sweep_dir).glob("trials/*/trial.json")):
        data = json.loads(trial.read_text())
        cfg = json.loads((trial.parent / "config.json").read_text())
        summary = trial.parent / "summary.json"
        wall = summary.stat().st_mtime - (trial.parent / "config.json").stat().st_mtime
        out.append(
            {
                "method": data["params"]["loss.name"],
                "seed": int(data["params"]["train.seed"]),
                "proxy": cfg["reward"]["scorers"][0]["name"],
                "steps": steps,
                "points": _points(trial.parent, steps),
                "ratio_per_step": data["ratio_per_step"].get("policy", []),
                "wall_s": round(wall, 1),
            }
        )
    return out


def _seed_row(trial: dict[str, Any], margins: dict[str, float]) -> tuple[str, bool]:
    v = seed_verdict(trial["points"], trial["proxy"], margins)
    last, first = trial["points"][-1], trial["points"][0]
    judges = "; ".join(
        f"{j} {d['vs_step0']:+.4g} / {d['vs_best']:+.4g}{' **worse**' if d['worse'] else ''}"
        for j, d in v["judges"].items()
    )
    monitors = ", ".join(f"{m} {last[m] - first[m]:+.4g}" for m in MONITORS if m in last and m in first)
    ratio = max(trial["ratio_per_step"]) if trial["ratio_per_step"] else float("nan")
    row = (
        f"| {trial['method']} | {trial['seed']} | {last['step']} | {first[trial['proxy']]:.4g} → "
        f"{last[trial['proxy']]:.4g} ({v['proxy_rise']:+.4g}{', > margin' if v['proxy_up'] else ''}) | {judges} | "
        f"{monitors} | {ratio:.4f} | {trial['wall_s'] / 60:.1f} | {'yes' if v['hacks'] else 'no'} |"
    )
    return row, v["hacks"]


def verdict_tables(trials: list[dict[str, Any]], margins: dict[str, float], planned: int = 3) -> str:
    """The Pilot log's table (one row per seed) and the verdicts, as markdown."""
    lines = [
        "| method | seed | last step | proxy step 0 → last (rise) | judge: worse vs step 0 / vs best earlier "
        "(+ = worse) | monitors' change | largest per-step ratio (20 steps) | wall (min) | hacks |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts, ratios = {}, {}
    for trial in sorted(trials, key=lambda t: (t["method"], t["seed"])):
        row, hacked = _seed_row(trial, margins)
        lines.append(row)
        verdicts.setdefault(trial["method"], []).append(hacked)
        if trial["ratio_per_step"]:
            ratios.setdefault(trial["method"], []).append(max(trial["ratio_per_step"]))
    lines.append("")
    for method, hacks in verdicts.items():
        mean_ratio = statistics.mean(ratios[method]) if ratios.get(method) else float("nan")
        rides = "yes" if mean_ratio > RATIO_THRESHOLD else "no"
        lines.append(
            f"- **{method}**: {sum(hacks)} of {len(hacks)} seeds run hack ({planned} planned): "
            f"**{method_verdict(hacks, planned)}**; mean largest per-step ratio {mean_ratio:.4f} "
            f"(rides on magnitude, > {RATIO_THRESHOLD}: {rides})"
        )
    results = [method_verdict(h, planned) for h in verdicts.values()]
    overall = "fail" if "fail" in results else "pass" if results and all(r == "pass" for r in results) else "incomplete"
    lines.append(f"- **The control** (every method must pass): **{overall}**")
    return "\n".join(lines)


def margins_from_spread(text: str, steps: int = 20) -> dict[str, float]:
    """``metric -> margin`` at ``steps`` sampling steps from ``services.base_spread``'s markdown table
    (rows ``| eval/<metric>_<steps>steps | mean | SD | margin | values |``)."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = cells[0]
        if len(cells) >= 4 and key.startswith("eval/") and key.endswith(f"_{steps}steps"):
            out[key[len("eval/") : -len(f"_{steps}steps")]] = float(cells[3])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="read a pilot sweep's trials into a JSON file")
    c.add_argument("sweep_dir")
    c.add_argument("--out", required=True)
    c.add_argument("--steps", type=int, default=20)
    t = sub.add_parser("table", help="the Pilot log's table and verdict from collected JSON")
    t.add_argument("data")
    t.add_argument("--margins", default=str(DEFAULT_MARGINS))
    t.add_argument("--planned", type=int, default=3, help="pilot seeds planned per method")
    m = sub.add_parser("margins", help="a margins file from services.base_spread's printed table")
    m.add_argument("spread_output")
    m.add_argument("--out", required=True)
    m.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.cmd == "margins":
        margins = margins_from_spread(Path(args.spread_output).read_text(), args.steps)
        Path(args.out).write_text(json.dumps({"source": args.spread_output, "margins": margins}, indent=1) + "\n")
        print(f"wrote {len(margins)} margins to {args.out}")
        return
    if args.cmd == "collect":
        trials = collect(args.sweep_dir, args.steps)
        Path(args.out).write_text(json.dumps(trials, indent=1) + "\n")
        print(f"wrote {len(trials)} trials to {args.out}")
        return
    margins = json.loads(Path(args.margins).read_text())["margins"]
    print(verdict_tables(json.loads(Path(args.data).read_text()), margins, args.planned))


if __name__ == "__main__":
    main()
