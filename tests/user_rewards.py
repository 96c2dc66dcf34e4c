"""A user's reward module outside the package, loaded by import path in tests (``impl: "user_rewards:..."``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class InkScorer:
    """Mean ink (dark pixels are 0 in digits images, so ink = 1 - mean intensity)... here: mean intensity."""

    def __init__(self, path: str | None = None, device: str = "cpu", scale: float = 1.0) -> None:
        self.name, self.scale = "ink", scale

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return (self.scale * images.float().mean(dim=(1, 2, 3))).cpu()


class InkRankInGroup:
    """Group-wise: 1 for the sample with the most ink in its prompt group, 0 otherwise."""

    groupwise = True

    def __init__(self, path: str | None = None, device: str = "cpu") -> None:
        self.name = "ink_rank"
        self.calls: list[Tensor] = []

    def score(self, images: Tensor, prompts: Sequence[str], group_ids: Tensor) -> Tensor:
        self.calls.append(group_ids.clone())
        ink = images.float().mean(dim=(1, 2, 3))
        out = torch.zeros(len(prompts))
        for g in torch.unique(group_ids):
            idx = torch.nonzero(group_ids == g).flatten()
            out[idx[ink[idx].argmax()]] = 1.0
        return out


class NotAScorer:
    def __init__(self, path: str | None = None, device: str = "cpu") -> None:
        pass


class TargetDigitScorer:
    """Rule-based, reads the prompt file's metadata: 1 for rows whose ``target`` equals the prompt's digit.

    Stands in for GenEval-style rewards whose rules come from the jsonl rows (objects to count).
    It records the metadata it was given, so a test can check what arrived."""

    seen: list = []

    def __init__(self, path: str | None = None, device: str = "cpu") -> None:
        self.name = "target_digit"

    def score(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict | None] | None = None) -> Tensor:
        TargetDigitScorer.seen.append(list(metadata) if metadata is not None else None)
        rows = metadata or [None] * len(prompts)
        return torch.tensor([float(r is not None and str(r.get("target")) == p[-1]) for p, r in zip(prompts, rows)])
