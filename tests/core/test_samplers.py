"""Samplers: SDE log-prob vs torch.distributions, Euler vs diffusers' scheduler, baselines."""

import pytest
import torch

from normguard_core.conventions import interpolate, sigma_grid, velocity_target
from normguard_core.samplers import (
    cfg_combine,
    euler_step,
    renormalize_velocity,
    sample_trajectory,
    sde_step,
)

pytestmark = pytest.mark.unit


def test_sde_log_prob_equals_torch_normal(gen):
    x = torch.randn(4, 3, 5, 5, generator=gen)
    v = torch.randn(4, 3, 5, 5, generator=gen)
    sigma = torch.tensor([0.9, 0.7, 0.5, 0.3])
    sigma_next = sigma - 0.1
    eps = torch.randn(4, 3, 5, 5, generator=gen)
    step = sde_step(x, v, sigma, sigma_next, noise_level=0.7, noise=eps)
    s, dt = sigma.view(-1, 1, 1, 1), (sigma_next - sigma).view(-1, 1, 1, 1)
    std_t = 0.7 * torch.sqrt(s / (1 - s))
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    dist = torch.distributions.Normal(mean, std_t * torch.sqrt(-dt))
    assert torch.allclose(step.mean, mean, atol=1e-6)
    assert torch.allclose(step.x_next, mean + std_t * torch.sqrt(-dt) * eps, atol=1e-6)
    expected = dist.log_prob(step.x_next).flatten(1).mean(dim=1)
    assert torch.allclose(step.log_prob, expected, atol=1e-5)
    # recomputing from the stored next state gives the same log-prob
    again = sde_step(x, v, sigma, sigma_next, noise_level=0.7, x_next=step.x_next)
    assert torch.allclose(again.log_prob, step.log_prob, atol=1e-6)


def test_sde_step_at_sigma_one_uses_next_sigma_in_std(gen):
    x, v = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    step = sde_step(x, v, torch.ones(2), torch.full((2,), 0.8), noise_level=0.7, generator=gen)
    assert torch.isfinite(step.log_prob).all() and torch.isfinite(step.x_next).all()
    assert torch.allclose(step.std, 0.7 * torch.sqrt(torch.tensor(1 / 0.2)) * torch.sqrt(torch.tensor(0.2)))


def test_sde_step_requires_decreasing_sigma(gen):
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        sde_step(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.6)


def test_euler_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    w = torch.randn(1, 3, 4, 4)

    def velocity(x, sigma):  # a smooth, state- and time-dependent field
        return torch.tanh(x) * w + sigma.view(-1, 1, 1, 1) * x

    for shift, steps in [(1.0, 10), (3.0, 4), (3.0, 28)]:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(steps)
        grid = sigma_grid(steps, shift=shift)
        assert torch.allclose(grid, sched.sigmas.float(), atol=1e-6), (shift, steps)
        x_ref = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
        x = x_ref.clone()
        for k, t in enumerate(sched.timesteps):
            v = velocity(x_ref, sched.sigmas[k].expand(2).float())
            x_ref = sched.step(v, t, x_ref).prev_sample
        traj = sample_trajectory(velocity, x, grid, record_states=True)
        assert torch.allclose(traj.x0, x_ref, atol=1e-5), (shift, steps)
        assert traj.norms.shape == (steps, 2) and traj.states.shape == (steps + 1, 2, 3, 4, 4)


def test_euler_on_straight_path_recovers_data_exactly(gen):
    """With the exact conditional velocity of one (x0, eps) pair, Euler is exact on any grid."""
    x0, eps = torch.randn(3, 8, generator=gen), torch.randn(3, 8, generator=gen)
    traj = sample_trajectory(lambda x, s: velocity_target(x0, eps), eps, sigma_grid(3, shift=3.0))
    assert torch.allclose(traj.x0, x0, atol=1e-5)
    mid = interpolate(x0, eps, torch.full((3,), 0.25))
    assert torch.allclose(euler_step(eps, eps - x0, 1.0, 0.25).x_next, mid, atol=1e-6)


def test_cfg_combine(gen):
    vc, vu = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    assert torch.equal(cfg_combine(vc, vu, 1.0), vc)
    assert torch.allclose(cfg_combine(vc, vu, 3.0), vu + 3 * (vc - vu))


def test_renormalize_velocity_keeps_direction_takes_reference_norm(gen):
    v, v_ref = torch.randn(4, 2, 3, generator=gen) * 3, torch.randn(4, 2, 3, generator=gen)
    out = renormalize_velocity(v, v_ref)
    assert torch.allclose(out.flatten(1).norm(dim=1), v_ref.flatten(1).norm(dim=1), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), v.flatten(1))
    assert torch.allclose(cos, torch.ones(4), atol=1e-6)


def test_sde_trajectory_records_log_probs_and_noise(gen):
    sigmas = sigma_grid(5)
    traj = sample_trajectory(
        lambda x, s: -x,
        torch.randn(3, 4, generator=gen),
        sigmas,
        sde_noise_level=0.5,
        generator=gen,
        record_states=True,
    )
    assert traj.log_probs.shape == (5, 3) and traj.noises.shape == (5, 3, 4)
    # the recorded noise and states reproduce the recorded log-probs
    for k in range(5):
        s, sn = sigmas[k].expand(3), sigmas[k + 1].expand(3)
        step = sde_step(traj.states[k], -traj.states[k], s, sn, noise_level=0.5, x_next=traj.states[k + 1])
        assert torch.allclose(step.log_prob, traj.log_probs[k], atol=1e-5)


def test_sde_kl_scale_is_flow_grpos_kl_on_the_step_means(gen):
    """flow_grpo: KL = mean_D (mean_theta - mean_ref)^2 / (2 std_t^2), with sigma = 1 using sigmas[1]."""
    from normguard_core.samplers import sde_kl_scale, sde_step

    s, s_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.8, 0.4, 0.1])
    x, v1, v2 = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(3))
    a = sde_step(x, v1, s, s_next, noise_level=0.7, noise=torch.zeros_like(x))
    b = sde_step(x, v2, s, s_next, noise_level=0.7, noise=torch.zeros_like(x))
    std_t = 0.7 * torch.sqrt(s / (1 - torch.where(s >= 1, s_next, s)))
    kl = ((a.mean - b.mean) ** 2).flatten(1).mean(1) / (2 * std_t**2)
    scaled = sde_kl_scale(s, s_next, noise_level=0.7) * ((v1 - v2) ** 2).flatten(1).mean(1)
    assert torch.allclose(kl, scaled, rtol=1e-5)
