"""ImageReward (Xu et al., 2023, arXiv:2304.05977): a BLIP image-text encoder and an MLP head.

Layout as published in THUDM/ImageReward (``ImageReward/ImageReward.py``, ``ImageReward/models/BLIP/
blip_pretrain.py``, ``vit.py``, ``med.py``); the weights ``ImageReward.pt`` (hub: THUDM/ImageReward, with
``med_config.json``) are a plain state dict of the ``ImageReward`` module:

* ``blip.visual_encoder.*``: BLIP's timm-style ViT-L/16 at 224 px (``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``;
  LayerNorm eps 1e-6, fused qkv with bias);
* ``blip.text_encoder.*``: med.py's ``BertModel`` without pooler, a cross-attention layer in every block
  (``embeddings.{word_embeddings,position_embeddings,LayerNorm}``, ``encoder.layer.{i}.{attention,
  crossattention,intermediate,output}.*``), sized by ``med_config.json`` (BERT-base, vocabulary 30524);
* ``blip.vision_proj`` / ``blip.text_proj``: BLIP's contrastive projections, which the score never reads;
* ``mlp.layers.{0,2,4,6,7}``: Linear 768->1024->128->64->16->1 with dropout between (no activations).

The score of (prompt, image) is ``(mlp(text_encoder(ids, mask, encoder_hidden_states=vit(pixels))[:, 0])
- 0.16717362830052426) / 1.0333394966054072``; the prompt is tokenised by bert-base-uncased (with
ImageReward's added ``[DEC]`` / ``[ENC]`` tokens) to 35 tokens, padded and truncated; the image is resized
(shorter side, bicubic) and center-cropped to 224 px and normalised with CLIP's mean / std. flow_grpo's
``imagereward_score`` scores the same way, one image at a time; this scorer batches.

The modules are transformers' ``BlipVisionModel`` (its fused ``qkv`` has timm's layout) and ``BlipTextModel``
(cross-attention built with ``is_decoder=True``, run bidirectionally), the keys renamed as transformers'
BLIP conversion script does (:func:`to_hf_keys`). ``path``: ``ImageReward.pt`` (read with
``weights_only=True``) or a ``.safetensors``, or a directory holding one with ``med_config.json``;
``options: {tokenizer: <bert-base-uncased directory or hub id>}``, and ``med_config`` (a path) when it is
not next to the weights (default: the published one). The ViT's head count is not in the weights:
``vision_heads`` (default ``hidden / 64``, 16 for ViT-L).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from services.hub import load_pretrained_checked
from services.rewards.aesthetic import AestheticHead
from services.rewards.base import load_state_file, validate_images

if TYPE_CHECKING:
    from transformers import BlipTextConfig, BlipVisionConfig

__all__ = ["ImageRewardModel", "ImageRewardScorer", "preprocess", "to_hf_keys"]

SCORE_MEAN, SCORE_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's self.mean / self.std
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 35
# train/src/config/med_config.json (the one the hub repository ships), BERT-base with cross-attention
PUBLISHED_MED_CONFIG = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "vocab_size": 30524,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
_VIT_RENAMES = (  # transformers' convert_blip_original_pytorch_to_hf.py rename_key, for the vision tower
    (".attn.proj.", ".self_attn.projection."),
    (".attn.qkv.", ".self_attn.qkv."),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
)


def to_hf_keys(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """ImageReward's keys -> (``BlipVisionModel``, ``BlipTextModel``, MLP head) state dicts.

    Every key lands in one of the three or is one of the contrastive projections / buffers the score
    does not read; any other key raises (it is not ImageReward's layout).
    """
    vision, text, head, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(_UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            vision[_vit_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            text[key.removeprefix("blip.text_encoder.")] = value  # med.py's names are transformers' BLIP text names
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"image_reward: keys outside ImageReward's layout: {unknown[:6]}")
    return vision, text, head


def _vit_key(key: str) -> str:
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    if key in fixed:
        return fixed[key]
    if key.startswith("blocks."):
        key = "encoder.layers." + key.removeprefix("blocks.")
    for old, new in _VIT_RENAMES:
        key = key.replace(old, new)
    return key


def _vision_config(vision: dict[str, Tensor], heads: int | None):
    from transformers import BlipVisionConfig

    if "embeddings.patch_embedding.weight" not in vision or "embeddings.position_embedding" not in vision:
        raise KeyError("image_reward: no blip.visual_encoder.patch_embed / pos_embed in the checkpoint")
    hidden, _, patch, _ = vision["embeddings.patch_embedding.weight"].shape
    grid = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=heads or max(hidden // 64, 1),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,  # vit.py: partial(nn.LayerNorm, eps=1e-6)
    )


def _text_config(med: dict, encoder_width: int):
    from transformers import BlipTextConfig

    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keys += ("max_position_embeddings", "vocab_size", "layer_norm_eps", "hidden_act", "pad_token_id")
    none: dict[str, Any] = {
        "bos_token_id": None,
        "eos_token_id": None,
        "sep_token_id": None,
    }  # generation ids: not read by the score
    return BlipTextConfig(**{k: med[k] for k in keys}, **none, encoder_hidden_size=encoder_width, is_decoder=True)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BERT with cross-attention + ImageReward's MLP; ``forward`` gives the normalised score."""

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.visual = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticHead(text_config.hidden_size)  # the same MLP as improved-aesthetic-predictor's

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """pixels ``(B, 3, S, S)`` normalised, ids / mask ``(B, L)`` -> ``(B,)``."""
        image_embeds = self.visual(pixel_values=pixels).last_hidden_state  # (B, 1 + patches, D_v)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,  # med.py's multimodal encoder: bidirectional self-attention, then cross-attention
        )
        feats = out.last_hidden_state[:, 0, :].float()  # (B, D_t), the [CLS] position
        return ((self.mlp(feats) - SCORE_MEAN) / SCORE_STD).squeeze(-1)


def build_image_reward(state: dict[str, Tensor], med: dict, *, vision_heads: int | None = None) -> ImageRewardModel:
    """An :class:`ImageRewardModel` holding ``state`` (ImageReward's keys); a missing or extra key raises."""
    vision, text, head = to_hf_keys(state)
    vcfg = _vision_config(vision, vision_heads)
    model = ImageRewardModel(vcfg, _text_config(med, vcfg.hidden_size))
    for part, sd, prefix in ((model.visual, vision, "blip.visual_encoder"), (model.text, text, "blip.text_encoder")):
        missing, unexpected = part.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise KeyError(
                f"image_reward: {prefix} does not match its config: missing {missing[:4]}, extra {unexpected[:4]}"
            )
    missing, unexpected = model.mlp.load_state_dict(head, strict=False)
    if missing or unexpected:
        raise KeyError(f"image_reward: mlp is not ImageReward's head: missing {missing}, extra {unexpected}")
    return model.eval()


def preprocess(images: Tensor, size: int) -> Tensor:
    """ImageReward's ``_transform``: shorter side to ``size`` (PIL bicubic), center crop, CLIP normalisation.

    ``images`` ``(B, 3, H, W)`` in [0, 1], quantised to uint8 as flow_grpo does -> ``(B, 3, size, size)``.
    """
    import numpy as np
    from PIL import Image

    out = []
    for img in (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy():
        pil = Image.fromarray(img)
        w, h = pil.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)  # torchvision Resize(int)'s rounding
        pil = pil.resize((size, new_long) if w <= h else (new_long, size), Image.Resampling.BICUBIC)
        w, h = pil.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # torchvision CenterCrop
        pil = pil.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _weights_file(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"image_reward: checkpoint path does not exist: {path}")
    found = sorted([*p.glob("*.pt"), *p.glob("*.pth"), *p.glob("*.safetensors")])
    if len(found) != 1:
        raise FileNotFoundError(f"image_reward: {p} must hold one ImageReward.pt / .safetensors, found {found}")
    return found[0]


class ImageRewardScorer:
    """ImageReward's normalised score of each (prompt, image) pair."""

    def __init__(
        self,
        name: str,
        path: str | None,
        *,
        tokenizer: str | None = None,
        med_config: str | None = None,
        vision_heads: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        from transformers import BertTokenizer

        if not path or not tokenizer:
            raise ValueError(
                f"{name}: needs path= ImageReward.pt (or its directory) and options: {{tokenizer: "
                "<bert-base-uncased>}}"
            )
        self.name, self.batch_size, self.device = name, batch_size, torch.device(device)
        weights = _weights_file(path)
        med_file = Path(med_config).expanduser() if med_config else weights.parent / "med_config.json"
        med = json.loads(med_file.read_text()) if med_file.is_file() else PUBLISHED_MED_CONFIG
        state = load_state_file(weights, what=name)
        self.model = build_image_reward(state, med, vision_heads=vision_heads).to(self.device)
        image_size = self.model.visual.config.image_size
        if not isinstance(image_size, int):
            raise TypeError(f"{name}: the BLIP vision config's image_size must be one int, got {image_size!r}")
        self.image_size = image_size
        self.tokenizer = load_pretrained_checked(BertTokenizer, tokenizer, what=f"{name} tokenizer")
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # blip.py

    @torch.no_grad()
    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        validate_images(images, prompts, scorer=self.name)
        out = []
        for i in range(0, len(prompts), self.batch_size):
            pixels = preprocess(images[i : i + self.batch_size], self.image_size).to(self.device)
            tok = self.tokenizer(
                list(prompts[i : i + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            ).to(self.device)
            out.append(self.model(pixels, tok["input_ids"], tok["attention_mask"]).cpu())
        return torch.cat(out)


def _image_reward(path: str | None = None, device: str | torch.device = "cpu", **options: Any) -> ImageRewardScorer:
    return ImageRewardScorer("image_reward", path, device=device, **options)
