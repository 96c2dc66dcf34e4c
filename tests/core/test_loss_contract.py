"""Contract over every base objective on its typed batch: finite scalar, differentiable, namespaced
metrics (P15), and frozen batches whose fields are all set."""

from dataclasses import FrozenInstanceError, fields

import pytest
import torch

from normguard_core.losses import (
    NormGuardParams,
    PairBatch,
    Reference,
    SampleBatch,
    StepBatch,
    awm_objective,
    compose_objective,
    dpo_objective,
    grpo_objective,
    nft_objective,
)

pytestmark = pytest.mark.unit

B, SHAPE = 8, (8, 2, 4, 4)


def _tensors(gen) -> dict[str, torch.Tensor]:
    noise = torch.randn(SHAPE, generator=gen)
    sigma = torch.rand(B, generator=gen) * 0.9 + 0.05
    noise[4:], sigma[4:] = noise[:4], sigma[:4]  # rows i and i + 4 share eps (DPO pairs)
    v_theta = torch.randn(SHAPE, generator=gen).requires_grad_(True)
    return dict(
        v_theta=v_theta,
        v_ref=torch.randn(SHAPE, generator=gen),
        v_old=v_theta.detach() + 0.01 * torch.randn(SHAPE, generator=gen),
        x0=torch.randn(SHAPE, generator=gen),
        noise=noise,
        sigma=sigma,
        advantages=torch.randn(B, generator=gen),
        reward_prob=torch.rand(B, generator=gen),
    )


def _case(name: str, t: dict):
    """``(objective, its batch)`` of one base loss; Flow-GRPO's log-prob is a differentiable stand-in."""
    sample = SampleBatch(
        v_theta=t["v_theta"],
        x0=t["x0"],
        noise=t["noise"],
        sigma=t["sigma"],
        advantages=t["advantages"],
        reward_prob=t["reward_prob"],
        v_old=t["v_old"],
        v_ema=None,
    )
    if name == "diffusion_nft":
        return lambda b: nft_objective(b, beta=1.0), sample
    if name == "awm":
        return lambda b: awm_objective(b, clip_range=0.2), sample
    if name == "flow_dpo":
        pair = PairBatch(
            v_theta=t["v_theta"],
            v_ref=t["v_ref"],
            x0=t["x0"],
            noise=t["noise"],
            sigma=t["sigma"],
            winners=torch.arange(4),
            losers=torch.arange(4, 8),
        )
        return dpo_objective, pair
    log_prob = t["v_theta"].flatten(1).mean(dim=1) * 0.01
    step = StepBatch(log_prob=log_prob, old_log_prob=log_prob.detach() + 0.001, advantages=t["advantages"], guard=None)
    return grpo_objective, step


NAMES = ["diffusion_nft", "awm", "flow_dpo", "flow_grpo"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_normguard", [False, True])
def test_loss_contract(name, with_normguard, gen):
    t = _tensors(gen)
    loss, batch = _case(name, t)
    ng = NormGuardParams(weight=0.5, margin=0.0) if with_normguard else None
    ref = Reference(v_theta=t["v_theta"], v_ref=t["v_ref"], kl_scale=torch.ones(B))
    out = compose_objective(loss, batch, ref, normguard=ng, kl_weight=0.1)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    v_theta = t["v_theta"]
    assert v_theta.grad is not None and torch.isfinite(v_theta.grad).all()
    assert v_theta.grad.abs().sum() > 0
    for key, value in out.metrics.items():
        assert "/" in key, key
        assert key.split("/")[0] in {"loss", "normguard"}, key
        assert isinstance(value, torch.Tensor) and not value.requires_grad and value.ndim == 0
    assert {"normguard/ratio_mean", "loss/total", "loss/kl"} <= set(out.metrics)
    assert ("normguard" in out.terms) == with_normguard


@pytest.mark.parametrize("name", NAMES)
def test_batches_are_frozen_and_carry_every_field(name, gen):
    _, batch = _case(name, _tensors(gen))
    with pytest.raises(FrozenInstanceError):
        batch.advantages = None
    with pytest.raises(TypeError):
        type(batch)()  # no field has a default: a batch is built whole, never as an optional bag
    unset = {f.name for f in fields(batch) if getattr(batch, f.name) is None}
    assert unset <= {"v_ema", "guard"}  # only a lagged copy this case keeps none of, or the plain GRPO ratio


def test_nft_names_its_missing_old_velocity(gen):
    t = _tensors(gen)
    _, sample = _case("diffusion_nft", t)
    no_old = SampleBatch(**{f.name: getattr(sample, f.name) for f in fields(sample)} | {"v_old": None})
    with pytest.raises(ValueError, match="diffusion_nft needs v_old"):
        nft_objective(no_old, beta=1.0)


def test_normguard_or_kl_without_a_reference_fail_by_name(gen):
    t = _tensors(gen)
    loss, batch = _case("awm", t)
    with pytest.raises(ValueError, match="NormGuard needs the reference"):
        compose_objective(loss, batch, None, normguard=NormGuardParams(weight=0.5))
    with pytest.raises(ValueError, match="KL term needs the reference"):
        compose_objective(loss, batch, None, kl_weight=0.1)
    out = compose_objective(loss, batch, None)
    assert out.norm_ratio is None and "normguard/ratio_mean" not in out.metrics
