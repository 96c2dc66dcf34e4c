"""Contract over every registered loss: finite scalar, differentiable, namespaced metrics (P15)."""

import pytest
import torch

from normguard_core.losses import LossBatch, NormGuardParams, available_losses, compose_objective, get_loss

pytestmark = pytest.mark.unit

B, SHAPE = 8, (8, 2, 4, 4)


def _full_batch(gen) -> tuple[LossBatch, torch.Tensor]:
    noise = torch.randn(SHAPE, generator=gen)
    sigma = torch.rand(B, generator=gen) * 0.9 + 0.05
    noise[4:], sigma[4:] = noise[:4], sigma[:4]  # rows i and i + 4 share eps (DPO pairs)
    v_theta = torch.randn(SHAPE, generator=gen).requires_grad_(True)
    log_prob = v_theta.flatten(1).mean(dim=1) * 0.01  # differentiable stand-in
    batch = LossBatch(
        v_theta=v_theta,
        v_ref=torch.randn(SHAPE, generator=gen),
        v_old=v_theta.detach() + 0.01 * torch.randn(SHAPE, generator=gen),
        x0=torch.randn(SHAPE, generator=gen),
        noise=noise,
        sigma=sigma,
        advantages=torch.randn(B, generator=gen),
        reward_prob=torch.rand(B, generator=gen),
        log_prob=log_prob,
        old_log_prob=log_prob.detach() + 0.001,
        winners=torch.arange(4),
        losers=torch.arange(4, 8),
    )
    return batch, v_theta


def test_all_four_base_losses_are_registered():
    assert set(available_losses()) >= {"diffusion_nft", "awm", "flow_dpo", "flow_grpo"}


@pytest.mark.parametrize("name", available_losses())
@pytest.mark.parametrize("with_normguard", [False, True])
def test_loss_contract(name, with_normguard, gen):
    batch, v_theta = _full_batch(gen)
    ng = NormGuardParams(weight=0.5, margin=0.0) if with_normguard else None
    out = compose_objective(name, batch, normguard=ng)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert v_theta.grad is not None and torch.isfinite(v_theta.grad).all()
    assert v_theta.grad.abs().sum() > 0
    for key, value in out.metrics.items():
        assert "/" in key, key
        assert key.split("/")[0] in {"loss", "normguard"}, key
        assert isinstance(value, torch.Tensor) and not value.requires_grad and value.ndim == 0
    assert "normguard/ratio_mean" in out.metrics and "loss/total" in out.metrics


@pytest.mark.parametrize("name", available_losses())
def test_each_loss_declares_fields_it_reads(name, gen):
    spec = get_loss(name)
    batch, _ = _full_batch(gen)
    spec.validate(batch)
    with pytest.raises(ValueError, match=name):
        spec.validate(LossBatch())
