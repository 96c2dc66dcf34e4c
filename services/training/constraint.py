"""NormGuard's per-sigma-bin state in the learner (``normguard_core.constraint`` does the math).

Every RL step the learner accumulates the norm ratio ``||v_theta|| / ||v_ref||`` of its training
points per sigma bin (:meth:`BinMultipliers.accumulate`: the ratios NormGuard's penalty measured, never
recomputed; in constraint mode the points' multipliers come from :meth:`BinMultipliers.weights`). After the step the sums are all-reduced over
the learner ranks (:meth:`BinMultipliers.advance`), logged as ``normguard/ratio_bin{b}``, and in
constraint mode each bin's log-multiplier takes one dual-ascent step: lambda on the upper bound
``1 + margin``, mu on the floor. The bins that no training point reached are remembered, so the
next step can probe them (``normguard.probe_uncovered``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from normguard_core.constraint import bin_means, sigma_bins, update_log_multipliers
from normguard_core.losses import BinWeights

if TYPE_CHECKING:
    from services.config import NormGuardConfig

__all__ = ["BinMultipliers"]


class BinMultipliers:
    """Per-bin ratio statistics of the current RL step and the constraint's multipliers (float64)."""

    def __init__(self, ng: NormGuardConfig) -> None:
        self.ng = ng
        self.log_lam = torch.full((ng.bins,), math.log(ng.lambda_init), dtype=torch.float64)  # upper bound
        self.log_mu = torch.full((ng.bins,), math.log(ng.lambda_init), dtype=torch.float64)  # the floor side
        self.prev_ratio = torch.full((ng.bins,), float("nan"), dtype=torch.float64)  # the derivative term's memory
        self.uncovered: Tensor | None = None  # bins no training point reached at the last RL step
        self._stats = torch.zeros(3, ng.bins, dtype=torch.float64)  # sum, count, count of training points

    @property
    def constrained(self) -> bool:
        return self.ng.mode == "constraint"

    def weights(self, sigma: Tensor, device: torch.device | str) -> BinWeights | None:
        """Constraint mode: each point's multipliers, those of its sigma bin: ``normguard`` and, with a
        floor, ``floor`` (``(N,)`` float32 on ``device``, a ``normguard_core.losses.BinWeights``); else
        ``None``. They depend only on ``sigma``, so they are looked up before the objective is computed.

        Args:
            sigma: ``(N,)`` the points' sigmas.
            device: where the objective is computed.
        """
        if not self.constrained:
            return None
        bins = sigma_bins(sigma.detach().cpu(), self.ng.bins)
        floor = self.log_mu.exp().float()[bins].to(device) if self.ng.floor is not None else None
        return BinWeights(normguard=self.log_lam.exp().float()[bins].to(device), floor=floor)

    def accumulate(self, ratio: Tensor, sigma: Tensor, *, training: bool = True) -> None:
        """Add the points' norm ratios to their bins' statistics (``training=False``: a probe, which
        does not count as a training point reaching the bin).

        Args:
            ratio: ``(N,)`` the ratios NormGuard measured (``LossOutput.norm_ratio``, not recomputed).
            sigma: ``(N,)`` the points' sigmas.
        """
        bins = sigma_bins(sigma.detach().cpu(), self.ng.bins)
        sums, counts = bin_means(ratio, bins, self.ng.bins)
        self._stats += torch.stack([sums, counts, counts if training else torch.zeros_like(counts)])

    def probe_sigmas(self, n: int, g: torch.Generator) -> Tensor | None:
        """``(n,)`` sigmas drawn uniformly inside the bins no training point reached (``None``: none to probe)."""
        if not (self.constrained and self.ng.probe_uncovered) or self.uncovered is None or not self.uncovered.any():
            return None
        open_bins = self.uncovered.nonzero().flatten()
        b = open_bins[torch.randint(len(open_bins), (n,), generator=g)]
        u = torch.rand(n, generator=g, dtype=torch.float64)
        return (1.0 - (b.double() + u) / self.ng.bins).float().clamp(1e-3, 1.0)

    def advance(self, all_reduce: Callable[[Tensor], None] | None = None) -> dict[str, float]:
        """After the RL step: sum the statistics over ranks (``all_reduce``), log the per-bin ratios and,
        in constraint mode, take one dual-ascent step. Every rank calls it, also with an empty shard."""
        ng, stats = self.ng, self._stats
        self._stats = torch.zeros_like(stats)
        if all_reduce is not None:
            all_reduce(stats)
        sums, counts, trained = stats
        if counts.sum() == 0:
            return {}
        self.uncovered = trained == 0
        ratio = sums / counts.clamp_min(1)
        out = {f"normguard/ratio_bin{b}": float(ratio[b]) for b in range(ng.bins) if counts[b] > 0}
        if self.constrained:
            out.update(self._dual_step(ratio, counts))
        return out

    def _dual_step(self, ratio: Tensor, counts: Tensor) -> dict[str, float]:
        ng = self.ng
        dual = {"rate": ng.dual_rate, "tolerance": ng.tolerance, "kd": ng.dual_kd, "previous": self.prev_ratio}
        dual.update(lam_min=ng.lambda_min, lam_max=ng.lambda_max)
        out = {}
        self.log_lam = update_log_multipliers(self.log_lam, ratio, counts, bound=1.0 + ng.margin, **dual)
        if ng.floor is not None:
            self.log_mu = update_log_multipliers(self.log_mu, ratio, counts, bound=ng.floor, side="lower", **dual)
            mu = self.log_mu.exp()
            out["normguard/floor_mu"] = float(mu.mean())
            out.update({f"normguard/floor_mu_bin{b}": float(mu[b]) for b in range(ng.bins)})
        self.prev_ratio = torch.where(counts > 0, ratio, self.prev_ratio)
        lam = self.log_lam.exp()
        out["normguard/lambda"] = float(lam.mean())
        out["normguard/lambda_max_bin"] = float(lam.max())
        out.update({f"normguard/lambda_bin{b}": float(lam[b]) for b in range(ng.bins)})
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors a checkpoint keeps (names as in ``learner_state.safetensors``)."""
        state = {"log_lambda": self.log_lam, "log_mu": self.log_mu, "prev_ratio": self.prev_ratio}
        if self.uncovered is not None:
            state["uncovered"] = self.uncovered
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.log_lam, self.log_mu = state["log_lambda"].double(), state["log_mu"].double()
        self.prev_ratio, self.uncovered = state["prev_ratio"].double(), state.get("uncovered")
