"""Generators behind one interface: the embedded digits default, SD3 / SD3.5 and FLUX."""

from __future__ import annotations

import torch

from services.models.base import Condition, FlowGenerator

__all__ = ["Condition", "FlowGenerator", "build_generator", "resolve_model_path"]

KNOWN_KINDS = ("digits", "sd3", "flux")


def resolve_model_path(model_cfg, *, seed: int = 0) -> str:
    """The directory / hub id the generator loads from (digits: the cached pretrained model)."""
    if model_cfg.kind == "digits":
        if model_cfg.path:
            return model_cfg.path
        from services.models.digits import load_or_pretrain_digits

        return str(
            load_or_pretrain_digits(
                resolution=model_cfg.resolution,
                steps=model_cfg.pretrain_steps,
                seed=seed,
                cache_dir=model_cfg.cache_dir,
            )
        )
    return model_cfg.path


def build_generator(model_cfg, *, path: str | None = None, device: str | torch.device = "cpu") -> FlowGenerator:
    """Instantiate the generator of a ``ModelConfig`` (unpacked into explicit arguments, P10)."""
    lora = dict(lora_rank=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, lora_targets=model_cfg.lora_targets)
    path = path or resolve_model_path(model_cfg)
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
