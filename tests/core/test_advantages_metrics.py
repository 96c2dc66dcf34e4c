"""Advantages, NFT reward map, DPO pairing with counted ties, norm metrics, adjoint analysis."""

import pytest
import torch

from normguard_core.advantages import group_advantages, nft_reward_prob, preference_pairs
from normguard_core.analysis import magnitude_sensitivity
from normguard_core.conventions import sample_sigmas, shift_sigma, sigma_grid
from normguard_core.metrics import norm_ratio, velocity_norm

pytestmark = pytest.mark.unit


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 2.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2])
    a = group_advantages(r, g, eps=1e-12, std="group")
    assert a.dtype == torch.float64
    assert torch.allclose(a, torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64), atol=1e-9)
    # global std (the sources' default): the std of all six rewards, population form
    glob = group_advantages(r, g, eps=1e-4)
    std = float(r.double().std(unbiased=False))
    assert torch.allclose(glob, torch.tensor([-1.0, 1.0, 0, 0, 0, 0], dtype=torch.float64) / (std + 1e-4))


def test_group_advantages_are_exactly_zero_for_equal_groups():
    """float32 left +-6e-4 on all-equal groups; they are now exactly 0, in both std modes."""
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.3, 0.301, 0.3, 0.3], dtype=torch.float32)
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    same = torch.tensor([1 / 3] * 5 + [0.2] * 3)
    for std in ("global", "group"):
        a = group_advantages(same, torch.tensor([0] * 5 + [1] * 3), std=std)
        assert torch.equal(a, torch.zeros(8, dtype=torch.float64))
        b = group_advantages(r, g, std=std)
        assert b.abs().max() > 0 and float(b[4:].sum()) == pytest.approx(0.0, abs=1e-6)
    # a tiny difference in a saturated group: full scale with the group's std, tiny with the global one
    per_group = group_advantages(r, g, std="group")[4:].abs().max()
    glob = group_advantages(r, g, std="global")[4:].abs().max()
    assert per_group > 1.0 and glob < 0.01
    with pytest.raises(ValueError, match="global"):
        group_advantages(r, g, std="batch")


def test_lag_schedules_follow_the_sources():
    from normguard_core.lagged import LAG_SCHEDULES, lag_decay, update_lagged

    nft, ocr, awm = LAG_SCHEDULES["nft_linear"], LAG_SCHEDULES["nft_delayed"], LAG_SCHEDULES["awm_linear"]
    assert [lag_decay(k, nft) for k in (0, 1, 100, 499, 500, 10_000)] == pytest.approx([0, 0.001, 0.1, 0.499, 0.5, 0.5])
    assert [lag_decay(k, ocr) for k in (0, 74, 75, 76, 10_000)] == pytest.approx([0, 0, 0, 0.0075, 0.999])
    assert [lag_decay(k, awm) for k in (0, 200, 300, 5000)] == pytest.approx([0, 0.2, 0.3, 0.3])
    assert lag_decay(1000, LAG_SCHEDULES["none"]) == 0.0
    lag, cur = [torch.zeros(3)], [torch.ones(3)]
    update_lagged(lag, cur, 0.25)
    assert torch.allclose(lag[0], torch.full((3,), 0.75))
    update_lagged(lag, cur, 0.0)
    assert torch.equal(lag[0], cur[0])


def test_nft_reward_prob():
    a = torch.tensor([-10.0, -1.0, 0.0, 1.0, 10.0])
    assert torch.allclose(nft_reward_prob(a, adv_clip_max=2.0), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


def test_preference_pairs_counts_ties():
    r = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.5, 0.2, 0.3, 0.25])
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    pairs = preference_pairs(r, g)
    assert pairs.num_groups == 3 and pairs.num_ties == 1 and pairs.num_pairs == 2
    assert pairs.winners.tolist() == [1, 6] and pairs.losers.tolist() == [0, 5]
    assert preference_pairs(r, g, min_gap=0.2).num_ties == 2
    # flow_grpo's tie handling (an option): the tied group pairs its 2nd sample over its 1st
    src = preference_pairs(r, g, ties="flow_grpo")
    assert src.num_ties == 1 and src.winners.tolist() == [1, 4, 6] and src.losers.tolist() == [0, 3, 5]


def test_norm_metrics():
    v = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    assert velocity_norm(v).tolist() == [5.0, 10.0]
    theta = torch.tensor([[1.1, 1.1], [1.2, 1.0]])
    ratio = norm_ratio(theta, torch.ones(2, 2))  # (T, B) norms
    assert torch.equal(ratio, theta)  # n + NORM_EPS == n in float32 for non-tiny norms: the plain quotient
    assert torch.isfinite(norm_ratio(torch.ones(2), torch.zeros(2))).all()  # a zero reference stays finite


def test_sigma_sampling_and_shift(gen):
    s = sample_sigmas(1000, generator=gen, shift=3.0)
    assert s.min() >= 0 and s.max() <= 1 and s.mean() > 0.5  # shift pushes mass to high noise
    assert shift_sigma(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="known"):
        sample_sigmas(4, scheme="cosine")


def test_adjoint_matches_finite_differences(gen):
    """Linear field v = A x: compare d R / d s_k with central finite differences."""
    a = torch.randn(6, 6, generator=gen) * 0.3
    target = torch.randn(6, generator=gen)

    def velocity(x, sigma):
        return x @ a.T

    def reward(x0):
        return -((x0 - target) ** 2).sum(dim=1)

    noise = torch.randn(4, 6, generator=gen)
    sigmas = sigma_grid(3)
    res = magnitude_sensitivity(velocity, reward, noise, sigmas)
    assert res.grad.shape == (3, 4)

    def reward_with(k, b, h):
        x = noise.clone()
        for j in range(3):
            v = velocity(x, None)
            scale = torch.ones(4, 1)
            if j == k:
                scale[b] += h
            x = x + (sigmas[j + 1] - sigmas[j]) * v * scale
        return reward(x)[b]

    for k in range(3):
        for b in range(4):
            # x0 is affine in one s_k for a linear field, so R is quadratic in it and the central
            # difference is exact for any h; a large h keeps float32 rounding out of the way.
            fd = (reward_with(k, b, 0.1) - reward_with(k, b, -0.1)) / 0.2
            assert res.grad[k, b].item() == pytest.approx(fd.item(), rel=1e-2, abs=1e-3)
    assert ((res.sign_agreement >= 0.5) & (res.sign_agreement <= 1)).all()
