"""The one place that fixes NormGuard's time convention (P4).

We follow SD3 / Flow-GRPO (and diffusers' ``FlowMatchEulerDiscreteScheduler``):

* ``sigma`` in [0, 1]; ``sigma = 1`` is pure noise, ``sigma = 0`` is data.
* Interpolant: ``x_sigma = (1 - sigma) * x0 + sigma * eps``.
* Velocity target: ``v* = d x_sigma / d sigma = eps - x0``.
* Sampling integrates from sigma = 1 down to 0: ``x_next = x + (sigma_next - sigma) * v``.
* Timestep shift (SD3 uses shift = 3): ``sigma' = shift * sigma / (1 + (shift - 1) * sigma)``.

facebookresearch/flow_matching uses the opposite direction (``t = 0`` noise, ``t = 1`` data,
``x_t = t * x1 + (1 - t) * x0``, ``u = x1 - x0``); :func:`to_flow_matching_time` and
:func:`to_flow_matching_velocity` convert.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "broadcast_sigma",
    "interpolate",
    "sample_sigmas",
    "shift_sigma",
    "sigma_grid",
    "to_flow_matching_time",
    "to_flow_matching_velocity",
    "velocity_target",
    "x0_from_velocity",
]


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor:
    """SD3 timestep shift ``shift * s / (1 + (shift - 1) * s)``; ``shift = 1`` is the identity.

    Args:
        sigma: any shape, values in [0, 1].
        shift: > 0; larger values spend more steps at high noise.

    Returns:
        Shifted sigma, same shape as ``sigma``.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigma = torch.as_tensor(sigma)
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sigma_grid(num_steps: int, *, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The sampling grid of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``.

    Reproduces the static-shift schedule exactly (including diffusers' quirk of shifting the
    already shifted ``sigma_min``) so that a trajectory integrated on this grid matches the
    scheduler step for step.

    Args:
        num_steps: number of Euler steps T >= 1.
        shift: SD3 shift (1 = none).
        num_train_timesteps: the scheduler's training discretisation.

    Returns:
        ``(T + 1,)`` float32, decreasing from 1 to a terminal 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigma_min = shift_sigma(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift)
    base = torch.linspace(1.0, float(sigma_min), num_steps, dtype=torch.float64)
    sigmas = shift_sigma(base, shift).to(torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sample_sigmas(
    batch_size: int,
    *,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    low: float = 0.0,
    high: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training-time sigmas: logit-normal (SD3's default) or uniform, then shifted and clamped.

    Args:
        batch_size: B.
        scheme: ``"logit_normal"`` (sigmoid of N(mean, std)) or ``"uniform"``.
        logit_mean: mean of the logit-normal.
        logit_std: std of the logit-normal.
        shift: SD3 shift applied after sampling.
        low: lower clamp of the returned sigma (e.g. to train on a sub-range).
        high: upper clamp.
        generator: torch RNG for reproducibility.
        device: output device.

    Returns:
        ``(B,)`` float32 sigmas in [low, high].
    """
    if scheme == "logit_normal":
        z = torch.randn(batch_size, generator=generator, device=device) * logit_std + logit_mean
        sigma = torch.sigmoid(z)
    elif scheme == "uniform":
        sigma = torch.rand(batch_size, generator=generator, device=device)
    else:
        raise ValueError(f"unknown sigma scheme {scheme!r}; known: 'logit_normal', 'uniform'")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    return shift_sigma(sigma, shift).clamp(low, high).float()


def broadcast_sigma(sigma: Tensor | float, like: Tensor) -> Tensor:
    """Reshape ``(B,)`` or scalar sigma to ``(B, 1, ..., 1)`` for broadcasting against ``like``."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(sigma.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x0: Tensor, noise: Tensor, sigma: Tensor | float) -> Tensor:
    """``x_sigma = (1 - sigma) * x0 + sigma * noise``.

    Args:
        x0: ``(B, *D)`` data.
        noise: ``(B, *D)`` standard normal.
        sigma: ``(B,)`` or scalar.

    Returns:
        ``(B, *D)``.
    """
    s = broadcast_sigma(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """``v* = noise - x0`` (``(B, *D)``), the conditional flow-matching target."""
    return noise - x0


def x0_from_velocity(x_sigma: Tensor, velocity: Tensor, sigma: Tensor | float) -> Tensor:
    """Data prediction implied by a velocity: ``x0_hat = x_sigma - sigma * v`` (``(B, *D)``)."""
    return x_sigma - broadcast_sigma(sigma, x_sigma) * velocity


def to_flow_matching_time(sigma: Tensor | float) -> Tensor:
    """Convert our sigma to facebookresearch/flow_matching's t (t = 1 - sigma)."""
    return 1.0 - torch.as_tensor(sigma)


def to_flow_matching_velocity(velocity: Tensor) -> Tensor:
    """Convert our velocity (d x / d sigma) to flow_matching's (d x / d t = -v)."""
    return -velocity
