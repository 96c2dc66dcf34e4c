"""Wan 2.1 / 2.2 text-to-video's data (``model.kind: wan``; its behaviour: ``services.models.families.wan``).

* LoRA targets: X-GenGroup/Flow-Factory ``src/flow_factory/models/wan/wan2_t2v.py`` (``default_target_modules``,
  snapshot a0b2bc5): each block's self-attention ``attn1.to_q/k/v/to_out.0``, cross-attention ``attn2.*`` and
  feed-forward ``ffn.net.0.proj`` / ``ffn.net.2``; rank 64 / alpha 128 as its ``examples/grpo/lora/wan21/t2v.yaml``.
* Frames: the Wan VAE (``AutoencoderKLWan``) compresses time 4x, ``num_frames = 4 k + 1`` -> ``k + 1`` latent frames
  (diffusers ``pipelines/wan/pipeline_wan.py`` ``check_inputs`` / ``prepare_latents``); the default 5 frames is
  Flow-Factory's Wan 2.1 GRPO recipe (``examples/grpo/lora/wan21/t2v.yaml``: 256 px, 5 frames, 10 steps).
* Timestep: the transformer takes the scheduler's ``t`` in [0, 1000) (``timestep_scale`` 1000).
* Counts: the published configs in ``deploy/architectures`` on the meta device
  (``tests/services/test_meta_families.py``); the text encoder umt5-xxl's encoder (google/umt5-xxl's config:
  vocab 256384, width 4096, 24 layers, gated-GELU 10240) builds 5,680,910,336 parameters on meta, the Wan VAE
  (``deploy/architectures/wan2.1-t2v-14b/vae_config.json``, Wan-Video/Wan2.1 ``wan/modules/vae.py``
  ``_video_vae``'s sizes) 126,892,531.
* Wan 2.2 A14B: two experts (``transformer`` / ``transformer_2`` switched at ``boundary_ratio``), both held and
  both adapted (Flow-Factory ``examples/grpo/lora/wan22/t2v.yaml``: ``target_components: ['transformer',
  'transformer_2']``), so its
  plan variant counts twice one expert's published config (the activations: one expert's, one runs per call).
"""

from __future__ import annotations

from services.config.family_spec import FamilySpec, LoraDefaults, Variant

__all__ = ["WAN"]

_UMT5_XXL_B, _WAN_VAE_B = 5.681, 0.127
_EXPERT, _EXPERT_LORA = 14_288_491_584, 4_792_320  # Wan 2.1 14B = each Wan 2.2 A14B expert
_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ffn.net.0.proj",
    "ffn.net.2",
)
_LORA = LoraDefaults(_TARGETS, 64, 2.0, "Flow-Factory src/flow_factory/models/wan/wan2_t2v.py (default_target_modules)")

WAN = FamilySpec(
    "wan",
    _LORA,
    text_parts=("text_encoder", "tokenizer"),
    pipeline_class="WanPipeline",
    transformer_class="WanTransformer3DModel",
    lora_writer="WanPipeline",
    timestep_scale=1000.0,
    components_b=_UMT5_XXL_B + _WAN_VAE_B,
    frame_stride=4,
    default_frames=5,
    variants=(
        Variant("wan2.1-t2v-1.3b", (("1.3b", "1_3b", "1-3b"),), "wan2.1-t2v-1.3b", 1_418_996_800, 1_367_040),
        Variant("wan2.2-t2v-a14b", (("2.2", "2_2", "a14b"),), "wan2.2-t2v-a14b", 2 * _EXPERT, 2 * _EXPERT_LORA),
        Variant("wan2.1-t2v-14b", (), "wan2.1-t2v-14b", _EXPERT, _EXPERT_LORA),
    ),
)
