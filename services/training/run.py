"""A training run end to end: ``run_training(cfg)``.

It builds the coordinator (``services.training.build``: actors, learner, resume from
``<run_dir>/checkpoints/latest``), evaluates before training, hands the loop to
:meth:`Coordinator.run` with this module's reporting hooks (metrics.jsonl and the trackers, the
progress bar, the guards, evaluations along the way), rolls back if a guard says so, evaluates
after training (with the inference-time renormalisation baseline), and writes plots, image grids
and ``summary.json``. Failures go through :class:`~services.training.failure.FailurePolicy`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.checkpoints import latest_intact
from services.cluster.connect import ensure_ray
from services.report import (
    MetricsWriter,
    format_table,
    grid_tensor,
    plot_ratio_per_step,
    plot_training,
    save_image_grid,
)
from services.training.build import build_coordinator
from services.training.coordinator import Coordinator
from services.training.guards import GuardMonitor

__all__ = ["RunSummary", "build_coordinator", "run_training", "train_and_report"]

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


def evaluate(coord: Coordinator, cfg, eval_names: list[str], *, renormalize: bool = False) -> tuple[dict, dict, dict]:
    """``services.evaluation.evaluate`` on sampler 0 and scorer 0 (fixed noise); the set-level metrics in
    the digit judge's features for the embedded default. Returns ``(metrics, ratio per step, images)``."""
    from services.evaluation import EvalPlan, Evaluator
    from services.evaluation import evaluate as run_eval
    from services.training.remote import call

    ev, eval_set = cfg.eval, coord.eval_prompt_set  # data.eval_prompts, or the training prompts in file order
    k = min(ev.num_prompts, len(eval_set))
    plan = EvalPlan(
        prompts=eval_set.prompts[:k],
        samples_per_prompt=ev.samples_per_prompt,
        steps=(ev.few_steps, ev.full_steps),
        scorers=(*coord.train_scorers, *eval_names),
        guidance_scale=ev.guidance_scale,
        shift=cfg.rollout.shift,
        metadata=eval_set.metadata[:k] if eval_set.metadata else None,
    )
    sampler, scorer, timeout = coord.samplers[0], coord.scorers[0], cfg.train.rollout_timeout_s

    def sample(prompts, n, guidance, shift, seed, renorm):
        kw = dict(num_steps=n, guidance_scale=guidance, shift=shift, seed=seed, renormalize=renorm)
        return call(sampler, "eval_samples", prompts, timeout_s=timeout, **kw)

    def score(images, prompts, groups, meta):
        kw = dict(group_ids=groups, metadata=meta)
        return call(scorer, "score", images, prompts, timeout_s=cfg.reward.timeout_s, **kw)

    features, real = None, None
    if cfg.model.kind == "digits" and "digits_judge" in eval_names:
        from services.prepare import real_test_images

        real = real_test_images(cfg.model.resolution)

        def features(images):
            return call(scorer, "features", "digits_judge", images, timeout_s=timeout)

    res = run_eval(plan, Evaluator(sample, score, features, real), renormalize=renormalize)
    return res.metrics, res.ratio_per_step, res.images


def run_training(cfg, *, local: bool = False, progress: bool = True, on_step=None, on_finish=None) -> RunSummary:
    """Train one configuration end to end; resumable by rerunning with the same run name. ``on_finish(coord)``
    runs once training and the after-training evaluation are done, before the actors are released (e.g.
    ``benchmarks/gpu_check.py`` reads every actor's peak memory there); an error in it fails the run.

    Failures go through :class:`~services.training.failure.FailurePolicy`: a lost learner worker
    (:class:`~services.training.learner_group.LearnerLost`) or a lost node is survived up to
    ``train.max_failures`` times by rebuilding everything from the newest intact checkpoint, exactly as
    a rerun would resume, and redoing the steps since (``metrics.jsonl`` keeps each step once; the restart
    is counted as ``faults/learner_restarts``); after a lost node the restart first waits, up to
    ``train.node_wait_s``, for the alive nodes to hold the run again, and otherwise stops with
    :class:`~services.training.nodes.NodeLost` naming the node. Any other error ends the run."""
    from services.training.failure import FailureDecision, FailurePolicy
    from services.training.nodes import NodeLost, NodeWatch, wait_for_placement

    if not local:
        ensure_ray()  # joined before the first attempt, so its nodes are known when one is lost
    policy, restarts, nodes = FailurePolicy(cfg.train.max_failures), 0, NodeWatch(enabled=not local)
    while True:
        nodes.attempt_started()
        try:
            return _train_once(
                cfg, local=local, progress=progress, on_step=on_step, on_finish=on_finish, restarts=restarts
            )
        except Exception as err:
            try:
                lost = nodes.newly_lost()
            except Exception as probe_err:  # the GCS itself unreachable (head restarting): keep the run's error
                log.warning("could not check the cluster's nodes after %s: %s", type(err).__name__, probe_err)
                lost = []
            where = f" (lost node(s): {', '.join(map(str, lost))})" if lost else ""
            if policy.decide(err, restarts, nodes_lost=len(lost)) is FailureDecision.RAISE:
                if lost:
                    spent = f"train.max_failures={policy.max_failures} restarts spent"
                    raise NodeLost(f"{type(err).__name__}: {err}{where}; {spent}") from err
                raise
            restarts += 1
            log.warning(
                "%s%s; restart %d of train.max_failures=%d from the newest intact checkpoint",
                err,
                where,
                restarts,
                cfg.train.max_failures,
            )
            if not local and cfg.resources.check_cluster == "error":  # a fixed cluster must hold the run again;
                wait_for_placement(cfg, nodes, timeout_s=cfg.train.node_wait_s)  # autoscaled: pending actors ask


def _train_once(cfg, *, local: bool, progress: bool, on_step, on_finish, restarts: int) -> RunSummary:
    # verified once (checksums read every byte of the checkpoint), then used by both checks below
    ckpt = latest_intact(cfg.run_dir, on_corrupt=cfg.train.on_corrupt_checkpoint)
    if (finished := _finished(cfg, ckpt)) is not None:  # a rerun of a finished run: nothing re-evaluated
        return finished
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    coord, extra, eval_specs = build_coordinator(cfg, local=local, checkpoint=ckpt)
    coord.count_learner_restarts(restarts)
    run = _Run(cfg, coord, list(eval_specs), extra, progress=progress, on_step=on_step)
    try:
        run.evaluate_before()
        coord.run(run, cfg.run_dir)
        run.bar.close()
        run.coord = coord = _rollback(coord, cfg, run.guards, local=local)
        run.evaluate_after()
        coord.finish()
        if on_finish is not None:
            on_finish(coord)
    except BaseException:
        coord.fail()
        raise
    finally:
        coord.shutdown()
        run.writer.close()
    return run.summarize()


class _Run:
    """The reporting side of a run, :meth:`Coordinator.run`'s hooks: metrics.jsonl and the trackers,
    the progress bar, the guards, the evaluations before, along and after training."""

    def __init__(self, cfg, coord: Coordinator, eval_names: list[str], extra: dict, *, progress: bool, on_step):
        from tqdm import tqdm

        self.cfg, self.coord, self.eval_names, self.on_step = cfg, coord, eval_names, on_step
        self.writer = _open_writer(cfg)
        self.summary = RunSummary(run_dir=cfg.run_dir, before=extra.get("before", {}))
        self.writer.truncate_after(coord.step_idx if self.summary.before else -1)  # no checkpoint yet: it reruns
        self.rewards = [r["reward/mean"] for r in self.writer.read() if "reward/mean" in r]
        self.bar = tqdm(total=cfg.train.steps, initial=coord.step_idx, disable=not progress, desc=cfg.train.run_name)
        self.guards: GuardMonitor | None = None  # watches rises over the before-training metrics: built after them

    def evaluate_before(self) -> None:
        """Before training (a resumed run has it in its checkpoint); then the guards, which read it."""
        coord, cfg = self.coord, self.cfg
        if not self.summary.before:
            with coord.evaluating():
                self.summary.before, ratios, images = evaluate(coord, cfg, self.eval_names)
            self.summary.ratio_per_step["reference"] = [1.0] * len(ratios[cfg.eval.full_steps])
            _save_grids(cfg.run_dir, images, "before", cfg, self.writer, coord.step_idx)
            self.writer.write(coord.step_idx, self.summary.before)
        self.guards = GuardMonitor(cfg.train.guards, before=self.summary.before)

    # ---- Coordinator.run's hooks ----------------------------------------------------------------
    def stopped(self) -> bool:
        return _reached(self.rewards, self.cfg.train)

    def after_step(self, report) -> bool:
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
        halt = self.guards.check(report.step, m) in ("stop", "rollback")
        return _reached(self.rewards, self.cfg.train) or halt

    def evaluate_along(self) -> bool:
        """An evaluation during training (with the renormalised baseline when ``eval.renorm_along``)."""
        coord, cfg = self.coord, self.cfg
        metrics, _, images = evaluate(coord, cfg, self.eval_names)
        if cfg.eval.renorm_along:  # the inference-time baseline at every evaluation point
            renorm, _, _ = evaluate(coord, cfg, self.eval_names, renormalize=True)
            metrics.update(_renorm_keys(renorm))
        self.writer.write(coord.step_idx, metrics)
        _log_grids(self.writer, images, "eval", cfg, coord.step_idx)
        return self.guards.check(coord.step_idx, metrics, evaluation=True) in ("stop", "rollback")

    def checkpoint_extra(self) -> dict:
        return {"before": self.summary.before}

    # ---- after training -----------------------------------------------------------------------
    def evaluate_after(self) -> None:
        """The after-training evaluation, and the paper's inference-time baseline on the same weights
        (v rescaled to ||v_ref||)."""
        coord, cfg, after = self.coord, self.cfg, None
        with coord.evaluating():
            after, ratios, images = evaluate(coord, cfg, self.eval_names)
            renorm, _, _ = evaluate(coord, cfg, self.eval_names, renormalize=True)
        after["train/steps_done"] = float(coord.step_idx)
        # the rewards up to the step the weights are from (after a rollback, not those of the steps undone)
        after["train/final_reward"] = window_mean(self.rewards[: coord.step_idx], cfg.train.stop_window)
        after.update(_renorm_keys(renorm))
        self.summary.after = after
        self.writer.write(coord.step_idx, after)
        self.summary.ratio_per_step["policy"] = ratios[cfg.eval.full_steps]
        _save_grids(cfg.run_dir, images, "after", cfg, self.writer, coord.step_idx)
        self.writer.trackers.log_summary(after)

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


def _rollback(coord: Coordinator, cfg, guards: GuardMonitor, *, local: bool) -> Coordinator:
    """A ``rollback`` guard fired: restore the newest checkpoint inside every bound (``checkpoints/latest``
    then names it, so a rerun finds the run finished there)."""
    if guards.action != "rollback":
        return coord
    target = guards.rollback_target(cfg.run_dir)
    if target is None:
        log.warning("rollback: no intact checkpoint inside the bounds; the run ends where the guard fired")
        return coord
    log.warning("rollback: restoring %s", target)
    coord.shutdown()
    coord, _, _ = build_coordinator(cfg, local=local, checkpoint=target)
    (cfg.run_dir / "checkpoints" / "latest").write_text(target.name)
    return coord


def _renorm_keys(metrics: dict[str, float]) -> dict[str, float]:
    """``eval/...`` -> ``eval_renorm/...`` (the norm ratio is 1 by construction and dropped)."""
    return {k.replace("eval/", "eval_renorm/"): v for k, v in metrics.items() if "norm_ratio" not in k}


def _finished(cfg, ckpt: Path | None) -> RunSummary | None:
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
    elif step < cfg.train.steps and not _reached([r["reward/mean"] for r in history if "reward/mean" in r], cfg.train):
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


def _open_writer(cfg) -> MetricsWriter:
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


def _reached(rewards: list[float], train) -> bool:
    """The early-stopping control's test: the windowed training reward reached ``stop_at_reward``."""
    if train.stop_at_reward is None or len(rewards) < train.stop_window:
        return False
    return window_mean(rewards, train.stop_window) >= train.stop_at_reward


def _save_grids(run_dir: Path, images: dict[int, torch.Tensor], tag: str, cfg, writer, step: int) -> None:
    per = cfg.eval.samples_per_prompt
    for n, imgs in images.items():
        save_image_grid(imgs, run_dir / "grids" / f"{tag}_{n}steps.png", nrow=per)
    _log_grids(writer, images, tag, cfg, step)


def _log_grids(writer, images: dict[int, torch.Tensor], tag: str, cfg, step: int) -> None:
    """The evaluation grids to the trackers as ``grids/<tag>_<N>steps``."""
    if writer.trackers is None or not cfg.logging.log_images:
        return
    grids = {f"grids/{tag}_{n}steps": grid_tensor(imgs, nrow=cfg.eval.samples_per_prompt) for n, imgs in images.items()}
    writer.trackers.log_images(step, grids)


def train_and_report(cfg, *, local: bool = False) -> str:
    """``normguard train``: the run (and, with ``train.compare_baseline``, the same config with NormGuard
    off), then their before / after table, run directories and the guards that fired."""
    summaries = {cfg.train.run_name: run_training(cfg, local=local)}
    if cfg.train.compare_baseline:
        ng = cfg.normguard.model_copy(update={"weight": 0.0, "mode": "penalty"})
        train = cfg.train.model_copy(update={"run_name": cfg.train.run_name + "-baseline", "compare_baseline": False})
        base = cfg.model_copy(update={"normguard": ng, "train": train})
        summaries[base.train.run_name] = run_training(base, local=local)
    lines = [summary_table(summaries)]
    for name, s in summaries.items():
        lines.append(f"{name}: run directory {s.run_dir}")
        for g in s.guards:  # what the proxy could not see (train.guards)
            lines.append(
                f"  guard fired at step {g['step']}: {g['metric']} = {g['value']:.4g} {g['bound']} -> {g['action']}"
            )
    return "\n".join(lines)


def summary_table(summaries: dict[str, RunSummary]) -> str:
    """One row per (run, before/after[/after+renorm]) with the eval metrics."""
    rows = []
    for name, s in summaries.items():
        after = {k: v for k, v in s.after.items() if k.startswith("eval/")}
        renorm = {k.replace("eval_renorm/", "eval/"): v for k, v in s.after.items() if k.startswith("eval_renorm/")}
        for when, m in (("before", s.before), ("after", after), ("after+renorm", renorm)):
            if not m:
                continue
            rows.append({"run": name, "when": when, **{k.removeprefix("eval/"): v for k, v in sorted(m.items())}})
    return format_table(rows)
