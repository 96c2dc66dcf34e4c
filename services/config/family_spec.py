"""The data classes of a model family (``services.config.families`` registers one per ``model.kind``). Torch-free.

A new family's data is one module ``services.config.families_<name>`` defining its :class:`FamilySpec` from
these, added to ``services.config.families``' registry; its behaviour is one module in
``services.models.families``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["CLIP_G_B", "CLIP_L_B", "T5_XXL_B", "VAE_B", "FamilySpec", "LoraDefaults", "Variant"]

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
        components_b: the variant's text encoders plus VAE (billions) where they differ from the family's
            ``FamilySpec.components_b`` (FLUX.2 [klein]'s Qwen3 against [dev]'s Mistral); None = the family's.
    """

    name: str
    match: tuple[tuple[str, ...], ...]
    folder: str
    transformer_params: int
    lora_per_rank: int
    overrides: Mapping[str, object] = field(default_factory=dict)
    components_b: float | None = None


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
        frame_stride: a video family's VAE temporal compression (Wan: 4, ``num_frames = 4 k + 1``, latent frames
            ``k + 1``); 0 = an image family (``model.num_frames`` must stay unset).
        default_frames: a video family's ``num_frames`` when ``model.num_frames`` is unset.
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
    frame_stride: int = 0
    default_frames: int = 1
    variants: tuple[Variant, ...] = ()

    @property
    def has_text_encoder(self) -> bool:
        return bool(self.text_parts)

    def text_tokens(self, max_sequence_length: int) -> int:
        """Rows of ``prompt_embeds`` a transformer call sees."""
        return self.text_prefix_tokens + max_sequence_length

    @property
    def is_video(self) -> bool:
        return self.frame_stride > 0

    def latent_frames(self, num_frames: int | None) -> int:
        """Latent frames of ``num_frames`` video frames (``None``: :attr:`default_frames`); 1 for an image family.
        ``ValueError`` unless ``num_frames = frame_stride * k + 1``."""
        if not self.is_video:
            if num_frames not in (None, 1):
                raise ValueError(f"model.kind={self.name!r} makes images: model.num_frames must be unset")
            return 1
        n = self.default_frames if num_frames is None else num_frames
        if n < 1 or (n - 1) % self.frame_stride:
            raise ValueError(f"{self.name}: num_frames must be {self.frame_stride} k + 1 (the VAE's), got {n}")
        return (n - 1) // self.frame_stride + 1

    def variant(self, path: str | None) -> Variant:
        """The published model ``model.path`` names (the last variant when none matches)."""
        p = (path or "").lower()
        for v in self.variants:
            if all(any(s in p for s in group) for group in v.match):
                return v
        if not self.variants:
            raise TypeError(f"model.kind={self.name!r} has no published variant (an embedded task)")
        return self.variants[-1]
