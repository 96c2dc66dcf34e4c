"""SD3 / SD3.5 and FLUX generators from diffusers pipelines (local directory or hub id).

* SD3: ``StableDiffusion3Pipeline`` components; ``SD3Transformer2DModel`` called with
  ``timestep = 1000 * sigma``; latents ``(16, H/8, W/8)``; decode ``z / scaling + shift``.
* FLUX: ``FluxPipeline`` components; ``FluxTransformer2DModel`` on *packed* latents
  ``(L, 4 * C)`` (2x2 patches) with ``timestep = sigma``, text / image position ids and the
  distilled guidance embedding (FLUX.1-dev); CFG is not used by FLUX.1-dev (guidance scale goes
  into the embedding).

Both follow the velocity convention of diffusers' FlowMatchEulerDiscreteScheduler, which is ours,
and sample on the grid their pipeline builds from the scheduler config (``services.models.schedules``:
SD3's static shift, FLUX's resolution-dependent ``mu``). With ``dtype`` below float32 the weights load in
that dtype, what trains is float32 (``services.models.base``), and each forward runs under
``torch.autocast`` with the latents, the timestep and the position ids in float32, as the sources run
theirs (DiffusionNFT ``scripts/train_nft_sd3.py``: the forwards inside ``torch_autocast``; diffusers'
pipelines pass the scheduler's float32 timesteps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from services.models.base import Condition, FlowGenerator
from services.models.schedules import FlowSchedule
from services.rewards.clip import load_pretrained_checked

__all__ = ["FluxGenerator", "SD3Generator"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _vae_decode(vae, z: Tensor) -> Tensor:
    """Scaled / shifted VAE latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1]."""
    z = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        images = vae.decode(z, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


class SD3Generator(FlowGenerator):
    """Stable Diffusion 3 / 3.5 (Medium, Large)."""

    name = "sd3"

    def __init__(
        self, path: str, *, resolution: int = 512, device: str | torch.device = "cpu", dtype: str = "float32", **kwargs
    ) -> None:
        from diffusers import StableDiffusion3Pipeline

        pipe = load_pretrained_checked(StableDiffusion3Pipeline, path, what="sd3", torch_dtype=_DTYPES[dtype])
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.resolution = resolution
        self.vae_scale = pipe.vae_scale_factor
        self.compute_dtype = _DTYPES[dtype]
        tokens = (resolution // self.vae_scale // pipe.transformer.config.patch_size) ** 2
        self.schedule = FlowSchedule.from_scheduler_config(
            pipe.scheduler.config, base="scheduler", image_seq_len=tokens
        )
        super().__init__(pipe.transformer, device=device, **kwargs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale
        return (self.transformer.config.in_channels, side, side)

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                prompt_3=None,
                do_classifier_free_guidance=False,
                device=self.device,
            )
        return Condition({"prompt_embeds": embeds, "pooled": pooled})

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"sd3 latents must be (B, {self.latent_shape}), got {tuple(latents.shape)}")
        return _vae_decode(self.pipe.vae, latents)

    def _call_backbone(self, module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        with self.autocast():
            return module(
                hidden_states=x,
                timestep=sigma * 1000.0,  # float32, as the pipeline passes scheduler.timesteps
                encoder_hidden_states=cond.tensors["prompt_embeds"],
                pooled_projections=cond.tensors["pooled"],
                return_dict=False,
            )[0]


class FluxGenerator(FlowGenerator):
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
        **kwargs,
    ) -> None:
        from diffusers import FluxPipeline

        pipe = load_pretrained_checked(FluxPipeline, path, what="flux", torch_dtype=_DTYPES[dtype])
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(device)
        self.resolution = resolution
        self.guidance = guidance
        self.compute_dtype = _DTYPES[dtype]
        side = 2 * (resolution // (pipe.vae_scale_factor * 2))
        self._latent_side = side
        tokens = (side // 2) ** 2  # FluxPipeline's image_seq_len: the packed latent's length
        self.schedule = FlowSchedule.from_scheduler_config(pipe.scheduler.config, base="flux", image_seq_len=tokens)
        super().__init__(pipe.transformer, device=device, **kwargs)
        self._img_ids = pipe._prepare_latent_image_ids(1, side // 2, side // 2, self.device, torch.float32)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return ((self._latent_side // 2) ** 2, self.transformer.config.in_channels)

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device)
        return Condition({"prompt_embeds": embeds, "pooled": pooled})

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 3 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"flux packed latents must be (B, {self.latent_shape}), got {tuple(latents.shape)}")
        z = self.pipe._unpack_latents(latents, self.resolution, self.resolution, self.pipe.vae_scale_factor)
        return _vae_decode(self.pipe.vae, z)

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
