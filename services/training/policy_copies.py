"""The learner's lagged weight copies (``normguard_core.lagged`` does the math).

* ``old``: the sampling ("old") policy, what the samplers get (``Learner.policy_weights``) and whose
  velocity ``v_old`` the loss reads. After each RL step with an update it moves toward the trained
  weights, ``old <- d old + (1 - d) theta``, with the method's schedule: DiffusionNFT
  ``min(0.001 k, 0.5)``, the others ``d = 0`` (on-policy: old = theta).
* ``ema``: AWM's EMA-KL target, lagged the same way with its own schedule (``None`` when unused).
* The pipelined loop (``train.pipeline: async``) trains on samples of the previous version, so the
  old copy of that version is kept too (:meth:`PolicyCopies.old_at`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor

from normguard_core.lagged import lag_decay, update_lagged

__all__ = ["PolicyCopies", "swapped_in"]


@contextlib.contextmanager
def swapped_in(params: list[Tensor], tensors: list[Tensor]) -> Iterator[None]:
    """``params`` hold ``tensors``' values inside the block, the trained values exactly back after.

    The storages are exchanged (``.data``), nothing is copied: a full fine-tune evaluating ``v_old`` or
    sampling with the old copy needs no third transformer in memory. ``tensors`` (copies of ``params``,
    same shapes, dtypes and devices) hold the trained values meanwhile; the parameters stay the
    optimiser's objects."""

    def exchange() -> None:
        for p, t in zip(params, tensors, strict=True):
            p.data, t.data = t.data, p.data

    exchange()
    try:
        yield
    finally:
        exchange()


class PolicyCopies:
    """The old (sampling) policy per version still in flight, and the optional EMA copy."""

    def __init__(self, params: list[Tensor], *, old_schedule, ema_schedule, keep_versions: int = 1) -> None:
        self.old = [p.detach().clone() for p in params]
        self.old_schedule, self.ema_schedule = old_schedule, ema_schedule
        self.ema = [p.detach().clone() for p in params] if ema_schedule else None
        self.keep_versions = keep_versions
        self._versions: dict[int, list[Tensor]] = {}

    def remember(self, version: int) -> None:
        """Record the old copy as the policy of ``version`` (kept while a sample of it may arrive)."""
        if self.keep_versions > 1:
            self._versions[version] = [t.clone() for t in self.old]
            for v in [v for v in self._versions if v <= version - self.keep_versions]:
                del self._versions[v]

    def forget(self) -> None:
        """Only the current version samples (after a restore: checkpoints are taken with nothing in flight)."""
        self._versions = {}

    def old_at(self, version: int, current: int) -> list[Tensor]:
        """The old copy as shipped at ``version`` (the learner is at ``current``)."""
        if version == current:
            return self.old
        if version not in self._versions:
            raise RuntimeError(
                f"a sample of policy v{version} reached the learner at v{current}; it keeps "
                f"{sorted(self._versions) or [current]} (train.pipeline async runs one version behind)"
            )
        return self._versions[version]

    def advance(self, params: list[Tensor], step_count: int) -> dict[str, float]:
        """After the RL step: old (and EMA) <- d copy + (1 - d) theta, d from the optimiser-step count."""
        d_old = lag_decay(step_count, self.old_schedule)
        update_lagged(self.old, params, d_old)
        out = {"learner/old_policy_decay": d_old}
        if self.ema is not None:
            d_ema = lag_decay(step_count, self.ema_schedule)
            update_lagged(self.ema, params, d_ema)
            out["learner/ema_decay"] = d_ema
        return out
