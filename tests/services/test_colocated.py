"""resources.placement: hybrid (the learner workers sample): same samples and updates as separate samplers."""

import os
import signal

import pytest
import torch
from conftest import tiny_overrides, train_worker_pids
from pydantic import ValidationError

from services.config import load_config
from services.training.build import build_coordinator
from services.training.colocated import ColocatedRollouts
from services.training.experience import split_request
from services.training.learner_group import LearnerFailed
from services.training.remote import CallStats, call_with_retries
from services.training.run import run_training
from services.types import RolloutRequest

KEYS = ("reward/mean", "loss/total", "normguard/ratio_mean", "rollout/norm_ratio_mean", "learner/old_policy_gap")
HYBRID = {"resources.placement": "hybrid"}


def _rows(summary) -> list[dict]:
    return [{k: r[k] for k in KEYS if k in r} for r in summary.history if "reward/mean" in r]


# ---- units --------------------------------------------------------------------------------------
@pytest.mark.unit
def test_a_request_splits_into_contiguous_shares_that_keep_each_samples_prompt_and_seed():
    req = RolloutRequest(
        prompts=[f"p{i}" for i in range(7)], group_ids=[0, 0, 0, 1, 1, 1, 2], seeds=list(range(10, 17)), num_steps=4
    )
    shares = split_request(req, 3)
    assert [len(s.seeds) for s in shares] == [2, 2, 3]
    assert [x for s in shares for x in s.seeds] == req.seeds
    assert [x for s in shares for x in s.prompts] == req.prompts
    assert all(s.num_steps == 4 and s.min_version == req.min_version for s in shares)


@pytest.mark.unit
def test_hybrid_is_checked_against_what_it_cannot_do(tmp_path):
    with pytest.raises(ValidationError, match="train.pipeline sync"):
        load_config(None, tiny_overrides(tmp_path, "x", **HYBRID, **{"train.pipeline": "async"}))
    with pytest.raises(ValidationError, match="resources.num_learners"):  # 8 samples over 3 learner-samplers
        load_config(None, tiny_overrides(tmp_path, "x", **HYBRID, **{"resources.num_learners": 3}))
    ok = load_config(None, tiny_overrides(tmp_path, "x", **HYBRID, **{"rollout.num_samplers": 3}))
    assert ok.resources.placement == "hybrid"  # rollout.num_samplers is unused, not checked


@pytest.mark.unit
def test_a_failed_learner_group_is_not_retried_as_a_sampler_would_be():
    """A rank that failed while sampling took its worker group down: the share is not redone on it."""
    calls = []

    class Broken:
        world_size, version = 1, 0

        def generate(self, shares, *, timeout_s):
            calls.append(len(shares))
            raise LearnerFailed("learner rank 0 failed: CUDA out of memory")

    stats = CallStats()
    req = RolloutRequest(prompts=["a"], group_ids=[0], seeds=[1], num_steps=2)
    with pytest.raises(LearnerFailed):
        call_with_retries(
            ColocatedRollouts(Broken(), timeout_s=5),
            "generate",
            req,
            timeout_s=5,
            retries=3,
            stats=stats,
            name="rollout",
        )
    assert calls == [1] and stats.retries == 0 and stats.failures == 1


@pytest.mark.service
def test_learner_sampling_swaps_the_old_policy_in_and_restores_weights_and_mode(digits_assets, tmp_path):
    from services.training.learner import Learner

    cfg = load_config(None, tiny_overrides(tmp_path, "swap"))
    learner = Learner.from_config(cfg, str(digits_assets.model_path))
    with torch.no_grad():
        for old in learner.copies.old:
            old.add_(0.5)  # the old copy differs from the trained weights
    trained = [p.detach().clone() for p in learner.params]
    old = [o.clone() for o in learner.copies.old]
    learner.gen.transformer.train()
    with learner.sampling():
        assert not learner.gen.transformer.training
        assert all(torch.equal(p, o) for p, o in zip(learner.params, old))
    assert learner.gen.transformer.training
    assert all(torch.equal(p, t) for p, t in zip(learner.params, trained))
    assert all(torch.equal(o, t) for o, t in zip(learner.copies.old, old))
    assert all(p.requires_grad for p in learner.params)  # still the optimiser's parameters


# ---- in process: the same run as separate samplers ----------------------------------------------
ARMS = [("diffusion_nft", []), ("flow_grpo", ["rollout.sde_noise_level=0.7"])]


@pytest.mark.service
@pytest.mark.parametrize("loss,extra", ARMS, ids=[a[0] for a in ARMS])
def test_in_process_hybrid_trains_and_evaluates_exactly_as_separate_samplers(digits_assets, tmp_path, loss, extra):
    """NFT's old policy lags the trained one (so the swap matters); Flow-GRPO keeps SDE trajectories."""
    common = {"loss.name": loss, "rollout.num_samplers": 1, "train.steps": 3, "train.eval_every": 2}

    def run(name, **more):
        return run_training(
            load_config(None, tiny_overrides(tmp_path, name, **common, **more) + extra), local=True, progress=False
        )

    separate, hybrid = run("separate"), run("hybrid", **HYBRID)
    assert _rows(hybrid) == _rows(separate)
    assert hybrid.after == separate.after and hybrid.before == separate.before
    if loss == "diffusion_nft":
        assert _rows(hybrid)[-1]["learner/old_policy_gap"] > 0  # sampled with the lagging copy, not theta


# ---- on Ray Train -------------------------------------------------------------------------------
@pytest.mark.service
@pytest.mark.slow
def test_on_ray_train_the_learners_sample_and_a_lost_one_is_recovered(ray_local, digits_assets, tmp_path):
    """Two learner workers, each sampling half the rollout: the same metrics as two learners beside two
    sampler actors, no sampler actor and no weights shipped. SIGKILL a worker after step 3: the next
    rollout finds the group lost, the run restarts from the step-2 checkpoint and ends equal."""
    inner = {"train.steps": 4, "train.checkpoint_every": 2, "resources.num_learners": 2, "resources.learner_cpus": 0.5}
    separate = run_training(load_config(None, tiny_overrides(tmp_path, "separate", **inner)), progress=False)

    cfg = load_config(None, tiny_overrides(tmp_path, "hybrid", **inner, **HYBRID))
    coord, _, _ = build_coordinator(cfg, checkpoint=None)
    try:
        (sampler,) = coord.samplers
        assert isinstance(sampler, ColocatedRollouts) and coord.weights_ref is None  # nothing to ship
        assert sampler.get_version() == coord.version == 0
    finally:
        coord.shutdown()
    hybrid = run_training(cfg, progress=False)
    assert _rows(hybrid) == _rows(separate)
    assert hybrid.after == separate.after

    killed = []

    def kill_after_step_3(step, _metrics):
        if step == 3 and not killed:
            pid = max(train_worker_pids())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    lost = run_training(
        load_config(None, tiny_overrides(tmp_path, "lost", **inner, **HYBRID)),
        progress=False,
        on_step=kill_after_step_3,
    )
    rows = [r for r in lost.history if "reward/mean" in r]
    assert killed and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["faults/learner_restarts"] for r in rows] == [0, 0, 1, 0]
    assert _rows(lost) == _rows(separate)
    assert lost.after == separate.after


@pytest.mark.service
@pytest.mark.slow
def test_in_process_hybrid_on_a_tiny_sd3_lora_pipeline_matches_separate_samplers(tmp_path):
    """The diffusers path: LoRA adapters swapped (the reference is the base with adapters off), text
    encoders and VAE decode in the learner's own pipeline, a CLIP-preference reward."""
    import tiny_models

    sd3, clip = tiny_models.save_tiny_sd3(tmp_path / "sd3"), tiny_models.save_tiny_clip(tmp_path / "clip")
    over = {
        "model.kind": "sd3",
        "model.path": str(sd3),
        "model.lora_rank": 4,
        "model.resolution": 64,
        "reward.scorers": f'[{{name: pickscore, path: "{clip}"}}]',
        "reward.eval_scorers": "[]",
        "rollout.num_samplers": 1,
        "rollout.num_steps": 2,
        "rollout.shift": 3.0,
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 2,
        "learner.lr": 0.02,
        "learner.timesteps_per_sample": 1,
        "eval.full_steps": 3,
        "logging.log_images": False,
    }

    def run(name, **more):
        cfg = load_config(None, tiny_overrides(tmp_path, name, **over, **more) + ['prompts=["a cat", "a red bicycle"]'])
        return run_training(cfg, local=True, progress=False)

    separate, hybrid = run("separate"), run("hybrid", **HYBRID)
    assert len(_rows(separate)) == 2 and _rows(hybrid) == _rows(separate)
    assert hybrid.after == separate.after

    # the LoRA init (peft's random A) is drawn from train.seed, whatever the process drew before
    from services.training.learner import Learner

    cfg = load_config(None, tiny_overrides(tmp_path, "init", **over))
    first = Learner.from_config(cfg, str(sd3)).params
    torch.rand(1000)
    again = Learner.from_config(cfg, str(sd3)).params
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = Learner.from_config(
        load_config(None, tiny_overrides(tmp_path, "init", **over, **{"train.seed": 1})), str(sd3)
    )
    assert not all(torch.equal(a, b) for a, b in zip(first, other.params))
