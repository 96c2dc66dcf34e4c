"""Z-Image's data (``model.kind: z_image``; behaviour: ``services.models.families.z_image``). Torch-free.

* LoRA: X-GenGroup/Flow-Factory ``src/flow_factory/models/z_image/z_image.py`` ``default_target_modules`` (snapshot
  ``a0b2bc5``): each block's attention projections and its SwiGLU feed-forward, which match the 30 main layers
  and both refiners (``noise_refiner``, ``context_refiner``); its GRPO LoRA example
  (``examples/grpo/lora/z_image/default.yaml``) trains rank 64 / alpha 128.
* Text: Qwen3-4B (4.02 B published parameters; hidden 2560 = the transformer's ``cap_feat_dim``), one tokenizer;
  the caption is at most ``max_sequence_length`` tokens (the chat-templated prompt is truncated there, and the
  padding removed), so the plan's text length is that bound.
* Counts: ``deploy/architectures/z-image/transformer_config.json`` (Tongyi-MAI/Z-Image-Turbo as quoted; the
  base Z-Image is assumed to share it) built on the meta device (``tests/services/test_meta_families.py``).
"""

from __future__ import annotations

from services.config.family_spec import VAE_B, FamilySpec, LoraDefaults, Variant

__all__ = ["Z_IMAGE"]

QWEN3_4B_B = 4.02  # Qwen/Qwen3-4B's model card: "Number of Parameters: 4.0B"

_TARGETS = (
    "attention.to_k",
    "attention.to_q",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
)

Z_IMAGE = FamilySpec(
    "z_image",
    LoraDefaults(_TARGETS, 64, 2.0, "Flow-Factory src/flow_factory/models/z_image/z_image.py default_target_modules"),
    text_parts=("text_encoder", "tokenizer"),
    pipeline_class="ZImagePipeline",
    transformer_class="ZImageTransformer2DModel",
    lora_writer="ZImagePipeline",
    components_b=QWEN3_4B_B + VAE_B,
    variants=(Variant("z-image", (), "z-image", 6_154_908_736, 2_480_640),),
)
