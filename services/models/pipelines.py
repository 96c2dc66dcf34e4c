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

Prompts are encoded with ``pipe.encode_prompt`` at ``max_sequence_length`` T5 tokens (``model.max_sequence_length``,
flow_grpo's 128; SD3's ``prompt_embeds`` are CLIP's 77 tokens + those), by the generator itself, or, built with
``prompt_embeddings`` (a table file of ``services.models.prompt_embeddings``), by one pre-pass: then the pipeline is
loaded without its tokenizers and text encoders and ``encode_prompts`` looks the prompts up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from services.config import ModelConfig
from services.hub import load_pretrained_checked
from services.models.base import Condition, FlowGenerator
from services.models.prompt_embeddings import ENCODE_BATCH, FIELDS, PromptEmbeddings
from services.models.schedules import FlowSchedule

__all__ = ["FluxGenerator", "SD3Generator", "encode_with_pipeline", "load_pipeline"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TEXT_PARTS = {
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"),
    "flux": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
}
_IMAGE_PARTS = ("transformer", "vae")


def _pipeline_class(kind: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    return {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[kind]


def load_pipeline(kind: str, path: str, dtype: str, *, parts: Literal["all", "image", "text"] = "all"):
    """The ``kind`` pipeline at ``path`` in ``dtype``: every component, only the transformer / VAE /
    scheduler (``image``: the text parts passed as ``None``, never read), or only the tokenizers and text
    encoders (``text``). An SD3 pipeline without T5 keeps its transformer with ``text``: its
    ``encode_prompt`` reads ``transformer.config.joint_attention_dim`` for T5's zero rows."""
    cls = _pipeline_class(kind)
    skip = {"all": (), "image": _TEXT_PARTS[kind], "text": _IMAGE_PARTS}[parts]
    pipe = load_pretrained_checked(cls, path, what=kind, torch_dtype=_DTYPES[dtype], **dict.fromkeys(skip))
    if parts == "text" and kind == "sd3" and pipe.text_encoder_3 is None:  # T5-less: keep the transformer
        pipe = load_pretrained_checked(cls, path, what=kind, torch_dtype=_DTYPES[dtype], vae=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_with_pipeline(
    pipe, kind: str, prompts: Sequence[str], *, max_sequence_length: int, device: torch.device | str
) -> dict[str, Tensor]:
    """``{"prompt_embeds": (B, L, C), "pooled": (B, P)}`` of ``prompts`` by ``pipe.encode_prompt`` (no CFG
    branch: the null prompt is a prompt); ``L`` is 77 + ``max_sequence_length`` for SD3, that for FLUX."""
    with torch.no_grad():
        if kind == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                prompt_3=None,
                do_classifier_free_guidance=False,
                device=device,
                max_sequence_length=max_sequence_length,
            )
        else:
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=max_sequence_length
            )
    return {"prompt_embeds": embeds, "pooled": pooled}


def _vae_decode(vae, z: Tensor) -> Tensor:
    """Scaled / shifted VAE latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1]."""
    z = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        images = vae.decode(z, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


class _PipelineGenerator(FlowGenerator):
    """What SD3 and FLUX share: the pipeline, and prompts encoded by it or looked up in a precomputed table."""

    def _load(
        self, path: str, dtype: str, max_sequence_length: int, prompt_embeddings: str | None, *, resolution: int, device
    ):
        """The pipeline on ``device`` (without its text encoders when prompts come from a table), and what
        both families keep of the settings."""
        self.max_sequence_length, self.resolution, self.compute_dtype = max_sequence_length, resolution, _DTYPES[dtype]
        self.prompt_table = PromptEmbeddings(prompt_embeddings) if prompt_embeddings else None
        if self.prompt_table is not None and self.prompt_table.max_sequence_length != max_sequence_length:
            raise ValueError(
                f"{prompt_embeddings} was encoded at max_sequence_length={self.prompt_table.max_sequence_length}, "
                f"the model is configured with {max_sequence_length}"
            )
        pipe = load_pipeline(self.name, path, dtype, parts="image" if self.prompt_table is not None else "all")
        self.pipe = pipe.to(device)
        return self.pipe

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        if self.prompt_table is not None:
            return Condition(self.prompt_table.lookup(prompts, self.device))
        rows = encode_with_pipeline(
            self.pipe, self.name, prompts, max_sequence_length=self.max_sequence_length, device=self.device
        )
        return Condition(rows)


class SD3Generator(_PipelineGenerator):
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
        **kwargs,
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


class FluxGenerator(_PipelineGenerator):
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
        **kwargs,
    ) -> None:
        """``prompt_embeddings``: a table file to look prompts up in; the text encoders are then not loaded."""
        pipe = self._load(path, dtype, max_sequence_length, prompt_embeddings, resolution=resolution, device=device)
        self.guidance = guidance
        side = 2 * (resolution // (pipe.vae_scale_factor * 2))
        self._latent_side = side
        tokens = (side // 2) ** 2  # FluxPipeline's image_seq_len: the packed latent's length
        self.schedule = FlowSchedule.from_scheduler_config(pipe.scheduler.config, base="flux", image_seq_len=tokens)
        super().__init__(pipe.transformer, device=device, **kwargs)
        self._img_ids = pipe._prepare_latent_image_ids(1, side // 2, side // 2, self.device, torch.float32)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return ((self._latent_side // 2) ** 2, self.transformer.config.in_channels)

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


def encode_prompt_file(
    model_cfg: ModelConfig,
    model_path: str,
    prompts: Sequence[str],
    out: str | Path,
    *,
    device: str = "cpu",
    threads: int = 1,
) -> str:
    """The pre-pass: load the pipeline's text encoders only, encode ``prompts`` in batches of
    :data:`ENCODE_BATCH`, write ``out`` atomically (a temporary file renamed), return its path.

    ``threads``: torch threads (a Ray task shares its node's cores with the actors)."""
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    kind, prompts = model_cfg.kind, list(prompts)
    pipe = load_pipeline(kind, model_path, model_cfg.dtype, parts="text").to(device)
    parts: dict[str, list[Tensor]] = {name: [] for name in FIELDS}
    for i in range(0, len(prompts), ENCODE_BATCH):
        rows = encode_with_pipeline(
            pipe, kind, prompts[i : i + ENCODE_BATCH], max_sequence_length=model_cfg.max_sequence_length, device=device
        )
        for name in FIELDS:
            parts[name].append(rows[name].cpu())
    tables = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
    meta = {"prompts": json.dumps(prompts), "kind": kind, "max_sequence_length": str(model_cfg.max_sequence_length)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file(tables, str(tmp), metadata=meta)
    os.replace(tmp, out)  # readers see the whole file or none
    return str(out)
