"""The reward-scorer protocol, input validation, the registry and weighted combination.

Protocol: ``score(images, prompts) -> (B,) float32`` with ``images`` a ``(B, 3, H, W)`` float
tensor in [0, 1]. Scorers are batched, device-aware and deterministic in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["RewardScorer", "available_scorers", "build_scorer", "combine_scores", "register_scorer", "validate_images"]


@runtime_checkable
class RewardScorer(Protocol):
    """Anything with a name and ``score(images (B, 3, H, W) in [0, 1], prompts) -> (B,)``."""

    name: str

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


def validate_images(images: Tensor, prompts: Sequence[str], *, scorer: str) -> None:
    """Raise a ValueError naming the expected shape when the batch is malformed."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{scorer}: images must be a (B, 3, H, W) float tensor in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{scorer}: images must be float in [0, 1], got dtype {images.dtype}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{scorer}: {images.shape[0]} images but {len(prompts)} prompts")


ScorerFactory = Callable[..., RewardScorer]
_SCORERS: dict[str, ScorerFactory] = {}


def register_scorer(name: str) -> Callable[[ScorerFactory], ScorerFactory]:
    """Register a factory ``(path=None, device='cpu', **options) -> RewardScorer``."""

    def deco(factory: ScorerFactory) -> ScorerFactory:
        if name in _SCORERS:
            raise ValueError(f"scorer {name!r} is already registered")
        _SCORERS[name] = factory
        return factory

    return deco


def available_scorers() -> list[str]:
    """Sorted registered scorer names."""
    _import_builtin()
    return sorted(_SCORERS)


def build_scorer(
    name: str, *, path: str | None = None, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None
) -> RewardScorer:
    """Instantiate a registered scorer; an unknown name lists the known ones."""
    _import_builtin()
    if name not in _SCORERS:
        raise KeyError(f"unknown scorer {name!r}; known scorers: {available_scorers()}")
    return _SCORERS[name](path=path, device=device, **dict(options or {}))


def combine_scores(scores: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``sum_k w_k * s_k`` over the named ``(B,)`` scores."""
    missing = sorted(set(weights) - set(scores))
    if missing:
        raise KeyError(f"no scores for {missing}; have {sorted(scores)}")
    return torch.stack([weights[k] * scores[k].float() for k in weights]).sum(dim=0)


def _import_builtin() -> None:
    from services.rewards import clip, digits, judges, realism  # noqa: F401  (registers)
