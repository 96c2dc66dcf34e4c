"""Composition root of a training run: the model and scorers resolved, the backend's workers started
(Ray actors and the Ray Train learner, or their plain-object twins: ``services.training.backends``), a
checkpoint resumed, and a :class:`Coordinator` and a :class:`~services.training.evaluator.RunEvaluator`
over them.

A build takes the :class:`~services.training.resume.ResumeState` it resumes (the controller's, made once
from the checkpoint it verified) and the :class:`~services.training.cadence.Cadence` the coordinator drains
its pipeline at; the backend is joined by the caller (the controller, once per run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.checkpoints import CheckpointStore
from services.training.backends import Backend, backend_for
from services.training.cadence import Cadence
from services.training.coordinator import Coordinator
from services.training.evaluator import RunEvaluator
from services.training.resume import ResumeState
from services.types import ScorerBuild

if TYPE_CHECKING:
    from services.config import ExperimentConfig

__all__ = ["Built", "build_coordinator", "build_run", "prompt_embeddings"]

log = logging.getLogger(__name__)


@dataclass
class Built:
    """What one build made: the coordinator and the evaluator on its workers."""

    coord: Coordinator
    evaluator: RunEvaluator


def _resolve(cfg: ExperimentConfig) -> tuple[str, dict[str, ScorerBuild], dict[str, ScorerBuild]]:
    """Model path and scorer specs (``services.prepare.resolve_model``; the embedded default's scorers
    come from its prepared directory)."""
    from services.prepare import resolve_model

    resolved = resolve_model(cfg.model, log=log.info)
    model_path, scorer_dir = resolved.path, resolved.scorer_dir

    def specs(items, *, train: bool) -> dict[str, ScorerBuild]:
        """``train``: the training scorers, whose ``required`` the worker reads (every evaluation judge is
        required: an evaluation has no step to go on with)."""
        embedded = lambda s: scorer_dir if s.name.startswith(("digits_", "colour_")) and not s.impl else None  # noqa: E731
        required = lambda s: s.required or not train  # noqa: E731
        return {
            s.name: _remote_build(s, required(s))
            if s.server
            else ScorerBuild(s.path or embedded(s), dict(s.options), s.impl, required(s))
            for s in items
        }

    return model_path, specs(cfg.reward.scorers, train=True), specs(cfg.reward.eval_scorers or (), train=False)


def _remote_build(spec, required: bool = True) -> ScorerBuild:
    """A scorer on a reward server (``server:``): the scorer actor builds its client
    (``services.rewards.remote.RemoteScorer``), which the worker calls like any scorer."""
    return ScorerBuild(
        options={"scorer": spec.name, **spec.server.model_dump()},
        impl="services.rewards.remote:RemoteScorer",
        required=required,
    )


def build_coordinator(
    cfg: ExperimentConfig, *, local: bool = False, checkpoint: Path | None | str = "latest"
) -> tuple[Coordinator, dict, dict]:
    """Actors (or plain objects with ``local``) and a Coordinator; resumes from ``checkpoint`` (the run
    directory's newest intact one when ``"latest"``, none when ``None``). Returns ``(coordinator, the
    checkpoint's extra state, the evaluation-only scorer specs)``."""
    if checkpoint == "latest":
        checkpoint = CheckpointStore(cfg.run_dir, on_corrupt=cfg.train.on_corrupt_checkpoint).latest_intact()
    resume = ResumeState.of(checkpoint)
    backend = backend_for(local)
    backend.connect()
    built, eval_specs = _build(cfg, backend=backend, resume=resume, cadence=Cadence(cfg.train))
    return built.coord, dict(resume.state), eval_specs


def build_run(cfg: ExperimentConfig, *, backend: Backend, resume: ResumeState, cadence: Cadence) -> Built:
    """:func:`build_coordinator` on ``backend`` (joined), with the evaluator on the same workers."""
    return _build(cfg, backend=backend, resume=resume, cadence=cadence)[0]


def _build(cfg: ExperimentConfig, *, backend: Backend, resume: ResumeState, cadence: Cadence) -> tuple[Built, dict]:
    from services.training.prompts import prompt_sets

    model_path, train_specs, eval_specs = _resolve(cfg)
    ckpt = str(resume.checkpoint) if resume.checkpoint else None
    train_prompts, eval_prompts = prompt_sets(cfg)
    _check_prompts(resume.prompt_fingerprint, train_prompts.fingerprint, ckpt)
    backend.check_cluster(cfg)  # before the prompt pre-pass's task asks for a sampler's resources
    embeddings = prompt_embeddings(cfg, model_path, (train_prompts, eval_prompts), backend=backend)
    scorer_specs = {**train_specs, **eval_specs}
    workers = backend.start_workers(cfg, model_path, scorer_specs, ckpt, embeddings=embeddings)
    try:
        coord = Coordinator(
            cfg,
            workers=workers,
            resume=resume,
            drains_after=cadence.drains_after,
            prompts=(train_prompts, eval_prompts),
        )
        if ckpt:
            log.info("resuming %s from %s (step %d, v%d)", cfg.train.run_name, ckpt, coord.step_idx, coord.version)
        coord.sync_samplers()  # samplers start from the learner's weights (the checkpoint's after a resume)
    except BaseException:
        # a sampler or scorer actor left pending for its resources (its node lost) would take them when a node
        # joins, ahead of the rerun's own actors, and a started learner group holds its workers
        workers.shutdown()
        raise
    evaluator = RunEvaluator(
        cfg,
        samplers=workers.samplers,
        scorers=workers.scorers,
        eval_set=eval_prompts,
        eval_names=list(eval_specs),
        stats=coord.stats,  # an evaluation's retried reward calls count with the steps'
    )
    return Built(coord, evaluator), eval_specs


def prompt_embeddings(cfg: ExperimentConfig, model_path: str, sets, *, backend: Backend) -> str | None:
    """``model.prompt_embeddings: once`` (sd3 / flux): the table file of every prompt of the prompt ``sets``
    (training, evaluation) and ``""``, encoded by one pre-pass that loads only the text encoders
    (``services.models.prompt_embeddings``): in the driver on the local backend, else one Ray task on a
    sampler's resources (a learner's with ``placement: hybrid``), waited for up to ``train.learner_timeout_s``
    (the budget of a learner's start-up, which it replaces for the text encoders). An existing file is reused
    (a resume, a restart, a rollback). ``None``: digits or ``per_actor``, every actor encodes its own prompts."""
    from services.config.families import spec
    from services.models.prompt_embeddings import embeddings_file, unique_prompts

    if not spec(cfg.model.kind).has_text_encoder or cfg.model.prompt_embeddings != "once":
        return None
    prompts = unique_prompts(*(s.prompts for s in sets))
    out = embeddings_file(cfg.run_dir, cfg.model, model_path, prompts)
    if out.is_file():
        log.info("prompt embeddings of %d prompts: %s (encoded before)", len(prompts), out)
        return str(out)
    log.info("encoding %d prompts once (model.prompt_embeddings: once) into %s", len(prompts), out)
    return backend.encode_prompts(cfg, model_path, prompts, out)


def _check_prompts(stored: str | None, now: str, resume: str | None) -> None:
    """A resume must see the prompts the run was training on (the checkpoint keeps their fingerprint)."""
    if stored is not None and stored != now:
        from services.checkpoints import CheckpointError

        raise CheckpointError(
            f"the training prompts changed since checkpoint {resume} (fingerprint {stored}, now {now}): a resume "
            "would not see the prompts the run was training on. Restore the prompt file, or start a new run "
            "(train.run_name)."
        )
