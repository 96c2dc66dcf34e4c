"""FLUX.1 (dev / schnell): ``FluxPipeline`` components.

``FluxTransformer2DModel`` on *packed* latents ``(L, 4 C)`` (``spec.latent_patch`` 2: 2x2 patches, packed and
unpacked by the pipeline's ``_prepare_latent_image_ids`` / ``_unpack_latents``) with ``timestep = sigma``, text /
image position ids and the distilled guidance embedding (FLUX.1-dev): CFG is not used by FLUX.1-dev, the guidance
scale goes into the embedding. Its grid: the scheduler config's resolution-dependent ``mu``
(``services.models.schedules``). Prompts: CLIP-L (pooled) + T5 (``max_sequence_length`` rows) by
``pipe.encode_prompt``. Data (LoRA targets, plan figures): ``services.config.families``.
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

__all__ = ["FLUX", "FluxFamily", "FluxGenerator"]

_PATCH = spec("flux").latent_patch  # 2x2 patches per packed latent row


class FluxGenerator(PipelineGenerator):
    """FLUX.1 (dev / schnell) on packed latents."""

    name = "flux"

    def __init__(
        self,
        path: str,
        *,
        resolution: int = 512,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        guidance: float = 3.5,
        max_sequence_length: int = 128,
        prompt_embeddings: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``prompt_embeddings``: a table file to look prompts up in; the text encoders are then not loaded."""
        pipe = self._load(path, dtype, max_sequence_length, prompt_embeddings, resolution=resolution, device=device)
        self.guidance = guidance
        patch = _PATCH
        side = patch * (resolution // (pipe.vae_scale_factor * patch))
        self._latent_side = side
        tokens = (side // patch) ** 2  # FluxPipeline's image_seq_len: the packed latent's length
        self.schedule = FlowSchedule.from_scheduler_config(pipe.scheduler.config, base="flux", image_seq_len=tokens)
        super().__init__(pipe.transformer, device=device, **kwargs)
        self._img_ids = pipe._prepare_latent_image_ids(1, side // patch, side // patch, self.device, torch.float32)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return ((self._latent_side // _PATCH) ** 2, self.transformer.config.in_channels)

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 3 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"flux packed latents must be (B, {self.latent_shape}), got {tuple(latents.shape)}")
        z = self.pipe._unpack_latents(latents, self.resolution, self.resolution, self.pipe.vae_scale_factor)
        return vae_decode(self.pipe.vae, z)

    def _call_backbone(self, module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        embeds = cond.tensors["prompt_embeds"]
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=torch.float32)
        with self.autocast():  # the transformer scales timestep and guidance by 1000 in x's dtype: float32
            return module(
                hidden_states=x,
                timestep=sigma,
                guidance=guidance,
                pooled_projections=cond.tensors["pooled"],
                encoder_hidden_states=embeds,
                txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=torch.float32),
                img_ids=self._img_ids,
                return_dict=False,
            )[0]


class FluxFamily(PipelineFamily):
    generator = FluxGenerator

    def plan_inputs(self, tr: Any, latent_side: int, text_tokens: int, device: Any) -> dict:
        c, f32, side = tr.config, dict(device=device, dtype=torch.float32), latent_side // _PATCH
        return dict(
            hidden_states=torch.zeros(1, side * side, c.in_channels, **f32),
            timestep=torch.full((1,), 0.7, **f32),
            guidance=torch.full((1,), 3.5, **f32) if c.guidance_embeds else None,
            encoder_hidden_states=torch.zeros(1, text_tokens, c.joint_attention_dim, **f32),
            pooled_projections=torch.zeros(1, c.pooled_projection_dim, **f32),
            txt_ids=torch.zeros(text_tokens, 3, **f32),
            img_ids=torch.zeros(side * side, 3, **f32),
            return_dict=False,
        )

    def encode_prompt(
        self, pipe: DiffusionPipeline, prompts: list[str], *, max_sequence_length: int, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return embeds, pooled


FLUX = FluxFamily(spec("flux"))
FluxGenerator.family = FLUX
