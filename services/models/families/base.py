"""What a model family does, behind one class: the behaviour half of a family plug-in (its data half, the
torch-free facts the config and the plan read, is its :class:`~services.config.families.FamilySpec`).

The shape follows Flow-Factory's adapter (``src/flow_factory/models/abc.py``, ``BaseAdapter``: load the
components, encode prompts, decode latents, run the transformer, the default LoRA targets), cut to what NormGuard
asks: build the family's ``FlowGenerator`` (which owns the latent packing, the sampling grid from the scheduler
config and the transformer call with guidance embedding or CFG), check a prompt, and export a full fine-tune. A
diffusers family adds loading its pipeline and encoding prompts (``services.models.families.pipeline``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypedDict

from services.config.families import FamilySpec

if TYPE_CHECKING:
    from pathlib import Path

    from services.config import ModelConfig
    from services.models.base import FlowGenerator

__all__ = ["LoraArgs", "ModelFamily"]


class LoraArgs(TypedDict):
    """The LoRA settings of ``model`` a family passes on to its generator (``FlowGenerator``'s keywords)."""

    lora_rank: int | None
    lora_alpha: float | None
    lora_targets: Sequence[str]


class ModelFamily:
    """One generator family; one subclass per family module, registered in ``services.models.families``.

    Attributes:
        spec: the family's data (``services.config.families``), registered under the same ``model.kind``.
    """

    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def build_generator(
        self, model_cfg: ModelConfig, path: str, *, device: Any, prompt_embeddings: str | None, lora: LoraArgs
    ) -> FlowGenerator:
        """The family's generator loaded from ``path`` (``lora``: ``lora_rank`` / ``lora_alpha`` /
        ``lora_targets``; ``prompt_embeddings``: a table file to look prompts up in, or None)."""
        raise NotImplementedError(f"{self.name}: no generator")

    def check_prompts(self, prompts: Sequence[str]) -> None:
        """Raise ``ValueError`` for a prompt the family cannot condition on (serving's 422); any text by default."""

    def plan_inputs(self, tr: Any, latent_side: int, text_tokens: int, device: Any) -> dict:
        """One sample's keyword arguments for ``tr`` (the family's transformer, built from a config) as the
        family's generator passes them, latents ``latent_side`` VAE pixels square and ``text_tokens`` text rows
        (``normguard plan`` measures activations on them, ``services.cluster.activations``). A video family's
        takes a keyword ``latent_frames`` too (passed only when not 1, so an image family's hook needs none)."""
        raise NotImplementedError(f"{self.name}: no transformer to plan")

    def plan_vae_latent(self, vae: Any, latent_side: int, dtype: Any) -> Any:
        """One latent ``vae.decode`` takes, ``latent_side`` square, on the meta device (the plan's decode peak);
        4-D ``(1, latent_channels, side, side)`` by default (a video family's: ``latent_frames`` too, as above)."""
        import torch

        return torch.zeros(1, vae.config.latent_channels, latent_side, latent_side, device="meta", dtype=dtype)

    def lora_files(self, weights: dict, name: str) -> dict[str, dict]:
        """A LoRA export's files: ``{file name: the LoRA weights of one transformer}`` (``normguard export``
        writes each with the pipeline's ``save_lora_weights``); one file ``name`` by default."""
        return {name: weights}

    def export_transformer(self, model_path: str, weights: dict, out: Path) -> list[str] | None:
        """A full fine-tune's files under ``out`` where the family has its own; None = the diffusers
        ``transformer/`` folder (``normguard export``)."""
        return None
