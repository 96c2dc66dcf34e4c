"""Generators behind one interface: the embedded digits default, SD3 / SD3.5 and FLUX."""

from __future__ import annotations

import torch

from services.models.base import Condition, FlowGenerator

__all__ = ["Condition", "FlowGenerator", "build_generator"]

KNOWN_KINDS = ("digits", "sd3", "flux")


def build_generator(model_cfg, *, path: str | None = None, device: str | torch.device = "cpu") -> FlowGenerator:
    """Instantiate the generator of a ``ModelConfig`` (unpacked into explicit arguments, P10)."""
    lora = dict(lora_rank=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, lora_targets=model_cfg.lora_targets)
    path = path or model_cfg.path
    if path is None:  # the embedded default is prepared (pretrained and cached) by services.prepare
        raise ValueError("no model path: pass path=services.prepare.resolve_model(model_cfg).path")
    if model_cfg.kind == "digits":
        from services.models.digits import load_digits_generator

        return load_digits_generator(path, device=device, **lora)
    if model_cfg.kind == "sd3":
        from services.models.pipelines import SD3Generator

        return SD3Generator(path, resolution=model_cfg.resolution, device=device, dtype=model_cfg.dtype, **lora)
    if model_cfg.kind == "flux":
        from services.models.pipelines import FluxGenerator

        return FluxGenerator(path, resolution=model_cfg.resolution, device=device, dtype=model_cfg.dtype, **lora)
    raise KeyError(f"unknown model kind {model_cfg.kind!r}; known: {list(KNOWN_KINDS)}")
