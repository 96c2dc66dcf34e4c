"""The reporting side of a run: metrics.jsonl and the trackers, the progress bar, the guards, the
evaluations before, along and after training, and the run's ``summary.json``.

:class:`RunRecord` writes what the controller (``services.training.controller``) hands it and answers what
it asks (the reward target reached, the guards' actions); it decides nothing about the run's course and
never touches the workers: evaluations go through the build's
:class:`~services.training.evaluator.RunEvaluator`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.report import MetricsWriter, grid_tensor, plot_ratio_per_step, plot_training, save_image_grid
from services.training.guards import GuardMonitor

if TYPE_CHECKING:
    from services.config import ExperimentConfig, TrainConfig

__all__ = ["RunRecord", "RunSummary", "finished_summary", "reached", "window_mean"]

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """Before / after evaluation of one run."""

    run_dir: Path
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    ratio_per_step: dict[str, list[float]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    guards: list[dict] = field(default_factory=list)  # the guards that fired (services.training.guards)


class RunRecord:
    """One attempt's record: opened after its build (``metrics.jsonl`` cut back to the checkpoint's step),
    closed when the attempt ends."""

    def __init__(self, cfg: ExperimentConfig, extra: dict, *, step: int, progress: bool, on_step) -> None:
        from tqdm import tqdm

        self.cfg, self.on_step = cfg, on_step
        self.writer = _open_writer(cfg)
        self.summary = RunSummary(run_dir=cfg.run_dir, before=extra.get("before", {}))
        self.writer.truncate_after(step if self.summary.before else -1)  # no checkpoint yet: it reruns
        self.rewards = [r["reward/mean"] for r in self.writer.read() if "reward/mean" in r]
        self.bar = tqdm(total=cfg.train.steps, initial=step, disable=not progress, desc=cfg.train.run_name)
        self.guards: GuardMonitor | None = None  # watches rises over the before-training metrics: built after them

    def reached(self) -> bool:
        """The windowed training reward reached ``train.stop_at_reward``."""
        return reached(self.rewards, self.cfg.train)

    def evaluate_before(self, evaluate, step: int) -> None:
        """Before training (a resumed run has it in its checkpoint); then the guards, which read it."""
        cfg = self.cfg
        if not self.summary.before:
            self.summary.before, ratios, images = evaluate()
            self.summary.ratio_per_step["reference"] = [1.0] * len(ratios[cfg.eval.full_steps])
            _save_grids(cfg.run_dir, images, "before", cfg, self.writer, step)
            self.writer.write(step, self.summary.before)
        self.guards = GuardMonitor(cfg.train.guards, before=self.summary.before)

    def log_step(self, report) -> None:
        """One RL step's metrics: the file and trackers, ``on_step``, the progress bar."""
        m = report.metrics
        self.rewards.append(m["reward/mean"])
        self.writer.write(report.step, m)
        if self.on_step is not None:  # e.g. Ray Tune's report (ASHA may stop the trial here)
            self.on_step(report.step, m)
        self.bar.set_postfix(
            reward=f"{m['reward/mean']:.3f}",
            ratio=f"{m.get('normguard/ratio_mean', float('nan')):.3f}",
            loss=f"{m.get('loss/total', float('nan')):.4f}",
        )
        self.bar.update(1)

    def evaluate_along(self, evaluate, step: int) -> dict[str, float]:
        """An evaluation during training (with the renormalised baseline when ``eval.renorm_along``)."""
        cfg = self.cfg
        metrics, _, images = evaluate()
        if cfg.eval.renorm_along:  # the inference-time baseline at every evaluation point
            renorm, _, _ = evaluate(renormalize=True)
            metrics.update(_renorm_keys(renorm))
        self.writer.write(step, metrics)
        _log_grids(self.writer, images, "eval", cfg, step)
        return metrics

    def checkpoint_extra(self) -> dict:
        """What a checkpoint keeps beside the coordinator's state."""
        return {"before": self.summary.before}

    def evaluate_after(self, evaluate, step: int) -> None:
        """The after-training evaluation, and the paper's inference-time baseline on the same weights
        (v rescaled to ||v_ref||)."""
        cfg = self.cfg
        after, ratios, images = evaluate()
        renorm, _, _ = evaluate(renormalize=True)
        after["train/steps_done"] = float(step)
        # the rewards up to the step the weights are from (after a rollback, not those of the steps undone)
        after["train/final_reward"] = window_mean(self.rewards[:step], cfg.train.stop_window)
        after.update(_renorm_keys(renorm))
        self.summary.after = after
        self.writer.write(step, after)
        self.summary.ratio_per_step["policy"] = ratios[cfg.eval.full_steps]
        _save_grids(cfg.run_dir, images, "after", cfg, self.writer, step)
        self.writer.trackers.log_summary(after)

    def close(self) -> None:
        self.writer.close()

    def summarize(self) -> RunSummary:
        """History, plots and ``summary.json``."""
        summary, cfg = self.summary, self.cfg
        summary.history = self.writer.read()
        plot_training([r for r in summary.history if "reward/mean" in r], cfg.run_dir / "training.png")
        plot_ratio_per_step(
            {"policy": summary.ratio_per_step["policy"]},
            cfg.run_dir / "norm_ratio_per_step.png",
            title=f"{cfg.train.run_name} ({cfg.eval.full_steps} steps)",
        )
        summary.guards = self.guards.record()
        _write_summary(summary, stopped_by_guard=self.guards.action in ("stop", "rollback"))
        return summary


def _write_summary(summary: RunSummary, *, stopped_by_guard: bool) -> None:
    (summary.run_dir / "summary.json").write_text(
        json.dumps(
            {
                "before": summary.before,
                "after": summary.after,
                "ratio_per_step": summary.ratio_per_step,
                "guards": summary.guards,
                "stopped_by_guard": stopped_by_guard,
            },
            indent=2,
        )
    )


def _renorm_keys(metrics: dict[str, float]) -> dict[str, float]:
    """``eval/...`` -> ``eval_renorm/...`` (the norm ratio is 1 by construction and dropped)."""
    return {k.replace("eval/", "eval_renorm/"): v for k, v in metrics.items() if "norm_ratio" not in k}


def finished_summary(cfg: ExperimentConfig, ckpt: Path | None) -> RunSummary | None:
    """The stored summary when the run directory holds this config's finished run (its newest intact
    checkpoint ``ckpt`` is the final one), else ``None``."""
    path = cfg.run_dir / "summary.json"
    if not path.is_file() or ckpt is None:
        return None
    data = json.loads(path.read_text())
    step = json.loads((ckpt / "coordinator.json").read_text())["step"]
    if data.get("after", {}).get("train/steps_done") != step:
        return None
    history = MetricsWriter.read_file(cfg.run_dir)
    if data.get("stopped_by_guard"):
        pass  # a guard ended it: finished where it stopped (or rolled back to)
    elif step < cfg.train.steps and not reached([r["reward/mean"] for r in history if "reward/mean" in r], cfg.train):
        return None  # e.g. train.steps was raised: resume and train on
    log.info("%s already finished at step %d: %s", cfg.train.run_name, step, cfg.run_dir)
    return RunSummary(
        run_dir=cfg.run_dir,
        before=data["before"],
        after=data["after"],
        ratio_per_step=data["ratio_per_step"],
        history=history,
        guards=data.get("guards", []),
    )


def _open_writer(cfg: ExperimentConfig) -> MetricsWriter:
    """config.json, metrics.jsonl and the configured trackers (``logging.backends``)."""
    from services.training.trackers import build_trackers

    run_dir = cfg.run_dir
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    trackers = build_trackers(
        cfg.logging,
        run_dir=run_dir,
        output_dir=run_dir.parent,
        run_name=cfg.train.run_name,
        config=cfg.model_dump(mode="json"),
    )
    return MetricsWriter(run_dir, trackers)


def window_mean(rewards: list[float], window: int) -> float:
    """Mean of the last ``window`` values (NaN for none)."""
    tail = rewards[-window:]
    return sum(tail) / len(tail) if tail else float("nan")


def reached(rewards: list[float], train: TrainConfig) -> bool:
    """The early-stopping control's test: the windowed training reward reached ``stop_at_reward``."""
    if train.stop_at_reward is None or len(rewards) < train.stop_window:
        return False
    return window_mean(rewards, train.stop_window) >= train.stop_at_reward


def _save_grids(
    run_dir: Path, images: dict[int, torch.Tensor], tag: str, cfg: ExperimentConfig, writer, step: int
) -> None:
    per = cfg.eval.samples_per_prompt
    for n, imgs in images.items():
        save_image_grid(imgs, run_dir / "grids" / f"{tag}_{n}steps.png", nrow=per)
    _log_grids(writer, images, tag, cfg, step)


def _log_grids(writer, images: dict[int, torch.Tensor], tag: str, cfg: ExperimentConfig, step: int) -> None:
    """The evaluation grids to the trackers as ``grids/<tag>_<N>steps``."""
    if writer.trackers is None or not cfg.logging.log_images:
        return
    grids = {f"grids/{tag}_{n}steps": grid_tensor(imgs, nrow=cfg.eval.samples_per_prompt) for n, imgs in images.items()}
    writer.trackers.log_images(step, grids)
