"""Stateless sampler steps and a trajectory sampler (P6), in the convention of ``conventions``.

* :func:`euler_step` - the ODE step ``x + (sigma_next - sigma) * v`` with optional CFG.
* :func:`sde_step` - Flow-GRPO's reverse-time SDE step with the Gaussian log-prob of the taken
  step (noise injectable, so log-probs can be recomputed exactly from stored rollouts).
  Source: J. Liu et al., Flow-GRPO, arXiv:2505.05470, eq. (9); reference code
  yifan123/flow_grpo ``diffusers_patch/sd3_sde_with_logprob.py``.
* :func:`renormalize_velocity` - the paper's inference-time baseline: rescale v_theta to the
  reference's norm at the same point.
* :func:`sample_trajectory` - integrates a velocity function over a sigma grid and records the
  per-step velocities, norms and (SDE) log-probs: the one sampling loop of the project (rollouts,
  evaluation, serving and the adjoint analysis all call it).
* :func:`per_sample_noise` - noise drawn per sample from its own seed, so a sample does not depend
  on its batch neighbours (a redone rollout share, a merged serving batch).
* :class:`RatioProbe` - a velocity hook that records ``||v|| / ||v_ref||`` per step and optionally
  applies the renormalisation baseline.

Everything is computed in float32 inside the steps (bf16 overflows in the SDE mean, as noted in
Flow-GRPO's code) and returned in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from normguard_core.conventions import broadcast_sigma
from normguard_core.metrics import norm_ratio, velocity_norm
from normguard_core.seeding import offset_seed
from normguard_core.types import StepResult, Trajectory

__all__ = [
    "RatioProbe",
    "VelocityFn",
    "VelocityTransform",
    "cfg_combine",
    "euler_step",
    "per_sample_noise",
    "renormalize_velocity",
    "sample_trajectory",
    "sde_kl_scale",
    "sde_step",
]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""``(x (B, *D), sigma (B,)) -> v (B, *D)``, already conditioned and guided."""

VelocityTransform = Callable[[int, Tensor, Tensor, Tensor], Tensor]
"""``(step k, x, sigma (B,), v) -> v'``: a hook applied to the velocity before each step."""


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance ``v_u + w (v_c - v_u)``; ``w = 1`` returns ``v_cond``."""
    if guidance_scale == 1.0:
        return v_cond
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def euler_step(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    v_uncond: Tensor | None = None,
    guidance_scale: float = 1.0,
) -> StepResult:
    """Euler ODE step from ``sigma`` to ``sigma_next`` (decreasing), with optional CFG.

    Args:
        x: ``(B, *D)`` state at ``sigma``.
        v: ``(B, *D)`` (conditional) velocity at ``(x, sigma)``.
        sigma: ``(B,)`` or scalar.
        sigma_next: ``(B,)`` or scalar.
        v_uncond: ``(B, *D)`` unconditional velocity for CFG, or ``None``.
        guidance_scale: CFG weight (used only with ``v_uncond``).

    Returns:
        StepResult with ``mean == x_next``, zero std and no log-prob.
    """
    if v_uncond is not None:
        v = cfg_combine(v, v_uncond, guidance_scale)
    x32, v32 = x.float(), v.float()
    dt = broadcast_sigma(sigma_next, x32) - broadcast_sigma(sigma, x32)
    x_next = x32 + dt * v32
    return StepResult(x_next=x_next, mean=x_next, std=x32.new_zeros(x.shape[0]))


def sde_step(
    x: Tensor,
    v: Tensor,
    sigma: Tensor | float,
    sigma_next: Tensor | float,
    *,
    noise_level: float = 0.7,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    x_next: Tensor | None = None,
) -> StepResult:
    """Flow-GRPO's SDE step ``x_t -> x_{t-dt}`` with the log-prob of the taken step.

    With ``s = sigma``, ``dt = sigma_next - sigma < 0`` and
    ``std_t = noise_level * sqrt(s / (1 - s))`` (where ``s = 1`` uses ``sigma_next`` in the
    denominator, as Flow-GRPO does with ``sigmas[1]``; otherwise std is infinite)::

        mean   = x * (1 + std_t^2 / (2 s) * dt) + v * (1 + std_t^2 (1 - s) / (2 s)) * dt
        x_next = mean + std_t * sqrt(-dt) * eps

    Args:
        x: ``(B, *D)`` state at ``sigma``.
        v: ``(B, *D)`` velocity at ``(x, sigma)``.
        sigma: ``(B,)`` or scalar, in (0, 1].
        sigma_next: ``(B,)`` or scalar, < sigma.
        noise_level: Flow-GRPO's ``a`` (0.7 in its SD3 config); 0 gives the ODE mean.
        noise: ``(B, *D)`` eps to use; drawn from ``generator`` when ``None``.
        generator: RNG for ``noise``.
        x_next: an already taken next state; when given, only its log-prob is computed
            (``noise`` is ignored), which is how the learner recomputes log-probs.

    Returns:
        StepResult; ``log_prob`` is the per-dimension mean of the Gaussian log-density
        (Flow-GRPO's convention), ``std`` the per-sample step std ``std_t * sqrt(-dt)``.
    """
    x32, v32 = x.float(), v.float()
    s = broadcast_sigma(sigma, x32)
    s_next = broadcast_sigma(sigma_next, x32)
    dt = s_next - s
    if bool((dt >= 0).any()):
        raise ValueError("sde_step integrates toward data: need sigma_next < sigma")
    denom_sigma = torch.where(s >= 1.0, s_next, s)
    std_t = noise_level * torch.sqrt(s / (1.0 - denom_sigma))
    mean = x32 * (1.0 + std_t**2 / (2.0 * s) * dt) + v32 * (1.0 + std_t**2 * (1.0 - s) / (2.0 * s)) * dt
    step_std = std_t * torch.sqrt(-dt)  # (B, 1, ..., 1) or scalar
    if x_next is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        x_next = mean + step_std * noise
    x_next = x_next.float()
    log_prob = None
    if noise_level > 0:
        log_density = (
            -((x_next.detach() - mean) ** 2) / (2.0 * step_std**2) - torch.log(step_std) - 0.5 * math.log(2.0 * math.pi)
        )
        log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))
    std_b = step_std.expand(x.shape[0], *([1] * (x.ndim - 1))).reshape(-1)  # (B,)
    return StepResult(x_next=x_next, mean=mean, std=std_b, log_prob=log_prob)


def sde_kl_scale(sigma: Tensor, sigma_next: Tensor, *, noise_level: float) -> Tensor:
    """``(B,)`` Flow-GRPO's KL weight in velocity terms: ``KL = scale * mean_D (v_theta - v_ref)^2``.

    Source: flow_grpo ``train_sd3.py`` ``kl = mean_D (mean_theta - mean_ref)^2 / (2 std_t^2)`` on the
    means of :func:`sde_step` (divided by ``std_t^2``, not by the step variance ``std_t^2 (-dt)``).
    The mean is linear in ``v`` with coefficient ``c = (1 + std_t^2 (1 - s) / (2 s)) dt``, so
    ``scale = c^2 / (2 std_t^2)``; ``s = 1`` uses ``sigma_next`` in ``std_t`` as :func:`sde_step` does.

    Args:
        sigma: ``(B,)`` sigma of the step.
        sigma_next: ``(B,)`` the next sigma (< sigma).
        noise_level: Flow-GRPO's ``a`` (> 0).
    """
    if noise_level <= 0:
        raise ValueError(f"the SDE KL needs noise_level > 0, got {noise_level}")
    s, s_next = sigma.double(), sigma_next.double()
    dt = s_next - s
    std_t = noise_level * torch.sqrt(s / (1.0 - torch.where(s >= 1.0, s_next, s)))
    coef = (1.0 + std_t**2 * (1.0 - s) / (2.0 * s)) * dt
    return (coef**2 / (2.0 * std_t**2)).float()


def renormalize_velocity(v: Tensor, v_ref: Tensor, *, eps: float = 1e-12) -> Tensor:
    """The paper's inference-time baseline: ``v * ||v_ref|| / ||v||`` per sample.

    Args:
        v: ``(B, *D)`` policy velocity.
        v_ref: ``(B, *D)`` reference velocity at the same point.
        eps: guard against a zero policy norm.

    Returns:
        ``(B, *D)`` with the direction of ``v`` and the norm of ``v_ref``.
    """
    scale = velocity_norm(v_ref) / velocity_norm(v).clamp_min(eps)  # (B,)
    return v * broadcast_sigma(scale, v)


def sample_trajectory(
    velocity_fn: VelocityFn,
    noise: Tensor,
    sigmas: Tensor,
    *,
    sde_noise_level: float = 0.0,
    generator: torch.Generator | None = None,
    sde_noise: Callable[[int], Tensor] | None = None,
    transform: VelocityTransform | None = None,
    record_states: bool = False,
    record_velocities: bool = False,
) -> Trajectory:
    """Integrate ``velocity_fn`` from ``noise`` (sigma = ``sigmas[0]``) down the grid.

    No ``torch.no_grad`` here: the adjoint analysis differentiates through this function, so
    callers that only sample wrap it themselves.

    Args:
        velocity_fn: ``(x, sigma (B,)) -> v``, conditioned and guided.
        noise: ``(B, *D)`` initial state.
        sigmas: ``(T + 1,)`` decreasing grid (``conventions.sigma_grid``).
        sde_noise_level: > 0 samples with :func:`sde_step` (and records log-probs).
        generator: RNG for the SDE noise.
        sde_noise: ``k -> (B, *D)`` the SDE noise of step ``k`` (e.g. :func:`per_sample_noise`), instead
            of drawing it from ``generator``.
        transform: velocity hook (renormalisation baseline, adjoint scales).
        record_states: keep ``(T + 1, B, *D)`` states.
        record_velocities: keep ``(T, B, *D)`` velocities.

    Returns:
        Trajectory.
    """
    num_steps = sigmas.numel() - 1
    batch = noise.shape[0]
    x = noise.float()
    states, velocities, norms, log_probs, noises = [x], [], [], [], []
    use_sde = sde_noise_level > 0
    for k in range(num_steps):
        sigma = sigmas[k].expand(batch).to(x.device)
        sigma_next = sigmas[k + 1].expand(batch).to(x.device)
        v = velocity_fn(x, sigma).float()
        if transform is not None:
            v = transform(k, x, sigma, v)
        norms.append(velocity_norm(v.detach()))
        if record_velocities:
            velocities.append(v)
        if use_sde:
            eps = _step_noise(k, x, sde_noise=sde_noise, generator=generator)
            step = sde_step(x, v, sigma, sigma_next, noise_level=sde_noise_level, noise=eps)
            noises.append(eps)
            log_probs.append(step.log_prob)
        else:
            step = euler_step(x, v, sigma, sigma_next)
        x = step.x_next
        if record_states:
            states.append(x)
    return Trajectory(
        x0=x,
        sigmas=sigmas,
        norms=torch.stack(norms),
        states=torch.stack(states) if record_states else None,
        velocities=torch.stack(velocities) if record_velocities else None,
        log_probs=torch.stack(log_probs) if use_sde else None,
        noises=torch.stack(noises) if use_sde else None,
    )


def _step_noise(
    k: int, x: Tensor, *, sde_noise: Callable[[int], Tensor] | None, generator: torch.Generator | None
) -> Tensor:
    """The float32 SDE noise of step ``k``, shaped like ``x`` ``(B, *D)``: ``sde_noise(k)`` or a draw from ``generator``."""
    if sde_noise is not None:
        return sde_noise(k).to(device=x.device, dtype=torch.float32)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def per_sample_noise(seeds: list[int], shape: tuple[int, ...], *, offset: int = 0) -> Tensor:
    """``(B, *shape)`` standard normal noise, sample ``b`` from its own generator seeded ``seeds[b] + offset``
    (the initial noise with ``offset = 0``, step ``k``'s SDE noise with ``seeding.sde_noise_offset(k)``)."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(offset_seed(s, offset))) for s in seeds]
    )


class RatioProbe:
    """A :data:`VelocityTransform` that records the per-step norm ratio ``||v|| / ||v_ref||`` at the
    policy's own states and, with ``renormalize``, rescales ``v`` to ``||v_ref||`` (the paper's
    inference-time baseline: the ratio recorded is the one before rescaling).

    Args:
        reference: ``(x, sigma) -> v_ref``, conditioned like the policy.
        renormalize: apply :func:`renormalize_velocity`.
    """

    def __init__(self, reference: VelocityFn, *, renormalize: bool = False) -> None:
        self.reference, self.renormalize = reference, renormalize
        self.ratios: list[Tensor] = []

    def __call__(self, k: int, x: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        v_ref = self.reference(x, sigma).float()
        self.ratios.append(norm_ratio(velocity_norm(v.detach()), velocity_norm(v_ref.detach())))
        return renormalize_velocity(v, v_ref) if self.renormalize else v

    def ratio(self) -> Tensor:
        """``(T, B)`` the ratios recorded, one row per step."""
        return torch.stack(self.ratios)
