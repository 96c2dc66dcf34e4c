"""The finished trials of a comparison sweep, as ``normguard compare`` and its companions read them.

``runs/sweeps/<name>/trials/<trial>/`` holds ``trial.json`` (params, the ratio curve), ``metrics.jsonl``
(evaluation points) and ``config.json``; a trial without ``trial.json`` has not finished.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["load_runs", "whole_seeds"]

log = logging.getLogger(__name__)


def whole_seeds(cells: list[tuple[str, str, int]]) -> set[int]:
    """The seeds at which every (method, arm) cell of ``cells`` has finished.

    A sweep stopped by the clock leaves its last seed part-run (``deploy/sweeps/colour_pref.yaml`` runs
    seed-major); docs/tasks/colour.md registers that a seed enters the tables only when all its trials
    have finished, so a part-run seed cannot tilt one arm's mean.
    """
    arms = {(m, a) for m, a, _ in cells}
    seeds = {s for _, _, s in cells}
    have = set(cells)
    return {s for s in seeds if all((m, a, s) in have for m, a in arms)}


def load_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per finished trial of a whole seed (:func:`whole_seeds`): params, evaluation points
    (step order), ratio curve, config."""
    runs = _load_all(sweep_dir)
    keep = whole_seeds([_cell(r["params"]) for r in runs])
    dropped = sorted({_cell(r["params"])[2] for r in runs} - keep)
    if dropped:
        log.warning("seeds %s are part-run (not every arm finished): left out of the comparison", dropped)
    return [r for r in runs if _cell(r["params"])[2] in keep]


def _cell(params: dict[str, Any]) -> tuple[str, str, int]:
    return params.get("loss.name", "?"), params.get("arm", "?"), int(params.get("train.seed", 0))


def _load_all(sweep_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for trial in sorted((sweep_dir / "trials").glob("*/trial.json")):
        data = json.loads(trial.read_text())
        rows = [json.loads(line) for line in (trial.parent / "metrics.jsonl").read_text().splitlines() if line]
        points: dict[int, dict[str, float]] = defaultdict(dict)
        for r in rows:
            if any(k.startswith("eval/") for k in r):
                points[r["step"]].update(r)
        cfg = json.loads((trial.parent / "config.json").read_text())
        runs.append(
            {
                "params": data["params"],
                "points": [points[s] for s in sorted(points)],
                "ratio": data["ratio_per_step"].get("policy", []),
                "margin": cfg["normguard"]["margin"],
                "reward": cfg["reward"]["scorers"][0]["name"],
                "reward_weights": {sc["name"]: float(sc.get("weight", 1.0)) for sc in cfg["reward"]["scorers"]},
                "full_steps": cfg["eval"]["full_steps"],
                "eval_scorers": [sc["name"] for sc in cfg["reward"].get("eval_scorers", [])],
            }
        )
    return runs
