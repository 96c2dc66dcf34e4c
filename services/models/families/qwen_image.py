"""Qwen-Image: ``QwenImagePipeline`` components (diffusers ``pipelines/qwenimage/pipeline_qwenimage.py``).

What the stock pipeline does, and so this family (``docs/wip/families.md``, Qwen-Image):

* latents: the VAE's 5-D ``(B, 1, C, H/8, W/8)`` packed in 2x2 patches, channel-major inside a patch, to
  ``(B, H/16 * W/16, 4 C)`` (``_pack_latents``; ``spec.latent_patch`` 2); one ``img_shapes`` entry
  ``(1, H/16, W/16)`` per sample; decode unpacks to 5-D, ``x * std + mean`` (the VAE config's ``latents_std`` /
  ``latents_mean``), decodes and takes frame 0;
* the transformer's ``timestep`` is the scheduler's timestep over 1000 (= sigma); no guidance embedding;
* the grid: FLUX's ``linspace(1, 1/N, N)`` and ``mu``, then the config's ``shift_terminal``
  (``services.models.schedules``);
* prompts: ``pipe.encode_prompt`` (Qwen2.5-VL's last hidden layer, the template's 34 tokens dropped, padded to
  the batch's longest prompt with a mask, truncated to ``max_sequence_length``). A condition here holds them
  zero-padded to ``max_sequence_length`` with the mask (``prompt_embeds_mask``), so that conditions of any
  batches stack (and the prompt table keeps one row per prompt); each transformer call cuts them back to the
  longest prompt of its batch and drops an all-ones mask, which is what the pipeline passes for that batch;
* guidance: true CFG, two transformer calls, iff ``true_cfg_scale > 1`` and a negative prompt is given (ours:
  the null prompt ``""``, Flow-Factory ``src/flow_factory/models/qwen_image/qwen_image.py``'s default
  negative), ``neg + s (cond - neg)`` rescaled per token to the conditional prediction's norm over the
  channels (:meth:`QwenImageGenerator.combine_guidance`; the learner's train-time CFG uses it too).

Data (LoRA targets, plan figures): ``services.config.families_qwen_image``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from services.config.families import spec
from services.models.base import Condition
from services.models.families.pipeline import PipelineFamily, PipelineGenerator
from services.models.schedules import FlowSchedule

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["QWEN_IMAGE", "QwenImageFamily", "QwenImageGenerator"]

_SPEC = spec("qwen_image")
_PATCH = _SPEC.latent_patch
_TIMESTEPS = 1000  # the pipeline passes scheduler timestep / 1000 (sigma * 1000 / 1000 in float32)


def true_cfg(v_cond: Tensor, v_neg: Tensor, scale: float) -> Tensor:
    """QwenImagePipeline's true CFG: ``neg + s (cond - neg)``, rescaled per token (last axis) to ``cond``'s norm;
    ``cond`` itself where ``scale <= 1`` (the pipeline runs no CFG then)."""
    if scale <= 1.0:
        return v_cond
    comb = v_neg + scale * (v_cond - v_neg)
    return comb * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


class QwenImageGenerator(PipelineGenerator):
    """Qwen-Image on packed latents with true CFG."""

    name = "qwen_image"
    batched_cfg = False  # the pipeline's two calls (cond, then negative), each with its own text length

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
        """``prompt_embeddings``: a table file to look prompts up in; the text encoder is then not loaded."""
        pipe = self._load(path, dtype, max_sequence_length, prompt_embeddings, resolution=resolution, device=device)
        self.vae_scale = pipe.vae_scale_factor
        self._side = _PATCH * (resolution // (self.vae_scale * _PATCH))  # latent side (prepare_latents)
        tokens = (self._side // _PATCH) ** 2  # the packed latent's length: the pipeline's image_seq_len
        self.schedule = FlowSchedule.from_scheduler_config(pipe.scheduler.config, base="flux", image_seq_len=tokens)
        super().__init__(pipe.transformer, device=device, **kwargs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return ((self._side // _PATCH) ** 2, self.transformer.config.in_channels)

    def combine_guidance(self, v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
        return true_cfg(v_cond, v_uncond, guidance_scale)

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 3 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"qwen_image packed latents must be (B, {self.latent_shape}), got {tuple(latents.shape)}")
        vae = self.pipe.vae
        z = self.pipe._unpack_latents(latents, self.resolution, self.resolution, self.vae_scale).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        with torch.no_grad():
            images = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _call_backbone(self, module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        embeds, mask = batch_text(cond)
        side = self._side // _PATCH
        with self.autocast():
            return module(
                hidden_states=x,
                timestep=sigma * _TIMESTEPS / _TIMESTEPS,  # float32, as the pipeline passes it
                encoder_hidden_states=embeds,
                encoder_hidden_states_mask=mask,
                img_shapes=[[(1, side, side)]] * x.shape[0],
                return_dict=False,
            )[0]


def batch_text(cond: Condition) -> tuple[Tensor, Tensor | None]:
    """``(prompt_embeds, mask)`` of one transformer call as the pipeline passes them for this batch: cut to its
    longest prompt, the mask ``None`` when it is all ones (``QwenImagePipeline.encode_prompt``)."""
    embeds, mask = cond.tensors["prompt_embeds"], cond.tensors["prompt_embeds_mask"]
    n = int(mask.sum(dim=1).max())  # the masks are contiguous: valid tokens, then padding
    embeds, mask = embeds[:, :n], mask[:, :n]
    return embeds, (None if bool(mask.all()) else mask)


class QwenImageFamily(PipelineFamily):
    generator = QwenImageGenerator

    def encode(
        self, pipe: DiffusionPipeline, prompts: Sequence[str], *, max_sequence_length: int, device: torch.device | str
    ) -> dict[str, Tensor]:
        """``{"prompt_embeds": (B, M, C), "prompt_embeds_mask": (B, M)}``, ``M = max_sequence_length``: the
        pipeline's ``encode_prompt`` of the batch, zero-padded (mask 0) from its longest prompt to ``M``."""
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(list(prompts), device=device, max_sequence_length=max_sequence_length)
        b, n, c = embeds.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.long, device=embeds.device)
        pad = max_sequence_length - n
        return {
            "prompt_embeds": torch.cat([embeds, embeds.new_zeros(b, pad, c)], dim=1),
            "prompt_embeds_mask": torch.cat([mask, mask.new_zeros(b, pad)], dim=1),
        }

    def plan_inputs(self, tr: Any, latent_side: int, text_tokens: int, device: Any) -> dict:
        c, f32, side = tr.config, dict(device=device, dtype=torch.float32), latent_side // _PATCH
        return dict(
            hidden_states=torch.zeros(1, side * side, c.in_channels, **f32),
            timestep=torch.full((1,), 0.7, **f32),
            encoder_hidden_states=torch.zeros(1, text_tokens, c.joint_attention_dim, **f32),
            encoder_hidden_states_mask=None,  # the longest prompt of a batch: no padding
            img_shapes=[[(1, side, side)]],
            return_dict=False,
        )

    def plan_vae_latent(self, vae: Any, latent_side: int, dtype: Any) -> Any:
        return torch.zeros(1, vae.config.z_dim, 1, latent_side, latent_side, device="meta", dtype=dtype)


QWEN_IMAGE = QwenImageFamily(_SPEC)
QwenImageGenerator.family = QWEN_IMAGE
