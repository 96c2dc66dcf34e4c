"""The point sources: each method names its own; frozen, documented shapes, deterministic draws."""

from dataclasses import FrozenInstanceError, fields

import pytest
import torch

from normguard_core.losses import PairBatch, SampleBatch, StepBatch
from services.config import load_config
from services.methods import get_method
from services.models.schedules import FlowSchedule
from services.points import (
    Evaluated,
    LaggedVelocities,
    PairDraw,
    PairPoints,
    SampleDraw,
    SamplePoints,
    StepDraw,
    TrajectoryPoints,
)
from services.training.learner_spec import LearnerSpec
from services.types import TrainBatch

pytestmark = pytest.mark.unit

N, T, K, D = 6, 4, 3, (1, 4, 4)  # samples, rollout steps, points per unit, latent shape
SOURCES = {
    "diffusion_nft": SamplePoints,
    "awm": SamplePoints,
    "flow_dpo": PairPoints,
    "flow_grpo": TrajectoryPoints,
}


def _source(name: str, *extra: str):
    over = [f"loss.name={name}", f"rollout.num_steps={T}", f"learner.timesteps_per_sample={K}", *extra]
    if name == "flow_grpo":
        over.append("rollout.sde_noise_level=0.7")
    spec = LearnerSpec.from_config(load_config(None, over))
    return spec, get_method(spec.loss).point_source(spec, FlowSchedule())  # the digits grid


def _batch(name: str, step: int = 0) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    pairs = N // 2 if name == "flow_dpo" else 0
    traj = name == "flow_grpo"
    return TrainBatch(
        latents=torch.randn((N, *D), generator=g),
        prompts=["p"] * N,
        advantages=torch.randn(N, generator=g, dtype=torch.float64),
        reward_prob=torch.rand(N, generator=g),
        step=step,
        rank=0,
        shard_units=(pairs or N,),
        num_pairs=pairs,
        states=torch.randn((T + 1, N, *D), generator=g) if traj else None,
        log_probs=torch.randn((T, N), generator=g) if traj else None,
        sigmas=torch.linspace(1.0, 0.0, T + 1) if traj else None,
    )


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_method_names_its_point_source_and_its_shapes_hold(name):
    spec, source = _source(name)
    assert type(source) is SOURCES[name] and spec.timesteps == K
    batch = _batch(name)
    pts = source.draw(batch, 0)
    units = batch.units
    m = units * K
    assert pts.size == m and pts.unit.tolist() == torch.arange(units).repeat_interleave(K).tolist()
    assert torch.equal(pts.sample, pts.unit)
    assert type(pts) is {SamplePoints: SampleDraw, PairPoints: PairDraw, TrajectoryPoints: StepDraw}[type(source)]
    if isinstance(pts, StepDraw):
        assert pts.step_k.shape == (m,) and int(pts.step_k.min()) >= 0 and int(pts.step_k.max()) < T
        for u in range(units):  # K distinct steps per sample
            assert len(set(pts.step_k[u * K : (u + 1) * K].tolist())) == K
    else:
        assert pts.sigma.shape == (m,) and pts.noise.shape == (m, *D)
        assert bool(((pts.sigma > 0) & (pts.sigma <= 1)).all())
    if isinstance(pts, PairDraw):
        assert torch.equal(pts.loser, pts.unit + batch.num_pairs)
    else:
        assert torch.equal(pts.adv, batch.advantages[pts.unit])
    if isinstance(pts, SampleDraw):
        assert torch.equal(pts.r, batch.reward_prob[pts.unit])


@pytest.mark.parametrize("name", list(SOURCES))
def test_points_are_frozen_and_drawn_deterministically(name):
    _, source = _source(name)
    batch = _batch(name)
    a, b = source.draw(batch, 0), source.draw(batch, 0)
    for f in fields(a):
        assert torch.equal(getattr(a, f.name), getattr(b, f.name)), f.name
    with pytest.raises(FrozenInstanceError):
        a.unit = None
    with pytest.raises(FrozenInstanceError):
        LaggedVelocities().v_old = torch.zeros(1)
    other = source.draw(batch, 1) if name != "flow_grpo" else source.draw(_batch(name, step=1), 0)
    moved = other.step_k if name == "flow_grpo" else other.noise
    assert not torch.equal(moved, a.step_k if name == "flow_grpo" else a.noise)


@pytest.mark.parametrize("name", list(SOURCES))
def test_minibatches_cover_every_row_once(name):
    _, source = _source(name, "learner.updates_per_step=2")
    batch = _batch(name)
    parts = source.minibatches(batch, 0)
    assert len(parts) == 2
    rows = torch.cat([r for r, _ in parts])
    assert sorted(rows.tolist()) == list(range(batch.units * K))
    assert sum(n for _, n in parts) == batch.units * K  # one rank: the global counts are its own


@pytest.mark.parametrize("name", list(SOURCES))
def test_inputs_and_typed_batch_of_a_micro_batch(name):
    _, source = _source(name)
    batch = _batch(name)
    pts = source.draw(batch, 0)
    rows = torch.tensor([0, 2, 4])
    x, sigma, idx = source.inputs(batch, pts, rows, "cpu")
    r = 2 * len(rows) if name == "flow_dpo" else len(rows)  # pairs stack winners, then losers
    assert x.shape == (r, *D) and sigma.shape == (r,) and idx.shape == (r,)
    assert all(t.shape[0] == len(rows) for t in source.lagged_inputs(batch, pts, rows, "cpu"))
    v_old = torch.randn((pts.size, *D))
    lagged = LaggedVelocities(v_old=v_old)
    v_theta, v_ref = torch.randn((r, *D)), torch.randn((r, *D))
    at = Evaluated(x=x, sigma=sigma, idx=idx, v_theta=v_theta, v_ref=v_ref, device="cpu")
    micro = source.micro(batch, pts, lagged, rows, at)
    got = micro.batch
    assert type(got) is {"flow_dpo": PairBatch, "flow_grpo": StepBatch}.get(name, SampleBatch)
    assert micro.kl_scale.shape == (r,)
    if name == "flow_dpo":
        assert got.winners.tolist() == [0, 1, 2] and got.losers.tolist() == [3, 4, 5] and got.v_ref is v_ref
        assert torch.equal(got.x0, batch.latents[idx]) and torch.equal(got.sigma, sigma)
    elif name == "flow_grpo":
        assert got.log_prob.shape == (len(rows),) and got.guard is None
        assert torch.equal(got.old_log_prob, batch.log_probs[pts.step_k[rows], pts.sample[rows]])
    else:
        assert torch.equal(got.v_old, v_old[rows]) and torch.equal(got.x0, batch.latents[idx]) and got.v_ema is None
        assert torch.equal(got.reward_prob, pts.r[rows]) and torch.equal(got.sigma, sigma)
        assert torch.equal(x, (1 - sigma.view(-1, 1, 1, 1)) * got.x0 + sigma.view(-1, 1, 1, 1) * got.noise)
    if name in ("diffusion_nft", "flow_dpo"):
        assert torch.equal(micro.kl_scale, torch.ones(r))  # the plain KL


def test_grpo_guard_adds_the_sampling_policys_sde_mean():
    _, source = _source("flow_grpo", "loss.guard=true")
    batch = _batch("flow_grpo")
    pts = source.draw(batch, 0)
    rows = torch.tensor([1, 3])
    x, sigma, idx = source.inputs(batch, pts, rows, "cpu")
    lagged = LaggedVelocities(v_old=torch.randn((pts.size, *D)))
    at = Evaluated(x=x, sigma=sigma, idx=idx, v_theta=torch.randn((2, *D)), v_ref=None, device="cpu")
    guard = source.micro(batch, pts, lagged, rows, at).batch.guard
    assert guard is not None and guard.old_mean.shape == (2, *D) and guard.step_std.shape == (2,)
    with pytest.raises(ValueError, match="v_old"):
        source.micro(batch, pts, LaggedVelocities(), rows, at)
