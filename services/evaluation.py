"""Evaluation of a generator, the one path for every caller: rewards, independent judges, the
per-step velocity-norm ratio against the frozen reference, and set-level quality in a judge's
features (Frechet distance, KID, precision / recall, within-prompt diversity), at each step count.

Where the samples and scores come from is injected: the training run evaluates on its first
sampler and scorer actors (``services.training.evaluator``), ``normguard prepare`` on in-process objects
(:func:`in_process`). Samples use fixed noise (one seed for the batch, the same for every model
compared). The norm ratio is measured along the policy's own ODE trajectory; with
``renormalize=True`` the policy's velocity is rescaled to the reference norm before each step
(the paper's inference-time baseline), so its effect on quality can be measured side by side.
Metric names are ``eval/{name}_{steps}steps`` (``report.eval_key``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from services.report import eval_key

if TYPE_CHECKING:
    from services.models.base import FlowGenerator
    from services.rewards.base import RewardScorer

__all__ = ["EvalPlan", "EvalResult", "Evaluator", "evaluate", "in_process"]

EVAL_SEED = 4321


@dataclass
class EvalResult:
    """Flat float metrics, per-step ratio curves and the images, per step count."""

    metrics: dict[str, float] = field(default_factory=dict)
    ratio_per_step: dict[int, list[float]] = field(default_factory=dict)
    images: dict[int, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalPlan:
    """What to evaluate: ``samples_per_prompt`` samples of each prompt at each step count.

    Attributes:
        prompts: the evaluation prompts (one group each).
        samples_per_prompt: samples per prompt.
        steps: step counts, e.g. ``(4, 20)``.
        scorers: the scorers whose mean is reported.
        guidance_scale: CFG scale.
        shift: a static grid shift, or ``None``: the generator family's schedule (``FlowGenerator.sigma_grid``).
        metadata: one prompt-file row per prompt (rule-based rewards), or ``None``.
        seed: the noise seed.
    """

    prompts: tuple[str, ...]
    samples_per_prompt: int
    steps: tuple[int, ...]
    scorers: tuple[str, ...]
    guidance_scale: float = 1.0
    shift: float | None = None
    metadata: tuple[dict, ...] | None = None
    seed: int = EVAL_SEED


@dataclass(frozen=True)
class Evaluator:
    """Where samples, scores and features come from.

    Attributes:
        sample: ``(prompts, num_steps, guidance_scale, shift, seed, renormalize) -> {"images", "ratio"}``
            with ``ratio`` ``(T, B)``.
        score: ``(images, prompts, group_ids, metadata) -> {name: (B,) scores}``.
        features: ``images -> (B, F)`` a judge's features for the set-level metrics, or ``None``.
        real_images: ``(N, 3, H, W)`` real images the set-level metrics compare against, or ``None``.
    """

    sample: Callable[..., dict]
    score: Callable[..., Mapping[str, Tensor]]
    features: Callable[[Tensor], Tensor] | None = None
    real_images: Tensor | None = None


def evaluate(plan: EvalPlan, ev: Evaluator, *, renormalize: bool = False) -> EvalResult:
    """Score fixed-noise samples at each step count of ``plan``."""
    per = plan.samples_per_prompt
    prompts = [p for p in plan.prompts for _ in range(per)]
    meta = [m for m in plan.metadata for _ in range(per)] if plan.metadata else None
    groups = torch.arange(len(plan.prompts)).repeat_interleave(per)  # one group per prompt
    features = ev.features
    real = features(ev.real_images) if features is not None and ev.real_images is not None else None
    result = EvalResult()
    for n in sorted(set(plan.steps)):
        out = ev.sample(prompts, n, plan.guidance_scale, plan.shift, plan.seed, renormalize)
        scores = ev.score(out["images"], prompts, groups, meta)
        result.images[n] = out["images"]
        for name in plan.scorers:
            if name in scores:  # an optional training scorer that failed every try is left out (logged)
                result.metrics[eval_key(name, n)] = float(scores[name].mean())
        result.ratio_per_step[n] = out["ratio"].mean(dim=1).tolist()
        result.metrics[eval_key("norm_ratio", n)] = float(out["ratio"].mean())
        if features is not None and real is not None:
            result.metrics.update(feature_metrics(features(out["images"]), real, groups, n))
    return result


def feature_metrics(fake: Tensor, real: Tensor, groups: Tensor, n: int) -> dict[str, float]:
    """Set-level quality and diversity in a judge's features: FD, KID, precision / recall, spread."""
    from normguard_core.sample_quality import kernel_inception_distance, precision_recall, within_group_spread
    from services.rewards.digits import frechet_distance

    out = {eval_key("frechet", n): frechet_distance(fake, real)}
    if min(len(fake), len(real)) >= 2:
        out[eval_key("kid", n)] = kernel_inception_distance(fake, real)
    if min(len(fake), len(real)) > 3:  # k = 3 neighbours
        out[eval_key("precision", n)], out[eval_key("recall", n)] = precision_recall(fake, real)
    if len(groups) > len(torch.unique(groups)):  # some prompt has >= 2 samples
        out[eval_key("diversity", n)] = within_group_spread(fake, groups)
    return out


def in_process(
    gen: FlowGenerator,
    scorers: Mapping[str, RewardScorer],
    *,
    judge: str | None = None,
    real_images: Tensor | None = None,
) -> Evaluator:
    """An :class:`Evaluator` on a generator and scorer objects in this process (``judge``: the scorer
    whose ``features`` the set-level metrics use)."""
    from services.models.sampling import fixed_noise, sample
    from services.rewards.base import FeatureJudge

    def sample_fn(
        prompts: Sequence[str], n: int, guidance: float, shift: float | None, seed: int, renorm: bool
    ) -> dict:
        noise = fixed_noise(gen, len(prompts), seed)
        out = sample(gen, prompts, noise=noise, num_steps=n, guidance_scale=guidance, shift=shift, renormalize=renorm)
        return {"images": out.images, "ratio": out.ratio}

    def score_fn(
        images: Tensor, prompts: Sequence[str], groups: Tensor, meta: Sequence[dict] | None
    ) -> dict[str, Tensor]:
        return {name: s.score(images, list(prompts)) for name, s in scorers.items()}

    if judge is None:
        return Evaluator(sample=sample_fn, score=score_fn, features=None, real_images=real_images)
    judge_name = judge

    def features(images: Tensor) -> Tensor:
        scorer = scorers[judge_name]
        if not isinstance(scorer, FeatureJudge):
            raise TypeError(f"judge {judge_name!r} ({type(scorer).__name__}) has no features(images) method")
        with torch.no_grad():
            return scorer.features(images)

    return Evaluator(sample=sample_fn, score=score_fn, features=features, real_images=real_images)
