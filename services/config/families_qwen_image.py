"""Qwen-Image's family data (``model.kind: qwen_image``; behaviour: ``services.models.families.qwen_image``).

LoRA targets: verl-omni's (verl-project/verl-omni ``examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr_lora.sh``,
the same list in its DiffusionNFT / DPO scripts, commit a1139ba): the eight attention projections of both streams
and both Linears of both feed-forwards, ``lora_rank 64`` / ``lora_alpha 128``. Flow-Factory's list
(X-GenGroup/Flow-Factory ``src/flow_factory/models/qwen_image/qwen_image.py``, ``default_target_modules``, commit
a0b2bc5) names the second FFN Linear ``img_mlp.net.2.proj`` / ``txt_mlp.net.2.proj``, which do not exist on the
diffusers module (its second Linear is ``net.2``; ``docs/wip/families.md``, subtlety 8): peft skips them silently,
so following it literally would leave the FFN output projections frozen. verl-omni's ``net.2`` adapts them.

Counts, on the meta device from ``deploy/architectures/qwen-image/transformer_config.json`` (diffusers 0.42.1;
``tests/services/test_meta_families.py``, ``benchmarks/meta_families.py``): 20,430,401,088 transformer parameters,
6,635,520 LoRA parameters per unit of rank on verl-omni's twelve targets. Text encoder: Qwen2.5-VL-7B-Instruct,
8.29 B (its model card); the VAE (``AutoencoderKLQwenImage``, its class defaults = the hub file's as far as
known): 126,892,531, counted on meta. The prompt embeddings are at most ``max_sequence_length`` rows (the
pipeline drops the template's 34 tokens, pads to the batch's longest prompt and truncates; no prefix rows).
"""

from __future__ import annotations

from services.config.family_spec import FamilySpec, LoraDefaults, Variant

__all__ = ["QWEN_IMAGE", "QWEN_IMAGE_LORA"]

_QWEN_VL_7B_B = 8.29  # Qwen/Qwen2.5-VL-7B-Instruct's model card: "8.29B params"
_QWEN_VAE_B = 0.127  # AutoencoderKLQwenImage, 126,892,531 parameters (class defaults, meta device)

QWEN_IMAGE_LORA = LoraDefaults(
    (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ),
    64,
    2.0,
    "verl-omni examples/flowgrpo_trainer/qwen_image/run_qwen_image_ocr_lora.sh (a1139ba); not Flow-Factory's "
    "qwen_image.py default_target_modules, whose img_mlp.net.2.proj / txt_mlp.net.2.proj do not exist on the "
    "diffusers QwenImageTransformer2DModel (docs/wip/families.md)",
)

QWEN_IMAGE = FamilySpec(
    "qwen_image",
    QWEN_IMAGE_LORA,
    text_parts=("text_encoder", "tokenizer"),
    pipeline_class="QwenImagePipeline",
    transformer_class="QwenImageTransformer2DModel",
    lora_writer="QwenImagePipeline",
    latent_patch=2,
    components_b=_QWEN_VL_7B_B + _QWEN_VAE_B,
    variants=(Variant("qwen-image", (), "qwen-image", 20_430_401_088, 6_635_520),),
)
