"""Prompt embeddings encoded once per prompt set and shared by samplers and learners.

With ``model.prompt_embeddings: once`` (sd3 / flux) a training run encodes its prompts in one pre-pass
(:func:`services.models.pipelines.encode_prompt_file`, run by ``services.training.build``) that loads only the pipeline's
tokenizers and text encoders (``transformer=None, vae=None``): every prompt of the training set, of
the evaluation set, and ``""`` (CFG's null prompt). The samplers and learners then build their
generator with ``text_encoder*=None, tokenizer*=None`` (the weights are never read) and look their
prompts up in :class:`PromptEmbeddings`. For SD3.5 and FLUX.1 that is one T5-XXL (4.76 B parameters,
9.5 GB in bf16) and one or two CLIP text towers loaded once per run instead of once per actor, and no
text-encoder forward in any rollout or update. This is the shape of Flow-Factory's dataset
preprocessing (``src/flow_factory/data_utils/dataset.py``, ``GeneralDataset``: the prompt set encoded
once into a cache keyed by a fingerprint of what produced it, training reading the cache), with the
sources' text length (flow_grpo ``scripts/train_sd3.py`` / ``scripts/train_flux.py``:
``max_sequence_length=128``, ``model.max_sequence_length``).

Where the file lives: ``<run dir>/prompt_embeddings/<key>.safetensors``. On a cluster the run
directory is already storage that every node shares, as it must be for checkpoints (the learner's rank
0 writes them there, the driver reads them back: ``services.checkpoints``; ``k8s/storage.yaml`` is the
ReadWriteMany claim that head and workers mount), so one file serves every actor on any node, and a
resume, a restart after a lost node or a rollback finds it (same key: not encoded again). The Ray
object store was the alternative; it is not used because the table does not fit it: each actor would
hold the whole set (SD3.5, 25 k prompts x (77 + 128) x 4096 bf16 is about 40 GB), while the file is
memory-mapped and an actor reads only the rows of the prompts it is handed. The key is a SHA-256 of
the family, model path, dtype, text length, the prompts and the format version.

Limits: the key names the model path, not the bytes under it: text encoders replaced in place at the
same path reuse a stale file (delete ``<run dir>/prompt_embeddings``). A prompt outside the set raises
``KeyError`` naming it (training never asks for one: rollouts draw from the training set, evaluation
from the evaluation set; serving, which takes any prompt, keeps its text encoders). The pre-pass
encodes :data:`ENCODE_BATCH` prompts per call, with the same ``encode_prompt`` call the generators use
(``services.models.pipelines.encode_with_pipeline``). Rows do not interact (every tokenizer pads to
its fixed length): a batch encoded on the fly equals the table's rows of the same batch bit for bit,
and in another batch the matrix kernels may round differently (CLIP's pooled projection does on CPU:
about 1e-7 at float32; tested), exactly as on-the-fly encoding of one prompt in two different batches
differs. Qwen-Image's tokenizer pads to the batch's longest prompt (masked, so the rows still do not
interact beyond rounding); its table holds the family's own tensors, ``prompt_embeds`` zero-padded to
``max_sequence_length`` and ``prompt_embeds_mask`` (``services.models.families.qwen_image``): the file's
tensors are what the family's ``encode`` returns. Sweeps: each trial has its own run directory, so each encodes
its prompts once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from services.config import ModelConfig

__all__ = ["ENCODE_BATCH", "PromptEmbeddings", "embeddings_file", "unique_prompts"]

FORMAT_VERSION = 1
ENCODE_BATCH = 32  # prompts per text-encoder call of the pre-pass (memory only; the rows do not interact)
FIELDS = ("prompt_embeds", "pooled")  # sd3 / flux's Condition tensors (a family's own: what its encode returns)


def unique_prompts(*prompt_lists: Sequence[str]) -> tuple[str, ...]:
    """``""`` (CFG's null prompt) and every prompt of ``prompt_lists``, each once, in first-seen order."""
    return tuple(dict.fromkeys(["", *(p for prompts in prompt_lists for p in prompts)]))


def embeddings_key(model_cfg: ModelConfig, model_path: str, prompts: Sequence[str]) -> str:
    """SHA-256 (16 hex digits) of what the embeddings depend on (see the module docstring's limits)."""
    blob = json.dumps(
        dict(
            kind=model_cfg.kind,
            path=str(model_path),
            dtype=model_cfg.dtype,
            max_sequence_length=model_cfg.max_sequence_length,
            prompts=list(prompts),
            v=FORMAT_VERSION,
        ),
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def embeddings_file(run_dir: Path, model_cfg: ModelConfig, model_path: str, prompts: Sequence[str]) -> Path:
    """Where the run's table of ``prompts`` lives: ``run_dir/prompt_embeddings/<key>.safetensors``."""
    return Path(run_dir) / "prompt_embeddings" / f"{embeddings_key(model_cfg, model_path, prompts)}.safetensors"


class PromptEmbeddings:
    """The encoded prompt set of one run: a memory-mapped safetensors table, looked up by prompt."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"prompt embeddings not found: {self.path} (written by the run's pre-pass into its run directory; "
                "on a cluster the run directory must be storage every node shares, as for checkpoints)"
            )
        self._file = safe_open(str(self.path), framework="pt")
        prompts = json.loads(self._file.metadata()["prompts"])
        self.rows = {p: i for i, p in enumerate(prompts)}
        self.max_sequence_length = int(self._file.metadata()["max_sequence_length"])

    def __len__(self) -> int:
        return len(self.rows)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self.rows

    def lookup(self, prompts: Sequence[str], device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """``{"prompt_embeds": (B, L, C), "pooled": (B, P)}`` of ``prompts`` (B rows, repeats allowed), read
        from the file (each distinct prompt once) and moved to ``device``."""
        distinct = list(dict.fromkeys(prompts))
        unknown = [p for p in distinct if p not in self.rows]
        if unknown:
            raise KeyError(
                f"{len(unknown)} prompt(s) are not in the precomputed prompt embeddings {self.path}, e.g. "
                f"{unknown[:3]!r}: model.prompt_embeddings=once encodes the training set, the evaluation set and '' "
                "only; use model.prompt_embeddings=per_actor to encode other prompts"
            )
        slot = {p: i for i, p in enumerate(distinct)}
        where = torch.tensor([slot[p] for p in prompts], dtype=torch.long)  # (B,) row of each in `distinct`
        out = {}
        for name in self._file.keys():  # the family's Condition tensors (FIELDS for sd3 / flux)
            table = self._file.get_slice(name)
            rows = torch.cat([table[self.rows[p] : self.rows[p] + 1] for p in distinct])
            out[name] = rows[where].to(device)
        return out
