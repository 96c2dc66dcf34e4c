"""Sampling a :class:`~services.models.base.FlowGenerator`: the one loop of the core, for everyone.

Rollouts (``RolloutSampler.generate``, with per-sample seeds and the SDE for Flow-GRPO), evaluation
(``RolloutSampler.eval_samples`` and ``services.evaluation``) and serving (``GeneratorCore.run``)
all sample through :func:`sample`, which runs ``normguard_core.samplers.sample_trajectory`` with the
generator's conditioned (and guided) velocity on the generator's own grid (``gen.sigma_grid``: its
family's schedule, ``services.models.schedules``), measures the norm ratio against the frozen
reference at the policy's own states (``RatioProbe``), optionally applies the renormalisation
baseline, and decodes; ``micro_batch`` / ``decode_batch`` bound the batch of one transformer call / one
VAE decode (``rollout.micro_batch`` / ``rollout.decode_batch``) without changing what is sampled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from normguard_core.samplers import RatioProbe, sample_trajectory
from normguard_core.types import Trajectory
from services.models.base import FlowGenerator

__all__ = ["Samples", "fixed_noise", "sample"]


@dataclass(frozen=True)
class Samples:
    """What :func:`sample` returns (on the generator's device).

    Attributes:
        trajectory: the core's record of the integration (``x0``, the grid, states and SDE log-probs
            when recorded).
        images: ``(B, 3, H, W)`` ``trajectory.x0`` decoded, in [0, 1].
        ratio: ``(T, B)`` ``||v_theta|| / ||v_ref||`` per step, or ``None`` when not measured.
    """

    trajectory: Trajectory
    images: Tensor
    ratio: Tensor | None = None


def fixed_noise(gen: FlowGenerator, n: int, seed: int) -> Tensor:
    """``(n, *gen.latent_shape)`` initial noise from one CPU generator seeded ``seed``: the same noise for
    every model compared (evaluation, serving, the rollout's fixed-noise samples, the sensitivity probe)."""
    return torch.randn(n, *gen.latent_shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample(
    gen: FlowGenerator,
    prompts: Sequence[str],
    *,
    noise: Tensor,
    num_steps: int,
    guidance_scale: float = 1.0,
    shift: float | None = None,
    sde_noise_level: float = 0.0,
    sde_noise: Callable[[int], Tensor] | None = None,
    measure_ratio: bool = True,
    renormalize: bool = False,
    record_states: bool = False,
    micro_batch: int | None = None,
    decode_batch: int | None = None,
) -> Samples:
    """Sample ``prompts`` from ``noise`` (``(B, *D)``) in ``num_steps`` steps of the generator's grid.

    ``shift`` is a static shift replacing the family's (``None``: the scheduler config's); ``sde_noise``
    gives the SDE noise of step ``k`` (per-sample seeds make a sample independent of its batch);
    ``renormalize`` rescales the policy's velocity to the reference's norm each step. ``micro_batch``:
    samples per transformer call (policy and reference, both CFG branches in one call); ``decode_batch``:
    latents per VAE decode; ``None`` = the whole batch at once. The chunks change the memory, not the
    samples: the steps, the SDE noise and the log-probs stay whole-batch.
    """
    policy, reference = gen.velocity_fns(prompts, guidance_scale, micro_batch=micro_batch)
    probe = RatioProbe(reference, renormalize=renormalize) if (measure_ratio or renormalize) else None
    sigmas = gen.sigma_grid(num_steps, shift=shift).to(gen.device)
    traj = sample_trajectory(
        policy,
        noise.to(gen.device),
        sigmas,
        sde_noise_level=sde_noise_level,
        sde_noise=sde_noise,
        transform=probe,
        record_states=record_states,
    )
    ratio = probe.ratio() if probe is not None and measure_ratio else None
    return Samples(trajectory=traj, images=gen.decode_chunked(traj.x0, decode_batch), ratio=ratio)
