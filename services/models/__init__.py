"""Generators behind one interface: the embedded digits default, SD3 / SD3.5 and FLUX, one family module each
(``services.models.families``)."""

from __future__ import annotations

import torch

from services.config import ModelConfig
from services.models.base import Condition, FlowGenerator
from services.models.families import FAMILIES, family
from services.models.families.base import LoraArgs

__all__ = ["Condition", "FlowGenerator", "build_generator"]

KNOWN_KINDS = tuple(FAMILIES)  # one module each in services.models.families


def build_generator(
    model_cfg: ModelConfig,
    *,
    path: str | None = None,
    device: str | torch.device = "cpu",
    prompt_embeddings: str | None = None,
) -> FlowGenerator:
    """Instantiate the generator of a ``ModelConfig`` (unpacked into explicit arguments, P10).

    ``prompt_embeddings``: sd3 / flux only, a table file of ``services.models.prompt_embeddings`` (the run's
    pre-pass, ``model.prompt_embeddings: once``): the generator then loads no text encoder and looks its prompts
    up there. ``None``: it loads them and encodes its prompts itself (``per_actor``, serving, digits)."""
    lora = LoraArgs(lora_rank=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, lora_targets=model_cfg.lora_targets)
    path = path or model_cfg.path
    if path is None:  # the embedded default is prepared (pretrained and cached) by services.prepare
        raise ValueError("no model path: pass path=services.prepare.resolve_model(model_cfg).path")
    gen = family(model_cfg.kind).build_generator(
        model_cfg, path, device=device, prompt_embeddings=prompt_embeddings, lora=lora
    )
    if model_cfg.gradient_checkpointing:  # diffusers' own: each block's forward is recomputed in backward
        gen.transformer.enable_gradient_checkpointing()
    return gen
