"""NormGuard as a constraint: one multiplier per sigma bin, adapted on the measured norm ratio.

The fixed-weight hinge (``mode: penalty``) needs a lambda per method and per learning rate: the
same lambda is invisible next to one base loss and over-corrects another through Adam. As a
constraint the bound is the hyperparameter and lambda follows from it:

    find theta  minimising  L_base(theta)
    subject to  r_b(theta) = E[ ||v_theta|| / ||v_ref|| | sigma in bin b ] <= 1 + margin   for every b

with one Lagrange multiplier per sigma bin, so the bound holds at every sampling step, not only
on average over them (the average hides a violated bound at sigma near 1 behind an
over-corrected one near 0). The force on the policy is the L1 hinge of
``losses.normguard.normguard_penalty`` weighted per point by its bin's multiplier; the multipliers
are updated once per RL step by dual ascent on the measured violation, in log space::

    e_b        = (r_b - (1 + margin)) / tolerance                  (the violation, in tolerances)
    d_b        = (r_b - r_b,previous) / tolerance                   (its trend since the last RL step)
    log lam_b <- clip(log lam_b + rate * clip(e_b + kd * d_b, -1, 1), log lam_min, log lam_max)

Log-space (multiplicative) ascent is our choice over the additive PID Lagrangian of Stooke et al.
(2020, "Responsive Safety in RL by PID Lagrangian Methods"): the multiplier a method needs scales
with its base loss's gradient (NFT's is x5 the unit loss, Flow-DPO's logistic loss at beta 100 is
another scale again), and a multiplicative step reaches any scale in a number of steps that
depends on the ratio ``lam* / lam_init``, not on ``lam*`` itself, so one default serves every
method. The clipped error is the proportional part (a small violation moves lambda a little); the
accumulation in ``log lam`` is the integral part, and the floor ``lam_min`` lets a satisfied bin
release the policy within a few steps instead of holding it below the bound.

The derivative term ``kd * d_b`` is there because the ratio answers lambda with a lag of several
RL steps (Adam's momentum keeps pushing after the force is gone; the hinge is one-sided and cannot
push back). Without it the integral winds up while the ratio is still above the bound and then
drives it far below (measured on DiffusionNFT: lambda 0.1 -> 14 over six steps, the ratio 1.04 ->
0.86). With it lambda starts falling as soon as the ratio turns down, before it crosses the bound.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["bin_means", "sigma_bins", "update_log_multipliers"]


def sigma_bins(sigma: Tensor, num_bins: int) -> Tensor:
    """Equal-width sigma bins: bin ``b`` holds ``sigma`` in ``(1 - (b + 1) / B, 1 - b / B]``.

    Bin 0 is pure noise (sigma 1, the first sampling step), bin ``B - 1`` the cleanest. The
    sampler's default grid of ``B`` steps (``conventions.sigma_grid``: 1 down to ``sigma_min``)
    puts one step in each bin; a finer evaluation grid puts several.

    Args:
        sigma: ``(N,)`` sigmas in [0, 1].
        num_bins: B >= 1.

    Returns:
        ``(N,)`` long indices in ``[0, B)``.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    return torch.floor((1.0 - sigma.double()) * num_bins).long().clamp(0, num_bins - 1)


def bin_means(values: Tensor, bins: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
    """Per-bin sums and counts of ``values`` (``(N,)``), float64, ready for an all-reduce."""
    sums = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins.cpu(), values.detach().double().cpu())
    counts = torch.zeros(num_bins, dtype=torch.float64).index_add_(
        0, bins.cpu(), torch.ones(len(bins), dtype=torch.float64)
    )
    return sums, counts


def update_log_multipliers(
    log_lam: Tensor,
    ratio: Tensor,
    counts: Tensor,
    *,
    bound: float,
    rate: float,
    tolerance: float,
    lam_min: float,
    lam_max: float,
    previous: Tensor | None = None,
    kd: float = 0.0,
    side: str = "upper",
) -> Tensor:
    """One dual-ascent step on the per-bin multipliers (see the module docstring).

    Args:
        log_lam: ``(B,)`` current ``log lambda`` per bin.
        ratio: ``(B,)`` measured mean norm ratio per bin (ignored where ``counts == 0``).
        counts: ``(B,)`` points measured per bin.
        bound: ``1 + margin``.
        rate: log-space step at a full violation (``e^rate`` per RL step).
        tolerance: the violation (in ratio units) that counts as full.
        lam_min, lam_max: the multiplier's range (``0 < lam_min <= lam_max``).
        previous: ``(B,)`` the ratio measured at the previous RL step (NaN where unmeasured); with
            ``kd > 0`` its change is the derivative term.
        kd: weight of the derivative term (in RL steps of lead).
        side: ``"upper"`` (``r_b <= bound``, NormGuard's constraint) or ``"lower"`` (``r_b >= bound``,
            the optional floor of a two-sided band: the errors change sign).

    Returns:
        ``(B,)`` the new ``log lambda``.
    """
    if not 0 < lam_min <= lam_max:
        raise ValueError(f"need 0 < lam_min <= lam_max, got {lam_min}, {lam_max}")
    if tolerance <= 0 or rate < 0:
        raise ValueError(f"need tolerance > 0 and rate >= 0, got {tolerance}, {rate}")
    if side not in ("upper", "lower"):
        raise ValueError(f"side must be 'upper' or 'lower', got {side!r}")
    sign = 1.0 if side == "upper" else -1.0
    err = sign * (ratio.double() - bound) / tolerance
    if previous is not None and kd > 0:
        trend = sign * (ratio.double() - previous.double()) / tolerance
        err = err + kd * torch.where(torch.isfinite(trend), trend, torch.zeros_like(trend))
    err = torch.where(counts > 0, err.clamp(-1.0, 1.0), torch.zeros_like(err))
    return (log_lam.double() + rate * err).clamp(math.log(lam_min), math.log(lam_max))
