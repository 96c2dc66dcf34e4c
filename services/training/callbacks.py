"""What the controller tells the run's reporting: state changes, step reports, evaluations.

The shape of Ray Train v2's callbacks (``python/ray/train/v2/_internal/execution/callback.py``:
``ControllerCallback.after_controller_state_update(previous_state, current_state)``, ``ReportCallback.after_report``)
and of how its controller runs them (``controller/controller.py``, ``_run_controller_hook`` after each
``_set_state``): the controller decides and carries out, a callback only hears what happened. The run's
record (``services.training.record.RunRecord``) is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from services.training.coordinator import StepReport
    from services.training.state import ControllerState

__all__ = ["Evaluation", "RunCallback", "renorm_keys"]


@dataclass(frozen=True)
class Evaluation:
    """One evaluation the controller ran (``services.training.evaluator.RunEvaluator``) after ``step`` steps:
    ``metrics``, the norm ratio per sampling step of each step count (``ratios``), the image grids
    (``images``: step count -> ``(N, 3, H, W)``), and ``renorm``: the inference-time baseline's metrics (v
    rescaled to ||v_ref||; after training, and along it with ``eval.renorm_along``), else None."""

    when: Literal["before", "along", "after"]
    step: int
    metrics: dict
    ratios: dict
    images: dict
    renorm: dict | None = None

    @property
    def with_renorm(self) -> dict[str, float]:
        """The metrics with the baseline's beside them (``eval_renorm/...``)."""
        return {**self.metrics, **renorm_keys(self.renorm or {})}


def renorm_keys(metrics: dict[str, float]) -> dict[str, float]:
    """``eval/...`` -> ``eval_renorm/...`` (the norm ratio is 1 by construction and dropped)."""
    return {k.replace("eval/", "eval_renorm/"): v for k, v in metrics.items() if "norm_ratio" not in k}


class RunCallback:
    """Hooks the controller calls; each does nothing unless overridden."""

    def after_state_update(self, previous: ControllerState, current: ControllerState) -> None:
        """The run went from ``previous`` to ``current`` (every transition, checked against the table)."""

    def after_report(self, report: StepReport) -> None:
        """An RL step finished with ``report``."""

    def after_evaluation(self, evaluation: Evaluation) -> None:
        """An evaluation finished."""
