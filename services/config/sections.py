"""The experiment's sections: model, rollout, reward, advantages, NormGuard, learner, resources,
train, logging, eval, data (hardware layout in ``resources``, apart from the algorithm)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from services.config.base import Section
from services.config.model import ModelConfig
from services.config.resources import ResourcesConfig
from services.config.reward_server import RewardServerRef

__all__ = [
    "AdvantageConfig",
    "DataConfig",
    "EvalConfig",
    "GuardSpec",
    "LearnerConfig",
    "LoggingConfig",
    "ModelConfig",
    "NormGuardConfig",
    "ResourcesConfig",
    "RewardConfig",
    "RewardServerRef",
    "RolloutConfig",
    "ScorerSpec",
    "TrainConfig",
]


class RolloutConfig(Section):
    num_samplers: int = Field(default=2, ge=1, description="RolloutSampler actors")
    prompts_per_step: int = Field(default=10, ge=1, description="prompt groups per RL step")
    group_size: int = Field(default=8, ge=1, description="samples per prompt")
    num_steps: int = Field(default=10, ge=1, le=200, description="sampler steps for rollouts")
    shift: float | None = Field(
        default=None,
        gt=0,
        description="static timestep shift of the sampling grid; null = the model family's schedule "
        "(services.models.schedules): SD3/SD3.5 the scheduler config's shift, FLUX its resolution-dependent mu "
        "(use_dynamic_shifting; a number replaces it, with a warning), digits 1 (filled in)",
    )
    guidance_scale: float = Field(default=1.0, ge=1.0, description="CFG scale for rollouts")
    sde_noise_level: float = Field(
        default=0.0, ge=0.0, description="0 = ODE rollouts; > 0 Flow-SDE (needed by flow_grpo)"
    )
    max_staleness: int = Field(
        default=0,
        ge=0,
        description="policy versions a rollout may lag the learner at its update (train.pipeline: async makes "
        "samples 1 version behind; a sampler holding an older policy is re-synced)",
    )
    micro_batch: int | None = Field(
        default=None,
        ge=1,
        description="samples per transformer call of a sampler (policy and reference velocity, the CFG's "
        "conditional and null rows together: 2x rows with CFG); null = its whole share at once. Same samples",
    )
    decode_batch: int | None = Field(
        default=None,
        ge=1,
        description="latents per VAE decode of a sampler; null = its whole share at once. Same images",
    )


class ScorerSpec(Section):
    name: str = Field(description="registered scorer name (see `normguard scorers`), or a label when impl is set")
    impl: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="'package.module:ClassName' of a user scorer following the scorer protocol",
    )
    weight: float = Field(default=1.0, description="weight in the combined reward")
    path: str | None = Field(default=None, description="checkpoint dir / hub id / URL for the scorer")
    required: bool = Field(default=True, description="a failure of a required scorer fails the step")
    pool: Literal["proxy", "judge"] = Field(default="proxy", description="actor pool (MLLM judges get their own)")
    options: dict[str, Any] = Field(default_factory=dict, description="scorer-specific keyword arguments")
    server: RewardServerRef | None = Field(
        default=None, description="score on a reward server instead of in the scorer actor (services.rewards.server)"
    )

    @model_validator(mode="after")
    def _server_builds_it(self) -> ScorerSpec:
        if self.server is not None and (self.impl or self.path or self.options):
            raise ValueError(
                f"scorer {self.name!r}: with server set, the server builds the scorer: give impl / path / options "
                "in its RewardServerConfig, not here"
            )
        return self


class RewardConfig(Section):
    scorers: tuple[ScorerSpec, ...] = Field(default=(ScorerSpec(name="digits_ink"),), min_length=1)
    eval_scorers: tuple[ScorerSpec, ...] = Field(
        default=(
            ScorerSpec(name="digits_judge", pool="judge"),
            ScorerSpec(name="digits_realism", pool="judge"),
            ScorerSpec(name="digits_classifier", pool="judge"),
        ),
        description="judges never used for training (digits_classifier: the class term of the proxy, as a monitor)",
    )
    num_actors: int = Field(default=1, ge=1, description="RewardScorer actors per pool")
    timeout_s: float = Field(default=120.0, gt=0, description="per-call timeout")
    retries: int = Field(default=2, ge=0, description="retries per scorer call, with exponential backoff")
    score_batch: int | None = Field(
        default=None,
        ge=1,
        description="images per call of a per-image scorer in a scorer actor (a group-wise one gets the whole "
        "request); null = the whole request at once. Same scores",
    )


class AdvantageConfig(Section):
    std: Literal["global", "group"] = Field(
        default="global",
        description="normalise by the std of all rewards of the step (sources) or of each prompt group",
    )
    eps: float = Field(default=1e-4, gt=0, description="added to the std")


class NormGuardConfig(Section):
    """``mode: penalty`` is the fixed-weight hinge; ``mode: constraint`` holds the per-sigma-bin mean ratio
    at or below ``1 + margin`` with one multiplier per bin (``normguard_core.constraint``)."""

    mode: Literal["penalty", "constraint"] = Field(
        default="penalty",
        description="penalty: lambda = weight, fixed; constraint: per-sigma-bin lambdas by dual ascent",
    )
    weight: float = Field(default=0.0, ge=0.0, description="penalty mode: lambda on the velocity-norm hinge (0 = off)")
    margin: float = Field(
        default=0.0, ge=0.0, description="relative slack over ||v_ref|| (the constraint's bound is 1 + margin)"
    )
    power: Literal[1, 2] = Field(default=2, description="L1 or squared hinge (the force of both modes)")
    scale: Literal["relative", "absolute"] = "relative"
    bins: int = Field(
        default=10, ge=1, le=1000, description="sigma bins (constraint multipliers and the ratio_bin metrics)"
    )
    lambda_init: float = Field(default=0.5, gt=0, description="constraint mode: every bin's starting multiplier")
    dual_rate: float = Field(
        default=0.5, ge=0, description="constraint mode: log-lambda step per RL step at a full violation"
    )
    dual_kd: float = Field(
        default=2.0, ge=0, description="constraint mode: weight of the ratio's trend (derivative term against wind-up)"
    )
    tolerance: float = Field(default=0.02, gt=0, description="constraint mode: the ratio violation that counts as full")
    lambda_min: float = Field(
        default=1e-3, gt=0, description="constraint mode: multiplier floor (a satisfied bin decays to it)"
    )
    lambda_max: float = Field(default=100.0, gt=0, description="constraint mode: multiplier ceiling")
    floor: float | None = Field(
        default=0.98,
        gt=0,
        lt=1,
        description="constraint mode (ignored by the penalty): also hold every bin's mean ratio at or above this "
        "(a second multiplier per bin; the force spills over between bins through the shared weights); null = "
        "one-sided",
    )
    probe_uncovered: bool = Field(
        default=True,
        description="constraint mode: apply the force at one extra point per sample in the sigma bins no training "
        "point reached at the last RL step (AWM's and Flow-DPO's sigmas leave the grid's ends empty)",
    )
    probe_floor: bool = Field(
        default=False,
        description="constraint mode: the probes also push a bin under the floor back up (both sides of the "
        "constraint at the probes, as at the training points). Off by default so that the published figures, "
        "measured with probes that only held the bound, reproduce bit for bit",
    )
    momentum: bool | None = Field(
        default=None,
        description="whether Adam's momentum carries NormGuard's force (None: the mode's default, penalty yes, "
        "constraint no: the force then acts in its own optimiser step only, normguard_core.optim.SplitAdamW)",
    )

    @property
    def split_force(self) -> bool:
        """The learner back-propagates the force on its own and keeps it out of Adam's first moment."""
        return self.active and not (self.momentum if self.momentum is not None else self.mode == "penalty")

    @property
    def active(self) -> bool:
        """The penalty acts on the policy (a constraint always does)."""
        return self.mode == "constraint" or self.weight > 0

    @model_validator(mode="after")
    def _check(self) -> NormGuardConfig:
        if self.mode == "constraint" and not self.lambda_min <= self.lambda_init <= self.lambda_max:
            raise ValueError("normguard: need lambda_min <= lambda_init <= lambda_max")
        return self


class LearnerConfig(Section):
    lr: float = Field(default=1e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    updates_per_step: int | None = Field(
        default=None,
        ge=1,
        description="optimiser steps (mini-batches) per RL step and epoch; None = the method's source default",
    )
    epochs_per_step: int = Field(
        default=1, ge=1, description="passes over the rollout batch per RL step (num_inner_epochs)"
    )
    timesteps_per_sample: int | None = Field(
        default=None, ge=1, description="training points per sample; None = the method's source default"
    )
    sigma_min: float = Field(
        default=0.02, ge=0.0, lt=1.0, description="lower clamp of uniform / logit-normal training sigmas"
    )
    sigma_max: float = Field(
        default=0.98, gt=0.0, le=1.0, description="upper clamp of uniform / logit-normal training sigmas"
    )
    micro_batch: int = Field(default=40, ge=1, description="samples per backward pass per worker")
    max_nonfinite_in_row: int = Field(
        default=3, ge=1, description="abort after this many skipped NaN/Inf updates in a row"
    )
    track_norm_ratio: bool = Field(
        default=True, description="compute v_ref for the norm-ratio metrics even when no term needs it"
    )
    track_old_policy_gap: bool = Field(
        default=True, description="compute v_old for learner/old_policy_gap even when the loss does not read it"
    )


class GuardSpec(Section):
    """A bound on one metric watched during training (``services.training.guards``): crossing it warns, stops,
    or rolls the run back to its newest checkpoint inside every bound."""

    metric: str = Field(
        description="a per-step metric (e.g. normguard/ratio_max, normguard/ratio_bin0) or an evaluation "
        "metric (e.g. eval/digits_judge_20steps, eval/frechet_20steps; needs train.eval_every)"
    )
    max: float | None = Field(default=None, description="fires when the metric exceeds this")
    min: float | None = Field(default=None, description="fires when the metric falls below this")
    max_rise: float | None = Field(
        default=None, description="fires when the metric exceeds its value before training by more than this"
    )
    action: Literal["warn", "stop", "rollback"] = Field(
        default="warn",
        description="warn: log and go on; stop: end training here; rollback: end and restore the newest "
        "checkpoint at which every guard held (checkpoint as often as you evaluate)",
    )

    @model_validator(mode="after")
    def _one_bound(self) -> GuardSpec:
        if self.max is None and self.min is None and self.max_rise is None:
            raise ValueError(f"guard on {self.metric!r}: give max, min or max_rise")
        return self


class TrainConfig(Section):
    run_name: str = Field(default="digits-nft", pattern=r"^[A-Za-z0-9._-]+$")
    output_dir: str = Field(default="runs", description="run directories live here")
    steps: int = Field(default=30, ge=1, description="RL steps (rollout -> update -> sync)")
    seed: int = 0
    eval_every: int = Field(default=10, ge=0, description="0 = only before and after")
    checkpoint_every: int = Field(default=10, ge=0, description="0 = only at the end")
    compare_baseline: bool = Field(
        default=False, description="also train the same config with NormGuard off, and compare"
    )
    stop_at_reward: float | None = Field(
        default=None,
        description="early-stopping control: end training once the mean training reward over the last "
        "`stop_window` steps reaches this (then the final eval runs as usual)",
    )
    stop_window: int = Field(default=3, ge=1)
    on_corrupt_checkpoint: Literal["fallback", "stop"] = Field(
        default="fallback", description="a corrupt latest checkpoint: resume from the newest intact one, or stop"
    )
    guards: tuple[GuardSpec, ...] = Field(default=(), description="bounds watched during training (reward hacking)")
    max_failures: int = Field(
        default=3,
        ge=0,
        description="lost learner workers or nodes survived per run: each restarts the learner group, samplers "
        "and scorers from the newest intact checkpoint and redoes the steps since (0 = a loss ends the run)",
    )
    node_wait_s: float = Field(
        default=300.0,
        ge=0,
        description="after a lost node, how long a restart waits for the alive nodes to hold the run again (a "
        "replacement node with the lost one's resources joining) before it stops, naming the lost node (with "
        "resources.check_cluster warn / off, an autoscaling cluster, it does not wait: pending actors ask for nodes)",
    )
    stop_wait_s: float = Field(
        default=20.0,
        gt=0,
        description="after SIGTERM / SIGINT, how long the step in flight may take to finish before it is abandoned "
        "(its checkpoint is written after it; keep the two inside the pod's terminationGracePeriodSeconds)",
    )
    rollout_timeout_s: float = Field(default=600.0, gt=0)
    learner_timeout_s: float = Field(default=900.0, gt=0)
    sampler_retries: int = Field(
        default=2,
        ge=0,
        description="retries per sampler call (a rollout share, a weight sync), with exponential backoff",
    )
    pipeline: Literal["sync", "async"] = Field(
        default="sync",
        description="async: the next step's rollout and rewards are made while the learner updates (samples one "
        "policy version behind; needs rollout.max_staleness >= 1, with 0 it is the sync loop); drains at every "
        "evaluation and checkpoint",
    )


class LoggingConfig(Section):
    """Where a run's scalars, image grids, config and summary go besides metrics.jsonl (``services.training.trackers``)."""

    backends: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = Field(
        default=("tensorboard",), description="any subset of tensorboard, wandb, mlflow"
    )
    project: str = Field(default="normguard", description="W&B project / MLflow experiment")
    group: str | None = Field(default=None, description="W&B group (a sweep sets its name)")
    wandb_mode: Literal["offline", "online"] = Field(
        default="offline", description="offline needs no network; `wandb sync` uploads later"
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="MLflow server or store URI; default sqlite:///<train.output_dir>/mlflow.db"
    )
    log_images: bool = Field(default=True, description="image grids at every evaluation")

    @model_validator(mode="after")
    def _unique(self) -> LoggingConfig:
        if len(set(self.backends)) != len(self.backends):
            raise ValueError(f"logging.backends lists a backend twice: {list(self.backends)}")
        return self


class EvalConfig(Section):
    num_prompts: int = Field(default=10, ge=1)
    samples_per_prompt: int = Field(default=10, ge=1)
    few_steps: int = Field(default=4, ge=1)
    full_steps: int = Field(default=20, ge=1)
    guidance_scale: float = Field(default=1.0, ge=1.0)
    renorm_along: bool = Field(
        default=False, description="also evaluate with inference-time renormalisation at every train.eval_every point"
    )


class DataConfig(Section):
    """Prompt files (``services.training.prompts``); without them the inline ``prompts`` list is used."""

    train_prompts: str | None = Field(
        default=None,
        description="training prompts: a .txt (one per line), .jsonl (a 'prompt' key + metadata) or .csv file",
    )
    eval_prompts: str | None = Field(
        default=None, description="held-out evaluation prompts (same formats); default: the training prompts"
    )
    shuffle: bool = Field(
        default=True, description="a fresh permutation of the training file per epoch (seeded by train.seed)"
    )
