"""NormGuard: a one-sided hinge on the per-sample velocity norm against the frozen reference.

Definition (this project's contribution; see README "The math")::

    n_theta_b = ||v_theta(x_b, sigma_b, c_b)||_2          (norm over all non-batch dims)
    n_ref_b   = ||v_ref(x_b, sigma_b, c_b)||_2             (frozen reference, no_grad)
    excess_b  = relu(n_theta_b - (1 + margin) * n_ref_b)   (absolute scale)
             or relu(n_theta_b / n_ref_b - (1 + margin))   (relative scale, the default)
    penalty   = weight * mean_b excess_b ** power

It is exactly zero, with exactly zero gradient, wherever the policy norm is at or below the
threshold, so it never pulls a deflating model up and leaves the base objective untouched there.
Above the threshold its gradient w.r.t. ``v_theta`` is parallel to ``v_theta`` (d||v||/dv =
v / ||v||), so a gradient step shrinks the magnitude without rotating the direction.

The relative scale divides by the reference norm, which makes ``weight`` transferable between a
64-dim digit and a 16x128x128 SD3 latent (absolute excesses grow like sqrt(D)); the zero set and
gradient direction are the same in both scales.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normguard_core.metrics import velocity_norm
from normguard_core.types import LossOutput

__all__ = ["normguard_penalty"]

_EPS = 1e-12  # guards the division by a zero reference norm (only reachable with zero inputs)


def normguard_penalty(
    *,
    v_theta: Tensor,
    v_ref: Tensor,
    weight: float | Tensor,
    margin: float = 0.0,
    power: int = 2,
    scale: str = "relative",
    has_step_dim: bool = False,
    step_reduction: str = "mean",
    floor: float | None = None,
    floor_weight: Tensor | None = None,
) -> LossOutput:
    """Hinge penalty on velocity-norm inflation over the reference, with its metrics.

    Args:
        v_theta: ``(B, *D)`` policy velocity, or ``(T, B, *D)`` with ``has_step_dim``.
        v_ref: same shape; the frozen reference velocity at the same (x, sigma, c). It is
            detached here, so callers may pass it with or without ``no_grad``.
        weight: lambda >= 0. ``0`` still returns the metrics, and a zero loss. A ``(B,)`` tensor
            gives each sample its own multiplier (``mode: constraint``: the multiplier of the
            sample's sigma bin); ``penalty`` then stays the unweighted mean.
        margin: relative slack >= 0: the hinge starts at ``(1 + margin) * ||v_ref||``.
        power: 1 (L1 hinge) or 2 (squared hinge).
        scale: ``"relative"`` (excess measured in units of ``||v_ref||``) or ``"absolute"``.
        has_step_dim: the leading dim of the inputs indexes sampling steps.
        step_reduction: with ``has_step_dim``: ``"mean"`` or ``"sum"`` over steps (the batch is
            always averaged).
        floor, floor_weight: the constraint mode's optional lower side (``normguard.floor``): the
            mirrored hinge ``mean_b floor_weight_b relu(floor - n_theta_b / n_ref_b)^power`` is added,
            pushing a bin whose mean ratio fell under the floor back up with its own ``(B,)``
            multipliers. Only without ``has_step_dim``.

    Returns:
        LossOutput with ``loss = weight * penalty`` (+ the floor term) and metrics
        ``normguard/penalty`` (before the weight), ``normguard/active_frac``, ``normguard/ratio_mean``,
        ``normguard/ratio_p95``, ``normguard/ratio_max`` (and ``normguard/floor_active_frac``).
    """
    if v_theta.shape != v_ref.shape:
        raise ValueError(f"v_theta {tuple(v_theta.shape)} and v_ref {tuple(v_ref.shape)} differ")
    if bool((torch.as_tensor(weight) < 0).any()) or margin < 0:
        raise ValueError(f"weight and margin must be >= 0, got weight={weight}, margin={margin}")
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power}")
    if scale not in ("relative", "absolute"):
        raise ValueError(f"scale must be 'relative' or 'absolute', got {scale!r}")
    if step_reduction not in ("mean", "sum"):
        raise ValueError(f"step_reduction must be 'mean' or 'sum', got {step_reduction!r}")
    batch_dims = 2 if has_step_dim else 1

    n_theta = velocity_norm(v_theta.float(), batch_dims=batch_dims)  # (B,) or (T, B)
    n_ref = velocity_norm(v_ref.detach().float(), batch_dims=batch_dims)
    threshold = (1.0 + margin) * n_ref
    if scale == "relative":
        excess = torch.relu((n_theta - threshold) / (n_ref + _EPS))
    else:
        excess = torch.relu(n_theta - threshold)
    per_sample = excess.pow(power)  # (B,) or (T, B)
    if has_step_dim:
        per_step = per_sample.mean(dim=1)  # (T,)
        penalty = per_step.mean() if step_reduction == "mean" else per_step.sum()
    else:
        penalty = per_sample.mean()

    if isinstance(weight, Tensor):
        if has_step_dim or weight.shape != per_sample.shape:
            raise ValueError(
                f"a per-sample weight must have shape {tuple(per_sample.shape)}, got {tuple(weight.shape)}"
            )
        weighted = (weight.detach().to(per_sample) * per_sample).mean()
    else:
        weighted = weight * penalty
    with torch.no_grad():
        ratio = (n_theta / (n_ref + _EPS)).flatten()
        metrics = {
            "normguard/penalty": penalty.detach(),
            "normguard/active_frac": (n_theta > threshold).float().mean(),
            "normguard/ratio_mean": ratio.mean(),
            "normguard/ratio_p95": torch.quantile(ratio, 0.95),
            "normguard/ratio_max": ratio.max(),
        }
    if floor is not None and floor_weight is not None:
        if has_step_dim:
            raise ValueError("the floor term takes per-sample inputs (has_step_dim=False)")
        short = torch.relu(floor - n_theta / (n_ref + _EPS))
        weighted = weighted + (floor_weight.detach().to(short) * short.pow(power)).mean()
        metrics["normguard/floor_active_frac"] = (short > 0).float().mean().detach()
    return LossOutput(loss=weighted, metrics=metrics)
