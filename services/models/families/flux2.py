"""FLUX.2 ([dev]: ``Flux2Pipeline``; [klein]: ``Flux2KleinPipeline``), one family, the pipeline class read from the
model's ``model_index.json``. Followed: diffusers 0.42.1 ``pipelines/flux2/pipeline_flux2.py`` and
``pipeline_flux2_klein.py`` (``__call__``, ``prepare_latents``, ``encode_prompt``), which the sampler equals.

* Latents: the state is the pipeline's noise, ``(128, H/16, W/16)`` (the VAE's 32 channels already patchified
  2 x 2, drawn in that layout, so a seed gives the stock pipeline's noise); each transformer call packs it to
  ``(H/16 * W/16, 128)`` tokens (``_pack_latents``) with the 4-axis position ids ``(t, h, w, l)``
  (``_prepare_latent_ids``, ``_prepare_text_ids``) and unpacks the velocity.
* Timestep: the scheduler's ``sigma * 1000`` divided by 1000, as the pipelines pass it (the transformer multiplies
  it, and the guidance, by 1000 again).
* Grid: ``linspace(1, 1/N, N)`` shifted by ``mu = empirical_mu(tokens, N)`` (``services.models.schedules``), so it
  depends on the step count as well as the resolution.
* Guidance: [dev] has the guidance embedding and no CFG: ``guidance`` (the pipeline's default 4.0, Flow-Factory's
  recipe value) goes into every call; a rollout ``guidance_scale`` > 1 adds the generator base's null-prompt CFG on
  top, as for FLUX.1 (the stock pipeline has no such mode). [klein] has no embedding and runs real CFG with the
  empty negative prompt, ``neg + s (cond - neg)``, the generator base's formula, iff ``s > 1`` and the pipeline
  config's ``is_distilled`` is false; a distilled Klein ignores the scale (``cfg_scale``), as the pipeline does.
* Prompts: ``pipe.encode_prompt`` (dev: Mistral-3 through the chat template with BFL's system message, hidden
  states of layers 10 / 20 / 30; Klein: Qwen3's template without thinking, layers 9 / 18 / 27), padded to
  ``max_sequence_length`` rows; no pooled vector (a zero-width ``pooled`` keeps the prompt table's format).
* Decode: ``x * sqrt(bn.running_var + eps) + bn.running_mean`` (the VAE's BatchNorm statistics), unpatchify,
  ``vae.decode``, ``x / 2 + 0.5``.

Data (LoRA targets, plan figures): ``services.config.families_flux2``.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from services.config.families import spec
from services.models.base import Condition
from services.models.families.pipeline import PipelineFamily, PipelineGenerator
from services.models.schedules import FlowSchedule, empirical_mu

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["FLUX2", "Flux2Family", "Flux2Generator"]

_SPEC = spec("flux2")
_PATCH = _SPEC.latent_patch  # 2x2 VAE latents per token
_PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline")


class Flux2Generator(PipelineGenerator):
    """FLUX.2 [dev] / [klein] on the pipeline's patchified latents."""

    name = "flux2"

    def __init__(
        self,
        path: str,
        *,
        resolution: int = 512,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        guidance: float = 4.0,
        max_sequence_length: int = 128,
        prompt_embeddings: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``guidance``: [dev]'s embedded guidance scale; ``prompt_embeddings``: a table file to look prompts up in
        (the text encoder is then not loaded)."""
        pipe = self._load(path, dtype, max_sequence_length, prompt_embeddings, resolution=resolution, device=device)
        self.guidance = guidance
        self.is_distilled = bool(pipe.config.get("is_distilled", False))
        side = resolution // (pipe.vae_scale_factor * _PATCH)  # prepare_latents' H/16
        self._side = side
        mu = functools.partial(empirical_mu, side * side)
        self.schedule = FlowSchedule.from_scheduler_config(
            pipe.scheduler.config, base="flux", image_seq_len=side * side, mu_of_steps=mu
        )
        super().__init__(pipe.transformer, device=device, **kwargs)
        noise = torch.zeros(1, 1, side, side)
        self._img_ids = pipe._prepare_latent_ids(noise)[0].to(self.device)  # (L, 4) int64, as the pipeline's

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.transformer.config.in_channels, self._side, self._side)

    def cfg_scale(self, guidance_scale: float) -> float:
        if self.is_distilled and guidance_scale > 1.0:
            warnings.warn(f"guidance scale {guidance_scale} is ignored by a step-distilled FLUX.2 model", stacklevel=3)
            return 1.0
        return guidance_scale

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"flux2 latents must be (B, {self.latent_shape}), got {tuple(latents.shape)}")
        vae = self.pipe.vae
        z = latents.to(vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        z = self.pipe._unpatchify_latents(z * std + mean)
        with torch.no_grad():
            images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _call_backbone(self, module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        b, c, h, w = x.shape
        embeds = cond.tensors["prompt_embeds"]
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
        scale = float(self.schedule.num_train_timesteps)
        txt_ids = self.pipe._prepare_text_ids(embeds[:1])[0].to(x.device)
        with self.autocast():  # the transformer scales timestep and guidance by 1000 in x's dtype: float32
            out = module(
                hidden_states=x.reshape(b, c, h * w).permute(0, 2, 1),  # _pack_latents
                timestep=sigma * scale / scale,  # the scheduler's timestep / 1000, as the pipeline passes it
                guidance=guidance,
                encoder_hidden_states=embeds,
                txt_ids=txt_ids,
                img_ids=self._img_ids,
                return_dict=False,
            )[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)


class Flux2Family(PipelineFamily):
    generator = Flux2Generator

    def pipeline_class(self, path: str | None = None) -> type[DiffusionPipeline]:
        """``Flux2Pipeline`` or ``Flux2KleinPipeline``, as ``path``'s ``model_index.json`` names it."""
        import diffusers
        from diffusers.pipelines.pipeline_utils import DiffusionPipeline

        if path is None:
            return super().pipeline_class()
        config = DiffusionPipeline.load_config(path)
        # diffusers annotates load_config as a tuple, which it returns only with return_unused_kwargs /
        # return_commit_hash; without them it returns the config dict
        name = config.get("_class_name")  # pyright: ignore[reportAttributeAccessIssue]
        if not isinstance(name, str) or name not in _PIPELINES:
            raise ValueError(f"{path} is a {name}, not a FLUX.2 pipeline ({', '.join(_PIPELINES)})")
        return getattr(diffusers, name)

    def plan_inputs(self, tr: Any, latent_side: int, text_tokens: int, device: Any) -> dict:
        c, f32, tokens = tr.config, dict(device=device, dtype=torch.float32), (latent_side // _PATCH) ** 2
        return dict(
            hidden_states=torch.zeros(1, tokens, c.in_channels, **f32),
            timestep=torch.full((1,), 0.7, **f32),
            guidance=torch.full((1,), 4.0, **f32) if c.guidance_embeds else None,
            encoder_hidden_states=torch.zeros(1, text_tokens, c.joint_attention_dim, **f32),
            txt_ids=torch.zeros(text_tokens, 4, device=device, dtype=torch.long),
            img_ids=torch.zeros(tokens, 4, device=device, dtype=torch.long),
            return_dict=False,
        )

    def encode_prompt(
        self, pipe: DiffusionPipeline, prompts: list[str], *, max_sequence_length: int, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        embeds, _ = pipe.encode_prompt(prompt=prompts, device=device, max_sequence_length=max_sequence_length)
        return embeds, embeds.new_zeros(embeds.shape[0], 0)  # no pooled projection


FLUX2 = Flux2Family(_SPEC)
Flux2Generator.family = FLUX2
