"""SD3 / SD3.5 and FLUX generators from diffusers pipelines (local directory or hub id), by ``model.kind``.

Each family's generator (its latents, its grid from the scheduler config, its transformer call) is its module
in ``services.models.families`` (``sd3``, ``flux``), re-exported here; the pipeline loading and prompt encoding
they share is ``services.models.families.pipeline``. Both follow the velocity convention of diffusers'
FlowMatchEulerDiscreteScheduler, which is ours.

Prompts are encoded with ``pipe.encode_prompt`` at ``max_sequence_length`` T5 tokens (``model.max_sequence_length``,
flow_grpo's 128; SD3's ``prompt_embeds`` are CLIP's 77 tokens + those), by the generator itself, or, built with
``prompt_embeddings`` (a table file of ``services.models.prompt_embeddings``), by one pre-pass
(:func:`encode_prompt_file`): then the pipeline is loaded without its tokenizers and text encoders and
``encode_prompts`` looks the prompts up.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from services.config import ModelConfig
from services.models.families import PipelineFamily, family
from services.models.families.flux import FluxGenerator
from services.models.families.sd3 import SD3Generator
from services.models.prompt_embeddings import ENCODE_BATCH

if TYPE_CHECKING:
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline

__all__ = ["FluxGenerator", "SD3Generator", "encode_prompt_file", "encode_with_pipeline", "load_pipeline"]


def _pipeline_family(kind: str) -> PipelineFamily:
    fam = family(kind)
    if not isinstance(fam, PipelineFamily):
        raise TypeError(f"model.kind={kind!r} is not a diffusers pipeline")
    return fam


def load_pipeline(kind: str, path: str, dtype: str, *, parts: Literal["all", "image", "text"] = "all"):
    """The ``kind`` pipeline at ``path`` in ``dtype`` (``PipelineFamily.load_pipeline``: every component, only
    the transformer / VAE / scheduler, or only the tokenizers and text encoders)."""
    return _pipeline_family(kind).load_pipeline(path, dtype, parts=parts)


def encode_with_pipeline(
    pipe: DiffusionPipeline, kind: str, prompts: Sequence[str], *, max_sequence_length: int, device: torch.device | str
) -> dict[str, Tensor]:
    """``{"prompt_embeds": (B, L, C), "pooled": (B, P)}`` of ``prompts`` by the family's ``pipe.encode_prompt``
    call (no CFG branch: the null prompt is a prompt); ``L`` is 77 + ``max_sequence_length`` for SD3, that for
    FLUX (``FamilySpec.text_tokens``)."""
    return _pipeline_family(kind).encode(pipe, prompts, max_sequence_length=max_sequence_length, device=device)


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
    parts: dict[str, list[Tensor]] = {}
    for i in range(0, len(prompts), ENCODE_BATCH):
        rows = encode_with_pipeline(
            pipe, kind, prompts[i : i + ENCODE_BATCH], max_sequence_length=model_cfg.max_sequence_length, device=device
        )
        for name, value in rows.items():  # the family's Condition tensors (FIELDS for sd3 / flux)
            parts.setdefault(name, []).append(value.cpu())
    tables = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items()}
    meta = {"prompts": json.dumps(prompts), "kind": kind, "max_sequence_length": str(model_cfg.max_sequence_length)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file(tables, str(tmp), metadata=meta)
    os.replace(tmp, out)  # readers see the whole file or none
    return str(out)
