"""The embedded colour task (``services.models.colour``): built here like digits, no text encoder, on the digits
grid; serving passes any prompt text to it (no check)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.config.families import spec
from services.models.families.base import ModelFamily

if TYPE_CHECKING:
    from services.config import ModelConfig
    from services.models.base import FlowGenerator
    from services.models.families.base import LoraArgs

__all__ = ["COLOUR", "ColourFamily"]


class ColourFamily(ModelFamily):
    def build_generator(
        self, model_cfg: ModelConfig, path: str, *, device: Any, prompt_embeddings: str | None, lora: LoraArgs
    ) -> FlowGenerator:
        if prompt_embeddings is not None:
            raise ValueError("the colour generator has no text encoder: its prompts are not precomputed")
        from services.models.colour import load_colour_generator

        return load_colour_generator(path, device=device, **lora)


COLOUR = ColourFamily(spec("colour"))
