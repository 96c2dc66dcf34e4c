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
from dataclasses import dataclass, field
from types import MappingProxyType

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

# Published parameter counts (billions) of the components the pipelines share.
CLIP_L_B, CLIP_G_B, T5_XXL_B, VAE_B = 0.123, 0.695, 4.76, 0.084


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


@dataclass(frozen=True)
class Variant:
    """A published model of a family (the plan's parameter counts and architecture folder).

    Attributes:
        name: the plan's name for it (``sd3.5-large``).
        match: groups of substrings of the lower-cased ``model.path``; it matches when each group has one.
        folder: its ``deploy/architectures`` folder.
        transformer_params / lora_per_rank: counted on the published config (meta device).
        overrides: changes to the folder's transformer config (SD3-medium: SD3.5-M's blocks without the second
            attention and the qk-norm, its ``pos_embed_max_size`` 192).
    """

    name: str
    match: tuple[tuple[str, ...], ...]
    folder: str
    transformer_params: int
    lora_per_rank: int
    overrides: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class FamilySpec:
    """One family's data (its behaviour: ``services.models.families``).

    Attributes:
        name: ``model.kind``.
        lora: the LoRA defaults of the family's source.
        embedded: built here from seeds and packaged data (nothing downloaded, no ``model.path``, no text
            encoder; ``normguard prepare`` builds it).
        grid_shift: the shift ``rollout.shift: null`` means where the family has no scheduler config (the
            embedded tasks); None = the scheduler config's own.
        text_parts: the pipeline's tokenizers and text encoders (not loaded when prompts come from a table).
        text_prefix_tokens: rows of ``prompt_embeds`` before the T5 rows (SD3: CLIP's 77).
        pipeline_class / transformer_class: the diffusers classes (loading, export, the model card).
        lora_writer: the diffusers pipeline whose ``save_lora_weights`` writes a LoRA export; None = no format.
        judge: the embedded task's judge scorer, whose features evaluation compares with held-out real images.
        latent_patch: side of the patches packed into one latent row (FLUX 2: ``(L, 4 C)``); 1 = unpacked.
        timestep_scale: the transformer's ``timestep`` per unit of sigma (SD3 1000, FLUX 1).
        components_b: published parameters (billions) of the text encoders plus the VAE (:data:`VAE_B`).
        variants: the published models, most specific first; the last one is the default.
    """

    name: str
    lora: LoraDefaults
    embedded: bool = False
    grid_shift: float | None = None
    text_parts: tuple[str, ...] = ()
    text_prefix_tokens: int = 0
    pipeline_class: str | None = None
    transformer_class: str | None = None
    lora_writer: str | None = None
    judge: str | None = None
    latent_patch: int = 1
    timestep_scale: float = 1.0
    components_b: float = 0.0
    variants: tuple[Variant, ...] = ()

    @property
    def has_text_encoder(self) -> bool:
        return bool(self.text_parts)

    def text_tokens(self, max_sequence_length: int) -> int:
        """Rows of ``prompt_embeds`` a transformer call sees."""
        return self.text_prefix_tokens + max_sequence_length

    def variant(self, path: str | None) -> Variant:
        """The published model ``model.path`` names (the last variant when none matches)."""
        p = (path or "").lower()
        for v in self.variants:
            if all(any(s in p for s in group) for group in v.match):
                return v
        if not self.variants:
            raise TypeError(f"model.kind={self.name!r} has no published variant (an embedded task)")
        return self.variants[-1]


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
