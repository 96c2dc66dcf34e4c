"""Composition root of a training run: Ray actors from config, the loop, the run directory.

``run_training(cfg)`` resolves the model and scorers, starts (or joins) Ray, creates the
RolloutSampler and RewardScorer actors and the Ray Train learner, resumes from
``<run_dir>/checkpoints/latest`` when present, and writes metrics.jsonl, TensorBoard events,
plots, image grids and a summary.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.checkpoints import latest_intact
from services.coordinator import Coordinator
from services.guards import GuardMonitor
from services.report import (
    MetricsWriter,
    eval_key,
    format_table,
    grid_tensor,
    plot_ratio_per_step,
    plot_training,
    save_image_grid,
)

__all__ = ["RunSummary", "run_training"]

log = logging.getLogger(__name__)
EVAL_SEED = 4321


@dataclass
class RunSummary:
    """Before / after evaluation of one run."""

    run_dir: Path
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    ratio_per_step: dict[str, list[float]] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    guards: list[dict] = field(default_factory=list)  # the guards that fired (services.guards)


def _resolve(cfg):
    """Model path and scorer specs (the embedded default fills its cached paths in)."""
    from services.models import resolve_model_path

    model_path = resolve_model_path(cfg.model, seed=0)
    scorer_dir = None
    if cfg.model.kind == "digits":
        from services.prepare import prepare_embedded

        assets = prepare_embedded(
            resolution=cfg.model.resolution,
            pretrain_steps=cfg.model.pretrain_steps,
            cache_dir=cfg.model.cache_dir,
            log=log.info,
        )
        model_path, scorer_dir = str(assets.model_path), str(assets.scorer_path)

    def specs(items):
        return {
            s.name: (
                s.path or (scorer_dir if s.name.startswith("digits_") and not s.impl else None),
                dict(s.options),
                s.impl,
            )
            for s in items
        }

    return model_path, specs(cfg.reward.scorers), specs(cfg.reward.eval_scorers or ())


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` if set, else start a local cluster (token auth stays as configured)."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # Driver of a Ray job (``normguard submit``): the job's runtime env already applies to every
        # actor, and Ray refuses a driver runtime env that sets the same keys.
        ray.init(log_to_driver=False)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False)


def _check_cluster(cfg) -> None:
    """Fail before any actor starts when the cluster can never hold the run (``resources.check_cluster``)."""
    if cfg.resources.check_cluster == "off":
        return
    from services.plan import ClusterTooSmall, check_plan, nodes_from_ray, plan_run, run_demand

    try:
        check_plan(plan_run(run_demand(cfg), nodes_from_ray()), where="the Ray cluster")
    except ClusterTooSmall as err:
        if cfg.resources.check_cluster == "error":
            raise
        log.warning("%s", err)


def build_coordinator(
    cfg, *, local: bool = False, checkpoint: Path | None | str = "latest"
) -> tuple[Coordinator, dict, dict]:
    """Actors (or plain objects with ``local``) and a Coordinator; resumes from ``checkpoint`` (the run
    directory's newest intact one when ``"latest"``, none when ``None``)."""
    from services.learner_group import LearnerGroup, LocalLearner
    from services.rollout import RolloutSampler
    from services.scoring import ScorerWorker

    model_path, train_specs, eval_specs = _resolve(cfg)
    ckpt = (
        latest_intact(cfg.run_dir, on_corrupt=cfg.train.on_corrupt_checkpoint) if checkpoint == "latest" else checkpoint
    )
    resume = str(ckpt) if ckpt else None
    res = cfg.resources
    scorer_specs = {**train_specs, **eval_specs}
    if local:
        samplers = [RolloutSampler(cfg.model, model_path, torch_threads=res.torch_threads)]
        scorers = [ScorerWorker(scorer_specs, torch_threads=res.torch_threads)]
        learner = LocalLearner(cfg, model_path, resume_from=resume)
    else:
        import ray

        ensure_ray()
        _check_cluster(cfg)
        # "DEFAULT" keeps the actors out of a Tune trial's placement group (they ask for their own resources)
        opts = dict(max_restarts=3, scheduling_strategy="DEFAULT")
        sampler_cls = ray.remote(RolloutSampler).options(num_cpus=res.sampler_cpus, num_gpus=res.sampler_gpus, **opts)
        scorer_cls = ray.remote(ScorerWorker).options(num_cpus=res.scorer_cpus, num_gpus=res.scorer_gpus, **opts)
        samplers = [
            sampler_cls.remote(
                cfg.model, model_path, torch_threads=res.torch_threads, device="cuda" if res.sampler_gpus else "cpu"
            )
            for _ in range(cfg.rollout.num_samplers)
        ]
        scorers = [
            scorer_cls.remote(
                scorer_specs, torch_threads=res.torch_threads, device="cuda" if res.scorer_gpus else "cpu"
            )
            for _ in range(cfg.reward.num_actors)
        ]
        learner = LearnerGroup(
            cfg,
            model_path,
            storage_path=str(cfg.run_dir / "ray_train"),
            resume_from=resume,
            timeout_s=cfg.train.learner_timeout_s,
        )
    extra = learner.extra if resume else {}
    from services.prompts import prompt_sets

    train_prompts, eval_prompts = prompt_sets(cfg)
    stored = extra.get("prompt_fingerprint")
    if stored is not None and stored != train_prompts.fingerprint:
        from services.checkpoints import CheckpointError

        raise CheckpointError(
            f"the training prompts changed since checkpoint {resume} (fingerprint {stored}, now "
            f"{train_prompts.fingerprint}): a resume would not see the prompts the run was training on. "
            "Restore the prompt file, or start a new run (train.run_name)."
        )
    coord = Coordinator(
        cfg,
        samplers=samplers,
        scorers=scorers,
        learner=learner,
        start_step=extra.get("step", 0),
        prompts=(train_prompts, eval_prompts),
    )
    coord.nonfinite_in_row = extra.get("nonfinite_in_row", 0)
    if resume:
        log.info("resuming %s from %s (step %d, policy v%d)", cfg.train.run_name, resume, coord.step_idx, coord.version)
    coord.sync_samplers()  # samplers start from the learner's weights (the checkpoint's after a resume)
    return coord, extra, eval_specs


def evaluate(coord: Coordinator, cfg, eval_names: list[str], *, renormalize: bool = False) -> tuple[dict, dict, dict]:
    """Fixed-noise evaluation on sampler 0, scored by the scorer pool; Frechet distance for digits."""
    from services.remote import call

    ev = cfg.eval
    eval_set = coord.eval_prompt_set  # data.eval_prompts, or the training prompts in file order
    chosen = range(min(ev.num_prompts, len(eval_set)))
    prompts = [eval_set.prompts[i] for i in chosen for _ in range(ev.samples_per_prompt)]
    meta = [eval_set.metadata[i] for i in chosen for _ in range(ev.samples_per_prompt)] if eval_set.metadata else None
    groups = torch.arange(len(chosen)).repeat_interleave(ev.samples_per_prompt)  # one group per prompt
    metrics, ratios, images = {}, {}, {}
    timeout = cfg.train.rollout_timeout_s
    for n in sorted({ev.few_steps, ev.full_steps}):
        out = call(
            coord.samplers[0],
            "eval_samples",
            prompts,
            num_steps=n,
            guidance_scale=ev.guidance_scale,
            shift=cfg.rollout.shift,
            seed=EVAL_SEED,
            renormalize=renormalize,
            timeout_s=timeout,
        )
        scores = call(
            coord.scorers[0],
            "score",
            out["images"],
            prompts,
            group_ids=groups,
            metadata=meta,
            timeout_s=cfg.reward.timeout_s,
        )
        for name in list(coord.train_scorers) + eval_names:
            metrics[eval_key(name, n)] = float(scores[name].mean())
        metrics[eval_key("norm_ratio", n)] = float(out["ratio"].mean())
        ratios[n] = out["ratio"].mean(dim=1).tolist()
        images[n] = out["images"]
        if cfg.model.kind == "digits" and "digits_judge" in eval_names:
            from services.prepare import real_test_images

            real = real_test_images(cfg.model.resolution)
            fake_f, real_f = (
                call(coord.scorers[0], "features", "digits_judge", x, timeout_s=timeout) for x in (out["images"], real)
            )
            metrics.update(_feature_metrics(fake_f, real_f, groups, n))
    return metrics, ratios, images


def _feature_metrics(fake: torch.Tensor, real: torch.Tensor, groups: torch.Tensor, n: int) -> dict[str, float]:
    """Set-level quality and diversity in the judge's features: FD, KID, precision / recall, spread."""
    from normguard_core.sample_quality import kernel_inception_distance, precision_recall, within_group_spread
    from services.rewards.digits import frechet_distance

    out = {eval_key("frechet", n): frechet_distance(fake, real)}
    if min(len(fake), len(real)) >= 2:
        out[eval_key("kid", n)] = kernel_inception_distance(fake, real)
    if min(len(fake), len(real)) > 3:  # k = 3 neighbours
        out[eval_key("precision", n)], out[eval_key("recall", n)] = precision_recall(fake, real)
    if len(groups) > len(torch.unique(groups)):  # some prompt has >= 2 samples
        out[eval_key("diversity", n)] = within_group_spread(fake, groups)
    return out


def run_training(cfg, *, local: bool = False, progress: bool = True, on_step=None) -> RunSummary:
    """Train one configuration end to end; resumable by rerunning with the same run name.

    A lost learner worker (:class:`~services.learner_group.LearnerLost`) is survived up to
    ``train.max_failures`` times: everything is rebuilt from the newest intact checkpoint, exactly as a
    rerun would resume, and the steps since are redone (``metrics.jsonl`` keeps each step once; the
    restart is counted as ``faults/learner_restarts``)."""
    from services.learner_group import LearnerLost

    restarts = 0
    while True:
        try:
            return _train_once(cfg, local=local, progress=progress, on_step=on_step, restarts=restarts)
        except LearnerLost as err:
            restarts += 1
            if restarts > cfg.train.max_failures:
                raise
            log.warning(
                "learner lost (%s); restart %d of train.max_failures=%d from the newest intact checkpoint",
                err,
                restarts,
                cfg.train.max_failures,
            )


def _train_once(cfg, *, local: bool, progress: bool, on_step, restarts: int) -> RunSummary:
    from tqdm import tqdm

    # verified once (checksums read every byte of the checkpoint), then used by both checks below
    ckpt = latest_intact(cfg.run_dir, on_corrupt=cfg.train.on_corrupt_checkpoint)
    if (finished := _finished(cfg, ckpt)) is not None:  # a rerun of a finished run: nothing re-evaluated
        return finished
    (run_dir := cfg.run_dir).mkdir(parents=True, exist_ok=True)
    coord, extra, eval_specs = build_coordinator(cfg, local=local, checkpoint=ckpt)
    eval_names = list(eval_specs)
    coord.count_learner_restarts(restarts)
    writer = _open_writer(cfg)
    summary = RunSummary(run_dir=run_dir, before=extra.get("before", {}))
    writer.truncate_after(coord.step_idx if summary.before else -1)  # no checkpoint yet: the before-eval reruns
    try:
        if not summary.before:
            coord.begin_evaluation()
            summary.before, ratios, images = evaluate(coord, cfg, eval_names)
            summary.ratio_per_step["reference"] = [1.0] * len(ratios[cfg.eval.full_steps])
            _save_grids(run_dir, images, "before", cfg, writer, coord.step_idx)
            writer.write(coord.step_idx, summary.before)
        guards = GuardMonitor(cfg.train.guards, before=summary.before)
        bar = tqdm(total=cfg.train.steps, initial=coord.step_idx, disable=not progress, desc=cfg.train.run_name)
        rewards = [r["reward/mean"] for r in writer.read() if "reward/mean" in r]
        done = coord.step_idx >= cfg.train.steps or _reached(rewards, cfg.train)
        while not done:
            report = coord.step()
            rewards.append(report.metrics["reward/mean"])
            writer.write(report.step, report.metrics)
            if on_step is not None:  # e.g. Ray Tune's report (ASHA may stop the trial here)
                on_step(report.step, report.metrics)
            m = report.metrics
            bar.set_postfix(
                reward=f"{m['reward/mean']:.3f}",
                ratio=f"{m.get('normguard/ratio_mean', float('nan')):.3f}",
                loss=f"{m.get('loss/total', float('nan')):.4f}",
            )
            bar.update(1)
            halt = guards.check(report.step, m) in ("stop", "rollback")
            done = coord.step_idx >= cfg.train.steps or _reached(rewards, cfg.train) or halt
            if done:
                coord.drain()  # the run ended before a drain point: experience made ahead is dropped
            if cfg.train.eval_every and coord.step_idx % cfg.train.eval_every == 0 and not done:
                done = _evaluate_along(coord, cfg, eval_names, writer, guards)
            if (cfg.train.checkpoint_every and coord.step_idx % cfg.train.checkpoint_every == 0) or done:
                coord.checkpoint(run_dir, {"before": summary.before})
        bar.close()
        coord = _rollback(coord, cfg, guards, local=local)
        _final_eval(coord, cfg, eval_names, writer, summary, rewards)
        coord.finish()
    except BaseException:
        coord.fail()
        raise
    finally:
        coord.learner.stop()
        writer.close()
    summary.history = writer.read()
    plot_training([r for r in summary.history if "reward/mean" in r], run_dir / "training.png")
    plot_ratio_per_step(
        {"policy": summary.ratio_per_step["policy"]},
        run_dir / "norm_ratio_per_step.png",
        title=f"{cfg.train.run_name} ({cfg.eval.full_steps} steps)",
    )
    summary.guards = guards.record()
    _write_summary(summary, stopped_by_guard=guards.action in ("stop", "rollback"))
    return summary


def _evaluate_along(coord: Coordinator, cfg, eval_names: list[str], writer, guards: GuardMonitor) -> bool:
    """An evaluation during training (with the renormalised baseline when ``eval.renorm_along``); returns
    whether a guard on its metrics ends the run."""
    coord.begin_evaluation()
    metrics, _, images = evaluate(coord, cfg, eval_names)
    if cfg.eval.renorm_along:  # the inference-time baseline at every evaluation point
        renorm, _, _ = evaluate(coord, cfg, eval_names, renormalize=True)
        metrics.update(_renorm_keys(renorm))
    writer.write(coord.step_idx, metrics)
    _log_grids(writer, images, "eval", cfg, coord.step_idx)
    coord.end_evaluation()
    return guards.check(coord.step_idx, metrics, evaluation=True) in ("stop", "rollback")


def _final_eval(coord: Coordinator, cfg, eval_names: list[str], writer, summary: RunSummary, rewards: list) -> None:
    """The after-training evaluation, and the paper's inference-time baseline on the same weights
    (v rescaled to ||v_ref||)."""
    coord.begin_evaluation()
    summary.after, ratios, images = evaluate(coord, cfg, eval_names)
    summary.after["train/steps_done"] = float(coord.step_idx)
    # the rewards up to the step the weights are from (after a rollback, not those of the steps undone)
    summary.after["train/final_reward"] = window_mean(rewards[: coord.step_idx], cfg.train.stop_window)
    renorm, _, _ = evaluate(coord, cfg, eval_names, renormalize=True)
    summary.after.update(_renorm_keys(renorm))
    writer.write(coord.step_idx, summary.after)
    summary.ratio_per_step["policy"] = ratios[cfg.eval.full_steps]
    _save_grids(summary.run_dir, images, "after", cfg, writer, coord.step_idx)
    writer.trackers.log_summary(summary.after)


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
    coord.learner.stop()
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
    from services.trackers import build_trackers

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
