"""Forensic realism: any transformers image-classification checkpoint of real vs generated.

The score is P(real): the softmax probability of the label whose name is ``real_label``
(default: the first label containing "real", case-insensitive).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from services.hub import load_pretrained_checked
from services.rewards.base import validate_images

__all__ = ["RealismDetector"]


class RealismDetector:
    """P(real) from an ``AutoModelForImageClassification`` real-vs-generated detector."""

    def __init__(
        self,
        name: str,
        path: str | None,
        *,
        device: str | torch.device = "cpu",
        real_label: str | None = None,
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.name, self.batch_size = name, batch_size
        self.device = torch.device(device)
        self.model = load_pretrained_checked(AutoModelForImageClassification, path, what=name).to(self.device).eval()
        self.processor = load_pretrained_checked(AutoImageProcessor, path, what=name)
        labels = {int(k): v for k, v in self.model.config.id2label.items()}
        if real_label is None:
            matches = [i for i, v in labels.items() if "real" in v.lower()]
        else:
            matches = [i for i, v in labels.items() if v == real_label]
        if not matches:
            raise ValueError(f"{name}: no label for real images among {labels}; set options.real_label")
        self.real_index = matches[0]

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            imgs = [img for img in (images[i : i + self.batch_size].clamp(0, 1) * 255).round().byte().cpu()]
            inputs = self.processor(images=imgs, return_tensors="pt").to(self.device)
            probs = self.model(**inputs).logits.float().softmax(dim=-1)
            out.append(probs[:, self.real_index].cpu())
        return torch.cat(out)


def _realism(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> RealismDetector:
    return RealismDetector("realism_detector", path, device=device, **options)
