"""Stable Diffusion 3 / 3.5 (Medium, Large): ``StableDiffusion3Pipeline`` components.

``SD3Transformer2DModel`` called with ``timestep = 1000 sigma`` (``spec.timestep_scale``); latents
``(16, H/8, W/8)``, unpacked; decode ``z / scaling + shift``; the grid the pipeline builds from its scheduler config
(the static shift, ``services.models.schedules``); CFG by the generator base (a null-prompt row). Prompts: CLIP-L +
CLIP-G + T5 by ``pipe.encode_prompt``, ``prompt_embeds`` CLIP's 77 rows plus ``max_sequence_length`` T5 rows. A
T5-less pipeline's ``encode_prompt`` reads ``transformer.config.joint_attention_dim`` for T5's zero rows, so a
text-only load keeps the transformer. Data (LoRA targets, plan figures): ``services.config.families``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from services.config.families import spec
from services.models.base import Condition
from services.models.families.pipeline import PipelineFamily, PipelineGenerator, vae_decode
from services.models.schedules import FlowSchedule

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["SD3", "SD3Family", "SD3Generator"]

_SPEC = spec("sd3")


class SD3Generator(PipelineGenerator):
    """Stable Diffusion 3 / 3.5 (Medium, Large)."""

    name = "sd3"

    def __init__(
        self,
        path: str,
        *,
        resolution: int = 512,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        max_sequence_length: int = 128,
        prompt_embeddings: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``prompt_embeddings``: a table file to look prompts up in; the text encoders are then not loaded."""
        pipe = self._load(path, dtype, max_sequence_length, prompt_embeddings, resolution=resolution, device=device)
        self.vae_scale = pipe.vae_scale_factor
        tokens = (resolution // self.vae_scale // pipe.transformer.config.patch_size) ** 2
        self.schedule = FlowSchedule.from_scheduler_config(
            pipe.scheduler.config, base="scheduler", image_seq_len=tokens
        )
        super().__init__(pipe.transformer, device=device, **kwargs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale
        return (self.transformer.config.in_channels, side, side)

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"sd3 latents must be (B, {self.latent_shape}), got {tuple(latents.shape)}")
        return vae_decode(self.pipe.vae, latents)

    def _call_backbone(self, module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        with self.autocast():
            return module(
                hidden_states=x,
                timestep=sigma * _SPEC.timestep_scale,  # float32, as the pipeline passes its timesteps
                encoder_hidden_states=cond.tensors["prompt_embeds"],
                pooled_projections=cond.tensors["pooled"],
                return_dict=False,
            )[0]


class SD3Family(PipelineFamily):
    generator = SD3Generator

    def plan_inputs(self, tr: Any, latent_side: int, text_tokens: int, device: Any) -> dict:
        c, f32 = tr.config, dict(device=device, dtype=torch.float32)
        return dict(
            hidden_states=torch.zeros(1, c.in_channels, latent_side, latent_side, **f32),
            timestep=torch.full((1,), 0.7 * _SPEC.timestep_scale, **f32),
            encoder_hidden_states=torch.zeros(1, text_tokens, c.joint_attention_dim, **f32),
            pooled_projections=torch.zeros(1, c.pooled_projection_dim, **f32),
            return_dict=False,
        )

    def text_needs_transformer(self, pipe: DiffusionPipeline) -> bool:
        return pipe.text_encoder_3 is None  # T5-less: encode_prompt reads the transformer's config

    def encode_prompt(
        self, pipe: DiffusionPipeline, prompts: list[str], *, max_sequence_length: int, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            device=device,
            max_sequence_length=max_sequence_length,
        )
        return embeds, pooled


SD3 = SD3Family(_SPEC)
SD3Generator.family = SD3
