"""Sweep config: a base experiment plus a search space over dotted keys (grid or random)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.config import ExperimentConfig, apply_overrides

__all__ = ["Arm", "Axis", "SweepConfig", "load_sweep"]


class Axis(BaseModel):
    """One searched key: ``grid`` values, or a random ``choice`` / ``uniform`` / ``loguniform``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    key: str = Field(description="dotted config key, e.g. normguard.weight or loss.name")
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Axis:
        kinds = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"axis {self.key!r}: give exactly one of grid / choice / uniform / loguniform, got {kinds}"
            )
        return self


class Arm(BaseModel):
    """A named set of overrides chosen by the ``arm`` axis (e.g. ``constraint``: normguard.mode=constraint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted config keys -> values")
    methods: list[str] | None = Field(
        default=None, description="only with these loss.name values (None = every method)"
    )
    by_method: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="extra overrides for one loss.name (e.g. a KL weight per method)"
    )


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="ablation", pattern=r"^[A-Za-z0-9._-]+$")
    base: dict[str, Any] = Field(default_factory=dict, description="ExperimentConfig overrides shared by all trials")
    axes: tuple[Axis, ...] = Field(min_length=1)
    num_samples: int = Field(default=1, ge=1, description="repeats of the grid (random axes are re-drawn)")
    max_concurrent_trials: int = Field(default=1, ge=1)
    trial_cpus: float = Field(
        default=0.01, gt=0, description="CPUs of the trial driver itself (its actors ask for their own)"
    )
    asha: bool = Field(default=False, description="early-stop trials with ASHA on `metric` vs the `step` attribute")
    asha_grace_steps: int = Field(default=5, ge=1)
    metric: str = Field(default="reward/mean", description="the per-step metric ASHA compares")
    mode: Literal["max", "min"] = "max"
    output_dir: str = "runs/sweeps"
    renorm_baseline: bool = Field(
        default=True, description="also evaluate each trial with inference-time renormalisation"
    )
    arms: dict[str, Arm] = Field(
        default_factory=dict, description="named override sets; an axis with key `arm` picks among them"
    )
    by_method: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="overrides per loss.name for every arm (e.g. SDE rollouts for flow_grpo)"
    )
    local_trials: bool = Field(
        default=False,
        description="each trial runs its samplers, scorers and learner in the trial's own process (small models on "
        "few cores: no actor start-up, and trials run side by side, one core each)",
    )
    early_stop_control: bool = Field(
        default=False,
        description="after the grid: for every finished trial with normguard.weight > 0, train the same "
        "config with NormGuard off, stopped once its training reward reaches that trial's final reward",
    )

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir).resolve() / self.name

    def grid_trials(self) -> list[dict[str, Any]] | None:
        """With arms: every valid combination of the grid axes (an arm only with its methods); else None."""
        if not self.arms:
            return None
        import itertools

        keys = [a.key for a in self.axes]
        grids = [a.grid for a in self.axes if a.grid is not None]
        if len(grids) != len(self.axes):
            raise ValueError("with arms, give grid values on every axis")
        out = []
        for values in itertools.product(*grids):
            params = dict(zip(keys, values))
            arm = self.arms[params["arm"]]
            if arm.methods is None or params.get("loss.name") in arm.methods:
                out.append(params)
        return out

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        if self.arms:
            arm_axes = [a for a in self.axes if a.key == "arm"]
            arm_grid = arm_axes[0].grid if arm_axes else None
            if arm_grid is None or any(a.grid is None for a in self.axes):
                raise ValueError("with arms, give an axis with key `arm` and grid values on every axis")
            unknown = sorted(set(arm_grid) - set(self.arms))
            if unknown:
                raise ValueError(f"arm axis names undeclared arms {unknown}; declared: {sorted(self.arms)}")
            for params in self.grid_trials() or []:  # a list: self.arms is set
                self.trial_config(params, "check")
            return self
        trial = self.trial_config({a.key: _first(a) for a in self.axes}, "check")
        if self.asha and trial.train.steps <= self.asha_grace_steps:
            raise ValueError("asha needs train.steps > asha_grace_steps")
        return self

    def trial_config(self, params: dict[str, Any], trial_name: str) -> ExperimentConfig:
        params = dict(params)
        layers = [self.base]
        arm_name = params.pop("arm", None)
        arm = self.arms.get(arm_name) if self.arms and arm_name is not None else None
        method = params.get("loss.name", self.base.get("loss.name"))
        layers.append(self.by_method.get(method, {}) if method is not None else {})
        if arm is not None:
            layers += [arm.overrides, arm.by_method.get(method, {}) if method is not None else {}]
        layers.append(params)
        data: dict[str, Any] = {}
        for layer in layers:
            apply_overrides(
                data, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}" for k, v in layer.items()]
            )
        data.setdefault("train", {})
        data["train"].update(run_name=trial_name, output_dir=str(self.sweep_dir / "trials"), compare_baseline=False)
        data.setdefault("logging", {}).setdefault("group", self.name)  # W&B groups a sweep's trials
        return ExperimentConfig.model_validate(data)


def _first(axis: Axis) -> Any:
    if axis.grid is not None:
        return axis.grid[0]
    if axis.choice is not None:
        return axis.choice[0]
    bounds = axis.uniform or axis.loguniform
    assert bounds is not None, "Axis._one_kind: an axis has exactly one of its kinds"
    return bounds[0]


PATH_KEYS = ("data.train_prompts", "data.eval_prompts")  # files a trial reads: made absolute at load time


def _absolute_paths(layer: Any) -> None:
    """Resolve the relative :data:`PATH_KEYS` of one override layer against the current directory, in place:
    a trial runs in Tune's trial directory, where ``deploy/prompts/colour.txt`` does not exist."""
    if isinstance(layer, dict):
        for key in PATH_KEYS:
            if isinstance(layer.get(key), str) and not Path(layer[key]).expanduser().is_absolute():
                layer[key] = str(Path(layer[key]).expanduser().resolve())


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    data = yaml.safe_load(Path(path).read_text()) or {}
    apply_overrides(data, list(overrides or []))
    _absolute_paths(data.get("base"))
    for layer in (data.get("by_method") or {}).values():
        _absolute_paths(layer)
    for arm in (data.get("arms") or {}).values():
        if isinstance(arm, dict):
            _absolute_paths(arm.get("overrides"))
            for layer in (arm.get("by_method") or {}).values():
                _absolute_paths(layer)
    return SweepConfig.model_validate(data)
