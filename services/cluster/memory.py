"""Each actor's GPU memory, term by term: what ``normguard plan`` adds up and checks against a card.

* weights: the folders a diffusers pipeline loads (``model_index.json``'s components, not a stray folder
  such as SD3.5-M's ``text_encoders/`` of non-diffusers copies), from the files of a staged directory or
  from the published parameter counts (``services.cluster.plan``); the text encoders are a term of their
  own, dropped where prompts are encoded once by a pre-pass (:func:`_loads_text_encoders`);
* learners: the trainable weights in float32 (``services.models.base``), their gradients, Adam's two
  float32 moments and the old / EMA copies (one each, an upper bound: a method may keep neither);
* activations at ``learner.micro_batch`` (the forward with grad, saved for backward) and, while that
  graph is alive, the no-grad forwards of ``v_ref`` / ``v_old`` at the same micro-batch;
* rollouts (samplers, hybrid learners): the transformer's no-grad transient at ``rollout.micro_batch``
  samples per call (the whole share when null; CFG doubles the rows) and the VAE decode at
  ``rollout.decode_batch`` latents per call plus the share's float32 images.

The per-sample counts come from ``services.cluster.activations`` (meta-device forwards of the real
architecture at the configured resolution and text length). Phases take turns on a device (a hybrid
learner samples, then trains), so an actor's peak is its resident terms plus its largest phase.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.config import families

if TYPE_CHECKING:
    from services.cluster.activations import TransformerBytes
    from services.config import ExperimentConfig, ModelConfig

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Published parameter counts (transformer, LoRA per unit of rank, text encoders + VAE) per family and variant:
# services.config.families, where their sources are cited.


def _family(kind: str, path: str | None) -> str:
    """The plan variant (``sd3.5-large``, ``flux``, ...) that ``model.path`` names."""
    return families.spec(kind).variant(path).name


__all__ = [
    "Term",
    "model_terms",
    "peak_gb",
    "pipeline_bytes",
    "rollout_terms",
    "share_of",
    "text_tokens",
    "training_terms",
]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Term:
    """One part of an actor's memory.

    Attributes:
        name: what it is, in words (``"decode of 192 images at 512 px"``).
        gb: decimal GB.
        phase: ``""`` when always held; else the phase it belongs to (``train``, ``rollout``, ``decode``),
            phases taking turns.
        hint: the knob that shrinks it.
    """

    name: str
    gb: float
    phase: str = ""
    hint: str = ""


def peak_gb(terms: list[Term]) -> float:
    """Resident terms plus the largest phase."""
    phases: dict[str, float] = {}
    for t in terms:
        if t.phase:
            phases[t.phase] = phases.get(t.phase, 0.0) + t.gb
    return sum(t.gb for t in terms if not t.phase) + max(phases.values(), default=0.0)


def _loads_text_encoders(cfg: ExperimentConfig) -> bool:
    """Whether samplers and learners load the text encoders: not with ``model.prompt_embeddings: once`` (a
    pre-pass encodes the prompts once; the field's default)."""
    return cfg.model.prompt_embeddings != "once"


def text_tokens(cfg: ExperimentConfig) -> int:
    """Text length of a transformer call, the family's: SD3 77 CLIP + T5 tokens, FLUX the T5 tokens."""
    return families.spec(cfg.model.kind).text_tokens(cfg.model.max_sequence_length)


def _folder_bytes(folder: Path) -> float:
    """Weight files of one component folder: its safetensors when it has any (diffusers loads those), else
    its ``.bin`` / ``.pt`` files."""
    files = [f for f in folder.rglob("*") if f.is_file() and f.suffix in _WEIGHT_SUFFIXES]
    safe = [f for f in files if f.suffix == ".safetensors"]
    return float(sum(f.stat().st_size for f in (safe or files)))


def pipeline_bytes(path: Path) -> dict[str, float] | None:
    """Bytes per component that ``DiffusionPipeline.from_pretrained`` loads from ``path``: the folders named
    in ``model_index.json`` with a library and class (``[null, null]`` = not loaded); None without it."""
    index = path / "model_index.json"
    if not index.is_file():
        return None
    out = {}
    for name, spec in json.loads(index.read_text()).items():
        if name.startswith("_") or not isinstance(spec, list) or None in spec[:2]:
            continue
        if (path / name).is_dir():
            out[name] = _folder_bytes(path / name)
    return out


def _rows(cfg: ExperimentConfig) -> int:
    return 2 if cfg.rollout.guidance_scale != 1.0 else 1  # CFG: the null row goes with each sample


def _measured(cfg: ExperimentConfig, family: str) -> TransformerBytes:
    from services.cluster.activations import transformer_bytes

    m = cfg.model
    local = m.path if m.path and Path(m.path).is_dir() else None
    return transformer_bytes(family, resolution=m.resolution, text_tokens=text_tokens(cfg), dtype=m.dtype,
                             lora_rank=m.lora_rank, targets=tuple(m.lora_targets), model_dir=local,
                             latent_frames=families.spec(m.kind).latent_frames(m.num_frames),
                             checkpointing=m.gradient_checkpointing)  # fmt: skip


def training_terms(cfg: ExperimentConfig, family: str) -> list[Term]:
    """A learner's micro-batch: saved activations and the no-grad forwards beside them."""
    per, n = _measured(cfg, family), cfg.learner.micro_batch * _rows(cfg)
    hint = "lower learner.micro_batch"
    saved = f"activations of {cfg.learner.micro_batch} samples (saved for backward)"
    terms = [
        Term(saved, per.saved * n / 1e9, "train", hint),
        Term("no-grad forwards beside them (v_ref / v_old)", per.no_grad_peak * n / 1e9, "train", hint),
    ]
    if cfg.model.gradient_checkpointing:  # the checkpointed blocks' inputs above, one block recomputed in backward
        terms.append(Term("backward: one checkpointed block recomputed", per.recompute * n / 1e9, "train", hint))
    return terms


def rollout_terms(cfg: ExperimentConfig, family: str, share: int) -> list[Term]:
    """A rollout of ``share`` samples: the transformer's no-grad transient per call, the VAE decode."""
    from services.cluster.activations import vae_decode_bytes

    m, r = cfg.model, cfg.rollout
    per = _measured(cfg, family)
    call = min(r.micro_batch or share, share)
    decode = min(r.decode_batch or share, share)
    local = m.path if m.path and Path(m.path).is_dir() else None
    fam = families.spec(m.kind)
    latent_frames = fam.latent_frames(m.num_frames)
    frames = (latent_frames - 1) * fam.frame_stride + 1  # 1 for an image family
    per_image = vae_decode_bytes(
        m.kind, resolution=m.resolution, dtype=m.dtype, model_dir=local, latent_frames=latent_frames
    )
    images = share * frames * 3 * m.resolution**2 * 4  # the share's float32 images (videos), kept until they ship
    transformer = per.no_grad_peak * call * _rows(cfg) / 1e9
    return [
        Term(f"transformer call of {call} samples", transformer, "rollout", "set rollout.micro_batch"),
        Term(
            f"decode of {decode} images at {m.resolution} px",
            (per_image * decode + images) / 1e9,
            "decode",
            "set rollout.decode_batch",
        ),
    ]


def _weights(model: ModelConfig) -> tuple[float, float, float, float]:
    """``(transformer GB, text encoders GB, the rest GB (VAE, ...), trainable params)`` at the model's dtype."""

    width = _BYTES[model.dtype]
    variant = families.spec(model.kind).variant(model.path)
    comps = pipeline_bytes(Path(model.path)) if model.path and Path(model.path).is_dir() else None
    if comps and "transformer" in comps:
        tr = comps.pop("transformer") / 1e9
        enc = sum(v for k, v in comps.items() if k.startswith("text_encoder")) / 1e9
        rest = sum(comps.values()) / 1e9 - enc
        params = tr * 1e9 / width
    else:
        params = variant.transformer_params
        tr, rest = params * width / 1e9, families.VAE_B * width
        comps_b = families.spec(model.kind).components_b if variant.components_b is None else variant.components_b
        enc = (comps_b - families.VAE_B) * width
    trainable = float(variant.lora_per_rank * model.lora_rank) if model.lora_rank else params
    return tr, enc, rest, trainable


def model_terms(cfg: ExperimentConfig) -> tuple[list[Term], list[Term]]:
    """``(learner terms, sampler terms)`` of a diffusers generator."""

    model, fam = cfg.model, _family(cfg.model.kind, cfg.model.path)
    tr, enc, rest, trainable = _weights(model)
    weights = [Term("transformer", tr), Term("VAE, other components", rest)]
    if _loads_text_encoders(cfg):
        weights.append(Term("text encoders", enc, hint="encode the prompts once (no text encoders per actor)"))
    else:  # the saving, shown: what each sampler / learner would otherwise hold
        weights.append(Term(f"text encoders: {enc:.1f} GB not loaded (prompts encoded once)", 0.0))
    what = "LoRA" if model.lora_rank else "transformer"
    # float32 trainables (services.models.base), their gradients, Adam's two moments, old and EMA copies
    state = Term(f"{what}: fp32 weights, grads, Adam moments, old/EMA copies", trainable * 4 * 6 / 1e9)
    learner = [*weights, state, *training_terms(cfg, fam)]
    rollout = rollout_terms(cfg, fam, share_of(cfg))
    if cfg.resources.placement == "hybrid":
        learner += rollout
    return learner, [*weights, *rollout]


def share_of(cfg: ExperimentConfig) -> int:
    """Samples one sampler (or, hybrid, one learner) generates per step."""
    n = cfg.resources.num_learners if cfg.resources.placement == "hybrid" else cfg.rollout.num_samplers
    return math.ceil(cfg.samples_per_step / n)
