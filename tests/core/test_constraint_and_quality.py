"""NormGuard's constraint mode (sigma bins, dual ascent), the per-sample hinge weight, GRPO-Guard's
ratio, and the sample-quality statistics (KID, precision / recall, within-prompt spread)."""

import math

import pytest
import torch

from normguard_core.constraint import bin_means, sigma_bins, update_log_multipliers
from normguard_core.conventions import sigma_grid
from normguard_core.losses import flow_grpo_loss, normguard_penalty
from normguard_core.sample_quality import kernel_inception_distance, precision_recall, within_group_spread
from normguard_core.samplers import sde_step


def test_each_step_of_the_default_grid_gets_its_own_bin():
    assert sigma_bins(sigma_grid(10)[:-1], 10).tolist() == list(range(10))
    assert sigma_bins(sigma_grid(20)[:-1], 10).tolist() == [b for b in range(10) for _ in range(2)]
    assert sigma_bins(torch.tensor([1.0, 0.0]), 4).tolist() == [0, 3]
    sums, counts = bin_means(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), 3)
    assert sums.tolist() == [4.0, 0.0, 5.0] and counts.tolist() == [2.0, 0.0, 1.0]


def test_dual_ascent_raises_violated_bins_lowers_satisfied_ones_and_leaves_empty_ones():
    log_lam = torch.zeros(4, dtype=torch.float64)
    ratio = torch.tensor([1.10, 1.01, 0.90, 1.50])
    counts = torch.tensor([5.0, 5.0, 5.0, 0.0])
    new = update_log_multipliers(
        log_lam, ratio, counts, bound=1.0, rate=0.5, tolerance=0.02, lam_min=1e-3, lam_max=100.0
    )
    # full violation -> +rate; half of the tolerance -> +rate/2; below the bound -> -rate; no points -> unchanged
    assert new.tolist() == pytest.approx([0.5, 0.25, -0.5, 0.0])
    many = log_lam
    for _ in range(100):
        many = update_log_multipliers(
            many, ratio, counts, bound=1.0, rate=0.5, tolerance=0.02, lam_min=1e-3, lam_max=100.0
        )
    assert many[0] == pytest.approx(math.log(100.0)) and many[2] == pytest.approx(math.log(1e-3))
    # the derivative term: a violated bin whose ratio is falling fast already lowers its multiplier
    falling = update_log_multipliers(
        log_lam,
        torch.tensor([1.01, 1.01, 1.01, 1.01]),
        counts,
        bound=1.0,
        rate=0.5,
        tolerance=0.02,
        lam_min=1e-3,
        lam_max=100.0,
        previous=torch.tensor([1.05, 1.01, float("nan"), 1.0]),
        kd=2.0,
    )
    # bin 0: 0.5 + 2 * (-2) -> clipped to -1; bin 1: no trend (+0.5 * rate); bin 2: no previous; bin 3: no points
    assert falling.tolist() == pytest.approx([-0.5, 0.25, 0.25, 0.0], abs=1e-6)


def test_per_sample_weights_weight_each_samples_hinge():
    g = torch.Generator().manual_seed(0)
    v_ref = torch.randn(6, 4, generator=g)
    v = v_ref * torch.tensor([1.3, 0.8, 1.1, 1.0, 1.5, 0.5])[:, None]
    scalar = normguard_penalty(v_theta=v, v_ref=v_ref, weight=2.0, power=1)
    same = normguard_penalty(v_theta=v, v_ref=v_ref, weight=torch.full((6,), 2.0), power=1)
    assert same.loss.item() == pytest.approx(scalar.loss.item())
    w = torch.tensor([1.0, 5.0, 0.0, 3.0, 2.0, 1.0])
    out = normguard_penalty(v_theta=v, v_ref=v_ref, weight=w, power=1)
    excess = torch.relu(torch.tensor([1.3, 0.8, 1.1, 1.0, 1.5, 0.5]) - 1.0)
    assert out.loss.item() == pytest.approx((w * excess).mean().item(), rel=1e-5)
    assert out.metrics["normguard/penalty"].item() == pytest.approx(excess.mean().item(), rel=1e-5)


def test_grpo_guard_log_ratio_is_the_noise_times_the_mean_shift():
    """s (log p - log p_old) + |mu - mu_old|^2 / 2s equals mean_D(eps * (mu - mu_old)) for a step the
    old policy took with noise eps: the per-timestep 1/s^2 scale of the plain ratio is gone."""
    g = torch.Generator().manual_seed(1)
    x, v_old = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    v = v_old + 0.01 * torch.randn(5, 1, 4, 4, generator=g)
    sigma, s_next = torch.full((5,), 0.6), torch.full((5,), 0.5)
    eps = torch.randn(5, 1, 4, 4, generator=g)
    old = sde_step(x, v_old, sigma, s_next, noise_level=0.7, noise=eps)
    new = sde_step(x, v, sigma, s_next, noise_level=0.7, x_next=old.x_next)
    adv = torch.tensor([1.0, -1.0, 0.5, 2.0, -0.3])
    out = flow_grpo_loss(
        log_prob=new.log_prob,
        old_log_prob=old.log_prob,
        advantages=adv,
        clip_range=10.0,
        mean=new.mean,
        old_mean=old.mean,
        step_std=new.std,
    )
    log_ratio = (eps * (new.mean - old.mean)).flatten(1).mean(1)
    assert out.metrics["loss/ratio_mean"].item() == pytest.approx(log_ratio.exp().mean().item(), rel=1e-4)
    assert out.loss.item() == pytest.approx((-adv * log_ratio.exp()).mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="together"):
        flow_grpo_loss(log_prob=new.log_prob, old_log_prob=old.log_prob, advantages=adv, mean=new.mean)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    same, shifted = kernel_inception_distance(a, b), kernel_inception_distance(a, b + 1.0)
    assert abs(same) < 0.1 * shifted and shifted > 0


def test_precision_recall_separate_fidelity_from_coverage():
    g = torch.Generator().manual_seed(3)
    real = torch.randn(300, 4, generator=g)
    p, r = precision_recall(torch.randn(300, 4, generator=g), real)
    assert p > 0.8 and r > 0.8
    collapsed = real[:5].repeat(60, 1) + 1e-3 * torch.randn(300, 4, generator=g)  # on the manifold, 5 modes
    p, r = precision_recall(collapsed, real)
    assert p > 0.95 and r < 0.2
    far = torch.randn(300, 4, generator=g) + 10.0
    assert precision_recall(far, real) == (0.0, 0.0)


def test_within_group_spread_is_the_mean_pairwise_distance_per_group():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [9.0, 9.0]])
    groups = torch.tensor([0, 0, 1, 1, 2])  # group 2 has one member: skipped
    assert within_group_spread(feats, groups) == pytest.approx((5.0 + 0.0) / 2)
