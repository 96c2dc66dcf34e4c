"""FLUX.2 ([dev]: ``Flux2Pipeline``; [klein] 4B / 9B: ``Flux2KleinPipeline``; both ``Flux2Transformer2DModel``): the
family's data. Torch-free. Behaviour: ``services.models.families.flux2``.

* LoRA targets: X-GenGroup/Flow-Factory ``src/flow_factory/models/flux/flux2.py`` and ``flux2_klein.py``
  ``default_target_modules`` (the same list in both, commit a0b2bc5): the double-stream blocks' attention
  (``attn.to_q/k/v``, ``attn.to_out.0``, the context stream's ``attn.add_*_proj`` / ``attn.to_add_out``) and
  feed-forwards (``ff.linear_in/out``, ``ff_context.linear_in/out``), and the single-stream blocks' fused
  ``attn.to_qkv_mlp_proj``. The list names ``attn.to_out.0`` twice; in diffusers 0.42.1 it matches only the
  double-stream blocks (a ``ModuleList``): the single-stream output projection is a bare Linear
  ``attn.to_out``, so it stays frozen, as in Flow-Factory (``tests/services/test_meta_families.py`` asserts
  what each target matches). Rank 64 / alpha 128: Flow-Factory ``examples/grpo/lora/flux2/t2i.yaml``,
  ``flux2_klein/default.yaml``.
* Latents: the VAE's 32 channels patchified 2 x 2 into 128 per token (``Flux2Pipeline.prepare_latents``), so one
  latent row covers ``latent_patch`` 2 VAE latents on a side; ``timestep = sigma`` (the transformer scales it by
  1000 itself); the prompt embeddings are ``max_sequence_length`` padded rows (no pooled vector).
* Plan figures: the published configs in ``deploy/architectures/flux2-*`` counted on the meta device
  (``tests/services/test_meta_families.py``). Text encoders: Mistral-Small-3.x 24B (dev's
  ``Mistral3ForConditionalGeneration``, the publisher's "24B"), Qwen3-4B (4.02 B) and Qwen3-8B (8.19 B) for the Klein
  models (the Qwen3 model cards' totals); the VAE (``AutoencoderKLFlux2``, class defaults) has 84.0 M parameters.
"""

from __future__ import annotations

from services.config.family_spec import VAE_B, FamilySpec, LoraDefaults, Variant

__all__ = ["FLUX2", "FLUX2_TARGETS"]

# Flow-Factory's default_target_modules, in its order (its second "attn.to_out.0" dropped: the same name)
FLUX2_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
)
_SOURCE = "Flow-Factory src/flow_factory/models/flux/flux2.py, flux2_klein.py default_target_modules; rank 64 / 128"
_MISTRAL_SMALL_B, _QWEN3_4B_B, _QWEN3_8B_B = 24.0, 4.02, 8.19
_KLEIN = ("klein",)

FLUX2 = FamilySpec(
    "flux2",
    LoraDefaults(FLUX2_TARGETS, 64, 2.0, _SOURCE),
    text_parts=("text_encoder", "tokenizer"),
    pipeline_class="Flux2Pipeline",  # [klein]: Flux2KleinPipeline, read from the model's model_index.json
    transformer_class="Flux2Transformer2DModel",
    lora_writer="Flux2Pipeline",  # Flux2LoraLoaderMixin: the same file format for both pipelines
    latent_patch=2,
    components_b=_MISTRAL_SMALL_B + VAE_B,
    variants=(
        Variant("flux2-klein-4b", (_KLEIN, ("4b",)), "flux2-klein-4b", 3_875_544_576, 1_198_080,
                components_b=_QWEN3_4B_B + VAE_B),
        Variant("flux2-klein-9b", (_KLEIN,), "flux2-klein-9b", 9_078_581_248, 2_228_224,
                components_b=_QWEN3_8B_B + VAE_B),
        Variant("flux2-dev", (), "flux2-dev", 32_223_281_152, 4_816_896),
    ),
)  # fmt: skip
