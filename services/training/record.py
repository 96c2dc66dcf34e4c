"""The reporting side of a run: metrics.jsonl and the trackers, the progress bar, the evaluations before,
along and after training, and the run's ``summary.json``.

:class:`RunRecord` is a :class:`~services.training.callbacks.RunCallback` of the controller
(``services.training.controller``): it writes what the controller tells it (each step's report, each
evaluation it ran, the end of training as a change of state) and decides nothing about the run's course;
it never touches the workers and never checks a guard (``services.training.failure.GuardPolicy``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.report import MetricsWriter, grid_tensor, plot_ratio_per_step, plot_training, save_image_grid
from services.training.cadence import reached, window_mean
from services.training.callbacks import Evaluation, RunCallback, renorm_keys
from services.training.state import Evaluating, RunState

if TYPE_CHECKING:
    from services.config import ExperimentConfig
    from services.training.resume import ResumeState

__all__ = ["RunRecord", "RunSummary", "finished_summary", "reached", "window_mean"]

log = logging.getLogger(__name__)
_TRAINING_OVER = (RunState.ROLLING_BACK, RunState.STOPPING)  # and the evaluation after training


@dataclass
class RunSummary:
    """Before / after evaluation of one run."""

    run_dir: Path
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    ratio_per_step: dict[str, list[float]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    guards: list[dict] = field(default_factory=list)  # the guards that fired (services.training.guards)


class RunRecord(RunCallback):
    """One attempt's record: opened after its build (``metrics.jsonl`` cut back to the checkpoint's step),
    closed when the attempt ends. ``rewards``: the training rewards so far (the early-stopping control's)."""

    def __init__(self, cfg: ExperimentConfig, resume: ResumeState, *, progress: bool, on_step) -> None:
        from tqdm import tqdm

        self.cfg, self.on_step, step = cfg, on_step, resume.step
        self.writer = _open_writer(cfg)
        self.summary = RunSummary(run_dir=cfg.run_dir, before=dict(resume.before))
        self.writer.truncate_after(step if self.summary.before else -1)  # no checkpoint yet: it reruns
        self.rewards = [r["reward/mean"] for r in self.writer.read() if "reward/mean" in r]
        self.bar = tqdm(total=cfg.train.steps, initial=step, disable=not progress, desc=cfg.train.run_name)

    def after_state_update(self, previous, current) -> None:
        """Training is over (the evaluation after it, a rollback, a stop): the progress bar closes."""
        if current.kind in _TRAINING_OVER or (isinstance(current, Evaluating) and current.when == "after"):
            self.bar.close()

    def after_report(self, report) -> None:
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

    def after_evaluation(self, evaluation: Evaluation) -> None:
        {"before": self._before, "along": self._along, "after": self._after}[evaluation.when](evaluation)

    def _before(self, ev: Evaluation) -> None:
        """Before training (a resumed run has it in its checkpoint and is not evaluated again)."""
        cfg = self.cfg
        self.summary.before = ev.metrics
        self.summary.ratio_per_step["reference"] = [1.0] * len(ev.ratios[cfg.eval.full_steps])
        _save_grids(cfg.run_dir, ev.images, "before", cfg, self.writer, ev.step)
        self.writer.write(ev.step, self.summary.before)

    def _along(self, ev: Evaluation) -> None:
        """An evaluation during training (with the renormalised baseline when ``eval.renorm_along``)."""
        self.writer.write(ev.step, ev.with_renorm)
        _log_grids(self.writer, ev.images, "eval", self.cfg, ev.step)

    def _after(self, ev: Evaluation) -> None:
        """The after-training evaluation, and the paper's inference-time baseline on the same weights."""
        cfg, step = self.cfg, ev.step
        after = dict(ev.metrics)
        after["train/steps_done"] = float(step)
        # the rewards up to the step the weights are from (after a rollback, not those of the steps undone)
        after["train/final_reward"] = window_mean(self.rewards[:step], cfg.train.stop_window)
        after.update(renorm_keys(ev.renorm))
        self.summary.after = after
        self.writer.write(step, after)
        self.summary.ratio_per_step["policy"] = ev.ratios[cfg.eval.full_steps]
        _save_grids(cfg.run_dir, ev.images, "after", cfg, self.writer, step)
        self.writer.trackers.log_summary(after)

    def close(self) -> None:
        self.writer.close()

    def summarize(self, *, guards: list[dict], stopped_by_guard: bool) -> RunSummary:
        """History, plots and ``summary.json`` (``guards``: what fired; ``stopped_by_guard``: training ended
        by one)."""
        summary, cfg = self.summary, self.cfg
        summary.history = self.writer.read()
        plot_training([r for r in summary.history if "reward/mean" in r], cfg.run_dir / "training.png")
        plot_ratio_per_step(
            {"policy": summary.ratio_per_step["policy"]},
            cfg.run_dir / "norm_ratio_per_step.png",
            title=f"{cfg.train.run_name} ({cfg.eval.full_steps} steps)",
        )
        summary.guards = guards
        _write_summary(summary, stopped_by_guard=stopped_by_guard)
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


def finished_summary(cfg: ExperimentConfig, resume: ResumeState) -> RunSummary | None:
    """The stored summary when the run directory holds this config's finished run (the checkpoint it
    resumes from, the newest intact one, is the final one), else ``None``."""
    path = cfg.run_dir / "summary.json"
    if not path.is_file() or resume.checkpoint is None:
        return None
    data = json.loads(path.read_text())
    step = resume.step
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
