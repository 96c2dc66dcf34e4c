"""SplitAdamW: AdamW for the base gradient, and a force that acts in its own step only."""

import pytest
import torch

from normguard_core.constraint import update_log_multipliers
from normguard_core.losses.normguard import normguard_penalty
from normguard_core.optim import SplitAdamW

pytestmark = pytest.mark.unit


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(5, 3, generator=g).requires_grad_(), torch.randn(4, generator=g).requires_grad_()]
    return a, [t.detach().clone().requires_grad_() for t in a]


def test_without_a_force_it_is_torch_adamw_and_shares_its_state():
    a, b = _pair()
    ref, ours = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1), SplitAdamW(b, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        grads = [torch.randn(t.shape, generator=g) for t in a]
        for t, x in zip(a, grads):
            t.grad = x.clone()
        for t, x in zip(b, grads):
            t.grad = x.clone()
        ref.step()
        ours.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-7)
    ours.load_state_dict(ref.state_dict())  # checkpoints of either load into the other
    assert set(ours.state[b[0]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_a_force_moves_the_weights_in_its_own_step_only():
    """One step with a force, then steps with a zero base gradient: AdamW on the sum keeps moving
    the weights through its momentum for many steps; SplitAdamW stops the moment the force does."""
    a, b = _pair()
    joint, split = torch.optim.AdamW(a, lr=1e-2, weight_decay=0.0), SplitAdamW(b, lr=1e-2, weight_decay=0.0)
    force = [torch.ones_like(t) for t in a]
    for t, f in zip(a, force):
        t.grad = f.clone()  # AdamW sees the force inside the gradient
    for t in b:
        t.grad = torch.zeros_like(t)
    joint.step()
    split.step(force=force)
    after_a, after_b = [t.detach().clone() for t in a], [t.detach().clone() for t in b]
    for _ in range(10):
        for t in (*a, *b):
            t.grad = torch.zeros_like(t)
        joint.step()
        split.step()
    drift_joint = max((t - s).abs().max().item() for t, s in zip(a, after_a))
    drift_split = max((t - s).abs().max().item() for t, s in zip(b, after_b))
    assert drift_split == 0.0
    assert drift_joint > 2e-2  # measured 3.4 lr: the momentum carries the force on, 3x its own step
    first_step = max((t - s).abs().max().item() for t, s in zip(after_b, _pair()[1]))
    assert first_step == pytest.approx(1e-2, rel=1e-3)  # one full Adam step, as the joint optimiser's first


def test_the_force_is_capped_at_one_adam_step_per_element():
    """A force that arrives after many steps of tiny base gradients: the second moment has not caught
    up (uncapped, f / sqrt(v) would be ~13 Adam steps), the cap holds it to one."""
    _, b = _pair()
    opt = SplitAdamW(b, lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        for t in b:
            t.grad = torch.full_like(t, 1e-6)  # a tiny base gradient: v is tiny
        opt.step()
    before = [t.detach().clone() for t in b]
    opt.step(force=[torch.full_like(t, 10.0) for t in b])
    assert max((t - s).abs().max().item() for t, s in zip(b, before)) <= 2e-2 + 1e-7


def test_the_lower_side_raises_a_multiplier_below_the_floor_and_lowers_it_above():
    log_lam = torch.zeros(3, dtype=torch.float64)
    ratio = torch.tensor([0.90, 0.97, 1.02], dtype=torch.float64)
    new = update_log_multipliers(
        log_lam, ratio, torch.ones(3), bound=0.97, rate=0.5, tolerance=0.02, lam_min=1e-3, lam_max=10, side="lower"
    )
    assert new.tolist() == pytest.approx([0.5, 0.0, -0.5], abs=1e-9)
    with pytest.raises(ValueError, match="side"):
        update_log_multipliers(
            log_lam, ratio, torch.ones(3), bound=1, rate=1, tolerance=1, lam_min=1, lam_max=1, side="x"
        )


def test_the_floor_hinge_pushes_only_short_norms_up():
    v_ref = torch.ones(4, 8)
    v = torch.cat([torch.full((2, 8), 0.5), torch.full((2, 8), 1.5)]).requires_grad_()
    out = normguard_penalty(v_theta=v, v_ref=v_ref, weight=0.0, floor=0.9, floor_weight=torch.ones(4))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(2 * 0.4**2 / 4, rel=1e-5)
    assert (v.grad[:2] < 0).all() and (v.grad[2:] == 0).all()  # descent raises the short norms, leaves the rest
    assert out.metrics["normguard/floor_active_frac"].item() == pytest.approx(0.5)
