"""Evaluation of a generator: rewards, independent judges, realism, Frechet distance and the
per-step velocity-norm ratio against the frozen reference, at few and full sampling steps.

The norm ratio is measured along the policy's own ODE trajectory: at every state the
reference velocity is evaluated at the same (x, sigma, c). With ``renormalize=True`` the
policy's velocity is rescaled to the reference norm before each step (the paper's
inference-time baseline), so its effect on quality can be measured side by side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from services.models.base import FlowGenerator
from services.models.sampling import sample
from services.report import eval_key

__all__ = ["EvalResult", "evaluate_generator"]


@dataclass
class EvalResult:
    """Flat float metrics, per-step ratio curves and the images, per step count."""

    metrics: dict[str, float] = field(default_factory=dict)
    ratio_per_step: dict[int, list[float]] = field(default_factory=dict)
    images: dict[int, Tensor] = field(default_factory=dict)


def evaluate_generator(
    gen: FlowGenerator,
    *,
    prompts: Sequence[str],
    samples_per_prompt: int,
    steps: Sequence[int],
    scorers: Mapping[str, object],
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    seed: int = 1234,
    renormalize: bool = False,
    fd_scorer: object | None = None,
    fd_real_images: Tensor | None = None,
) -> EvalResult:
    """Score fixed-noise samples at each step count; metric names are ``eval/{name}_{steps}steps`` (``report.eval_key``).

    Args:
        gen: the generator (its LoRA / weights are the policy; the reference is built in).
        prompts: evaluation prompts.
        samples_per_prompt: samples per prompt.
        steps: step counts, e.g. ``(4, 20)``.
        scorers: name -> scorer with ``score(images, prompts)``.
        guidance_scale: CFG scale.
        shift: grid shift.
        seed: noise seed (the same for every model compared).
        renormalize: apply the inference-time renormalisation baseline.
        fd_scorer: a scorer with ``features(images)`` for the Frechet distance.
        fd_real_images: ``(N, 3, H, W)`` real images for the Frechet distance.
    """
    all_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    result = EvalResult()
    for n in steps:
        noise = torch.randn(len(all_prompts), *gen.latent_shape, generator=torch.Generator().manual_seed(seed))
        out = sample(
            gen,
            all_prompts,
            noise=noise,
            num_steps=n,
            guidance_scale=guidance_scale,
            shift=shift,
            renormalize=renormalize,
        )
        images, ratio = out.images, out.ratio
        result.images[n] = images
        for name, scorer in scorers.items():
            result.metrics[eval_key(name, n)] = float(scorer.score(images, all_prompts).mean())
        if ratio is not None:
            result.ratio_per_step[n] = ratio.mean(dim=1).tolist()
            result.metrics[eval_key("norm_ratio", n)] = float(ratio.mean())
        if fd_scorer is not None and fd_real_images is not None:
            from services.rewards.digits import frechet_distance

            with torch.no_grad():
                fd = frechet_distance(fd_scorer.features(images), fd_scorer.features(fd_real_images))
            result.metrics[eval_key("frechet", n)] = fd
    return result
