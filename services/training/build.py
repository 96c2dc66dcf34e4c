"""Composition root of a training run: the model and scorers resolved, Ray started (or joined), the
RolloutSampler and RewardScorer actors and the Ray Train learner created (or their plain-object
twins with ``local``), a checkpoint resumed, and a :class:`Coordinator` over them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from services.checkpoints import latest_intact
from services.cluster.connect import ensure_ray
from services.training.coordinator import Coordinator
from services.training.remote import is_actor
from services.types import ScorerBuild

__all__ = ["build_coordinator"]

log = logging.getLogger(__name__)


def _resolve(cfg):
    """Model path and scorer specs (``services.prepare.resolve_model``; the embedded default's scorers
    come from its prepared directory)."""
    from services.prepare import resolve_model

    resolved = resolve_model(cfg.model, log=log.info)
    model_path, scorer_dir = resolved.path, resolved.scorer_dir

    def specs(items) -> dict[str, ScorerBuild]:
        embedded = lambda s: scorer_dir if s.name.startswith("digits_") and not s.impl else None  # noqa: E731
        return {s.name: ScorerBuild(path=s.path or embedded(s), options=dict(s.options), impl=s.impl) for s in items}

    return model_path, specs(cfg.reward.scorers), specs(cfg.reward.eval_scorers or ())


def _check_cluster(cfg) -> None:
    """Fail before any actor starts when the cluster can never hold the run (``resources.check_cluster``)."""
    if cfg.resources.check_cluster == "off":
        return
    from services.cluster.plan import ClusterTooSmall, check_plan, nodes_from_ray, plan_run, run_demand

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
    directory's newest intact one when ``"latest"``, none when ``None``). Returns ``(coordinator, the
    checkpoint's extra state, the evaluation-only scorer specs)``."""
    from services.training.prompts import prompt_sets

    model_path, train_specs, eval_specs = _resolve(cfg)
    ckpt = (
        latest_intact(cfg.run_dir, on_corrupt=cfg.train.on_corrupt_checkpoint) if checkpoint == "latest" else checkpoint
    )
    resume = str(ckpt) if ckpt else None
    train_prompts, eval_prompts = prompt_sets(cfg)
    if not local:
        ensure_ray()
        _check_cluster(cfg)  # before the prompt pre-pass's task asks for a sampler's resources
    embeddings = prompt_embeddings(cfg, model_path, (train_prompts, eval_prompts), local=local)
    scorer_specs = {**train_specs, **eval_specs}
    samplers, scorers, learner = _workers(cfg, model_path, scorer_specs, resume, local=local, embeddings=embeddings)
    try:
        extra = learner.extra if resume else {}
        _check_prompts(extra.get("prompt_fingerprint"), train_prompts.fingerprint, resume)
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
            log.info("resuming %s from %s (step %d, v%d)", cfg.train.run_name, resume, coord.step_idx, coord.version)
        coord.sync_samplers()  # samplers start from the learner's weights (the checkpoint's after a resume)
    except BaseException:
        _release([*samplers, *scorers], learner)
        raise
    return coord, extra, eval_specs


def _release(actors: list, learner=None) -> None:
    """What a build that failed half-way had started, stopped: a sampler or scorer actor left pending for
    its resources (its node lost) would take them when a node joins, ahead of the rerun's own actors, and
    a started learner group holds its workers."""
    if learner is not None:
        learner.stop()
    handles = [a for a in actors if is_actor(a)]
    if handles:
        import ray

        for a in handles:
            ray.kill(a)


def prompt_embeddings(cfg, model_path: str, sets, *, local: bool) -> str | None:
    """``model.prompt_embeddings: once`` (sd3 / flux): the table file of every prompt of the prompt ``sets``
    (training, evaluation) and ``""``, encoded by one pre-pass that loads only the text encoders
    (``services.models.prompt_embeddings``): the driver with ``local``, else one Ray task on a sampler's
    resources (a learner's with ``placement: hybrid``), waited for up to ``train.learner_timeout_s`` (the
    budget of a learner's start-up, which it replaces for the text encoders). An existing file is reused (a
    resume, a restart, a rollback). ``None``: digits or ``per_actor``, every actor encodes its own prompts."""
    from services.models.pipelines import encode_prompt_file
    from services.models.prompt_embeddings import embeddings_file, unique_prompts

    if cfg.model.kind == "digits" or cfg.model.prompt_embeddings != "once":
        return None
    prompts = unique_prompts(*(s.prompts for s in sets))
    out = embeddings_file(cfg.run_dir, cfg.model, model_path, prompts)
    if out.is_file():
        log.info("prompt embeddings of %d prompts: %s (encoded before)", len(prompts), out)
        return str(out)
    log.info("encoding %d prompts once (model.prompt_embeddings: once) into %s", len(prompts), out)
    res = cfg.resources
    if local:
        return encode_prompt_file(cfg.model, model_path, prompts, out, threads=res.torch_threads)
    import ray

    hybrid = res.placement == "hybrid"
    gpus = res.learner_gpus if hybrid else res.sampler_gpus
    task = ray.remote(encode_prompt_file).options(
        num_cpus=res.learner_cpus if hybrid else res.sampler_cpus,
        num_gpus=gpus,
        resources=dict(res.learner_resources if hybrid else res.sampler_resources),
        scheduling_strategy="DEFAULT",  # outside a Tune trial's placement group, as the actors
    )
    ref = task.remote(
        cfg.model, model_path, prompts, str(out), device="cuda" if gpus else "cpu", threads=res.torch_threads
    )
    return ray.get(ref, timeout=cfg.train.learner_timeout_s)


def _workers(
    cfg, model_path: str, scorer_specs: dict, resume: str | None, *, local: bool, embeddings: str | None = None
) -> tuple[list, list, object]:
    """``(samplers, scorers, learner)``: Ray actors and the Ray Train learner group, or plain objects (the
    samplers are the learner workers with ``placement: hybrid``); all get the prompt table ``embeddings``."""
    from services.training.learner_group import LearnerGroup, LocalLearner
    from services.training.rollout import RolloutSampler, rollout_chunks
    from services.training.scoring import ScorerWorker

    res = cfg.resources
    hybrid = res.placement == "hybrid"
    sampler_kw = dict(rollout_chunks(cfg), prompt_embeddings=embeddings)
    scorer_kw = {"torch_threads": res.torch_threads, "score_batch": cfg.reward.score_batch}
    if local:
        scorers = [ScorerWorker(scorer_specs, **scorer_kw)]
        learner = LocalLearner(cfg, model_path, resume_from=resume, prompt_embeddings=embeddings)
        if hybrid:
            return _colocated(cfg, learner), scorers, learner
        return [RolloutSampler(cfg.model, model_path, torch_threads=res.torch_threads, **sampler_kw)], scorers, learner
    import ray

    # "DEFAULT" keeps the actors out of a Tune trial's placement group (they ask for their own resources)
    opts = dict(max_restarts=3, scheduling_strategy="DEFAULT")
    scorer_cls = ray.remote(ScorerWorker).options(
        num_cpus=res.scorer_cpus, num_gpus=res.scorer_gpus, resources=dict(res.scorer_resources), **opts
    )
    scorer_dev = "cuda" if res.scorer_gpus else "cpu"
    scorers = [scorer_cls.remote(scorer_specs, device=scorer_dev, **scorer_kw) for _ in range(cfg.reward.num_actors)]
    samplers = []
    if not hybrid:
        sampler_cls = ray.remote(RolloutSampler).options(
            num_cpus=res.sampler_cpus, num_gpus=res.sampler_gpus, resources=dict(res.sampler_resources), **opts
        )
        sampler_dev = "cuda" if res.sampler_gpus else "cpu"
        samplers = [
            sampler_cls.remote(cfg.model, model_path, torch_threads=res.torch_threads, device=sampler_dev, **sampler_kw)
            for _ in range(cfg.rollout.num_samplers)
        ]
    storage = str(cfg.run_dir / "ray_train")
    try:
        timeout, kw = cfg.train.learner_timeout_s, dict(resume_from=resume, prompt_embeddings=embeddings)
        learner = LearnerGroup(cfg, model_path, storage_path=storage, timeout_s=timeout, **kw)
    except BaseException:  # e.g. its worker group could not be placed: the actors above must not linger
        _release([*samplers, *scorers])
        raise
    return (_colocated(cfg, learner) if hybrid else samplers), scorers, learner


def _colocated(cfg, learner) -> list:
    """``placement: hybrid``: the one sampler object whose calls run on the learner workers."""
    from services.training.colocated import ColocatedRollouts

    return [ColocatedRollouts(learner, timeout_s=cfg.train.rollout_timeout_s)]


def _check_prompts(stored: str | None, now: str, resume: str | None) -> None:
    """A resume must see the prompts the run was training on (the checkpoint keeps their fingerprint)."""
    if stored is not None and stored != now:
        from services.checkpoints import CheckpointError

        raise CheckpointError(
            f"the training prompts changed since checkpoint {resume} (fingerprint {stored}, now {now}): a resume "
            "would not see the prompts the run was training on. Restore the prompt file, or start a new run "
            "(train.run_name)."
        )
