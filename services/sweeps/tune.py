"""Ablation sweeps on Ray Tune: each trial is one training run (Ray Train inside a function
trainable, the Train V2 pattern), reported step by step, optionally early-stopped by ASHA on
the explicit ``step`` attribute; the sweep is resumable; the end product is one table (CSV and
printed) and plots (norm ratio per sampling step, reward vs quality frontier).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.report import eval_key, format_table, split_eval_key
from services.sweeps.config import SweepConfig

if TYPE_CHECKING:
    from ray import tune

__all__ = ["run_sweep", "results_table"]

log = logging.getLogger(__name__)


def _trial_name(params: dict[str, Any]) -> str:
    import re

    parts = [f"{k.split('.')[-1]}-{v}" for k, v in sorted(params.items())]
    return re.sub(r"[^A-Za-z0-9._-]", "", "_".join(parts))[:120]


def _search_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    space = {}
    for a in sweep.axes:
        if a.grid is not None:
            space[a.key] = tune.grid_search(a.grid)
        elif a.choice is not None:
            space[a.key] = tune.choice(a.choice)
        elif a.uniform is not None:
            space[a.key] = tune.uniform(*a.uniform)
        else:
            assert a.loguniform is not None, "Axis._one_kind: an axis has exactly one of its kinds"
            space[a.key] = tune.loguniform(*a.loguniform)
    return space


def _trainable(params: dict[str, Any], sweep_json: str) -> None:
    """One trial: a full training run whose steps are reported to Tune."""
    from ray import tune

    from services.sweeps.config import SweepConfig
    from services.training.run import run_training

    sweep = SweepConfig.model_validate_json(sweep_json)
    # grid trials get the searched keys; arm grids and early-stopping controls one whole dict under "trial"
    params = dict(params["trial"]) if "trial" in params else dict(params)
    cfg = sweep.trial_config(params, _trial_name(params))

    def report(step: int, metrics: dict[str, float]) -> None:
        tune.report({"step": step, **{k: v for k, v in metrics.items() if isinstance(v, float)}})

    summary = run_training(cfg, local=sweep.local_trials, progress=False, on_step=report)
    final = {"step": cfg.train.steps, **summary.after, "done": 1.0}
    (cfg.run_dir / "trial.json").write_text(
        json.dumps(
            {
                "params": params,
                "after": summary.after,
                "before": summary.before,
                "ratio_per_step": summary.ratio_per_step,
                "guards": summary.guards,
            }
        )
    )
    tune.report(final)


def run_sweep(sweep: SweepConfig) -> list[dict]:
    """Run (or resume) the sweep; returns the table rows and writes results.csv and plots."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from services.cluster.connect import ensure_ray

    ensure_ray()
    # Tune runs each trial in its own working directory: pin the outputs to an absolute path first
    sweep = sweep.model_copy(update={"output_dir": str(Path(sweep.output_dir).resolve())})
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, sweep_json=sweep.model_dump_json()), {"cpu": sweep.trial_cpus}
    )
    storage = str(sweep.sweep_dir / "tune")
    scheduler = None
    if sweep.asha:
        scheduler = ASHAScheduler(
            time_attr="step", metric=sweep.metric, mode=sweep.mode, grace_period=sweep.asha_grace_steps
        )
    if tune.Tuner.can_restore(str(Path(storage) / sweep.name)):
        log.info("resuming sweep %s", sweep.name)
        tuner = tune.Tuner.restore(str(Path(storage) / sweep.name), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_search_space(sweep)
            if not sweep.arms
            else {"trial": tune.grid_search(sweep.grid_trials() or [])},
            tune_config=tune.TuneConfig(
                num_samples=sweep.num_samples, max_concurrent_trials=sweep.max_concurrent_trials, scheduler=scheduler
            ),
            run_config=tune.RunConfig(name=sweep.name, storage_path=storage, verbose=0),
        )
    _fit(tuner)
    if sweep.early_stop_control:
        _run_controls(sweep, trainable, storage)
    del ray
    return write_results(sweep)


def _fit(tuner: tune.Tuner) -> None:
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error]
    if errors:
        log.warning("%d trial(s) errored; the first: %s", len(errors), errors[0])


def control_params(sweep: SweepConfig, num_se: float = 2.0) -> list[dict[str, Any]]:
    """The early-stopping controls: each NormGuard trial's config with NormGuard off, stopped once its
    training reward reaches the NormGuard trial's final reward, so the two are compared at matched
    reward. "Reaches" is within ``num_se`` standard errors of that final reward (the mean over the
    last ``train.stop_window`` steps): near a saturated proxy an exact match would only ever happen
    at the last step, by noise."""
    out = []
    for path in _trial_files(sweep):
        p = json.loads(path.read_text())["params"]
        if "train.stop_at_reward" in p or float(p.get("normguard.weight", 0.0)) <= 0.0:
            continue
        level = _reward_level(path.parent, num_se)
        if level is not None:
            out.append({**p, "normguard.weight": 0.0, "train.stop_at_reward": round(level, 5)})
    return out


def _reward_level(run_dir: Path, num_se: float) -> float | None:
    """Final windowed training reward minus ``num_se`` standard errors (None without training rows)."""
    from services.report import MetricsWriter
    from services.training.run import window_mean

    cfg = json.loads((run_dir / "config.json").read_text())
    window = cfg["train"]["stop_window"]
    train = [r for r in MetricsWriter.read_file(run_dir) if "reward/mean" in r]
    if not train:
        return None
    n = cfg["rollout"]["prompts_per_step"] * cfg["rollout"]["group_size"] * len(train[-window:])
    mean = window_mean([r["reward/mean"] for r in train], window)
    std = window_mean([r.get("reward/std", 0.0) for r in train], window)
    return mean - num_se * std / math.sqrt(n)


def _run_controls(sweep: SweepConfig, trainable: type[tune.Trainable] | Callable, storage: str) -> None:
    from ray import tune

    controls = control_params(sweep)
    if not controls:
        log.warning("early_stop_control: no finished NormGuard trial to match")
        return
    name = f"{sweep.name}-early_stop"
    path = str(Path(storage) / name)
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(controls)},
            tune_config=tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent_trials),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0),
        )
    _fit(tuner)


def _trial_files(sweep: SweepConfig) -> list[Path]:
    return sorted((sweep.sweep_dir / "trials").glob("*/trial.json"))


def _trials(sweep: SweepConfig) -> list[dict]:
    return [json.loads(p.read_text()) for p in _trial_files(sweep)]


def _row(trial: dict) -> dict:
    p, a, b = trial["params"], trial["after"], trial["before"]
    row: dict[str, Any] = {k.split(".")[-1] if k != "loss.name" else "method": v for k, v in p.items()}
    row.setdefault("stop_at_reward", None)
    row["steps_done"] = a.get("train/steps_done")
    row["train_reward"] = a.get("train/final_reward")
    for key in sorted(a):
        if key.startswith(("eval/", "eval_renorm/")):
            name = key.replace("eval/", "").replace("eval_renorm/", "renorm:")
            row[name] = a[key]
    for key in sorted(b):
        if key.startswith("eval/norm_ratio") or "frechet" in key:
            continue
        row["before:" + key.replace("eval/", "")] = b[key]
    return row


def results_table(sweep: SweepConfig) -> list[dict]:
    return [_row(t) for t in _trials(sweep)]


def write_results(sweep: SweepConfig) -> list[dict]:
    """results.csv, a printed table, and the sweep's plots."""
    rows = results_table(sweep)
    if not rows:
        print("no finished trials")
        return rows
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with (sweep.sweep_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    short = [c for c in cols if not c.startswith(("before:", "renorm:")) and "realism_" not in c]
    print(format_table(rows, short))
    _plots(sweep)
    print(f"\nwrote {sweep.sweep_dir / 'results.csv'} and plots in {sweep.sweep_dir}")
    return rows


def _plots(sweep: SweepConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.report import plot_ratio_per_step

    trials = _trials(sweep)
    curves = {"reference": next(iter(t["ratio_per_step"].get("reference", []) for t in trials), [])}
    for t in trials:
        name = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(t["params"].items()))
        curves[name] = t["ratio_per_step"]["policy"]
    if not curves["reference"]:
        curves.pop("reference")
    plot_ratio_per_step(
        curves, sweep.sweep_dir / "norm_ratio_per_step.png", title="||v|| / ||v_ref|| per sampling step"
    )
    # rows: few / full sampling steps; columns: the reward proxy vs FD and vs the independent judge
    keys = [split_eval_key(k) for t in trials for k in t["after"]]
    steps = sorted({sk[1] for sk in keys if sk and sk[0] == "eval/norm_ratio"})
    fig, axes = plt.subplots(len(steps), 2, figsize=(10, 3.6 * len(steps)), squeeze=False)
    for row, n in zip(axes, steps):
        for ax, qk in zip(row, ("frechet", "judge")):
            for t in trials:
                a = t["after"]
                rk = next((k for k in a if k.startswith("eval/") and ("classifier" in k or "pickscore" in k)), None)
                parts = split_eval_key(rk) if rk else None
                rk = eval_key(parts[0].removeprefix("eval/"), n) if parts else None
                qkey = next((k for k in a if k.startswith("eval/") and qk in k and k.endswith(f"_{n}steps")), None)
                if rk in a and qkey:
                    label = ", ".join(f"{v}" for _, v in sorted(t["params"].items()))
                    ax.scatter(a[rk], a[qkey])
                    ax.annotate(label, (a[rk], a[qkey]), fontsize=6)
                    ax.set_xlabel(rk)
                    ax.set_ylabel(qkey)
    fig.suptitle("reward vs quality")
    fig.tight_layout()
    fig.savefig(sweep.sweep_dir / "reward_vs_quality.png", dpi=100)
    plt.close(fig)
