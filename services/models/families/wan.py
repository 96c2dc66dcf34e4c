"""Wan 2.1 / 2.2 text-to-video: ``WanPipeline`` components (diffusers ``pipelines/wan/pipeline_wan.py``).

Frames are a latent axis: a sample is ``(C, F', h, w)`` with ``F' = (num_frames - 1) / 4 + 1`` latent frames
(``AutoencoderKLWan``'s 4x temporal, 8x spatial compression) and ``WanTransformer3DModel`` patchifies ``(1, 2, 2)``
itself. Its ``timestep`` is the scheduler's ``t = 1000 sigma`` and its output the flow velocity (the pipeline
steps ``x + (sigma_next - sigma) v``: the convention of ``normguard_core.conventions``). CFG is the base class's
``uncond + s (cond - uncond)`` with the empty negative prompt, as the pipeline's default ``negative_prompt``;
the pipeline makes two transformer calls where the base class batches the rows (the same rows: rows do not
interact). Prompts: UMT5 by ``pipe.encode_prompt``, padded with zeros to ``max_sequence_length`` (the pipeline's
``__call__`` default is 512, so the deploy config sets it), no pooled embedding (an empty ``(B, 0)`` column keeps
the prompt table's two fields).

The grid: NormGuard integrates with Euler on a flow grid (``services.models.schedules``). A pipeline carrying a
``FlowMatchEulerDiscreteScheduler`` gives its grid exactly; the published Wan pipelines carry
``UniPCMultistepScheduler`` (``flow_prediction``, ``use_flow_sigmas``, ``flow_shift``), a second-order multistep
solver on another grid, which this sampler does **not** reproduce: it takes the config's ``flow_shift`` as the
static shift of the Euler grid (as Flow-Factory's Wan recipes set ``flow_shift 3.0`` for their own SDE sampler,
``examples/grpo/lora/wan21/t2v.yaml``). Decoding: ``AutoencoderKLWan.decode`` runs latent frame by latent frame
on its causal cache, so one sample's decode peak is one latent frame's; ``rollout.decode_batch`` bounds the
samples per call. Videos are ``(B, F, 3, H, W)`` in [0, 1], the pipeline's ``output_type="pt"`` layout.

Wan 2.2 A14B: its two experts are one trainable module (:class:`WanExperts`): ``transformer`` where
``t >= boundary_ratio * 1000``, ``transformer_2`` below, each with the LoRA, one guidance scale for both (the
pipeline's ``guidance_scale_2`` default: ``guidance_scale``); a LoRA export writes one file per expert. Wan 2.2
TI2V (``expand_timesteps``) is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from services.config.families import spec
from services.hub import load_pretrained_checked
from services.models.base import Condition
from services.models.families.pipeline import DTYPES, PipelineFamily, PipelineGenerator
from services.models.schedules import FlowSchedule

if TYPE_CHECKING:
    from pathlib import Path

    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from peft import LoraConfig

    from services.config import ModelConfig
    from services.models.families.base import LoraArgs

__all__ = ["WAN", "WanExperts", "WanFamily", "WanGenerator", "wan_schedule"]

_SPEC = spec("wan")


def wan_schedule(config: Mapping[str, Any], *, image_seq_len: int) -> FlowSchedule:
    """The Euler flow grid of a Wan pipeline's scheduler ``config`` (see the module docstring): a
    ``FlowMatchEulerDiscreteScheduler``'s own, or a flow UniPC's ``flow_shift`` as a static shift."""
    if config.get("_class_name") == "UniPCMultistepScheduler":
        if not (config.get("use_flow_sigmas") and config.get("prediction_type") == "flow_prediction"):
            raise NotImplementedError(f"a UniPC scheduler without flow sigmas / flow prediction: {dict(config)}")
        if config.get("use_dynamic_shifting"):
            raise NotImplementedError("a UniPC scheduler with dynamic shifting is not reproduced")
        return FlowSchedule(
            base="scheduler",
            shift=float(config.get("flow_shift", 1.0)),
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        )
    return FlowSchedule.from_scheduler_config(config, base="scheduler", image_seq_len=image_seq_len)


class WanExperts(nn.Module):
    """Wan 2.2 A14B's two experts as one trainable module: ``transformer`` (high noise) for the samples whose
    ``timestep >= boundary`` (``boundary_ratio * num_train_timesteps``), ``transformer_2`` (low noise) for the
    others, as ``WanPipeline.__call__`` switches them (per sample here: a learner's batch mixes sigmas). LoRA is
    added to both, as Flow-Factory's ``apply_lora(components=['transformer', 'transformer_2'])``."""

    def __init__(self, high: ModelMixin, low: ModelMixin, boundary: float) -> None:
        super().__init__()
        self.transformer, self.transformer_2, self.boundary = high, low, boundary

    @property
    def config(self) -> Any:  # the high-noise expert's (diffusers' FrozenDict, read by attribute)
        return self.transformer.config

    def add_adapter(self, config: LoraConfig) -> None:
        self.transformer.add_adapter(config)
        self.transformer_2.add_adapter(config)

    def disable_adapters(self) -> None:
        self.transformer.disable_adapters()
        self.transformer_2.disable_adapters()

    def enable_adapters(self) -> None:
        self.transformer.enable_adapters()
        self.transformer_2.enable_adapters()

    def enable_gradient_checkpointing(self, **kwargs: Any) -> None:
        """Both experts' own (diffusers ``ModelMixin.enable_gradient_checkpointing``): ``model.gradient_checkpointing``."""
        self.transformer.enable_gradient_checkpointing(**kwargs)
        self.transformer_2.enable_gradient_checkpointing(**kwargs)

    def disable_gradient_checkpointing(self) -> None:
        self.transformer.disable_gradient_checkpointing()
        self.transformer_2.disable_gradient_checkpointing()

    def forward(
        self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, return_dict: bool = False
    ) -> tuple[Tensor]:
        high = timestep >= self.boundary
        parts, rows = [], []
        for expert, mask in ((self.transformer, high), (self.transformer_2, ~high)):
            if mask.any():
                idx = mask.nonzero().squeeze(1)
                kw = dict(timestep=timestep[idx], encoder_hidden_states=encoder_hidden_states[idx], return_dict=False)
                parts.append(expert(hidden_states=hidden_states[idx], **kw)[0])
                rows.append(idx)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.cat(rows).argsort()]
        return (out,)


class WanGenerator(PipelineGenerator):
    """Wan 2.1 T2V (1.3B, 14B) and Wan 2.2 T2V A14B on ``(C, F', h, w)`` latents."""

    name = "wan"

    def __init__(
        self,
        path: str,
        *,
        resolution: int = 256,
        num_frames: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        max_sequence_length: int = 512,
        prompt_embeddings: str | None = None,
        **kwargs: Any,
    ) -> None:
        """``num_frames``: ``4 k + 1`` (None: the family's default); ``prompt_embeddings``: a table file to look
        prompts up in, the text encoder then not loaded."""
        self.latent_frames = _SPEC.latent_frames(num_frames)
        self.num_frames = (self.latent_frames - 1) * _SPEC.frame_stride + 1
        pipe = self._load(path, dtype, max_sequence_length, prompt_embeddings, resolution=resolution, device=device)
        transformer = self._backbone(pipe, path)
        patch = transformer.config.patch_size
        multiple = pipe.vae_scale_factor_spatial * patch[1]
        if resolution % multiple:
            raise ValueError(f"wan: resolution must be a multiple of {multiple} (VAE x patch), got {resolution}")
        self.vae_scale = pipe.vae_scale_factor_spatial
        side = resolution // self.vae_scale
        tokens = self.latent_frames * (side // patch[1]) * (side // patch[2])
        self.schedule = wan_schedule(pipe.scheduler.config, image_seq_len=tokens)
        # WanExperts is an nn.Module with the config / peft-adapter / checkpointing surface the base reads, not a
        # ModelMixin
        super().__init__(transformer, device=device, **kwargs)  # pyright: ignore[reportArgumentType]

    @staticmethod
    def _backbone(pipe: DiffusionPipeline, path: str) -> ModelMixin | WanExperts:
        """The transformer, or Wan 2.2 A14B's two experts (:class:`WanExperts`)."""
        ratio = pipe.config["boundary_ratio"]  # WanPipeline registers both in its config, always
        if pipe.config["expand_timesteps"] or (pipe.transformer_2 is not None) != (ratio is not None):
            raise NotImplementedError(f"{path}: expand_timesteps (Wan 2.2 TI2V) or one expert alone is not supported")
        if pipe.transformer_2 is None:
            return pipe.transformer
        if pipe.transformer is None or not 0 < ratio < 1:
            raise NotImplementedError(f"{path}: boundary_ratio {ratio} with one expert is not supported")
        return WanExperts(pipe.transformer, pipe.transformer_2, ratio * pipe.scheduler.config.num_train_timesteps)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_scale
        return (self.transformer.config.in_channels, self.latent_frames, side, side)

    def decode(self, latents: Tensor) -> Tensor:
        """``(B, C, F', h, w)`` -> videos ``(B, F, 3, H, W)`` in [0, 1], as the pipeline decodes (its latent
        de-normalisation with the VAE's ``latents_mean`` / ``latents_std``, ``postprocess_video``)."""
        if latents.ndim != 5 or tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(f"wan latents must be (B, {self.latent_shape}), got {tuple(latents.shape)}")
        vae = self.pipe.vae
        z = latents.to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        with torch.no_grad():
            video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4).contiguous()

    def _call_backbone(self, module: nn.Module, x: Tensor, sigma: Tensor, cond: Condition) -> Tensor:
        with self.autocast():
            return module(
                hidden_states=x,
                timestep=sigma * _SPEC.timestep_scale,  # float32: the Euler scheduler's timesteps
                encoder_hidden_states=cond.tensors["prompt_embeds"],
                return_dict=False,
            )[0]


class WanFamily(PipelineFamily):
    generator = WanGenerator

    def build_generator(
        self, model_cfg: ModelConfig, path: str, *, device: Any, prompt_embeddings: str | None, lora: LoraArgs
    ) -> WanGenerator:
        m, embeddings = model_cfg, prompt_embeddings
        return WanGenerator(  # self.generator, with the frames only WanGenerator takes
            path,
            resolution=m.resolution,
            num_frames=m.num_frames,
            device=device,
            dtype=m.dtype,
            max_sequence_length=m.max_sequence_length,
            prompt_embeddings=embeddings,
            **lora,
        )

    def plan_inputs(self, tr: Any, latent_side: int, text_tokens: int, device: Any, latent_frames: int = 1) -> dict:
        c, f32 = tr.config, dict(device=device, dtype=torch.float32)
        return dict(
            hidden_states=torch.zeros(1, c.in_channels, latent_frames, latent_side, latent_side, **f32),
            timestep=torch.full((1,), 0.7 * _SPEC.timestep_scale, **f32),
            encoder_hidden_states=torch.zeros(1, text_tokens, c.text_dim, **f32),
            return_dict=False,
        )

    def plan_vae_latent(self, vae: Any, latent_side: int, dtype: Any, latent_frames: int = 1) -> Any:
        return torch.zeros(1, vae.config.z_dim, latent_frames, latent_side, latent_side, device="meta", dtype=dtype)

    def load_pipeline(
        self, path: str, dtype: str, *, parts: Literal["all", "image", "text"] = "all"
    ) -> DiffusionPipeline:
        """As the other pipelines'; a text-only load also leaves out Wan 2.2's second expert."""
        if parts != "text":
            return super().load_pipeline(path, dtype, parts=parts)
        skip = dict.fromkeys(("transformer", "transformer_2", "vae"))
        pipe = load_pretrained_checked(self.pipeline_class(), path, what=self.name, torch_dtype=DTYPES[dtype], **skip)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def lora_files(self, weights: dict, name: str) -> dict[str, dict]:
        """Wan 2.2's two experts: ``name`` for ``transformer``'s LoRA and ``*_transformer_2.safetensors`` for
        ``transformer_2``'s (load it with ``load_lora_weights(dir, weight_name=..., load_into_transformer_2=True)``)."""
        low = {k.removeprefix("transformer_2."): v for k, v in weights.items() if k.startswith("transformer_2.")}
        if not low:
            return {name: weights}
        high = {k.removeprefix("transformer."): v for k, v in weights.items() if k.startswith("transformer.")}
        return {name: high, name.replace(".safetensors", "_transformer_2.safetensors"): low}

    def export_transformer(self, model_path: str, weights: dict, out: Path) -> list[str] | None:
        """A full fine-tune of Wan 2.2's experts: ``transformer/`` and ``transformer_2/`` (None for Wan 2.1: the
        one ``transformer/`` folder, as every pipeline family's)."""
        if not any(k.startswith("transformer_2.") for k in weights):
            return None
        from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

        for part in ("transformer", "transformer_2"):
            expert = WanTransformer3DModel.from_pretrained(model_path, subfolder=part)
            state = {k.removeprefix(f"{part}."): v for k, v in weights.items() if k.startswith(f"{part}.")}
            unknown = set(state) - set(expert.state_dict())
            if unknown:
                raise KeyError(f"weights for unknown {part} parameters: {sorted(unknown)[:5]}")
            expert.load_state_dict(state, strict=False)
            expert.save_pretrained(out / part)
        return ["transformer/", "transformer_2/"]

    def encode_prompt(
        self, pipe: DiffusionPipeline, prompts: list[str], *, max_sequence_length: int, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        embeds, _ = pipe.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length, device=device
        )
        return embeds, embeds.new_zeros(embeds.shape[0], 0)  # no pooled embedding


WAN = WanFamily(_SPEC)
WanGenerator.family = WAN
