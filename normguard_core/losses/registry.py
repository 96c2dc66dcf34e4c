"""Explicit, fail-fast loss registry (P8).

Each loss is a pure function with keyword-only tensor arguments returning a ``LossOutput``.
It registers the batch fields it needs (``required``) and may read (``optional``); a
``LossBatch`` is validated against them before any compute, and a missing field names the
loss, the field and what the batch does carry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from normguard_core.types import LossOutput

__all__ = ["LossBatch", "LossSpec", "available_losses", "compute_loss", "get_loss", "register_loss"]


@dataclass(frozen=True)
class LossBatch:
    """Everything a base loss may need, evaluated at shared training points.

    All per-sample tensors share the batch size B; ``*D`` is the per-sample data shape.

    Attributes:
        v_theta: ``(B, *D)`` current policy velocity (carries grad).
        v_ref: ``(B, *D)`` frozen reference velocity at the same points (no grad).
        v_old: ``(B, *D)`` sampling-policy ("old") velocity at the same points (no grad).
        x0: ``(B, *D)`` clean samples (the rollout's final latents).
        noise: ``(B, *D)`` the eps used to build ``x_sigma``.
        sigma: ``(B,)`` training sigmas.
        advantages: ``(B,)`` group-normalised advantages.
        reward_prob: ``(B,)`` rewards mapped to [0, 1] (DiffusionNFT's optimality probability).
        log_prob: ``(B,)`` policy log-prob of the taken SDE step (Flow-GRPO; carries grad).
        old_log_prob: ``(B,)`` the same under the sampling policy (no grad).
        winners: ``(P,)`` long indices of preferred samples (Flow-DPO).
        losers: ``(P,)`` long indices of rejected samples, paired with ``winners``.
        v_ema: ``(B, *D)`` velocity of a lagged EMA copy of the policy (AWM's EMA-KL; no grad).
        kl_scale: ``(B,)`` per-sample weight of the KL term (a method's sigma-dependent KL form,
            e.g. Flow-GRPO's ``1 / (2 std_t^2)`` in velocity terms); ``None`` means 1.
        mean: ``(B, *D)`` current-policy SDE mean of the taken step (GRPO-Guard; carries grad).
        old_mean: ``(B, *D)`` the sampling policy's SDE mean at the same state (GRPO-Guard).
        step_std: ``(B,)`` the SDE step std ``std_t sqrt(-dt)`` (GRPO-Guard).
        normguard_weight: ``(B,)`` per-point NormGuard multipliers (``mode: constraint``: one per
            sigma bin); ``None`` uses the scalar weight of ``NormGuardParams``.
        floor_weight: ``(B,)`` per-point multipliers of the constraint's lower side
            (``NormGuardParams.floor``), or ``None``.
    """

    v_theta: Tensor | None = None
    v_ref: Tensor | None = None
    v_old: Tensor | None = None
    x0: Tensor | None = None
    noise: Tensor | None = None
    sigma: Tensor | None = None
    advantages: Tensor | None = None
    reward_prob: Tensor | None = None
    log_prob: Tensor | None = None
    old_log_prob: Tensor | None = None
    winners: Tensor | None = None
    losers: Tensor | None = None
    v_ema: Tensor | None = None
    kl_scale: Tensor | None = None
    mean: Tensor | None = None
    old_mean: Tensor | None = None
    step_std: Tensor | None = None
    normguard_weight: Tensor | None = None
    floor_weight: Tensor | None = None

    def present(self) -> list[str]:
        """Names of the fields that are set."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


LossFn = Callable[..., LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function and the batch fields it reads."""

    name: str
    fn: LossFn
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    def validate(self, batch: LossBatch) -> None:
        """Raise ``ValueError`` naming every missing required field."""
        missing = [f for f in self.required if getattr(batch, f) is None]
        if missing:
            raise ValueError(f"loss {self.name!r} needs batch fields {missing}; the batch carries {batch.present()}")

    def __call__(self, batch: LossBatch, **hparams: Any) -> LossOutput:
        """Validate ``batch`` and call the loss with its fields as keyword arguments."""
        self.validate(batch)
        tensors = {f: getattr(batch, f) for f in self.required}
        tensors.update({f: getattr(batch, f) for f in self.optional if getattr(batch, f) is not None})
        return self.fn(**tensors, **hparams)


_LOSSES: dict[str, LossSpec] = {}
_BATCH_FIELDS = frozenset(f.name for f in fields(LossBatch))


def register_loss(
    name: str, *, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Callable[[LossFn], LossFn]:
    """Decorator registering ``fn`` under ``name``; unknown field names fail at import."""

    def decorator(fn: LossFn) -> LossFn:
        unknown = sorted(set(required + optional) - _BATCH_FIELDS)
        if unknown:
            raise ValueError(f"loss {name!r} declares unknown batch fields {unknown}")
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = LossSpec(name=name, fn=fn, required=required, optional=optional)
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name; the error lists the known names."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; known losses: {available_losses()}") from None


def available_losses() -> list[str]:
    """Sorted names of the registered losses."""
    return sorted(_LOSSES)


def compute_loss(name: str, batch: LossBatch, **hparams: Any) -> LossOutput:
    """Validate and compute the registered loss ``name`` on ``batch``."""
    return get_loss(name)(batch, **hparams)
