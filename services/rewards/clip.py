"""CLIP-preference scorers (PickScore, HPSv2-style) through transformers' CLIPModel.

PickScore (Kirstain et al., 2023, arXiv:2305.01569): ``logit_scale.exp() * cos(img, txt)``.
HPSv2 (Wu et al., 2023, arXiv:2306.09341): the cosine of image and prompt embeddings of a
fine-tuned CLIP. Both load a CLIPModel + processor from a local directory or hub id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from services.rewards.base import register_scorer, validate_images

__all__ = ["CLIPPreferenceScorer", "load_pretrained_checked"]


def load_pretrained_checked(loader, path: str | None, *, what: str, **kwargs):
    """``loader.from_pretrained(path)`` with a clear error for a missing local path."""
    if not path:
        raise ValueError(f"{what}: needs path= (a local directory or hub id)")
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    if looks_local and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{what}: checkpoint path does not exist: {path}")
    return loader.from_pretrained(str(Path(path).expanduser()) if looks_local else path, **kwargs)


class CLIPPreferenceScorer:
    """Scaled cosine between CLIP image and prompt embeddings."""

    def __init__(
        self,
        name: str,
        path: str | None,
        *,
        device: str | torch.device = "cpu",
        use_logit_scale: bool = True,
        batch_size: int = 32,
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.name, self.batch_size, self.use_logit_scale = name, batch_size, use_logit_scale
        self.device = torch.device(device)
        self.model = load_pretrained_checked(CLIPModel, path, what=name).to(self.device).eval()
        self.processor = load_pretrained_checked(CLIPProcessor, path, what=name)

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            imgs = [img for img in (images[i : i + self.batch_size].clamp(0, 1) * 255).round().byte().cpu()]
            inputs = self.processor(
                text=list(prompts[i : i + self.batch_size]),
                images=imgs,
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(self.device)
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            img = getattr(img, "pooler_output", img)  # transformers v5 returns a model output
            txt = getattr(txt, "pooler_output", txt)
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
            scale = self.model.logit_scale.exp() if self.use_logit_scale else 1.0
            out.append((scale * cos).float().cpu())
        return torch.cat(out)


@register_scorer("pickscore")
def _pickscore(path: str | None = None, device: str | torch.device = "cpu", **options) -> CLIPPreferenceScorer:
    return CLIPPreferenceScorer("pickscore", path, device=device, use_logit_scale=True, **options)


@register_scorer("hpsv2")
def _hpsv2(path: str | None = None, device: str | torch.device = "cpu", **options) -> CLIPPreferenceScorer:
    return CLIPPreferenceScorer("hpsv2", path, device=device, use_logit_scale=False, **options)


class GroupRankScorer:
    """Group-wise: each sample's rank within its prompt group by a CLIP-preference model, in [0, 1].

    The worst sample of a group scores 0 and the best 1 (ties share their mean rank; a group of one
    scores 0.5). A rank is invariant to the preference model's scale and offset, which drift between
    prompts; as a reward it turns any CLIP-style scorer into a within-group preference.
    """

    groupwise = True

    def __init__(self, inner: CLIPPreferenceScorer, name: str = "clip_group_rank") -> None:
        self.inner, self.name = inner, name

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str], group_ids: Tensor) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        if group_ids.shape != (len(prompts),):
            raise ValueError(f"{self.name}: group_ids must be ({len(prompts)},), got {tuple(group_ids.shape)}")
        raw = self.inner.score(images, prompts)  # (B,)
        out = torch.empty_like(raw)
        for g in torch.unique(group_ids):
            idx = torch.nonzero(group_ids == g).flatten()
            r = raw[idx]
            below = (r[:, None] > r[None, :]).sum(1).float()
            ties = (r[:, None] == r[None, :]).sum(1).float() - 1
            out[idx] = (below + 0.5 * ties) / (len(idx) - 1) if len(idx) > 1 else torch.full_like(r, 0.5)
        return out


@register_scorer("clip_group_rank")
def _clip_group_rank(path: str | None = None, device: str | torch.device = "cpu", **options) -> GroupRankScorer:
    return GroupRankScorer(CLIPPreferenceScorer("clip_group_rank", path, device=device, **options))
