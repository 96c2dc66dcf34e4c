"""The LAION aesthetic predictor: an MLP head over L2-normalised CLIP ViT-L/14 image embeddings.

Layout as published in christophschuhmann/improved-aesthetic-predictor (``simple_inference.py``'s
``MLP``; the weights ``sac+logos+ava1-l14-linearMSE.pth`` are a plain state dict): ``layers`` is an
``nn.Sequential`` of Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
Linear(64, 16), Linear(16, 1), so the keys are ``layers.{0,2,4,6,7}.{weight,bias}``. The score is the
head's output on ``clip.get_image_features(x) / ||.||`` (about 1..10 on real images), the reward
flow_grpo's ``aesthetic_score`` trains on.

``path``: the head's file (``.pth`` read with ``weights_only=True``, or ``.safetensors``);
``options: {clip: <a transformers CLIP directory or hub id, openai/clip-vit-large-patch14>}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from services.hub import load_pretrained_checked
from services.rewards.base import features_tensor, load_state_file, validate_images

__all__ = ["AestheticHead", "AestheticScorer"]


class AestheticHead(nn.Module):
    """improved-aesthetic-predictor's MLP (its key layout; dropout is inert in eval mode)."""

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: Tensor) -> Tensor:
        return self.layers(emb)


class AestheticScorer:
    """``head(normalise(CLIP image embedding))`` per image (the prompt is not read)."""

    def __init__(
        self,
        name: str,
        path: str | None,
        *,
        clip: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        from transformers import CLIPImageProcessor, CLIPModel

        if not path or not clip:
            raise ValueError(
                f"{name}: needs path= the head's .pth / .safetensors and options: {{clip: <CLIP ViT-L/14>}}"
            )
        self.name, self.batch_size, self.device = name, batch_size, torch.device(device)
        self.clip = load_pretrained_checked(CLIPModel, clip, what=f"{name} CLIP").to(self.device).eval()
        self.processor = load_pretrained_checked(CLIPImageProcessor, clip, what=f"{name} processor")
        self.head = AestheticHead(self.clip.config.projection_dim)
        missing, unexpected = self.head.load_state_dict(load_state_file(path, what=name), strict=False)
        if missing or unexpected:
            raise KeyError(f"{name}: {path} is not the aesthetic head's layout: missing {missing}, extra {unexpected}")
        self.head.to(self.device).eval()

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            imgs = list((images[i : i + self.batch_size].clamp(0, 1) * 255).round().byte().cpu())
            pixels = self.processor(images=imgs, return_tensors="pt")["pixel_values"].to(self.device)
            emb = self.clip.get_image_features(pixel_values=pixels)
            emb = features_tensor(emb)
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out.append(self.head(emb.float()).squeeze(-1).cpu())
        return torch.cat(out)


def _laion_aesthetic(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> AestheticScorer:
    return AestheticScorer("laion_aesthetic", path, device=device, **options)
