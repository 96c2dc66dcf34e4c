"""NormGuard: a hinge on the per-sample velocity norm against the frozen reference, with an
optional mirrored floor.

Definition (this project's contribution; see README "The math")::

    n_theta_b = ||v_theta(x_b, sigma_b, c_b)||_2          (norm over all non-batch dims)
    n_ref_b   = ||v_ref(x_b, sigma_b, c_b)||_2             (frozen reference, no_grad)
    excess_b  = relu(n_theta_b - (1 + margin) * n_ref_b)   (absolute scale)
             or relu(n_theta_b / n_ref_b - (1 + margin))   (relative scale, the default)
    penalty   = weight * mean_b excess_b ** power
              (+ mean_b floor_weight_b * relu(floor - n_theta_b / n_ref_b) ** power   with a floor)

Without a floor it is exactly zero, with exactly zero gradient, wherever the policy norm is at or
below the threshold: the upper hinge alone never pulls a deflating model up, and leaves the base
objective untouched there. With a floor (``mode: constraint``'s optional lower side) the mirrored
hinge does pull a sample whose ratio fell under ``floor`` back up; between ``floor`` and
``1 + margin`` both sides are zero. Either side's gradient w.r.t. ``v_theta`` is parallel to
``v_theta`` (d||v||/dv = v / ||v||), so a gradient step changes the magnitude without rotating the
direction: the upper hinge shrinks it, the floor grows it.

The relative scale divides by the reference norm, which makes ``weight`` transferable between a
64-dim digit and a 16x128x128 SD3 latent (absolute excesses grow like sqrt(D)); the zero set and
gradient direction are the same in both scales. Every ratio goes through
:func:`normguard_core.metrics.norm_ratio` (one guard against a zero reference norm).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normguard_core.metrics import norm_ratio, velocity_norm
from normguard_core.types import LossOutput

__all__ = ["normguard_penalty"]


def _check(v_theta: Tensor, v_ref: Tensor, weight: float | Tensor, margin: float, power: int, scale: str) -> None:
    if v_theta.shape != v_ref.shape:
        raise ValueError(f"v_theta {tuple(v_theta.shape)} and v_ref {tuple(v_ref.shape)} differ")
    if bool((torch.as_tensor(weight) < 0).any()) or margin < 0:
        raise ValueError(f"weight and margin must be >= 0, got weight={weight}, margin={margin}")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power}")
    if scale not in ("relative", "absolute"):
        raise ValueError(f"scale must be 'relative' or 'absolute', got {scale!r}")


def normguard_penalty(
    *,
    v_theta: Tensor,
    v_ref: Tensor,
    weight: float | Tensor,
    margin: float = 0.0,
    power: int = 2,
    scale: str = "relative",
    floor: float | None = None,
    floor_weight: Tensor | None = None,
) -> LossOutput:
    """Hinge penalty on velocity-norm inflation over the reference (and, with a floor, on deflation
    under it), with its metrics and the per-sample ratios it measured.

    Args:
        v_theta: ``(B, *D)`` policy velocity.
        v_ref: same shape; the frozen reference velocity at the same (x, sigma, c). It is
            detached here, so callers may pass it with or without ``no_grad``.
        weight: lambda >= 0. ``0`` still returns the metrics, and a zero loss. A ``(B,)`` tensor
            gives each sample its own multiplier (``mode: constraint``: the multiplier of the
            sample's sigma bin); ``penalty`` then stays the unweighted mean.
        margin: relative slack >= 0: the hinge starts at ``(1 + margin) * ||v_ref||``.
        power: 1 (L1 hinge) or 2 (squared hinge).
        scale: ``"relative"`` (excess measured in units of ``||v_ref||``) or ``"absolute"``.
        floor, floor_weight: the constraint mode's optional lower side (``normguard.floor``): when
            both are given, the mirrored hinge ``mean_b floor_weight_b relu(floor - n_theta_b /
            n_ref_b)^power`` is added, pushing a sample whose ratio fell under the floor back up with
            its own ``(B,)`` multipliers.

    Returns:
        LossOutput with ``loss = weight * penalty`` (+ the floor term), ``norm_ratio`` the detached
        ``(B,)`` ratios ``||v_theta|| / ||v_ref||``, and metrics ``normguard/penalty`` (before the
        weight), ``normguard/active_frac``, ``normguard/ratio_mean``, ``normguard/ratio_p95``,
        ``normguard/ratio_max`` (and ``normguard/floor_active_frac``).
    """
    _check(v_theta, v_ref, weight, margin, power, scale)
    n_theta = velocity_norm(v_theta.float())  # (B,)
    n_ref = velocity_norm(v_ref.detach().float())
    ratio = norm_ratio(n_theta, n_ref)  # (B,), differentiable in v_theta (the floor's force)
    threshold = (1.0 + margin) * n_ref
    if scale == "relative":
        excess = torch.relu(norm_ratio(n_theta - threshold, n_ref))
    else:
        excess = torch.relu(n_theta - threshold)
    per_sample = excess.pow(power)  # (B,)
    penalty = per_sample.mean()
    if isinstance(weight, Tensor):
        if weight.shape != per_sample.shape:
            raise ValueError(
                f"a per-sample weight must have shape {tuple(per_sample.shape)}, got {tuple(weight.shape)}"
            )
        weighted = (weight.detach().to(per_sample) * per_sample).mean()
    else:
        weighted = weight * penalty
    with torch.no_grad():
        measured = ratio.detach().flatten()
        metrics = {
            "normguard/penalty": penalty.detach(),
            "normguard/active_frac": (n_theta > threshold).float().mean(),
            "normguard/ratio_mean": measured.mean(),
            "normguard/ratio_p95": torch.quantile(measured, 0.95),
            "normguard/ratio_max": measured.max(),
        }
    if floor is not None and floor_weight is not None:
        short = torch.relu(floor - ratio)
        weighted = weighted + (floor_weight.detach().to(short) * short.pow(power)).mean()
        metrics["normguard/floor_active_frac"] = (short > 0).float().mean().detach()
    return LossOutput(loss=weighted, metrics=metrics, norm_ratio=measured)
