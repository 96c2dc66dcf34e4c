"""The reward-scorer protocol, input validation, the registry and weighted combination.

Protocol: ``score(images, prompts) -> (B,) float32`` with ``images`` a ``(B, 3, H, W)`` float
tensor in [0, 1]. Scorers are batched, device-aware and deterministic in eval mode.

A **group-wise** scorer (``groupwise = True``) scores a whole prompt group at once:
``score(images, prompts, group_ids) -> (B,)``, e.g. a rank within the group or a pairwise judge
(Flow-Factory's group-wise rewards). The coordinator never splits a group across scorer actors.

A video family's samples are ``(B, F, 3, H, W)``: a scorer is given one frame of each sample per call and its
scores are averaged over the frames, unless it sets ``takes_clips = True``, when it gets the clips whole.

A user's scorer need not live in this package: ``reward.scorers: [{name: mine, impl:
"my_pkg.rewards:MyScorer"}]`` imports ``MyScorer`` and calls it like a registered factory,
``MyScorer(path=..., device=..., **options)``; the result is checked against the protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeGuard, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "load_state_file",
    "DifferentiableScorer",
    "FeatureJudge",
    "GroupRewardScorer",
    "RewardScorer",
    "available_scorers",
    "build_scorer",
    "combine_scores",
    "is_groupwise",
    "takes_clips",
    "register_scorer",
    "validate_images",
]


@runtime_checkable
class RewardScorer(Protocol):
    """Anything with a name and ``score(images (B, 3, H, W) in [0, 1], prompts) -> (B,)``."""

    name: str

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


@runtime_checkable
class GroupRewardScorer(Protocol):
    """``groupwise = True`` and ``score(images (B, 3, H, W), prompts, group_ids (B,)) -> (B,)``."""

    name: str
    groupwise: bool

    def score(self, images: Tensor, prompts: Sequence[str], group_ids: Tensor) -> Tensor: ...


def takes_clips(scorer: object) -> bool:
    """Whether ``scorer`` scores videos ``(B, F, 3, H, W)`` whole (``takes_clips = True``); every other scorer
    gets a video family's samples frame by frame, its scores averaged over the frames
    (``services.training.scoring``)."""
    return bool(getattr(scorer, "takes_clips", False))


@runtime_checkable
class DifferentiableScorer(Protocol):
    """A scorer whose ``differentiable_score(images, prompts) -> (B,)`` keeps the gradient w.r.t. the images."""

    name: str

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...

    def differentiable_score(self, images: Tensor, prompts: Sequence[str]) -> Tensor: ...


@runtime_checkable
class FeatureJudge(Protocol):
    """A judge whose ``features(images (B, 3, H, W)) -> (B, F)`` the set-level metrics compare."""

    def features(self, images: Tensor) -> Tensor: ...


def features_tensor(out: object) -> Tensor:
    """The ``(B, D)`` tensor of a transformers ``get_*_features`` call: the tensor itself (transformers 4) or
    its ``pooler_output`` (transformers 5 returns a model output)."""
    pooled = getattr(out, "pooler_output", out)
    if not isinstance(pooled, Tensor):
        raise TypeError(f"expected a feature tensor or a model output with pooler_output, got {type(out).__name__}")
    return pooled


def is_groupwise(scorer: object) -> TypeGuard[GroupRewardScorer]:
    """Whether ``scorer`` scores whole prompt groups (see the module docstring)."""
    return bool(getattr(scorer, "groupwise", False))


def validate_images(images: Tensor, prompts: Sequence[str], *, scorer: str) -> None:
    """Raise a ValueError naming the expected shape when the batch is malformed."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{scorer}: images must be a (B, 3, H, W) float tensor in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{scorer}: images must be float in [0, 1], got dtype {images.dtype}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{scorer}: {images.shape[0]} images but {len(prompts)} prompts")


ScorerFactory = Callable[..., RewardScorer]
_SCORERS: dict[str, ScorerFactory] = {}  # user registrations (register_scorer)
# The built-in scorers, by import path: the scorer modules import this one (for the protocol and
# validate_images), never the other way round, so there is no import circle; a scorer's heavy
# dependencies load only when it is built.
BUILTIN_SCORERS: dict[str, str] = {
    "clip_group_rank": "services.rewards.clip:_clip_group_rank",
    "colour_brightness": "services.rewards.colour:_brightness",
    "colour_clip": "services.rewards.colour:_clip",
    "colour_contrast": "services.rewards.colour:_contrast",
    "colour_jpeg": "services.rewards.colour:_jpeg",
    "colour_judge": "services.rewards.colour:_judge",
    "colour_pref": "services.rewards.colour_pref:_pref",
    "colour_realism": "services.rewards.colour:_realism",
    "colour_saturation": "services.rewards.colour:_saturation",
    "colour_texture": "services.rewards.colour:_texture",
    "digits_classifier": "services.rewards.digits:_classifier",
    "digits_ink": "services.rewards.digits:_ink",
    "digits_judge": "services.rewards.digits:_judge",
    "digits_realism": "services.rewards.digits:_realism",
    "hpsv2": "services.rewards.clip:_hpsv2",
    "http_judge": "services.rewards.judges:_http_judge",
    "image_reward": "services.rewards.image_reward:_image_reward",
    "laion_aesthetic": "services.rewards.aesthetic:_laion_aesthetic",
    "ocr": "services.rewards.ocr:_ocr",
    "pickscore": "services.rewards.clip:_pickscore",
    "realism_detector": "services.rewards.realism:_realism",
    "unified_reward": "services.rewards.unified_reward:_unified_reward",
    "vlm_judge": "services.rewards.judges:_vlm_judge",
}


def register_scorer(name: str) -> Callable[[ScorerFactory], ScorerFactory]:
    """Register a factory ``(path=None, device='cpu', **options) -> RewardScorer``."""

    def deco(factory: ScorerFactory) -> ScorerFactory:
        if name in _SCORERS or name in BUILTIN_SCORERS:
            raise ValueError(f"scorer {name!r} is already registered")
        _SCORERS[name] = factory
        return factory

    return deco


def available_scorers() -> list[str]:
    """Sorted scorer names: the built-in ones and the user-registered ones."""
    return sorted({*BUILTIN_SCORERS, *_SCORERS})


def build_scorer(
    name: str,
    *,
    path: str | None = None,
    device: str | torch.device = "cpu",
    options: Mapping[str, Any] | None = None,
    impl: str | None = None,
) -> RewardScorer:
    """Instantiate a registered scorer, or the class / factory ``impl`` (``"module.path:Name"``).

    An unknown name lists the known ones; an ``impl`` that cannot be imported, built, or does not
    follow the protocol raises an error naming the scorer, the import path and what is wrong.
    """
    if impl is not None:
        factory = _import_impl(name, impl)
        try:
            scorer = factory(path=path, device=device, **dict(options or {}))
        except TypeError as err:
            raise TypeError(
                f"scorer {name!r}: {impl} must accept (path=None, device='cpu', **options); calling it failed: {err}"
            ) from err
        _check_protocol(name, impl, scorer)
        return scorer
    if name in BUILTIN_SCORERS:
        return _import_impl(name, BUILTIN_SCORERS[name])(path=path, device=device, **dict(options or {}))
    if name not in _SCORERS:
        raise KeyError(f"unknown scorer {name!r}; known scorers: {available_scorers()} (or give impl: 'module:Class')")
    return _SCORERS[name](path=path, device=device, **dict(options or {}))


def _import_impl(name: str, impl: str) -> Callable[..., Any]:
    import importlib

    module_name, sep, attr = impl.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"scorer {name!r}: impl must look like 'package.module:ClassName', got {impl!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"scorer {name!r}: cannot import module {module_name!r} of impl {impl!r} ({err}); on a Ray cluster it "
            "must be importable on every node (an installed package, or runtime_env py_modules / working_dir)"
        ) from err
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise AttributeError(f"scorer {name!r}: module {module_name!r} has no attribute {attr!r} (impl {impl!r})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise TypeError(f"scorer {name!r}: {impl} is not a class or factory")
    return factory


def _check_protocol(name: str, impl: str, scorer: object) -> None:
    score = getattr(scorer, "score", None)
    if not callable(score):
        raise TypeError(
            f"scorer {name!r}: {impl} built a {type(scorer).__name__} without a score method; the protocol is "
            "score(images (B, 3, H, W) in [0, 1], prompts) -> (B,) tensor, or with groupwise = True "
            "score(images, prompts, group_ids)"
        )
    if not hasattr(scorer, "name"):
        try:
            setattr(scorer, "name", name)  # noqa: B010 - scorer is any user object, its type has no name
        except AttributeError:
            pass


def combine_scores(scores: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``sum_k w_k * s_k`` over the named ``(B,)`` scores."""
    missing = sorted(set(weights) - set(scores))
    if missing:
        raise KeyError(f"no scores for {missing}; have {sorted(scores)}")
    return torch.stack([weights[k] * scores[k].float() for k in weights]).sum(dim=0)


def load_state_file(path: str | Path, *, what: str) -> dict[str, Tensor]:
    """A scorer's weight file as its tensors, never unpickled: safetensors, or ``torch.load(weights_only=True)``.

    A checkpoint that wraps its tensors in ``{"state_dict": ...}`` is unwrapped and DataParallel's ``module.``
    prefix dropped; a file that holds anything but tensors raises naming ``what`` (the scorer).
    """
    import pickle

    p = Path(path).expanduser()
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{what}: {p} holds objects other than tensors; it is not unpickled: {err}") from err
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{what}: {p} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
