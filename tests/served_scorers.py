"""Scorers the reward-server tests deploy by import path (``impl: "served_scorers:..."``; ``tests/`` is on the
replicas' PYTHONPATH)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor


class MeanScorer:
    """The mean pixel value: cheap, deterministic, easy to recompute in the test."""

    def __init__(self, path: str | None = None, device: str = "cpu", delay_s: float = 0.0) -> None:
        self.name, self.delay_s = "mean", delay_s

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)  # a slow model: keeps a call in flight while a replica is killed
        return images.float().mean(dim=(1, 2, 3)).cpu()


class BatchSizeScorer:
    """Each image scores the size of the scorer call it was in: shows requests merged by ``serve.batch``."""

    def __init__(self, path: str | None = None, device: str = "cpu") -> None:
        self.name = "batch_size"

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        time.sleep(0.05)
        return torch.full((len(prompts),), float(len(prompts)))


class PromptLengthScorer:
    """Scores each prompt's length and the metadata's ``bonus`` field: checks both reach the scorer."""

    def __init__(self, path: str | None = None, device: str = "cpu") -> None:
        self.name = "prompt_length"

    def score(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict | None] | None = None) -> Tensor:
        bonus = [float((m or {}).get("bonus", 0.0)) for m in (metadata or [None] * len(prompts))]
        return torch.tensor([len(p) + b for p, b in zip(prompts, bonus)], dtype=torch.float32)


class QuantisedInk:
    """``digits_ink`` on the images a reward server sees (each pixel quantised to uint8, as its PNGs are): the
    in-process twin of a served ``digits_ink``, so the two runs' rewards can be compared exactly."""

    def __init__(self, path: str | None = None, device: str = "cpu") -> None:
        from services.rewards import build_scorer

        self.name, self.inner = "digits_ink", build_scorer("digits_ink", path=path, device=device)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        from services.rewards.wire import to_uint8

        return self.inner.score(to_uint8(images).float() / 255.0, prompts)
