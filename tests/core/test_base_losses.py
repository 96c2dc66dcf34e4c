"""Each base loss against its formula, written out independently in float64."""

import math

import pytest
import torch

from normguard_core.advantages import nft_reward_prob
from normguard_core.losses import (
    GuardTerms,
    Reference,
    SampleBatch,
    StepBatch,
    awm_loss,
    diffusion_nft_loss,
    flow_dpo_loss,
    flow_grpo_loss,
    grpo_objective,
    nft_objective,
)

pytestmark = pytest.mark.unit
B, SHAPE = 6, (6, 2, 3, 3)


@pytest.fixture
def data(gen):
    t = {k: torch.randn(SHAPE, generator=gen) for k in ("v_theta", "v_old", "v_ref", "x0", "noise")}
    t["sigma"] = torch.rand(B, generator=gen) * 0.9 + 0.05
    t["adv"] = torch.randn(B, generator=gen) * 2
    return t


def _mean_d(x):
    return x.flatten(1).mean(dim=1)


@pytest.mark.parametrize("adaptive", [False, True])
def test_diffusion_nft_matches_formula(data, adaptive):
    beta = 0.7
    r = nft_reward_prob(data["adv"], adv_clip_max=2.0)
    out = diffusion_nft_loss(
        v_theta=data["v_theta"],
        v_old=data["v_old"],
        x0=data["x0"],
        noise=data["noise"],
        sigma=data["sigma"],
        reward_prob=r,
        beta=beta,
        adaptive_weighting=adaptive,
    )
    d = {k: v.double() for k, v in data.items()}
    vp = beta * d["v_theta"] + (1 - beta) * d["v_old"]
    vn = (1 + beta) * d["v_old"] - beta * d["v_theta"]
    s = d["sigma"].view(-1, 1, 1, 1)
    if adaptive:
        xs = (1 - s) * d["x0"] + s * d["noise"]

        def err(v):
            e = xs - s * v - d["x0"]
            return _mean_d(e**2) / _mean_d(e.abs()).clamp_min(1e-5)
    else:

        def err(v):
            return _mean_d((v - (d["noise"] - d["x0"])) ** 2)

    rr = r.double()
    expected = ((rr * err(vp) + (1 - rr) * err(vn)) / beta).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_diffusion_nft_gradient_signs(data):
    """At beta -> 0 the gradient is (2r - 1) times the flow-matching gradient."""
    v = data["v_theta"].clone().requires_grad_(True)
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5])
    out = diffusion_nft_loss(
        v_theta=v,
        v_old=v.detach(),
        x0=data["x0"],
        noise=data["noise"],
        sigma=data["sigma"],
        reward_prob=r,
        beta=1e-3,
        adaptive_weighting=False,
    )
    out.loss.backward()
    fm_grad = 2 * (v.detach() - (data["noise"] - data["x0"])) / v[0].numel() / B
    expected = fm_grad * (2 * r - 1).view(-1, 1, 1, 1)
    assert torch.allclose(v.grad, expected, atol=1e-4)


def test_diffusion_nft_rejects_unmapped_rewards(data):
    with pytest.raises(ValueError, match="reward_prob"):
        diffusion_nft_loss(
            v_theta=data["v_theta"],
            v_old=data["v_old"],
            x0=data["x0"],
            noise=data["noise"],
            sigma=data["sigma"],
            reward_prob=data["adv"],
        )


@pytest.mark.parametrize("weighting", ["uniform", "sigma", "sigma2"])
def test_awm_plain_matches_formula(data, weighting):
    out = awm_loss(
        v_theta=data["v_theta"],
        x0=data["x0"],
        noise=data["noise"],
        sigma=data["sigma"],
        advantages=data["adv"],
        weighting=weighting,
        adv_clip_max=1.5,
    )
    d = {k: v.double() for k, v in data.items()}
    w = {"uniform": 1.0, "sigma": d["sigma"], "sigma2": d["sigma"] ** 2}[weighting]
    mse = _mean_d((d["v_theta"] - (d["noise"] - d["x0"])) ** 2)
    expected = (d["adv"].clamp(-1.5, 1.5) * w * mse).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_awm_clipped_matches_formula(data):
    v_theta = data["v_old"] + 0.01 * data["v_theta"]
    out = awm_loss(
        v_theta=v_theta,
        v_old=data["v_old"],
        x0=data["x0"],
        noise=data["noise"],
        sigma=data["sigma"],
        advantages=data["adv"],
        clip_range=0.01,
    )
    d = {k: v.double() for k, v in data.items()}
    tgt = d["noise"] - d["x0"]
    lp = -_mean_d((v_theta.double() - tgt) ** 2)
    lp_old = -_mean_d((d["v_old"] - tgt) ** 2)
    ratio = torch.exp(lp - lp_old)
    a = d["adv"].clamp(-5, 5)
    expected = torch.maximum(-a * ratio, -a * ratio.clamp(0.99, 1.01)).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert 0.0 <= out.metrics["loss/clip_frac"].item() <= 1.0


def test_awm_clip_needs_v_old(data):
    with pytest.raises(ValueError, match="v_old"):
        awm_loss(
            v_theta=data["v_theta"],
            x0=data["x0"],
            noise=data["noise"],
            sigma=data["sigma"],
            advantages=data["adv"],
            clip_range=0.1,
        )


def _dpo_data(data):
    noise = data["noise"].clone()
    sigma = data["sigma"].clone()
    noise[3:] = noise[:3]  # pairs (0,3), (1,4), (2,5) share eps and sigma
    sigma[3:] = sigma[:3]
    return noise, sigma, torch.tensor([0, 4, 2]), torch.tensor([3, 1, 5])


def test_flow_dpo_matches_formula(data):
    noise, sigma, w, lo = _dpo_data(data)
    beta = 50.0
    out = flow_dpo_loss(
        v_theta=data["v_theta"],
        v_ref=data["v_ref"],
        x0=data["x0"],
        noise=noise,
        sigma=sigma,
        winners=w,
        losers=lo,
        beta=beta,
    )
    tgt = (noise - data["x0"]).double()
    e = _mean_d((data["v_theta"].double() - tgt) ** 2)
    e_ref = _mean_d((data["v_ref"].double() - tgt) ** 2)
    delta = (e[w] - e_ref[w]) - (e[lo] - e_ref[lo])
    expected = sum(math.log1p(math.exp(0.5 * beta * float(x))) for x in delta) / len(delta)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)  # float32 loss, beta amplifies
    assert out.metrics["loss/dpo_accuracy"].item() == pytest.approx(float((delta < 0).double().mean()))


def test_flow_dpo_rejects_pairs_with_different_noise(data):
    with pytest.raises(ValueError, match="share"):
        flow_dpo_loss(
            v_theta=data["v_theta"],
            v_ref=data["v_ref"],
            x0=data["x0"],
            noise=data["noise"],
            sigma=data["sigma"],
            winners=torch.tensor([0]),
            losers=torch.tensor([1]),
        )


def test_flow_grpo_matches_formula(gen):
    lp = torch.randn(B, generator=gen) * 0.01
    old = torch.randn(B, generator=gen) * 0.01
    adv = torch.randn(B, generator=gen)
    out = flow_grpo_loss(log_prob=lp, old_log_prob=old, advantages=adv, clip_range=0.005)
    ratio = torch.exp(lp.double() - old.double())
    a = adv.double()
    expected = torch.maximum(-a * ratio, -a * ratio.clamp(0.995, 1.005)).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_typed_objectives_are_the_keyword_losses(data):
    """A loss of its typed batch is the keyword function on the batch's fields (NFT; GRPO with its guard)."""
    r = nft_reward_prob(data["adv"])
    kw = dict(v_theta=data["v_theta"], x0=data["x0"], noise=data["noise"], sigma=data["sigma"])
    batch = SampleBatch(**kw, advantages=data["adv"], reward_prob=r, v_old=data["v_old"], v_ema=None)
    typed = nft_objective(batch, beta=0.5, loss_scale=5.0)
    direct = diffusion_nft_loss(**kw, v_old=data["v_old"], reward_prob=r, beta=0.5, loss_scale=5.0)
    assert torch.equal(typed.loss, direct.loss)
    lp, adv = data["v_theta"].flatten(1).mean(1), data["adv"]
    mean, old = data["v_theta"] * 0.5, data["v_old"] * 0.5
    std = data["sigma"] * 0.1 + 0.01
    guard = GuardTerms(mean=mean, old_mean=old, step_std=std)
    typed = grpo_objective(StepBatch(lp, lp.detach() + 0.01, adv, guard), clip_range=0.2)
    direct = flow_grpo_loss(
        log_prob=lp,
        old_log_prob=lp.detach() + 0.01,
        advantages=adv,
        clip_range=0.2,
        mean=mean,
        old_mean=old,
        step_std=std,
    )
    assert torch.equal(typed.loss, direct.loss)


@pytest.mark.parametrize("weighting", ["huber", "ghuber"])
def test_awm_source_weightings_advantage_max_and_ema_kl(data, weighting):
    """AWM's released form: (g)huber weighting, advantages rescaled to +-advantage_max, EMA-KL."""
    v_ema = data["v_old"] * 0.5
    out = awm_loss(
        v_theta=data["v_theta"],
        v_ema=v_ema,
        x0=data["x0"],
        noise=data["noise"],
        sigma=data["sigma"],
        advantages=data["adv"],
        weighting=weighting,
        ghuber_power=0.25,
        advantage_max=1.0,
        ema_kl_weight=0.3,
    )
    d = {k: v.double() for k, v in data.items()}
    mse = _mean_d((d["v_theta"] - (d["noise"] - d["x0"])) ** 2)
    if weighting == "huber":
        lp = -(torch.sqrt(mse + 1e-10) - 1e-5) * d["sigma"]
    else:
        lp = -(torch.pow(mse + 1e-10, 0.25) - math.pow(1e-10, 0.25)) * d["sigma"] / 0.25
    a = d["adv"].clamp(-5, 5) / 5 * 1.0
    ema_kl = _mean_d((d["v_theta"] - v_ema.double()) ** 2).mean()
    expected = -(a * lp).mean() + 0.3 * ema_kl
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="v_ema"):
        awm_loss(
            v_theta=data["v_theta"],
            x0=data["x0"],
            noise=data["noise"],
            sigma=data["sigma"],
            advantages=data["adv"],
            ema_kl_weight=1.0,
        )


def test_nft_loss_scale_is_a_plain_factor(data):
    r = nft_reward_prob(data["adv"])
    kw = dict(v_theta=data["v_theta"], v_old=data["v_old"], x0=data["x0"], noise=data["noise"], sigma=data["sigma"])
    one = diffusion_nft_loss(**kw, reward_prob=r)
    five = diffusion_nft_loss(**kw, reward_prob=r, loss_scale=5.0)
    assert five.loss.item() == pytest.approx(5 * one.loss.item(), rel=1e-6)


def test_kl_scale_weights_the_composed_kl(data):
    from normguard_core.losses import awm_objective, compose_objective, elbo_kl_scale

    scale = elbo_kl_scale(data["sigma"])
    kw = dict(v_theta=data["v_theta"], x0=data["x0"], noise=data["noise"], sigma=data["sigma"])
    batch = SampleBatch(**kw, advantages=data["adv"], reward_prob=data["adv"], v_old=None, v_ema=None)
    ref = Reference(v_theta=data["v_theta"], v_ref=data["v_ref"], kl_scale=scale)
    out = compose_objective(awm_objective, batch, ref, kl_weight=0.1)
    d = {k: v.double() for k, v in data.items()}
    std_t = 0.7 * torch.sqrt(d["sigma"] / (1 - d["sigma"].clamp(0, 0.99)))
    kl = (_mean_d((d["v_theta"] - d["v_ref"]) ** 2) / (2 * std_t**2)).mean()
    assert out.metrics["loss/kl"].item() == pytest.approx(kl.item(), rel=1e-5)
