"""The model families' data, by ``model.kind``: names, which are embedded, LoRA defaults from the sources, the
figures ``normguard plan`` counts and the latent-packing facts. Torch-free: the config and the placement plan
read it. What a family *does* (loading, prompt encoding, packing, the grid, the transformer call) is its
behaviour module in ``services.models.families``, registered under the same name.

* SD3 / SD3.5: flow_grpo ``scripts/train_sd3.py`` (the ``use_lora`` block, commit ac4c86e, lines 419-434)
  and DiffusionNFT ``scripts/train_nft_sd3.py`` (commit 24af555, lines 420-432) adapt the same eight
  attention projections, both streams (``attn.to_*`` and the context stream's ``attn.add_*_proj`` /
  ``attn.to_add_out``), ``LoraConfig(r=32, lora_alpha=64)``. SD3.5-M's second attention (``attn2``) is
  not in the list, so it stays frozen there too. ``prompt_embeds`` are CLIP's 77 rows plus the T5 rows.
* FLUX: flow_grpo ``scripts/train_flux.py`` (commit 74db691, ``main``'s ``use_lora`` block) adds the
  double-stream blocks' feed-forwards (``ff.net.0.proj``, ``ff.net.2``, ``ff_context.*``) to the eight,
  ``LoraConfig(r=64, lora_alpha=128)``. Its ``attn.to_q/k/v`` also match the single-stream blocks'
  attention; their ``proj_mlp`` / ``proj_out`` are not in its list (frozen there too). Latents are packed
  2x2 patches (``FluxPipeline._pack_latents``), ``timestep = sigma``.
* digits, colour (ours): the four image-stream projections, alpha = rank; built here, no scheduler config:
  they integrate on diffusers' ``set_timesteps`` grid unshifted.

Peft matches a target name against a module's full name or its dotted suffix, so ``attn.to_q`` is every
block's ``...attn.to_q`` and not ``attn2.to_q``.

Plan figures: transformer parameters and LoRA parameters per unit of rank counted on the transformers built
from the published configs in ``deploy/architectures`` (meta device; ``tests/e2e/test_real_architectures.py``
recounts them). SD3-medium (2.03 B, no config there) has SD3.5-M's adapted blocks: 24 joint blocks of width
1536, the last without the context stream's output projection.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from services.config.families_flux2 import FLUX2
from services.config.families_qwen_image import QWEN_IMAGE
from services.config.families_wan import WAN
from services.config.families_z_image import Z_IMAGE
from services.config.family_spec import CLIP_G_B, CLIP_L_B, T5_XXL_B, VAE_B, FamilySpec, LoraDefaults, Variant

__all__ = [
    "EMBEDDED_KINDS",
    "FAMILIES",
    "KINDS",
    "LORA_DEFAULTS",
    "VAE_B",
    "FamilySpec",
    "LoraDefaults",
    "VARIANTS",
    "Variant",
    "architecture",
    "require",
    "spec",
]

_EMBEDDED_LORA = LoraDefaults(("to_q", "to_k", "to_v", "to_out.0"), None, 1.0, "ours (the image stream's attention)")
_DIGITS_SHIFT = 1.0  # the embedded digits model's grid: diffusers' set_timesteps grid, unshifted
_ATTENTION = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
_SD3_LORA = LoraDefaults(
    _ATTENTION, 32, 2.0, "flow_grpo scripts/train_sd3.py:419-434; DiffusionNFT scripts/train_nft_sd3.py:420-432"
)
_FLUX_TARGETS = (
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
)
_FLUX_LORA = LoraDefaults(_FLUX_TARGETS, 64, 2.0, "flow_grpo scripts/train_flux.py (main, the use_lora block)")
_SD3_MEDIUM = MappingProxyType(dict(dual_attention_layers=[], qk_norm=None, pos_embed_max_size=192))
_3_5 = ("3.5", "3-5")

_SPECS = (
    FamilySpec("digits", _EMBEDDED_LORA, embedded=True, grid_shift=_DIGITS_SHIFT, judge="digits_judge"),
    # the colour generator integrates on the digits grid too; its LoRA export goes through FluxPipeline's
    # writer, as export did before the registry
    FamilySpec(
        "colour",
        _EMBEDDED_LORA,
        embedded=True,
        grid_shift=_DIGITS_SHIFT,
        judge="colour_judge",
        lora_writer="FluxPipeline",
    ),
    FamilySpec(
        "sd3",
        _SD3_LORA,
        text_parts=("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"),
        text_prefix_tokens=77,  # CLIP's context (StableDiffusion3Pipeline)
        pipeline_class="StableDiffusion3Pipeline",
        transformer_class="SD3Transformer2DModel",
        lora_writer="StableDiffusion3Pipeline",
        timestep_scale=1000.0,
        components_b=CLIP_L_B + CLIP_G_B + T5_XXL_B + VAE_B,
        variants=(
            Variant("sd3.5-large", (_3_5, ("large",)), "sd3.5-large", 8_056_627_520, 1_473_792),
            Variant("sd3.5-medium", (_3_5,), "sd3.5-medium", 2_243_171_520, 586_752),
            Variant("sd3", (), "sd3.5-medium", 2_030_000_000, 586_752, _SD3_MEDIUM),
        ),
    ),
    FamilySpec(
        "flux",
        _FLUX_LORA,
        text_parts=("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
        pipeline_class="FluxPipeline",
        transformer_class="FluxTransformer2DModel",
        lora_writer="FluxPipeline",
        latent_patch=2,
        components_b=CLIP_L_B + T5_XXL_B + VAE_B,
        variants=(Variant("flux", (), "flux1-dev", 11_901_408_320, 2_801_664),),
    ),
    QWEN_IMAGE,
    WAN,
    Z_IMAGE,
    FLUX2,
)

FAMILIES: Mapping[str, FamilySpec] = MappingProxyType({s.name: s for s in _SPECS})
KINDS: tuple[str, ...] = tuple(FAMILIES)  # ModelConfig.kind's values
EMBEDDED_KINDS: frozenset[str] = frozenset(n for n, s in FAMILIES.items() if s.embedded)
LORA_DEFAULTS: Mapping[str, LoraDefaults] = MappingProxyType({n: s.lora for n, s in FAMILIES.items()})
VARIANTS: Mapping[str, Variant] = MappingProxyType({v.name: v for s in _SPECS for v in s.variants})


def spec(kind: str) -> FamilySpec:
    """The data of ``model.kind``; a ``KeyError`` naming the known kinds otherwise."""
    try:
        return FAMILIES[kind]
    except KeyError:
        raise KeyError(f"unknown model kind {kind!r}; known: {list(FAMILIES)}") from None


def require(kind: str, name: str, message: str) -> None:
    """A tool built for one family (``analyze``: digits; ``base_spread``, the proxy probe: colour):
    ``ValueError`` with ``message`` for any other ``model.kind``."""
    if spec(kind) is not spec(name):
        raise ValueError(message)


def architecture(variant: str, what: str) -> tuple[str, Mapping[str, object]]:
    """``(deploy/architectures folder, config overrides)`` of a plan variant's ``what`` (``transformer`` /
    ``vae``) config; a family name means its default variant, anything else names a folder."""
    if variant in FAMILIES and FAMILIES[variant].variants:
        variant = FAMILIES[variant].variants[-1].name
    if variant not in VARIANTS:
        return variant, {}
    v = VARIANTS[variant]
    return v.folder, (v.overrides if what == "transformer" else {})
