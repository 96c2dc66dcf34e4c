"""Lagged weight copies: the "old" policy of DiffusionNFT and the EMA of AWM's EMA-KL.

Both sources keep a second copy of the trainable weights that, once per RL step (after the step's
optimiser updates), moves toward the trained weights::

    lagged <- d * lagged + (1 - d) * theta,     d = 0                        for k < flat
                                                d = min(rate * (k - flat), cap) otherwise

where ``k`` is the number of optimiser steps taken so far (the sources' ``global_step``).

* DiffusionNFT ``train_nft_sd3.py::return_decay`` (the old policy, which also samples):
  ``decay_type=1`` (default) ``rate=0.001, cap=0.5``; ``decay_type=2`` (OCR config)
  ``flat=75, rate=0.0075, cap=0.999``; ``decay_type=0`` ``d = 0`` (old = theta after every step).
* AWM ``train_sd3_awm.py`` (the EMA adapter of the EMA-KL): ``kl_ema_decay_type='linear'``,
  ``d = min(0.3, 0.001 * k)``; or a constant ``d``.

``d = 0`` makes the copy equal the trained weights after each RL step, i.e. on-policy sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LAG_SCHEDULES", "LagSchedule", "lag_decay", "update_lagged"]


@dataclass(frozen=True)
class LagSchedule:
    """``d(k) = 0 if k < flat else min(rate * (k - flat), cap)``."""

    rate: float = 0.0
    cap: float = 0.0
    flat: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.cap < 1.0 or self.rate < 0 or self.flat < 0:
            raise ValueError(f"need 0 <= cap < 1, rate >= 0, flat >= 0; got {self}")


LAG_SCHEDULES: dict[str, LagSchedule] = {
    "none": LagSchedule(),
    "nft_linear": LagSchedule(rate=0.001, cap=0.5),  # DiffusionNFT decay_type=1
    "nft_delayed": LagSchedule(rate=0.0075, cap=0.999, flat=75),  # DiffusionNFT decay_type=2
    "awm_linear": LagSchedule(rate=0.001, cap=0.3),  # AWM kl_ema_decay_type='linear', kl_ema_decay=0.3
}


def lag_decay(optimizer_steps: int, schedule: LagSchedule) -> float:
    """The decay ``d`` after ``optimizer_steps`` optimiser steps."""
    if optimizer_steps < schedule.flat:
        return 0.0
    return min(schedule.rate * (optimizer_steps - schedule.flat), schedule.cap)


@torch.no_grad()
def update_lagged(lagged: list[Tensor], current: list[Tensor], decay: float) -> None:
    """In place ``lagged <- decay * lagged + (1 - decay) * current`` (exact copy when ``decay == 0``)."""
    if len(lagged) != len(current):
        raise ValueError(f"{len(lagged)} lagged tensors for {len(current)} current ones")
    for lag, cur in zip(lagged, current):
        if decay == 0.0:
            lag.copy_(cur)
        else:
            lag.copy_(lag * decay + cur.detach() * (1.0 - decay))
