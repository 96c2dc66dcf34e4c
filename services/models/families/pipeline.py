"""What the diffusers families (SD3, FLUX) share: loading the pipeline (all of it, the image parts, or the text
parts), encoding prompts by ``pipe.encode_prompt`` or looking them up in a precomputed table, and the VAE decode.

With ``dtype`` below float32 the weights load in that dtype, what trains is float32 (``services.models.base``), and
each forward runs under ``torch.autocast`` with the latents, the timestep and the position ids in float32, as the
sources run theirs (DiffusionNFT ``scripts/train_nft_sd3.py``: the forwards inside ``torch_autocast``; diffusers'
pipelines pass the scheduler's float32 timesteps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor

from services.hub import load_pretrained_checked
from services.models.base import Condition, FlowGenerator
from services.models.families.base import ModelFamily
from services.models.prompt_embeddings import PromptEmbeddings

if TYPE_CHECKING:
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

    from services.config import ModelConfig
    from services.models.families.base import LoraArgs

__all__ = ["DTYPES", "PipelineFamily", "PipelineGenerator", "vae_decode"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IMAGE_PARTS = ("transformer", "vae")


class GeneratorClass(Protocol):
    """A pipeline generator's constructor as :meth:`PipelineFamily.build_generator` calls it (the generator
    classes take more keywords, with defaults: guidance, a video family's frames)."""

    def __call__(
        self,
        path: str,
        *,
        resolution: int,
        device: Any,
        dtype: str,
        max_sequence_length: int,
        prompt_embeddings: str | None,
        lora_rank: int | None,
        lora_alpha: float | None,
        lora_targets: Sequence[str],
    ) -> PipelineGenerator: ...


class PipelineFamily(ModelFamily):
    """A family loaded from a diffusers pipeline (``spec.pipeline_class``) by its generator class."""

    generator: GeneratorClass

    def build_generator(
        self, model_cfg: ModelConfig, path: str, *, device: Any, prompt_embeddings: str | None, lora: LoraArgs
    ) -> PipelineGenerator:
        m, embeddings = model_cfg, prompt_embeddings
        return self.generator(
            path,
            resolution=m.resolution,
            device=device,
            dtype=m.dtype,
            max_sequence_length=m.max_sequence_length,
            prompt_embeddings=embeddings,
            **lora,
        )

    def pipeline_class(self, path: str | None = None) -> type[DiffusionPipeline]:
        """The diffusers pipeline class (of the model at ``path`` where the family has several; one by default)."""
        import diffusers

        name = self.spec.pipeline_class
        if name is None:  # every pipeline family's spec names its class (services.config.families)
            raise TypeError(f"{self.name}: its FamilySpec names no pipeline_class")
        return getattr(diffusers, name)

    def text_needs_transformer(self, pipe: DiffusionPipeline) -> bool:
        """Whether a text-only load must keep the transformer (its ``encode_prompt`` reads the config)."""
        return False

    def load_pipeline(
        self, path: str, dtype: str, *, parts: Literal["all", "image", "text"] = "all"
    ) -> DiffusionPipeline:
        """The pipeline at ``path`` in ``dtype``: every component, only the transformer / VAE / scheduler
        (``image``: the text parts passed as ``None``, never read), or only the tokenizers and text encoders
        (``text``; the transformer too where :meth:`text_needs_transformer`)."""
        cls, what = self.pipeline_class(path), self.name
        skip = {"all": (), "image": self.spec.text_parts, "text": _IMAGE_PARTS}[parts]
        pipe = load_pretrained_checked(cls, path, what=what, torch_dtype=DTYPES[dtype], **dict.fromkeys(skip))
        if parts == "text" and self.text_needs_transformer(pipe):
            pipe = load_pretrained_checked(cls, path, what=what, torch_dtype=DTYPES[dtype], vae=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompt(
        self, pipe: DiffusionPipeline, prompts: list[str], *, max_sequence_length: int, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        """``(prompt_embeds (B, L, C), pooled (B, P))`` by ``pipe.encode_prompt`` (no CFG branch)."""
        raise NotImplementedError(f"{self.name}: no text encoder")

    def encode(
        self, pipe: DiffusionPipeline, prompts: Sequence[str], *, max_sequence_length: int, device: torch.device | str
    ) -> dict[str, Tensor]:
        """``{"prompt_embeds": (B, L, C), "pooled": (B, P)}`` of ``prompts`` (the null prompt is a prompt);
        ``L`` is ``spec.text_tokens(max_sequence_length)``."""
        with torch.no_grad():
            embeds, pooled = self.encode_prompt(
                pipe, list(prompts), max_sequence_length=max_sequence_length, device=device
            )
        return {"prompt_embeds": embeds, "pooled": pooled}


def vae_decode(vae: ModelMixin, z: Tensor) -> Tensor:
    """Scaled / shifted VAE latents ``(B, C, h, w)`` -> images ``(B, 3, H, W)`` in [0, 1]."""
    z = z.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    with torch.no_grad():
        images = vae.decode(z, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


class PipelineGenerator(FlowGenerator):
    """What the pipeline generators share: the pipeline, and prompts encoded by it or looked up in a table."""

    family: PipelineFamily

    def _load(
        self,
        path: str,
        dtype: str,
        max_sequence_length: int,
        prompt_embeddings: str | None,
        *,
        resolution: int,
        device: torch.device | str,
    ) -> DiffusionPipeline:
        """The pipeline on ``device`` (without its text encoders when prompts come from a table), and what
        every family keeps of the settings."""
        self.max_sequence_length, self.resolution, self.compute_dtype = max_sequence_length, resolution, DTYPES[dtype]
        self.prompt_table = PromptEmbeddings(prompt_embeddings) if prompt_embeddings else None
        if self.prompt_table is not None and self.prompt_table.max_sequence_length != max_sequence_length:
            raise ValueError(
                f"{prompt_embeddings} was encoded at max_sequence_length={self.prompt_table.max_sequence_length}, "
                f"the model is configured with {max_sequence_length}"
            )
        pipe = self.family.load_pipeline(path, dtype, parts="image" if self.prompt_table is not None else "all")
        self.pipe = pipe.to(device)
        return self.pipe

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        if self.prompt_table is not None:
            return Condition(self.prompt_table.lookup(prompts, self.device))
        rows = self.family.encode(self.pipe, prompts, max_sequence_length=self.max_sequence_length, device=self.device)
        return Condition(rows)
