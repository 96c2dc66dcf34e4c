"""Catch reward hacking while it happens: bounds on the norm ratio and the independent judges.

``train.guards`` lists :class:`~services.config.GuardSpec` bounds. After every RL step the per-step
metrics are checked (e.g. ``normguard/ratio_max``, a sigma bin's ``normguard/ratio_bin0``), after
every evaluation the evaluation metrics (``eval/digits_judge_20steps`` with ``min``,
``eval/frechet_20steps`` with ``max_rise`` over its value before training). A guard that fires is
recorded (step, metric, value, bound, action) in the run's ``summary.json`` and logged; ``stop``
ends training there (the final evaluation runs as usual), ``rollback`` ends it and restores the
newest checkpoint taken at or before the last evaluation at which every guard held, so the run's
final model is one that was inside the bounds (the decision is
:class:`~services.training.failure.GuardPolicy`'s, the target the checkpoint store's). This answers the
question most asked in flow_grpo's tracker ("the model tends to reward hacking in only 10 steps"): watch
what the proxy cannot see.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.config.sections import GuardSpec

__all__ = ["Firing", "GuardMonitor"]

log = logging.getLogger(__name__)

_RANK = {"warn": 0, "stop": 1, "rollback": 2}


@dataclass(frozen=True)
class Firing:
    """One guard crossing its bound."""

    step: int
    metric: str
    value: float
    bound: str
    action: str


@dataclass
class GuardMonitor:
    """Checks the guards as metrics arrive and remembers what fired and the last step inside the bounds."""

    specs: Sequence
    before: Mapping[str, float] = field(default_factory=dict)
    fired: list[Firing] = field(default_factory=list)
    last_ok_eval_step: int = 0  # the base model (step 0) was inside the bounds unless an eval said no

    def _crossed(self, spec: GuardSpec, value: float) -> str | None:
        if spec.max is not None and value > spec.max:
            return f"> max {spec.max}"
        if spec.min is not None and value < spec.min:
            return f"< min {spec.min}"
        if spec.max_rise is not None and spec.metric in self.before:
            limit = self.before[spec.metric] + spec.max_rise
            if value > limit:
                return f"> before {self.before[spec.metric]:.4g} + max_rise {spec.max_rise}"
        return None

    def check(self, step: int, metrics: Mapping[str, float], *, evaluation: bool = False) -> Firing | None:
        """Check every guard whose metric is in ``metrics``; returns the firing of the strongest action, if any
        (the first of its rank)."""
        strongest = None
        for spec in self.specs:
            value = metrics.get(spec.metric)
            if value is None:
                continue
            bound = self._crossed(spec, float(value))
            if bound is None:
                continue
            firing = Firing(step=step, metric=spec.metric, value=float(value), bound=bound, action=spec.action)
            self.fired.append(firing)
            log.warning("guard fired at step %d: %s = %.4g %s -> %s", step, spec.metric, value, bound, spec.action)
            if strongest is None or _RANK[spec.action] > _RANK[strongest.action]:
                strongest = firing
        if evaluation and strongest is None:  # (a stop or rollback ends training: no evaluation is checked after one)
            self.last_ok_eval_step = step
        return strongest

    @property
    def action(self) -> str | None:
        """The strongest action that fired so far, ``None`` when nothing fired."""
        acts = [f.action for f in self.fired]
        return max(acts, key=_RANK.__getitem__) if acts else None

    def record(self) -> list[dict]:
        """What fired, for ``summary.json``."""
        return [asdict(f) for f in self.fired]
