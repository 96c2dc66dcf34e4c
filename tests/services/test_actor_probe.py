"""Actor probes (``services.training.probe``) on CPU: what they report, and that reading them changes no update."""

import pytest
import torch
from torch import nn

from services.config import load_config
from services.training.learner import Learner
from services.training.learner_group import LearnerCommand, _serve
from services.training.probe import probe_process
from services.training.rollout import RolloutSampler
from services.training.scoring import ScorerWorker
from services.types import RolloutRequest, TrainBatch

pytestmark = pytest.mark.service


def test_probe_reports_peak_rss_and_parameter_dtypes():
    module = nn.Sequential(nn.Linear(2, 2).bfloat16().requires_grad_(False), nn.Linear(2, 2))
    p = probe_process(module)
    assert p.trainable == ("float32@cpu",) and p.frozen == ("bfloat16@cpu",)
    assert p.peak_rss_mb > 0 and probe_process().trainable == () == probe_process().frozen
    if not torch.cuda.is_initialized():  # a process without CUDA reports the CPU and its RSS
        assert p.device == "cpu" and p.peak_allocated_mb == 0.0 and p.peak_mb == p.peak_rss_mb


def _cfg():
    return load_config(
        None,
        ["rollout.num_steps=2", "rollout.group_size=2", "rollout.prompts_per_step=2", "model.pretrain_steps=5"],
    )


def _batch(sampler: RolloutSampler) -> TrainBatch:
    prompts = ["a handwritten digit 1"] * 2 + ["a handwritten digit 2"] * 2
    rb = sampler.generate(RolloutRequest(prompts=prompts, group_ids=[0, 0, 1, 1], seeds=[0, 1, 2, 3], num_steps=2))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    return TrainBatch(
        latents=rb.latents,
        prompts=prompts,
        advantages=adv,
        reward_prob=(adv / 4 + 0.5),
        step=0,
        rank=0,
        shard_units=(4,),
    )


def test_probing_a_learner_rank_changes_no_update(digits_assets):
    cfg, path = _cfg(), str(digits_assets.model_path)
    sampler = RolloutSampler(cfg.model, path)
    batch = _batch(sampler)
    plain, probed = Learner.from_config(cfg, path), Learner.from_config(cfg, path)
    reply = _serve(LearnerCommand("probe"), probed, None, rank=0, ships=False)  # the rank's command
    assert reply.kind == "probed" and reply.result.trainable == ("float32@cpu",) and reply.result.peak_mb > 0
    expected = plain.update(batch)
    got = probed.update(batch)
    _serve(LearnerCommand("probe"), probed, None, rank=0, ships=False)
    assert got.keys() == expected.keys()
    assert all(got[k] == v or (got[k] != got[k] and v != v) for k, v in expected.items())  # NaN == NaN
    for name, w in plain.policy_weights().items():
        assert torch.equal(w, probed.policy_weights()[name]), name
    assert sampler.probe().trainable == ("float32@cpu",) and ScorerWorker({}).probe().peak_rss_mb > 0
