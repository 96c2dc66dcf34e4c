"""What a learner worker receives: a frozen spec built once by the driver from the experiment config
(the config stops at the service edge; inside Ray Train the worker gets this, not the config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.methods import get_method

if TYPE_CHECKING:
    from services.config import ExperimentConfig, LearnerConfig, LossConfig, ModelConfig, NormGuardConfig, RolloutConfig

__all__ = ["LearnerSpec"]


@dataclass(frozen=True)
class LearnerSpec:
    """What a learner worker needs, built once by the driver (the worker never sees the experiment
    config): the frozen sections it reads, and the values derived from the rest.

    Attributes:
        model, loss, normguard, learner: the config's sections.
        rollout: the sampling grid and guidance the training points follow.
        seed: ``train.seed`` (seeds the training points).
        threads: torch threads of the worker.
        timesteps: training points per sample (``learner.timesteps_per_sample`` or the method's).
        updates_per_step: optimiser steps per RL step (``learner.updates_per_step`` or the method's).
        keep_versions: old-policy versions kept (2 when the pipelined loop trains one version behind).
        prompt_embeddings: the run's precomputed prompt table (``model.prompt_embeddings: once``), or ``None``
            (the worker loads the text encoders and encodes its prompts).
    """

    model: ModelConfig
    loss: LossConfig
    normguard: NormGuardConfig
    learner: LearnerConfig
    rollout: RolloutConfig
    seed: int
    threads: int
    timesteps: int
    updates_per_step: int
    keep_versions: int = 1
    prompt_embeddings: str | None = None

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, *, prompt_embeddings: str | None = None) -> LearnerSpec:
        method, lc, res = get_method(cfg.loss), cfg.learner, cfg.resources
        return cls(
            model=cfg.model,
            loss=cfg.loss,
            normguard=cfg.normguard,
            learner=lc,
            rollout=cfg.rollout,
            seed=cfg.train.seed,
            threads=res.learner_threads or res.torch_threads,
            timesteps=lc.timesteps_per_sample or method.timesteps_per_sample(cfg.rollout),
            updates_per_step=lc.updates_per_step or method.updates_per_step,
            keep_versions=2 if cfg.train.pipeline == "async" and cfg.rollout.max_staleness > 0 else 1,
            prompt_embeddings=prompt_embeddings,
        )
