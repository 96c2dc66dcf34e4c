"""NormGuard: hand-derived values, zero set, gradient direction, lambda = 0 identity."""

import pytest
import torch

from normguard_core.losses import (
    BinWeights,
    NormGuardParams,
    Reference,
    SampleBatch,
    awm_objective,
    compose_objective,
    normguard_objective,
    normguard_penalty,
)
from normguard_core.metrics import norm_ratio, velocity_norm

pytestmark = pytest.mark.unit


def _awm_batch(v_theta, v_ref, x0, noise, sigma, adv) -> tuple[SampleBatch, Reference]:
    """An AWM micro-batch and its reference (plain KL weight)."""
    batch = SampleBatch(
        v_theta=v_theta, x0=x0, noise=noise, sigma=sigma, advantages=adv, reward_prob=adv, v_old=None, v_ema=None
    )
    return batch, Reference(v_theta=v_theta, v_ref=v_ref, kl_scale=torch.ones_like(sigma))


def _vel(norms, dim=4):
    """(B, dim) velocities along e_0 with the given norms."""
    v = torch.zeros(len(norms), dim)
    v[:, 0] = torch.tensor(norms, dtype=torch.float32)
    return v


def test_zero_value_and_zero_grad_below_threshold():
    v_ref = _vel([2.0, 3.0])
    v_theta = _vel([2.0, 3.1]).requires_grad_(True)  # ratios 1.0 and 1.033 <= 1 + margin
    out = normguard_penalty(v_theta=v_theta, v_ref=v_ref, weight=10.0, margin=0.05)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.count_nonzero(v_theta.grad) == 0
    assert out.metrics["normguard/active_frac"].item() == 0.0


@pytest.mark.parametrize("scale", ["relative", "absolute"])
@pytest.mark.parametrize("power", [1, 2])
def test_exact_value_above_threshold(scale, power):
    # norms 5 vs ref 4 (active), 1 vs ref 2 (inactive); margin 0.1 -> threshold 4.4
    v_theta = _vel([5.0, 1.0])
    v_ref = _vel([4.0, 2.0])
    out = normguard_penalty(v_theta=v_theta, v_ref=v_ref, weight=3.0, margin=0.1, power=power, scale=scale)
    excess = (5.0 - 4.4) / 4.0 if scale == "relative" else 5.0 - 4.4
    expected = 3.0 * (excess**power + 0.0) / 2.0  # mean over the batch of 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["normguard/penalty"].item() == pytest.approx(expected / 3.0, rel=1e-6)
    assert out.metrics["normguard/active_frac"].item() == 0.5
    assert out.metrics["normguard/ratio_mean"].item() == pytest.approx((5 / 4 + 1 / 2) / 2, rel=1e-6)
    assert out.metrics["normguard/ratio_max"].item() == pytest.approx(1.25, rel=1e-6)


def test_gradient_step_lowers_norm_without_rotating(gen):
    v_ref = torch.randn(8, 3, 4, 4, generator=gen)
    v_theta = (1.3 * v_ref + 0.1 * torch.randn(8, 3, 4, 4, generator=gen)).requires_grad_(True)
    out = normguard_penalty(v_theta=v_theta, v_ref=v_ref, weight=1.0)
    out.loss.backward()
    before = v_theta.detach().flatten(1).norm(dim=1)
    after_v = v_theta.detach() - 0.1 * v_theta.grad
    after = after_v.flatten(1).norm(dim=1)
    assert torch.all(after < before)
    cos = torch.nn.functional.cosine_similarity(after_v.flatten(1), v_theta.detach().flatten(1))
    assert torch.allclose(cos, torch.ones(8), atol=1e-6)  # gradient is parallel to v_theta


def test_reference_receives_no_gradient(gen):
    v_ref = torch.randn(4, 6, generator=gen).requires_grad_(True)
    v_theta = (2 * v_ref.detach()).requires_grad_(True)
    normguard_penalty(v_theta=v_theta, v_ref=v_ref, weight=1.0).loss.backward()
    assert v_ref.grad is None


def test_the_penalty_returns_the_ratios_it_measured():
    v_ref = _vel([2.0, 4.0])
    v_theta = _vel([2.2, 3.0]).requires_grad_(True)
    out = normguard_penalty(v_theta=v_theta, v_ref=v_ref, weight=1.0)
    assert out.norm_ratio.tolist() == pytest.approx([1.1, 0.75], rel=1e-6)
    assert not out.norm_ratio.requires_grad
    assert out.metrics["normguard/ratio_mean"].item() == out.norm_ratio.mean().item()
    assert torch.equal(out.norm_ratio, norm_ratio(velocity_norm(v_theta.detach()), velocity_norm(v_ref)))
    sigma, adv = torch.full((2,), 0.5), torch.zeros(2)
    batch, ref = _awm_batch(v_theta, v_ref, v_ref, v_ref, sigma, adv)
    composed = compose_objective(awm_objective, batch, ref, normguard=None)
    assert torch.equal(composed.norm_ratio, out.norm_ratio)  # measured also without the penalty


def test_normguard_objective_is_the_penalty_with_its_floor():
    """The probes' objective: NormGuard only, per-point weights, and the floor pulls a deflated sample up."""
    v_ref = _vel([2.0, 2.0, 2.0])
    v_theta = _vel([2.4, 2.0, 1.0]).requires_grad_(True)  # ratios 1.2 (over), 1.0, 0.5 (under the floor)
    lam, mu = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5, 4.0])
    params = NormGuardParams(weight=0.0, power=1, floor=0.9)
    out = normguard_objective(v_theta=v_theta, v_ref=v_ref, bins=BinWeights(lam, mu), normguard=params)
    # (1 * 0.2 + 0 + 0) / 3 over the bound, (0 + 0 + 4 * 0.4) / 3 under the floor
    assert out.loss.item() == pytest.approx((0.2 + 1.6) / 3, rel=1e-5)
    assert torch.equal(out.terms["normguard"], out.loss)
    direct = normguard_penalty(
        v_theta=v_theta, v_ref=v_ref, weight=lam, margin=0.0, power=1, floor=0.9, floor_weight=mu
    )
    assert torch.equal(out.loss, direct.loss) and torch.equal(out.norm_ratio, direct.norm_ratio)
    out.loss.backward()
    g = v_theta.grad[:, 0]
    assert g[0] > 0 and g[1] == 0 and g[2] < 0  # descent shrinks the inflated norm, grows the deflated one
    with pytest.raises(ValueError, match="active"):
        normguard_objective(v_theta=v_theta, v_ref=v_ref, bins=None, normguard=params)
    no_floor = normguard_objective(v_theta=v_theta, v_ref=v_ref, bins=BinWeights(lam, None), normguard=params)
    assert no_floor.loss.item() == pytest.approx(0.2 / 3, rel=1e-5)  # the bound alone: the probes' default


def test_lambda_zero_leaves_base_loss_bit_identical(gen):
    shape = (6, 2, 4, 4)
    x0, noise, v_ref = (torch.randn(shape, generator=gen) for _ in range(3))
    sigma = torch.rand(6, generator=gen)
    adv = torch.randn(6, generator=gen)
    w = torch.randn(shape, generator=gen)

    def run(normguard):
        v_theta = (2.0 * w).requires_grad_(True)  # norms well above the reference: hinge would be active
        batch, ref = _awm_batch(v_theta, v_ref, x0, noise, sigma, adv)
        out = compose_objective(awm_objective, batch, ref, normguard=normguard)
        out.loss.backward()
        return out, v_theta.grad

    base, g_base = run(None)
    zero, g_zero = run(NormGuardParams(weight=0.0))
    on, g_on = run(NormGuardParams(weight=1.0))
    assert torch.equal(base.loss, zero.loss) and torch.equal(g_base, g_zero)
    assert on.loss.item() > base.loss.item()
    assert base.metrics["normguard/ratio_mean"].item() > 1.0  # metrics reported without the penalty
    assert not torch.equal(g_base, g_on)


@pytest.mark.parametrize(
    "kwargs",
    [dict(power=3), dict(weight=-1.0), dict(margin=-0.1), dict(scale="log")],
)
def test_bad_hyperparameters_raise(kwargs):
    with pytest.raises(ValueError):
        normguard_penalty(v_theta=torch.ones(2, 3), v_ref=torch.ones(2, 3), **{"weight": 1.0, **kwargs})


def test_shape_mismatch_names_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        normguard_penalty(v_theta=torch.ones(2, 3), v_ref=torch.ones(2, 4), weight=1.0)
