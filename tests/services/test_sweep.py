"""A tiny 4-trial Ray Tune sweep in a local cluster produces the table and plots."""

import csv
import json
import math

import pytest
from conftest import TINY_PRETRAIN_STEPS

from services.sweeps.config import Axis, SweepConfig, load_sweep
from services.sweeps.tune import run_sweep

pytestmark = [pytest.mark.service, pytest.mark.slow]


def test_shipped_sweeps_validate():
    from pathlib import Path

    for p in (Path(__file__).parents[2] / "deploy" / "sweeps").glob("*.yaml"):
        assert load_sweep(p).axes


def test_prompt_files_are_resolved_where_the_sweep_is_loaded(tmp_path, monkeypatch):
    """A trial runs in Tune's trial directory: relative prompt files are made absolute at load time."""
    from pathlib import Path

    root = Path(__file__).parents[2]
    monkeypatch.chdir(root)
    sweep = load_sweep(root / "deploy" / "sweeps" / "colour_comparison.yaml")
    path = Path(sweep.base["data.train_prompts"])
    assert path.is_absolute() and path.is_file()
    monkeypatch.chdir(tmp_path)  # the trial's directory: the config still finds its prompts
    cfg = sweep.trial_config(sweep.grid_trials()[0], "t")
    assert Path(cfg.data.train_prompts) == path


def test_bad_axis_is_rejected():
    with pytest.raises(ValueError, match="exactly one"):
        Axis(key="normguard.weight", grid=[0.0], choice=[1.0])


def test_sweep_with_an_early_stopping_control(ray_local, digits_assets, tmp_path):
    sweep = SweepConfig(
        name="tiny",
        output_dir=str(tmp_path),
        base={
            "model.pretrain_steps": TINY_PRETRAIN_STEPS,
            "train.steps": 3,
            "train.stop_window": 1,
            "train.eval_every": 0,
            "rollout.prompts_per_step": 2,
            "rollout.group_size": 4,
            "rollout.num_samplers": 1,
            "rollout.num_steps": 3,
            "eval.num_prompts": 2,
            "eval.samples_per_prompt": 2,
            "eval.few_steps": 2,
            "eval.full_steps": 4,
            "learner.micro_batch": 16,
            "logging.backends": ["tensorboard", "wandb", "mlflow"],
        },
        # a product of two axes in 2 trials and their control (the 2 x 2 grid cost CI 6 trials, ~250 s)
        axes=(Axis(key="loss.name", grid=["awm"]), Axis(key="normguard.weight", grid=[0.0, 1.0])),
        early_stop_control=True,
    )
    rows = run_sweep(sweep)
    grid = [r for r in rows if r["stop_at_reward"] is None]
    assert len(grid) == 2
    assert {(r["method"], r["weight"]) for r in grid} == {("awm", 0.0), ("awm", 1.0)}
    for r in rows:
        assert "norm_ratio_4steps" in r and "digits_judge_2steps" in r and "renorm:digits_judge_4steps" in r
    # one early-stopping control per NormGuard trial: NormGuard off, stopped at that trial's reward
    controls = {r["method"]: r for r in rows if r["stop_at_reward"] is not None}
    assert set(controls) == {"awm"}
    for method, c in controls.items():
        ng = next(r for r in grid if r["method"] == method and r["weight"] == 1.0)
        # matched within two standard errors of the NormGuard trial's final reward (window 1, 8 samples)
        ng_dir = sweep.sweep_dir / "trials" / f"name-{method}_weight-1.0"
        last = [json.loads(line) for line in (ng_dir / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in last if "reward/mean" in r][-1]
        level = last["reward/mean"] - 2 * last["reward/std"] / math.sqrt(8)
        assert ng["train_reward"] == pytest.approx(last["reward/mean"])
        assert c["weight"] == 0.0 and c["stop_at_reward"] == pytest.approx(level, abs=1e-5)
        assert c["steps_done"] == 3 or c["train_reward"] >= c["stop_at_reward"]
    with (sweep.sweep_dir / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3
    assert (sweep.sweep_dir / "norm_ratio_per_step.png").is_file()
    assert (sweep.sweep_dir / "reward_vs_quality.png").is_file()
    # every trial (controls included) logs to the trackers like a training run, grouped by the sweep
    from mlflow.tracking import MlflowClient

    trials = sweep.sweep_dir / "trials"
    client = MlflowClient(f"sqlite:///{trials / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("normguard").experiment_id])
    assert len(runs) == 3 and all(client.get_metric_history(r.info.run_id, "reward/mean") for r in runs)
    assert {r.info.run_name for r in runs} == {p.name for p in trials.iterdir() if (p / "trial.json").is_file()}
    assert len(list(trials.glob("*/wandb/offline-run-*/run-*.wandb"))) == 3
