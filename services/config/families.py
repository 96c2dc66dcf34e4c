"""Per-family defaults that come from the sources: LoRA target modules and the LoRA scale (alpha / rank).

* SD3 / SD3.5: flow_grpo ``scripts/train_sd3.py`` (the ``use_lora`` block, commit ac4c86e, lines 419-434)
  and DiffusionNFT ``scripts/train_nft_sd3.py`` (commit 24af555, lines 420-432) adapt the same eight
  attention projections, both streams (``attn.to_*`` and the context stream's ``attn.add_*_proj`` /
  ``attn.to_add_out``), ``LoraConfig(r=32, lora_alpha=64)``. SD3.5-M's second attention (``attn2``) is
  not in the list, so it stays frozen there too.
* FLUX: flow_grpo ``scripts/train_flux.py`` (commit 74db691, ``main``'s ``use_lora`` block) adds the
  double-stream blocks' feed-forwards (``ff.net.0.proj``, ``ff.net.2``, ``ff_context.*``) to the eight,
  ``LoraConfig(r=64, lora_alpha=128)``. Its ``attn.to_q/k/v`` also match the single-stream blocks'
  attention; their ``proj_mlp`` / ``proj_out`` are not in its list (frozen there too).
* digits (ours): the four image-stream projections, alpha = rank.

Peft matches a target name against a module's full name or its dotted suffix, so ``attn.to_q`` is every
block's ``...attn.to_q`` and not ``attn2.to_q``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LORA_DEFAULTS", "LoraDefaults"]

_SD3_TARGETS = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


@dataclass(frozen=True)
class LoraDefaults:
    """A family's LoRA defaults.

    Attributes:
        targets: peft ``target_modules``.
        rank: the source's rank (documentation: ``model.lora_rank`` stays the user's choice, null = full
            fine-tuning).
        alpha_per_rank: ``lora_alpha / r`` of the source, applied when ``model.lora_alpha`` is null.
        source: where the values come from.
    """

    targets: tuple[str, ...]
    rank: int | None
    alpha_per_rank: float
    source: str


LORA_DEFAULTS = {
    "digits": LoraDefaults(("to_q", "to_k", "to_v", "to_out.0"), None, 1.0, "ours (the image stream's attention)"),
    "colour": LoraDefaults(("to_q", "to_k", "to_v", "to_out.0"), None, 1.0, "ours (the image stream's attention)"),
    "sd3": LoraDefaults(
        _SD3_TARGETS, 32, 2.0, "flow_grpo scripts/train_sd3.py:419-434; DiffusionNFT scripts/train_nft_sd3.py:420-432"
    ),
    "flux": LoraDefaults(
        (
            "attn.to_k",
            "attn.to_q",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_k_proj",
            "attn.add_q_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
            "ff.net.0.proj",
            "ff.net.2",
            "ff_context.net.0.proj",
            "ff_context.net.2",
        ),
        64,
        2.0,
        "flow_grpo scripts/train_flux.py (main, the use_lora block)",
    ),
}
