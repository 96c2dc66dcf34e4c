"""Generators behind one interface: the embedded digits default, SD3 / SD3.5 and FLUX."""

from __future__ import annotations

import torch

from services.config import ModelConfig
from services.models.base import Condition, FlowGenerator

__all__ = ["Condition", "FlowGenerator", "build_generator"]

KNOWN_KINDS = ("digits", "colour", "sd3", "flux")


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
    lora = dict(lora_rank=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, lora_targets=model_cfg.lora_targets)
    path = path or model_cfg.path
    if path is None:  # the embedded default is prepared (pretrained and cached) by services.prepare
        raise ValueError("no model path: pass path=services.prepare.resolve_model(model_cfg).path")
    if model_cfg.kind == "digits":
        if prompt_embeddings is not None:
            raise ValueError("the digits generator has no text encoder: its prompts are not precomputed")
        from services.models.digits import load_digits_generator

        return load_digits_generator(path, device=device, **lora)
    if model_cfg.kind == "colour":
        if prompt_embeddings is not None:
            raise ValueError("the colour generator has no text encoder: its prompts are not precomputed")
        from services.models.colour import load_colour_generator

        return load_colour_generator(path, device=device, **lora)
    text = dict(max_sequence_length=model_cfg.max_sequence_length, prompt_embeddings=prompt_embeddings)
    common = dict(resolution=model_cfg.resolution, device=device, dtype=model_cfg.dtype, **text, **lora)
    if model_cfg.kind == "sd3":
        from services.models.pipelines import SD3Generator

        return SD3Generator(path, **common)
    if model_cfg.kind == "flux":
        from services.models.pipelines import FluxGenerator

        return FluxGenerator(path, **common)
    raise KeyError(f"unknown model kind {model_cfg.kind!r}; known: {list(KNOWN_KINDS)}")
