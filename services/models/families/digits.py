"""The embedded digits task: a small class-conditional flow transformer pretrained here (``services.models.digits``).

No text encoder: a prompt names a digit (``services.data.digits.parse_digit_prompt``); no scheduler config (its
grid: ``FamilySpec.grid_shift``). A full fine-tune exports its ``transformer/`` folder and the class conditioner.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.config.families import spec
from services.models.families.base import ModelFamily

if TYPE_CHECKING:
    from services.config import ModelConfig
    from services.models.base import FlowGenerator
    from services.models.families.base import LoraArgs

__all__ = ["DIGITS", "DigitsFamily"]


class DigitsFamily(ModelFamily):
    def build_generator(
        self, model_cfg: ModelConfig, path: str, *, device: Any, prompt_embeddings: str | None, lora: LoraArgs
    ) -> FlowGenerator:
        if prompt_embeddings is not None:
            raise ValueError("the digits generator has no text encoder: its prompts are not precomputed")
        from services.models.digits import load_digits_generator

        return load_digits_generator(path, device=device, **lora)

    def check_prompts(self, prompts: Sequence[str]) -> None:
        from services.data.digits import parse_digit_prompt

        for p in prompts:
            parse_digit_prompt(p)

    def export_transformer(self, model_path: str, weights: dict, out: Path) -> list[str]:
        """Its ``transformer/`` folder plus the class conditioner (``conditioner.safetensors``)."""
        import torch
        from safetensors.torch import save_file

        from services.models.digits import load_digits_generator

        gen = load_digits_generator(model_path)
        gen.load_trainable_state_dict(weights)
        gen.transformer.save_pretrained(out / "transformer")
        cond = Path(model_path) / "conditioner.pt"
        if cond.is_file():
            state = torch.load(cond, map_location="cpu", weights_only=True)
            save_file({k: v.contiguous() for k, v in state.items()}, out / "conditioner.safetensors")
        return ["transformer/", "conditioner.safetensors"]


DIGITS = DigitsFamily(spec("digits"))
