"""The hardware layout of a run (``resources``): CPUs, GPUs and custom Ray resources per actor, apart from the
algorithm's hyperparameters (P9). Re-exported by ``services.config.sections``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from services.config.base import Section

__all__ = ["ResourcesConfig"]


class ResourcesConfig(Section):
    check_cluster: Literal["error", "warn", "off"] = Field(
        default="error",
        description="before the actors start, place them on the cluster's nodes (services.cluster.plan): 'error' stops a "
        "run the cluster can never hold; 'warn' starts anyway (an autoscaling cluster that will add nodes)",
    )
    num_learners: int = Field(default=1, ge=1, description="Ray Train workers (DDP)")
    placement: Literal["separate", "hybrid"] = Field(
        default="separate",
        description="separate: RolloutSampler actors beside the learners, synced with weights after each update; "
        "hybrid: every learner worker also samples its share of the rollout with the policy it holds, on its own "
        "device (verl's actor-rollout worker): no sampler actors and no weight sync, the learners' GPUs do both "
        "(rollout.num_samplers and resources.sampler_* are unused; needs train.pipeline sync)",
    )

    @field_validator("check_cluster", mode="before")
    @classmethod
    def _yaml_off(cls, v: object) -> object:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false

    learner_cpus: float = Field(default=1.0, gt=0)
    learner_gpus: float = Field(default=0.0, ge=0)
    sampler_cpus: float = Field(default=0.25, ge=0)
    sampler_gpus: float = Field(default=0.0, ge=0)
    scorer_cpus: float = Field(default=0.25, ge=0)
    scorer_gpus: float = Field(default=0.0, ge=0)
    learner_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each learner worker asks for besides learner_cpus / learner_gpus (Ray "
        "Train's resources_per_worker), e.g. {learner_pool: 1} runs the learners only on nodes started with "
        "--resources '{\"learner_pool\": 1}' (a node pool); also what a replacement node must declare",
    )
    sampler_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each RolloutSampler actor asks for (as above)"
    )
    scorer_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each RewardScorer actor asks for (as above)"
    )

    @field_validator("learner_resources", "sampler_resources", "scorer_resources")
    @classmethod
    def _custom_only(cls, v: dict[str, float]) -> dict[str, float]:
        if {"CPU", "GPU", "memory", "object_store_memory"} & set(v) or any(x < 0 for x in v.values()):
            raise ValueError(f"custom Ray resources >= 0 only (CPUs / GPUs have their own fields), got {v}")
        return v

    # ``duplicates`` pairs these field declarations with RewardConfig's (an int with a bound, an optional one
    # with a description): alike in shape, different fields; a declaration is not logic to share
    torch_threads: int = Field(default=1, ge=1, description="torch threads per actor (avoid oversubscription)")
    learner_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads per learner worker (default: torch_threads); the update runs while the "
        "samplers wait, so on a small CPU machine the learner can use every core",
    )
