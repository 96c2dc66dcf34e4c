"""Total objective = base loss + NormGuard (+ KL to the reference), by configuration (P7).

Any registered base loss gains NormGuard by passing ``normguard=NormGuardParams(...)``; there is
no subclass per (loss x regulariser). The NormGuard metrics (norm ratio, active fraction) are
computed whenever ``v_theta`` and ``v_ref`` are present, also with ``weight = 0``, so baselines
report the same inflation statistics; with ``weight = 0`` (or ``normguard=None``) the total loss
IS the base loss tensor (bit-identical value and gradient), not ``base + 0 * penalty``.

:func:`normguard_objective` is the same NormGuard term without a base loss (the constraint's probes
at sigmas no training point reached); both go through one call of ``normguard_penalty``, so the
term, its floor and its measured ratios are the same wherever NormGuard acts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from normguard_core.losses.normguard import normguard_penalty
from normguard_core.losses.registry import LossBatch, get_loss
from normguard_core.types import LossOutput

__all__ = ["NormGuardParams", "compose_objective", "normguard_objective"]


@dataclass(frozen=True)
class NormGuardParams:
    """Hyperparameters of :func:`normguard_penalty` (same names, same meaning). ``weight`` has no
    default here: the one default is the config's (``normguard.weight``, 0 = off)."""

    weight: float
    margin: float = 0.0
    power: int = 2
    scale: str = "relative"
    floor: float | None = None  # constraint mode's optional lower side: a hinge on ratio < floor


def _normguard_term(batch: LossBatch, normguard: NormGuardParams | None, *, active: bool) -> LossOutput:
    """The one NormGuard call: weighted by ``batch.normguard_weight`` when given (constraint mode),
    else by ``normguard.weight``; the floor only when ``active``."""
    weight = normguard.weight if normguard is not None else 0.0
    if normguard is not None and batch.normguard_weight is not None:
        weight = batch.normguard_weight
    return normguard_penalty(
        v_theta=batch.v_theta,
        v_ref=batch.v_ref,
        weight=weight,
        margin=normguard.margin if normguard is not None else 0.0,
        power=normguard.power if normguard is not None else 2,
        scale=normguard.scale if normguard is not None else "relative",
        floor=normguard.floor if active else None,
        floor_weight=batch.floor_weight,
    )


def _is_active(batch: LossBatch, normguard: NormGuardParams | None) -> bool:
    return normguard is not None and (normguard.weight > 0 or batch.normguard_weight is not None)


def normguard_objective(batch: LossBatch, *, normguard: NormGuardParams) -> LossOutput:
    """The NormGuard term alone (its upper hinge and, with ``normguard.floor`` and
    ``batch.floor_weight``, its floor): no base loss, no KL.

    Args:
        batch: ``v_theta`` and ``v_ref`` ``(B, *D)``, and in constraint mode the ``(B,)``
            ``normguard_weight`` / ``floor_weight`` of each point's sigma bin.
        normguard: the hyperparameters; the term must be active (``weight > 0`` or per-point weights).

    Returns:
        LossOutput with the weighted term as ``loss`` and ``terms["normguard"]``, the NormGuard
        metrics and the measured ``norm_ratio``.
    """
    if batch.v_theta is None or batch.v_ref is None:
        raise ValueError(f"NormGuard needs v_theta and v_ref in the batch; it carries {batch.present()}")
    if not _is_active(batch, normguard):
        raise ValueError("normguard_objective needs an active term: weight > 0 or per-point normguard_weight")
    ng = _normguard_term(batch, normguard, active=True)
    return LossOutput(loss=ng.loss, metrics=ng.metrics, terms={"normguard": ng.loss}, norm_ratio=ng.norm_ratio)


def compose_objective(
    loss_name: str,
    batch: LossBatch,
    *,
    loss_kwargs: Mapping[str, Any] | None = None,
    normguard: NormGuardParams | None = None,
    kl_weight: float = 0.0,
) -> LossOutput:
    """Compute ``base + lambda * NormGuard + kl_weight * KL`` for one batch.

    Args:
        loss_name: a registered base loss (``available_losses()``).
        batch: the shared training points; NormGuard and KL need ``v_theta`` and ``v_ref``.
        loss_kwargs: hyperparameters of the base loss.
        normguard: NormGuard hyperparameters, or ``None`` for no penalty.
        kl_weight: weight of the velocity-space KL ``mean_b kl_scale_b * mean_D (v_theta - v_ref)^2``
            (``kl_scale`` from the batch, 1 when absent). With ``kl_scale = 1`` it is the KL of
            DiffusionNFT (``train.beta``) and AWM (``kl_weight='Uniform'``); a method whose KL is
            sigma-dependent (Flow-GRPO, AWM ``ELBO``) supplies its per-sample scale.

    Returns:
        LossOutput with the total as ``loss``; when NormGuard is active, ``terms["normguard"]``
        (its weighted term) and ``terms["rest"]`` (base + KL; ``loss`` is their sum); metrics
        ``loss/total``, ``loss/base``, the base loss's metrics, the NormGuard metrics when ``v_ref``
        is present, and ``loss/kl`` when ``kl_weight > 0``; ``norm_ratio`` (the ``(B,)`` ratios
        NormGuard measured) when ``v_ref`` is present.
    """
    base = get_loss(loss_name)(batch, **dict(loss_kwargs or {}))
    total = base.loss
    metrics = dict(base.metrics)
    metrics["loss/base"] = base.loss.detach()
    terms: dict[str, Tensor] = {}
    has_ref = batch.v_theta is not None and batch.v_ref is not None
    active = _is_active(batch, normguard)
    if active and not has_ref:
        raise ValueError(f"NormGuard needs v_theta and v_ref in the batch; it carries {batch.present()}")
    ratio = None
    if has_ref:
        ng = _normguard_term(batch, normguard, active=active)
        metrics.update(ng.metrics)
        ratio = ng.norm_ratio
        if active:
            terms["normguard"] = ng.loss
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    if kl_weight > 0:
        total = total + kl_weight * _kl(batch, metrics)
    if "normguard" in terms:
        terms["rest"] = total
        total = total + terms["normguard"]
    metrics["loss/total"] = total.detach()
    return LossOutput(loss=total, metrics=metrics, terms=terms, norm_ratio=ratio)


def _kl(batch: LossBatch, metrics: dict[str, Tensor]) -> Tensor:
    """``mean_b kl_scale_b * mean_D (v_theta - sg(v_ref))^2``; logs ``loss/kl``."""
    if batch.v_theta is None or batch.v_ref is None:
        raise ValueError(f"the KL term needs v_theta and v_ref; the batch carries {batch.present()}")
    dims = tuple(range(1, batch.v_theta.ndim))
    per_sample = (batch.v_theta - batch.v_ref.detach()).pow(2).mean(dim=dims)  # (B,)
    if batch.kl_scale is not None:
        per_sample = per_sample * batch.kl_scale.to(per_sample.dtype)
    kl = per_sample.mean()
    metrics["loss/kl"] = kl.detach()
    return kl
