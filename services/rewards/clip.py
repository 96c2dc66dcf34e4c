"""CLIP-preference scorers (PickScore, HPSv2-style) through transformers' CLIPModel.

PickScore (Kirstain et al., 2023, arXiv:2305.01569): ``logit_scale.exp() * cos(img, txt)``.
HPSv2 (Wu et al., 2023, arXiv:2306.09341): the cosine of image and prompt embeddings of a
fine-tuned CLIP.

Checkpoint layouts, as published:

* a transformers ``CLIPModel`` directory (``yuvalkirstain/PickScore_v1``). PickScore_v1 ships without
  its processor, which lives in ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``: pass
  ``options: {processor_path: <that directory>}``.
* an open_clip state dict, the only form HPSv2 / HPSv2.1 are published in (``HPS_v2_compressed.pt``,
  ``HPS_v2.1_compressed.pt``: ``{"state_dict": ...}`` of open_clip's ``ViT-H-14``): ``path`` is the
  file (or a directory holding one ``.pt``) and ``options: {base: <a transformers CLIP directory of the
  same architecture>}`` gives the config and the processor (the laion ViT-H-14 repository's
  ``config.json`` and tokenizer / preprocessor files; its weights are not read). The keys are
  converted into a ``CLIPModel`` (:func:`open_clip_to_hf`), following transformers'
  ``convert_clip_original_pytorch_to_hf.py``; the file is read with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from services.hub import load_pretrained_checked, to_device
from services.rewards.base import features_tensor, validate_images

__all__ = ["CLIPPreferenceScorer"]


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
        processor_path: str | None = None,
        base: str | None = None,
    ) -> None:
        from transformers import CLIPProcessor

        self.name, self.batch_size, self.use_logit_scale = name, batch_size, use_logit_scale
        self.device = torch.device(device)
        state_file = _open_clip_file(path)
        if state_file is not None:  # an open_clip state dict (HPSv2): config and processor from `base`
            if not base:
                raise ValueError(
                    f"{name}: {state_file} is an open_clip state dict; pass options: {{base: <a transformers CLIP "
                    "directory of the same architecture, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K>}} for its "
                    "config and processor"
                )
            self.model = to_device(load_open_clip_state(state_file, base), self.device).eval()
            processor_path = processor_path or base
        else:
            from transformers import CLIPModel

            self.model = load_pretrained_checked(CLIPModel, path, what=name).to(self.device).eval()
        self.processor = load_pretrained_checked(CLIPProcessor, processor_path or path, what=f"{name} processor")

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
            img, txt = features_tensor(img), features_tensor(txt)  # transformers v5 returns a model output
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
            scale = self.model.logit_scale.exp() if self.use_logit_scale else 1.0
            out.append((scale * cos).float().cpu())
        return torch.cat(out)


def _open_clip_file(path: str | None) -> Path | None:
    """The open_clip ``.pt`` that ``path`` names (a file, or a directory with one ``.pt`` and no config.json)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if p.is_file() and p.suffix in (".pt", ".pth", ".bin"):
        return p
    if p.is_dir() and not (p / "config.json").exists():
        pts = sorted(p.glob("*.pt"))
        if len(pts) == 1:
            return pts[0]
    return None


def open_clip_to_hf(state: dict[str, Tensor], num_text_layers: int, num_vision_layers: int) -> dict[str, Tensor]:
    """open_clip's CLIP state dict (``ViT-*``, ``nn.MultiheadAttention`` blocks) -> transformers' CLIPModel keys.

    The packed ``in_proj`` of each attention is split into q / k / v; the projections are transposed
    (open_clip multiplies ``x @ proj``, transformers applies ``Linear(proj.T)``).
    """
    out: dict[str, Tensor] = {}

    def blocks(src: str, dst: str, n: int) -> None:
        for i in range(n):
            a, b = f"{src}.resblocks.{i}", f"{dst}.layers.{i}"
            q, k, v = state[f"{a}.attn.in_proj_weight"].chunk(3)
            qb, kb, vb = state[f"{a}.attn.in_proj_bias"].chunk(3)
            for name, w, bias in (("q_proj", q, qb), ("k_proj", k, kb), ("v_proj", v, vb)):
                out[f"{b}.self_attn.{name}.weight"], out[f"{b}.self_attn.{name}.bias"] = w, bias
            pairs = {
                "attn.out_proj": "self_attn.out_proj",
                "ln_1": "layer_norm1",
                "ln_2": "layer_norm2",
                "mlp.c_fc": "mlp.fc1",
                "mlp.c_proj": "mlp.fc2",
            }
            for s_name, d_name in pairs.items():
                for p in ("weight", "bias"):
                    out[f"{b}.{d_name}.{p}"] = state[f"{a}.{s_name}.{p}"]

    blocks("transformer", "text_model.encoder", num_text_layers)
    blocks("visual.transformer", "vision_model.encoder", num_vision_layers)
    out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
    out["text_model.final_layer_norm.weight"] = state["ln_final.weight"]
    out["text_model.final_layer_norm.bias"] = state["ln_final.bias"]
    out["text_projection.weight"] = state["text_projection"].T.contiguous()
    out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    for src, dst in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm")):
        out[f"{dst}.weight"], out[f"{dst}.bias"] = state[f"{src}.weight"], state[f"{src}.bias"]
    out["visual_projection.weight"] = state["visual.proj"].T.contiguous()
    out["logit_scale"] = state["logit_scale"]
    return out


def load_open_clip_state(path: Path, base: str):
    """A CLIPModel with ``base``'s config and the converted weights of the open_clip file ``path``."""
    from transformers import CLIPConfig, CLIPModel

    raw = torch.load(path, map_location="cpu", weights_only=True)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DDP
    config = load_pretrained_checked(CLIPConfig, base, what="open_clip base config")
    model = CLIPModel(config)
    hf = open_clip_to_hf(state, config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers)
    missing, unexpected = model.load_state_dict(hf, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise KeyError(
            f"{path}: open_clip keys do not match the base config: missing {missing[:4]}, extra {unexpected[:4]}"
        )
    return model


def _pickscore(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> CLIPPreferenceScorer:
    return CLIPPreferenceScorer("pickscore", path, device=device, use_logit_scale=True, **options)


def _hpsv2(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> CLIPPreferenceScorer:
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


def _clip_group_rank(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> GroupRankScorer:
    return GroupRankScorer(CLIPPreferenceScorer("clip_group_rank", path, device=device, **options))
