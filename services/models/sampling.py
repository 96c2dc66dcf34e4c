"""Sampling a :class:`~services.models.base.FlowGenerator`: the one loop of the core, for everyone.

Rollouts (``RolloutSampler.generate``, with per-sample seeds and the SDE for Flow-GRPO), evaluation
(``RolloutSampler.eval_samples`` and ``services.evaluation``) and serving (``GeneratorCore.run``)
all sample through :func:`sample`, which runs ``normguard_core.samplers.sample_trajectory`` with the
generator's conditioned (and guided) velocity, measures the norm ratio against the frozen
reference at the policy's own states (``RatioProbe``), optionally applies the renormalisation
baseline, and decodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from normguard_core.conventions import sigma_grid
from normguard_core.samplers import RatioProbe, sample_trajectory
from services.models.base import FlowGenerator

__all__ = ["Samples", "sample"]


@dataclass(frozen=True)
class Samples:
    """What :func:`sample` returns (on the generator's device).

    Attributes:
        latents: ``(B, *D)`` final samples x0.
        images: ``(B, 3, H, W)`` decoded, in [0, 1].
        sigmas: ``(T + 1,)`` the grid used.
        ratio: ``(T, B)`` ``||v_theta|| / ||v_ref||`` per step, or ``None`` when not measured.
        states: ``(T + 1, B, *D)`` the trajectory, when recorded.
        log_probs: ``(T, B)`` SDE step log-probs (``sde_noise_level > 0``), else ``None``.
    """

    latents: Tensor
    images: Tensor
    sigmas: Tensor
    ratio: Tensor | None = None
    states: Tensor | None = None
    log_probs: Tensor | None = None


@torch.no_grad()
def sample(
    gen: FlowGenerator,
    prompts: Sequence[str],
    *,
    noise: Tensor,
    num_steps: int,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    sde_noise_level: float = 0.0,
    sde_noise: Callable[[int], Tensor] | None = None,
    measure_ratio: bool = True,
    renormalize: bool = False,
    record_states: bool = False,
) -> Samples:
    """Sample ``prompts`` from ``noise`` (``(B, *D)``) in ``num_steps`` steps of the shifted grid.

    ``sde_noise`` gives the SDE noise of step ``k`` (per-sample seeds make a sample independent of
    its batch); ``renormalize`` rescales the policy's velocity to the reference's norm each step.
    """
    policy, reference = gen.velocity_fns(prompts, guidance_scale)
    probe = RatioProbe(reference, renormalize=renormalize) if (measure_ratio or renormalize) else None
    sigmas = sigma_grid(num_steps, shift=shift).to(gen.device)
    traj = sample_trajectory(
        policy,
        noise.to(gen.device),
        sigmas,
        sde_noise_level=sde_noise_level,
        sde_noise=sde_noise,
        transform=probe,
        record_states=record_states,
    )
    return Samples(
        latents=traj.x0,
        images=gen.decode(traj.x0),
        sigmas=sigmas,
        ratio=probe.ratio() if probe is not None and measure_ratio else None,
        states=traj.states,
        log_probs=traj.log_probs,
    )
