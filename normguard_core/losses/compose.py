"""Total objective = base loss + NormGuard (+ KL to the reference), by configuration (P7).

Any base loss (a function of its typed batch) gains NormGuard by passing ``normguard=NormGuardParams(...)``;
there is no subclass per (loss x regulariser). The NormGuard metrics (norm ratio, active fraction) are
computed whenever a :class:`~normguard_core.losses.batches.Reference` is given, also with ``weight = 0``, so baselines
report the same inflation statistics; with ``weight = 0`` (or ``normguard=None``) the total loss
IS the base loss tensor (bit-identical value and gradient), not ``base + 0 * penalty``.

:func:`normguard_objective` is the same NormGuard term without a base loss (the constraint's probes
at sigmas no training point reached); both go through one call of ``normguard_penalty``, so the
term, its floor and its measured ratios are the same wherever NormGuard acts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import Tensor

from normguard_core.losses.batches import BinWeights, Reference
from normguard_core.losses.normguard import normguard_penalty
from normguard_core.types import LossOutput

__all__ = ["NormGuardParams", "compose_objective", "normguard_objective"]

B = TypeVar("B")


@dataclass(frozen=True)
class NormGuardParams:
    """Hyperparameters of :func:`normguard_penalty` (same names, same meaning). ``weight`` has no
    default here: the one default is the config's (``normguard.weight``, 0 = off)."""

    weight: float
    margin: float = 0.0
    power: int = 2
    scale: str = "relative"
    floor: float | None = None  # constraint mode's optional lower side: a hinge on ratio < floor


def _normguard_term(
    v_theta: Tensor, v_ref: Tensor, bins: BinWeights | None, normguard: NormGuardParams | None, *, active: bool
) -> LossOutput:
    """The one NormGuard call: weighted by ``bins.normguard`` when given (constraint mode), else by
    ``normguard.weight``; the floor only when ``active``."""
    weight: float | Tensor = normguard.weight if normguard is not None else 0.0
    if normguard is not None and bins is not None:
        weight = bins.normguard
    return normguard_penalty(
        v_theta=v_theta,
        v_ref=v_ref,
        weight=weight,
        margin=normguard.margin if normguard is not None else 0.0,
        power=normguard.power if normguard is not None else 2,
        scale=normguard.scale if normguard is not None else "relative",
        floor=normguard.floor if active and normguard is not None else None,
        floor_weight=bins.floor if bins is not None else None,
    )


def _is_active(bins: BinWeights | None, normguard: NormGuardParams | None) -> bool:
    return normguard is not None and (normguard.weight > 0 or bins is not None)


def normguard_objective(
    *, v_theta: Tensor, v_ref: Tensor, bins: BinWeights | None, normguard: NormGuardParams
) -> LossOutput:
    """The NormGuard term alone (its upper hinge and, with ``normguard.floor`` and ``bins.floor``, its
    floor): no base loss, no KL.

    Args:
        v_theta, v_ref: ``(B, *D)`` policy and reference velocities.
        bins: in constraint mode the ``(B,)`` multipliers of each point's sigma bin, else ``None``.
        normguard: the hyperparameters; the term must be active (``weight > 0`` or per-point weights).

    Returns:
        LossOutput with the weighted term as ``loss`` and ``terms["normguard"]``, the NormGuard
        metrics and the measured ``norm_ratio``.
    """
    if not _is_active(bins, normguard):
        raise ValueError("normguard_objective needs an active term: weight > 0 or per-point bin weights")
    ng = _normguard_term(v_theta, v_ref, bins, normguard, active=True)
    return LossOutput(loss=ng.loss, metrics=ng.metrics, terms={"normguard": ng.loss}, norm_ratio=ng.norm_ratio)


def compose_objective(
    loss: Callable[[B], LossOutput],
    batch: B,
    reference: Reference | None,
    *,
    normguard: NormGuardParams | None = None,
    kl_weight: float = 0.0,
) -> LossOutput:
    """Compute ``base + lambda * NormGuard + kl_weight * KL`` for one micro-batch.

    Args:
        loss: the base loss, a function of its typed batch (a method's ``loss``, hyperparameters bound).
        batch: the micro-batch that loss reads (``normguard_core.losses.batches``).
        reference: the frozen reference at the same points (NormGuard and the KL read it), or ``None``
            when nothing reads it.
        normguard: NormGuard hyperparameters, or ``None`` for no penalty.
        kl_weight: weight of the velocity-space KL ``mean_b kl_scale_b * mean_D (v_theta - v_ref)^2``.
            With ``kl_scale = 1`` it is the KL of DiffusionNFT (``train.beta``) and AWM
            (``kl_weight='Uniform'``); a method whose KL is sigma-dependent (Flow-GRPO, AWM ``ELBO``)
            supplies its per-point scale.

    Returns:
        LossOutput with the total as ``loss``; when NormGuard is active, ``terms["normguard"]``
        (its weighted term) and ``terms["rest"]`` (base + KL; ``loss`` is their sum); metrics
        ``loss/total``, ``loss/base``, the base loss's metrics, the NormGuard metrics when a reference
        is given, and ``loss/kl`` when ``kl_weight > 0``; ``norm_ratio`` (the ``(B,)`` ratios NormGuard
        measured) when a reference is given.
    """
    base = loss(batch)
    total = base.loss
    metrics = dict(base.metrics)
    metrics["loss/base"] = base.loss.detach()
    terms: dict[str, Tensor] = {}
    bins = reference.bins if reference is not None else None
    active = _is_active(bins, normguard)
    if active and reference is None:
        raise ValueError("NormGuard needs the reference velocity v_ref at the batch's points")
    ratio = None
    if reference is not None:
        ng = _normguard_term(reference.v_theta, reference.v_ref, bins, normguard, active=active)
        metrics.update(ng.metrics)
        ratio = ng.norm_ratio
        if active:
            terms["normguard"] = ng.loss
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0, got {kl_weight}")
    if kl_weight > 0:
        if reference is None:
            raise ValueError("the KL term needs the reference velocity v_ref at the batch's points")
        total = total + kl_weight * _kl(reference, metrics)
    if "normguard" in terms:
        terms["rest"] = total
        total = total + terms["normguard"]
    metrics["loss/total"] = total.detach()
    return LossOutput(loss=total, metrics=metrics, terms=terms, norm_ratio=ratio)


def _kl(ref: Reference, metrics: dict[str, Tensor]) -> Tensor:
    """``mean_b kl_scale_b * mean_D (v_theta - sg(v_ref))^2``; logs ``loss/kl``."""
    dims = tuple(range(1, ref.v_theta.ndim))
    per_sample = (ref.v_theta - ref.v_ref.detach()).pow(2).mean(dim=dims)  # (B,)
    per_sample = per_sample * ref.kl_scale.to(per_sample.dtype)
    kl = per_sample.mean()
    metrics["loss/kl"] = kl.detach()
    return kl
