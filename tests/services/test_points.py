"""The point sources: each method names its own; frozen, documented shapes, deterministic draws."""

from dataclasses import FrozenInstanceError, fields

import pytest
import torch

from services.config import load_config
from services.methods import get_method
from services.models.schedules import FlowSchedule
from services.points import (
    LaggedVelocities,
    PairPoints,
    SamplePoints,
    TrainingPoints,
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
    return spec, get_method(name).point_source(spec, FlowSchedule())  # the digits grid


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
    if isinstance(source, TrajectoryPoints):
        assert pts.sigma is None and pts.noise is None and pts.loser is None
        assert pts.step_k.shape == (m,) and int(pts.step_k.min()) >= 0 and int(pts.step_k.max()) < T
        for u in range(units):  # K distinct steps per sample
            assert len(set(pts.step_k[u * K : (u + 1) * K].tolist())) == K
    else:
        assert pts.sigma.shape == (m,) and pts.noise.shape == (m, *D) and pts.step_k is None
        assert bool(((pts.sigma > 0) & (pts.sigma <= 1)).all())
    if isinstance(source, PairPoints):
        assert torch.equal(pts.loser, pts.unit + batch.num_pairs) and pts.adv is None and pts.r is None
    else:
        assert torch.equal(pts.adv, batch.advantages[pts.unit]) and pts.loser is None
    assert (pts.r is not None) == (type(source) is SamplePoints)


@pytest.mark.parametrize("name", list(SOURCES))
def test_points_are_frozen_and_drawn_deterministically(name):
    _, source = _source(name)
    batch = _batch(name)
    a, b = source.draw(batch, 0), source.draw(batch, 0)
    for f in fields(TrainingPoints):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x is None and y is None) or torch.equal(x, y), f.name
    with pytest.raises(FrozenInstanceError):
        a.sigma = None
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
def test_inputs_and_fields_of_a_micro_batch(name):
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
    v_theta = torch.randn((r, *D))
    got = source.fields(batch, pts, lagged, rows, x=x, sigma=sigma, idx=idx, v_theta=v_theta, device="cpu")
    expected = {
        "diffusion_nft": {"x0", "noise", "v_old", "v_ema", "kl_scale", "advantages", "reward_prob"},
        "awm": {"x0", "noise", "v_old", "v_ema", "kl_scale", "advantages", "reward_prob"},
        "flow_dpo": {"x0", "noise", "v_old", "v_ema", "kl_scale", "winners", "losers"},
        "flow_grpo": {"log_prob", "old_log_prob", "advantages", "kl_scale", "sigma"},
    }[name]
    assert set(got) == expected
    if name == "flow_dpo":
        assert got["v_old"] is None and got["winners"].tolist() == [0, 1, 2] and got["losers"].tolist() == [3, 4, 5]
    elif name == "flow_grpo":
        assert got["sigma"] is None and got["log_prob"].shape == (len(rows),)
    else:
        assert torch.equal(got["v_old"], v_old[rows]) and torch.equal(got["x0"], batch.latents[idx])
        assert torch.equal(x, (1 - sigma.view(-1, 1, 1, 1)) * got["x0"] + sigma.view(-1, 1, 1, 1) * got["noise"])


def test_grpo_guard_adds_the_sampling_policys_sde_mean():
    _, source = _source("flow_grpo", "loss.guard=true")
    batch = _batch("flow_grpo")
    pts = source.draw(batch, 0)
    rows = torch.tensor([1, 3])
    x, sigma, idx = source.inputs(batch, pts, rows, "cpu")
    lagged = LaggedVelocities(v_old=torch.randn((pts.size, *D)))
    at = dict(x=x, sigma=sigma, idx=idx, v_theta=torch.randn((2, *D)), device="cpu")
    got = source.fields(batch, pts, lagged, rows, **at)
    assert {"mean", "old_mean", "step_std"} <= set(got) and got["old_mean"].shape == (2, *D)
