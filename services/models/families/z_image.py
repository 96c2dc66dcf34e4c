"""Z-Image (Turbo / base): ``ZImagePipeline`` components, as diffusers 0.42's ``pipelines/z_image/pipeline_z_image.py``
runs them (the reference the tests compare with) and X-GenGroup/Flow-Factory ``src/flow_factory/models/z_image/
z_image.py`` trains them.

* Latents ``(16, H/8, W/8)`` in float32; the transformer takes a *list* of per-sample ``(16, 1, h, w)`` tensors (a
  frame axis of 1), patchifies 2x2 itself and returns a list.
* Timestep: the pipeline passes ``(1000 - t) / 1000`` with ``t = 1000 sigma`` (0 is noise, 1 is clean), which the
  transformer scales by its ``t_scale``; the model predicts ``x0 - noise``, so the pipeline negates it before the
  Euler step: our velocity (``normguard_core.conventions``: ``eps - x0``) is that negation.
* Grid: ``sigmas = torch.linspace(1, 1/N, N)`` (float32, then handed to ``set_timesteps``: not numpy's linspace,
  which rounds differently for most N) with the scheduler's shift (Z-Image-Turbo: static 3.0,
  ``deploy/architectures/z-image/scheduler_config.json``; a dynamic-shifting config takes the pipeline's ``mu``).
* Prompts: Qwen3 on the chat-templated prompt (``enable_thinking=True``), padded to ``max_sequence_length``, the
  second-to-last hidden layer with the padding removed: a variable-length list per batch. A :class:`Condition`
  needs batch tensors, so :meth:`ZImageFamily.encode` zero-pads them with a mask (``prompt_mask``) and the
  transformer call removes the padding again: the transformer sees the pipeline's list exactly.
* CFG: the pipeline guides iff its ``guidance_scale`` ``s > 0``, as ``pos + s (pos - neg)`` in one batched call
  (conditional rows first), optionally off once ``1 - sigma > cfg_truncation`` and with ``cfg_normalization`` c
  clipping each sample's ``norm(pred)`` to ``c norm(pos)`` (``combine_guidance``; the truncation in sampling). NormGuard's ``guidance_scale`` w keeps its meaning
  (1 = no CFG, ``v_u + w (v_c - v_u)``), so ``s = w - 1``: Flow-Factory's ``guidance_scale 4.0`` is w = 5.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from normguard_core.samplers import VelocityFn
from services.config.families import spec
from services.models.base import Condition
from services.models.families.pipeline import PipelineFamily, PipelineGenerator, vae_decode
from services.models.schedules import FlowSchedule

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["Z_IMAGE", "ZImageFamily", "ZImageGenerator", "ZImageSchedule"]

_PATCH = 2  # the transformer's all_patch_size


@dataclasses.dataclass(frozen=True)
class ZImageSchedule(FlowSchedule):
    """The grid ``ZImagePipeline`` builds: ``torch.linspace(1, 1/N, N)`` in float32 shifted as the scheduler does."""

    def sigma_grid(self, num_steps: int, shift: float | None = None) -> Tensor:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        mu = self.mu_at(num_steps)
        if shift is not None and mu is not None:
            warnings.warn(f"a static shift {shift} replaces this scheduler's mu = {mu:.4f}", stacklevel=2)
        static = shift if shift is not None else (self.shift if mu is None else None)
        base = np.array(torch.linspace(1.0, 1 / num_steps, num_steps).tolist()).astype(np.float32)
        out = torch.from_numpy(np.asarray(self._stretched(self._shifted(base, static, mu)))).to(torch.float32)
        return torch.cat([out, out.new_zeros(1)])


class ZImageGenerator(PipelineGenerator):
    """Z-Image on 4-D float32 latents; velocities are the negated model output."""

    name = "z_image"

    def __init__(
        self,
        path: str,
        *,
        resolution: int = 512,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        max_sequence_length: int = 128,
        prompt_embeddings: str | None = None,
        cfg_truncation: float = 1.0,
        cfg_normalization: float = 0.0,
        **kwargs: Any,
    ) -> None:
        """``cfg_truncation`` / ``cfg_normalization``: the pipeline's (defaults: off); ``prompt_embeddings``: a
        table file to look prompts up in (the text encoder is then not loaded)."""
        pipe = self._load(path, dtype, max_sequence_length, prompt_embeddings, resolution=resolution, device=device)
        self.cfg_truncation, self.cfg_normalization = float(cfg_truncation), float(cfg_normalization)
        multiple = pipe.vae_scale_factor * _PATCH
        if resolution % multiple:
            raise ValueError(f"z_image: resolution must be a multiple of {multiple}, got {resolution}")
        self._side = _PATCH * (resolution // multiple)
        tokens = (self._side // _PATCH) ** 2  # the pipeline's image_seq_len (its mu, where dynamic)
        base = FlowSchedule.from_scheduler_config(pipe.scheduler.config, base="flux", image_seq_len=tokens)
        self.schedule = ZImageSchedule(**dataclasses.asdict(base))
        super().__init__(pipe.transformer, device=device, **kwargs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.transformer.config.in_channels, self._side, self._side)

    def decode(self, latents: Tensor) -> Tensor:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"z_image latents must be (B, {self.latent_shape}), got {tuple(latents.shape)}")
        return vae_decode(self.pipe.vae, latents)

    def _call_backbone(self, module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        embeds, mask = cond.tensors["prompt_embeds"], cond.tensors["prompt_mask"]
        captions = [e[m] for e, m in zip(embeds, mask, strict=True)]  # the pipeline's unpadded list
        t = sigma.float() * self.schedule.num_train_timesteps  # the scheduler's timesteps
        with self.autocast():
            out = module(list(x.unsqueeze(2).unbind(0)), (1000 - t) / 1000, captions, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)

    def _cfg_on(self, sigma: Tensor) -> list[bool]:
        """Per sample: whether the pipeline guides at this sigma (``cfg_truncation``: off once 1 - sigma is past
        it; compared in Python floats, as the pipeline compares its precomputed list)."""
        if self.cfg_truncation > 1:
            return [True] * sigma.shape[0]
        t = sigma.float() * self.schedule.num_train_timesteps
        return [v <= self.cfg_truncation for v in ((1000 - t) / 1000).tolist()]

    def combine_guidance(self, v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
        """``pos + s (pos - neg)`` per sample with ``s = w - 1`` (on velocities: the negation commutes with it
        exactly) and the norm clip of ``cfg_normalization`` (sampling and the learner's train-time CFG)."""
        s, c, rows = guidance_scale - 1.0, self.cfg_normalization, []
        for pos, neg in zip(v_cond, v_uncond, strict=True):
            if s <= 0:
                rows.append(pos)
                continue
            pred = pos + s * (pos - neg)
            if c > 0:
                limit, norm = torch.linalg.vector_norm(pos) * c, torch.linalg.vector_norm(pred)
                if norm > limit:
                    pred = pred * (limit / norm)
            rows.append(pred)
        return torch.stack(rows)

    def _guided(
        self, cond: Condition, null_cond: Condition | None, guidance_scale: float, reference: bool
    ) -> VelocityFn:
        """The base's batched CFG (conditional rows, then null) with ``cfg_truncation``: the conditional
        velocity for a truncated sample, and a conditional-only call at a sigma where every sample is truncated, as
        the pipeline makes one there (the learner's train-time CFG does not truncate: it sees no sigma)."""
        if guidance_scale <= 1.0 or null_cond is None:
            return super()._guided(cond, None, 1.0, reference)
        both = cond.cat(null_cond)

        def fn(x: Tensor, sigma: Tensor) -> Tensor:
            on = self._cfg_on(sigma)
            if not any(on):
                return self.velocity(x, sigma, cond, reference=reference)
            v_cond, v_uncond = self.velocity(
                torch.cat([x, x]), torch.cat([sigma, sigma]), both, reference=reference
            ).chunk(2)
            guided = self.combine_guidance(v_cond, v_uncond, guidance_scale)
            return torch.where(torch.tensor(on, device=x.device).view(-1, *[1] * (x.ndim - 1)), guided, v_cond)

        return fn


class ZImageFamily(PipelineFamily):
    generator = ZImageGenerator

    def plan_inputs(self, tr: Any, latent_side: int, text_tokens: int, device: Any) -> dict:
        c, f32 = tr.config, dict(device=device, dtype=torch.float32)
        return dict(
            x=[torch.zeros(c.in_channels, 1, latent_side, latent_side, **f32)],
            t=torch.full((1,), 0.3, **f32),
            cap_feats=[torch.zeros(text_tokens, c.cap_feat_dim, **f32)],
            return_dict=False,
        )

    def encode(
        self, pipe: DiffusionPipeline, prompts: Sequence[str], *, max_sequence_length: int, device: torch.device | str
    ) -> dict[str, Tensor]:
        """``{"prompt_embeds": (B, L, C), "prompt_mask": (B, L)}``, ``L = max_sequence_length``: the pipeline's
        unpadded list, zero-padded at the end, ``prompt_mask`` marking each prompt's rows."""
        with torch.no_grad():
            rows, _ = pipe.encode_prompt(
                list(prompts), device=device, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
            )
        embeds = rows[0].new_zeros(len(rows), max_sequence_length, rows[0].shape[-1])
        mask = torch.zeros(len(rows), max_sequence_length, dtype=torch.bool, device=embeds.device)
        for i, r in enumerate(rows):
            embeds[i, : len(r)], mask[i, : len(r)] = r, True
        return {"prompt_embeds": embeds, "prompt_mask": mask}


Z_IMAGE = ZImageFamily(spec("z_image"))
ZImageGenerator.family = Z_IMAGE
