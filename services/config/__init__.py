"""One typed, airtight pydantic v2 config tree (P9), loaded from YAML with dotted overrides.

Hardware layout (``resources``) is separate from algorithm hyperparameters; the per-loss
sections are a discriminated union on ``loss.name``; every YAML in ``deploy/configs`` is
loaded in a test. Services unpack these into explicit keyword arguments (P10): the core never
sees a config object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from services.config.base import ConfigError, Section
from services.config.families import FAMILIES
from services.config.losses import *  # noqa: F403 - the loss sections are part of the config's names
from services.config.losses import LossConfig, NFTLoss
from services.config.sections import *  # noqa: F403 - and so are the other sections
from services.config.sections import (
    AdvantageConfig,
    DataConfig,
    EvalConfig,
    LearnerConfig,
    LoggingConfig,
    ModelConfig,
    NormGuardConfig,
    ResourcesConfig,
    RewardConfig,
    RolloutConfig,
    TrainConfig,
)

__all__ = ["ConfigError", "ExperimentConfig", "apply_overrides", "load_config"]


class ExperimentConfig(Section):
    """The whole experiment. Derived values are properties, never stored twice."""

    model: ModelConfig = ModelConfig()
    prompts: tuple[str, ...] = Field(default=tuple(f"a handwritten digit {d}" for d in range(10)), min_length=1)
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    loss: LossConfig = NFTLoss()
    advantages: AdvantageConfig = AdvantageConfig()
    normguard: NormGuardConfig = NormGuardConfig()
    learner: LearnerConfig = LearnerConfig()
    resources: ResourcesConfig = ResourcesConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def samples_per_step(self) -> int:
        """Rollout samples generated per RL step."""
        return self.rollout.prompts_per_step * self.rollout.group_size

    @property
    def run_dir(self) -> Path:
        """Directory of this run's outputs, absolute: Ray actors (the learner writes checkpoints) do not
        share the driver's working directory."""
        return Path(self.train.output_dir).expanduser().resolve() / self.train.run_name

    @model_validator(mode="before")
    @classmethod
    def _digits_grid(cls, data: Any) -> Any:
        """``rollout.shift: null`` is the family's scheduler; the digits model has none, its grid's shift (1)
        is filled in here, so that every reader of a digits run's config (serving, analyze) gets a number."""
        if not isinstance(data, dict):
            return data
        model, rollout = data.get("model") or {}, data.get("rollout") or {}
        kind = model.get("kind", "digits") if isinstance(model, dict) else model.kind
        fam = FAMILIES.get(kind)  # an unknown kind: the model section's own validation says so
        shift = fam.grid_shift if fam is not None else None  # digits, colour: no scheduler config
        if shift is None:
            return data
        if isinstance(rollout, dict) and rollout.get("shift") is None:
            return {**data, "rollout": {**rollout, "shift": shift}}
        if isinstance(rollout, RolloutConfig) and rollout.shift is None:
            return {**data, "rollout": rollout.model_copy(update={"shift": shift})}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        self.loss.check(self.rollout)  # the method's own cross-checks, on its section
        if self.learner.sigma_min >= self.learner.sigma_max:
            raise ValueError("learner.sigma_min must be < learner.sigma_max")
        hybrid = self.resources.placement == "hybrid"
        samplers, what = (
            (self.resources.num_learners, "resources.num_learners (placement hybrid: each learner samples a share)")
            if hybrid
            else (self.rollout.num_samplers, "rollout.num_samplers")
        )
        if self.samples_per_step % samplers:
            raise ValueError(f"samples per step ({self.samples_per_step}) must divide evenly over {what} ({samplers})")
        if hybrid and self.train.pipeline == "async":
            raise ValueError(
                "resources.placement hybrid samples on the learner workers between their updates, so nothing runs "
                "beside an update: use train.pipeline sync, or placement separate for the asynchronous pipeline"
            )
        return self


def _yaml_message(err: yaml.YAMLError) -> str:
    """``YAML syntax error at line L, column C: problem`` (1-based, as editors count)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    return f"YAML syntax error{where}: {problem}"


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value (e.g. train.steps=10)")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        try:
            node[parts[-1]] = _parse_value(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an ExperimentConfig from YAML (or the embedded default when ``path`` is None)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            hint = "" if path.suffix in (".yaml", ".yml") else " (an override is written key.path=value)"
            raise FileNotFoundError(f"config file not found: {path}{hint}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: {_yaml_message(err)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    apply_overrides(data, list(overrides or []))
    return ExperimentConfig.model_validate(data)
