"""The Learner in-process: every base loss with and without NormGuard, NaN skipping, checkpoints."""

import pytest
import torch

from services.config import load_config
from services.training.learner import Learner
from services.training.rollout import RolloutSampler
from services.types import RolloutRequest, TrainBatch

pytestmark = pytest.mark.service

LOSSES = {
    "diffusion_nft": [],
    "awm": ["loss.clip_range=0.2"],
    "flow_dpo": ["loss.beta=50"],
    "flow_grpo": ["rollout.sde_noise_level=0.7"],
}


def _cfg(loss: str, weight: float, *extra: str):
    return load_config(
        None,
        [
            f"loss.name={loss}",
            *LOSSES[loss],
            f"normguard.weight={weight}",
            "learner.lr=1e-3",
            "rollout.num_steps=3",
            "rollout.group_size=4",
            "rollout.prompts_per_step=2",
            "learner.micro_batch=8",
            "model.pretrain_steps=5",
            *extra,
        ],
    )


def _batch(cfg, assets) -> TrainBatch:
    sampler = RolloutSampler(cfg.model, str(assets.model_path))
    ro = cfg.rollout
    prompts = ["a handwritten digit 1"] * 4 + ["a handwritten digit 2"] * 4
    rb = sampler.generate(
        RolloutRequest(
            prompts=prompts,
            group_ids=[0] * 4 + [1] * 4,
            seeds=list(range(8)),
            num_steps=ro.num_steps,
            sde_noise_level=ro.sde_noise_level,
        )
    )
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.2, -1.2, 0.1, -0.1])
    if cfg.loss.name == "flow_dpo":  # two pairs: winners rows 0-1, losers rows 2-3
        idx = torch.tensor([0, 4, 1, 5])
        return TrainBatch(
            latents=rb.latents[idx],
            prompts=[prompts[i] for i in idx],
            advantages=adv[idx],
            reward_prob=(adv[idx] / 4 + 0.5),
            step=0,
            rank=0,
            shard_units=(2,),
            num_pairs=2,
        )
    return TrainBatch(
        latents=rb.latents,
        prompts=prompts,
        advantages=adv,
        reward_prob=(adv / 4 + 0.5).clamp(0, 1),
        step=0,
        rank=0,
        shard_units=(8,),
        states=rb.states,
        log_probs=rb.log_probs,
        sigmas=rb.sigmas,
    )


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_update_changes_weights_and_reports_metrics(digits_assets, loss, weight):
    cfg = _cfg(loss, weight)
    learner = Learner.from_config(cfg, str(digits_assets.model_path))
    before = {k: v.clone() for k, v in learner.policy_weights().items()}
    metrics = learner.update(_batch(cfg, digits_assets))
    assert metrics["learner/skipped_nonfinite"] == 0.0 and learner.version == 1
    assert "normguard/ratio_mean" in metrics and "loss/total" in metrics
    assert any(not torch.equal(before[k], v) for k, v in learner.policy_weights().items())
    assert (metrics["normguard/penalty"] >= 0) and (metrics["loss/total"] == metrics["loss/total"])


def test_normguard_term_changes_the_update(digits_assets):
    cfg0, cfg1 = _cfg("diffusion_nft", 0.0), _cfg("diffusion_nft", 100.0, "normguard.margin=0", "normguard.power=1")
    batch = _batch(cfg0, digits_assets)
    a, b = (
        Learner.from_config(cfg0, str(digits_assets.model_path)),
        Learner.from_config(cfg1, str(digits_assets.model_path)),
    )
    ma, mb = a.update(batch), b.update(batch)
    if mb["normguard/active_frac"] > 0:
        assert mb["loss/total"] > ma["loss/total"]
        wa, wb = a.policy_weights(), b.policy_weights()
        assert any(not torch.allclose(wa[k], wb[k]) for k in wa)
    else:  # no point above the reference norm: the penalty is exactly inactive
        assert mb["loss/total"] == pytest.approx(ma["loss/total"])


def test_nonfinite_loss_skips_the_update(digits_assets):
    cfg = _cfg("awm", 0.0)
    learner = Learner.from_config(cfg, str(digits_assets.model_path))
    batch = _batch(cfg, digits_assets)
    bad = TrainBatch(**{**batch.__dict__, "latents": batch.latents.clone().fill_(float("nan"))})
    before = {k: v.clone() for k, v in learner.policy_weights().items()}
    metrics = learner.update(bad)
    assert metrics["learner/skipped_nonfinite"] == 1.0 and learner.version == 0
    assert all(torch.equal(before[k], v) for k, v in learner.policy_weights().items())


@pytest.mark.parametrize(
    "loss, extra",
    [("diffusion_nft", ["learner.updates_per_step=2", "learner.epochs_per_step=2"]), ("awm", [])],
)
def test_checkpoint_round_trip_reproduces_the_next_update(digits_assets, tmp_path, loss, extra):
    """Weights, optimiser, the old policy (NFT) and the EMA-KL copy (AWM) survive a checkpoint exactly."""
    cfg = _cfg(loss, 1.0, *extra)
    batch = _batch(cfg, digits_assets)
    a = Learner.from_config(cfg, str(digits_assets.model_path))
    a.update(batch)
    a.save(tmp_path / "ck", {"step": 1})
    b = Learner.from_config(cfg, str(digits_assets.model_path))
    assert b.load(tmp_path / "ck") == {"step": 1} and b.version == 1
    second = TrainBatch(**{**batch.__dict__, "step": 1})
    ma, mb = a.update(second), b.update(second)
    assert ma == mb and ma["learner/updates"] == cfg.learner.epochs_per_step * (cfg.learner.updates_per_step or 1)
    wa, wb = a.policy_weights(), b.policy_weights()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))
    if a.copies.ema is not None:
        assert all(torch.equal(x, y) for x, y in zip(a.copies.ema, b.copies.ema))


@pytest.mark.parametrize("loss", ["flow_dpo", "flow_grpo"])
def test_an_empty_shard_still_takes_every_step(digits_assets, loss):
    """A rank can get no pairs (DPO) or no kept samples (GRPO): it must still join each optimiser step."""
    cfg = _cfg(loss, 0.0, "learner.updates_per_step=2")
    full = _batch(cfg, digits_assets)
    empty = TrainBatch(
        **{
            **full.__dict__,
            "latents": full.latents[:0],
            "prompts": [],
            "advantages": full.advantages[:0],
            "reward_prob": full.reward_prob[:0],
            "num_pairs": 0,
            "shard_units": (0, full.units),
            "states": None if full.states is None else full.states[:, :0],
            "log_probs": None if full.log_probs is None else full.log_probs[:, :0],
        }
    )
    learner = Learner.from_config(cfg, str(digits_assets.model_path))
    metrics = learner.update(empty)
    assert metrics["learner/updates"] == 2.0 and learner.step_count == 2


def test_a_sample_one_version_behind_reads_the_old_policy_that_made_it(digits_assets):
    """The pipelined loop trains on samples of the previous policy version: DiffusionNFT's v_old (and
    AWM-clip's) is the velocity of the old copy *as shipped at that version*, kept by the learner."""
    from dataclasses import replace

    cfg = _cfg("diffusion_nft", 0.0, "train.pipeline=async", "rollout.max_staleness=1")
    path = str(digits_assets.model_path)
    learner, fresh = Learner.from_config(cfg, path), Learner.from_config(cfg, path)  # same init: fresh holds policy v0
    batch = _batch(cfg, digits_assets)
    learner.update(batch)
    assert learner.version == 1

    def v_old(lr: Learner, versions: int):
        b = replace(batch, step=1, versions=torch.full((batch.latents.shape[0],), versions))
        pts = lr._points(b, 0)
        return lr._lagged_velocities(b, pts, lr.gen.encode_prompts(b.prompts), None).v_old

    behind = v_old(learner, 0)
    assert torch.equal(behind, v_old(fresh, 0))  # exactly the policy that sampled
    assert not torch.allclose(behind, v_old(learner, 1))  # not the current old copy
    with pytest.raises(RuntimeError, match="reached the learner"):
        v_old(learner, 3)
    sync = Learner.from_config(_cfg("diffusion_nft", 0.0), path)  # the sync loop keeps one version only
    sync.update(batch)
    with pytest.raises(RuntimeError, match="one version behind"):
        v_old(sync, 0)
