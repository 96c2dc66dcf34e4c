"""The model-family registry, behaviour half: ``model.kind`` -> :class:`~services.models.families.base.ModelFamily`.

A family is one behaviour module here (its generator: loading, prompt encoding, latent packing, the grid from its
scheduler config, the transformer call) and one :class:`~services.config.families.FamilySpec` (its data: LoRA
defaults, plan figures, packing facts) registered under the same name, which the config and the plan read without
importing torch. Everything that differs between families is asked of these two objects, never decided by testing
the name (``tests/services/test_families.py`` fails on a model-kind comparison outside them).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from services.config.families import FAMILIES as SPECS
from services.models.families.base import ModelFamily
from services.models.families.colour import COLOUR
from services.models.families.digits import DIGITS
from services.models.families.flux import FLUX
from services.models.families.flux2 import FLUX2
from services.models.families.pipeline import PipelineFamily
from services.models.families.qwen_image import QWEN_IMAGE
from services.models.families.sd3 import SD3
from services.models.families.wan import WAN
from services.models.families.z_image import Z_IMAGE

__all__ = ["FAMILIES", "ModelFamily", "PipelineFamily", "family", "family_of_transformer"]

FAMILIES: Mapping[str, ModelFamily] = MappingProxyType(
    {f.name: f for f in (DIGITS, COLOUR, SD3, FLUX, QWEN_IMAGE, WAN, Z_IMAGE, FLUX2)}
)
if set(FAMILIES) != set(SPECS) or any(FAMILIES[n].spec is not SPECS[n] for n in SPECS):
    raise ImportError(f"behaviour families {sorted(FAMILIES)} do not match the data ones {sorted(SPECS)}")


def family(kind: str) -> ModelFamily:
    """The family of ``model.kind``; a ``KeyError`` naming the known ones otherwise."""
    try:
        return FAMILIES[kind]
    except KeyError:
        raise KeyError(f"unknown model kind {kind!r}; known: {list(FAMILIES)}") from None


def family_of_transformer(class_name: str) -> ModelFamily:
    """The family whose ``spec.transformer_class`` is ``class_name`` (a diffusers transformer class)."""
    found = [f for f in FAMILIES.values() if f.spec.transformer_class == class_name]
    if not found:
        raise KeyError(f"no family has the transformer class {class_name!r}")
    return found[0]
