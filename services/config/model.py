"""The ``model`` section: which generator, its LoRA, precision, and how its prompts are encoded.

Text length and prompt encoding follow the sources. flow_grpo encodes SD3 and FLUX prompts with
``max_sequence_length=128`` T5 tokens (``scripts/train_sd3.py`` / ``scripts/train_flux.py``:
``compute_text_embeddings(..., max_sequence_length=128)``), not diffusers' pipeline defaults (256 for
SD3, 512 for FLUX); SD3 adds CLIP's 77 tokens to that (``77 + 128`` rows of ``prompt_embeds``).
Flow-Factory encodes a prompt set once, in its dataset preprocessing, into a cache keyed by the
preprocessing's inputs (``src/flow_factory/data_utils/dataset.py``, ``GeneralDataset``), so training
needs no text encoder forward; ``prompt_embeddings: once`` does the same here
(``services.models.prompt_embeddings``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from services.config.base import Section
from services.config.families import KINDS, LORA_DEFAULTS, spec

__all__ = ["ModelConfig"]


class ModelConfig(Section):
    kind: Literal[KINDS] = Field(default="digits", description="generator family (services.config.families)")  # type: ignore[valid-type]
    path: str | None = Field(default=None, description="local directory or hub id of a diffusers pipeline (sd3/flux)")
    lora_rank: int | None = Field(
        default=None, ge=1, description="LoRA rank; None = full fine-tuning with a frozen reference copy"
    )
    lora_alpha: float | None = Field(
        default=None,
        gt=0,
        description="LoRA alpha; None = the family's source scale x rank (sd3, flux: 2 x rank; digits: rank)",
    )
    lora_targets: tuple[str, ...] = Field(
        default=LORA_DEFAULTS["digits"].targets,
        description="peft target module names; omitted = the family's source list (services.config.families)",
    )
    resolution: int = Field(default=16, ge=8, le=4096, description="image side in pixels")
    num_frames: int | None = Field(
        default=None,
        ge=1,
        description="video families (wan): frames per sample, 4 k + 1 (the VAE's temporal compression); unset = "
        "the family's default (wan: 5, Flow-Factory's recipe); image families: must stay unset",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="weights dtype on the device"
    )
    pretrain_steps: int = Field(default=600, ge=0, description="digits only: steps of the embedded pretraining")
    cache_dir: str | None = Field(default=None, description="digits only: where pretrained weights are cached")
    max_sequence_length: int = Field(
        default=128,
        ge=1,
        le=512,
        description="sd3/flux: T5 tokens per prompt (pipe.encode_prompt's max_sequence_length; flow_grpo's 128, "
        "diffusers' defaults are 256 for SD3 and 512 for FLUX); SD3's prompt_embeds are CLIP's 77 + this",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="the transformer's activation checkpointing (diffusers enable_gradient_checkpointing): the "
        "backward recomputes each block instead of holding its activations (FLUX.2 [dev] needs it to fit 80 GB)",
    )
    prompt_embeddings: Literal["once", "per_actor"] = Field(
        default="once",
        description="sd3/flux training: 'once' = one pre-pass loads only the text encoders and encodes the training "
        "set, the evaluation set and '' (CFG's null prompt) into a file in the run directory; samplers and learners "
        "then load no text encoder and look prompts up. 'per_actor' = every sampler and learner loads the text "
        "encoders and encodes its prompts each step. Digits (no text encoder) and serving (any prompt) ignore it",
    )

    @model_validator(mode="before")
    @classmethod
    def _family_lora_defaults(cls, data: Any) -> Any:
        """Fill ``lora_targets`` / ``lora_alpha`` from the family's source (stored, so exports and runs read them)."""
        if not isinstance(data, dict) or data.get("kind", "digits") not in LORA_DEFAULTS:
            return data
        fam, data = LORA_DEFAULTS[data.get("kind", "digits")], dict(data)
        if data.get("lora_targets") is None:
            data["lora_targets"] = fam.targets
        if data.get("lora_rank") and data.get("lora_alpha") is None and fam.alpha_per_rank != 1.0:
            data["lora_alpha"] = fam.alpha_per_rank * data["lora_rank"]
        return data

    @model_validator(mode="after")
    def _needs_path(self) -> ModelConfig:
        if not spec(self.kind).embedded and not self.path:
            raise ValueError(f"model.path is required for model.kind={self.kind!r} (a local dir or hub id)")
        spec(self.kind).latent_frames(self.num_frames)  # a ValueError unless 4 k + 1 (video) / unset (images)
        return self
