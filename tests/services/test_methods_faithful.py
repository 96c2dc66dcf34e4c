"""Each method's training loop against its source's objective, computed independently in float64.

For every method the learner takes two RL steps on a tiny digits model; the loss and the gradient of
the last optimiser step (after the weights have moved, with the old / EMA copies lagging as the
source's schedule says) are compared with the source's objective written out below in float64
(NVlabs/DiffusionNFT ``train_nft_sd3.py``, scxue/advantage_weighted_matching ``train_sd3_awm.py``,
flow_grpo ``train_sd3.py`` / ``train_sd3_dpo.py``). The training points (sigmas, noise, mini-batch
split) are the learner's own; everything after them is recomputed here.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from services.config import load_config
from services.methods import get_method
from services.points import TrainingPoints
from services.training.learner import Learner
from services.training.rollout import RolloutSampler
from services.types import RolloutRequest, TrainBatch

pytestmark = pytest.mark.service

PROMPTS = ["a handwritten digit 1"] * 4 + ["a handwritten digit 2"] * 4
REWARDS = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.65])


def _cfg(loss: str, *extra: str):
    base = [
        f"loss.name={loss}",
        "learner.lr=3e-3",
        "learner.grad_clip=1e9",  # no clipping: the raw gradient is compared
        "learner.micro_batch=5",  # several backward passes per optimiser step
        "rollout.num_steps=4",
        "rollout.group_size=4",
        "rollout.prompts_per_step=2",
        "model.pretrain_steps=5",
    ]
    if loss == "flow_grpo":
        base.append("rollout.sde_noise_level=0.7")
    return load_config(None, base + list(extra))


def _batch(cfg, assets, step: int) -> TrainBatch:
    sampler = RolloutSampler(cfg.model, str(assets.model_path))
    ro = cfg.rollout
    rb = sampler.generate(
        RolloutRequest(
            prompts=PROMPTS,
            group_ids=[0] * 4 + [1] * 4,
            seeds=list(range(8)),
            num_steps=ro.num_steps,
            sde_noise_level=ro.sde_noise_level,
        )
    )
    tg = get_method(cfg.loss).targets(REWARDS, rb.group_ids, cfg.advantages)
    if tg.winners is not None:
        idx = torch.cat([tg.winners, tg.losers])
        units, pairs = (len(tg.winners),), len(tg.winners)
    else:
        idx, units, pairs = tg.train_idx, (len(tg.train_idx),), 0
    sde = rb.states is not None
    return TrainBatch(
        latents=rb.latents[idx],
        prompts=[PROMPTS[i] for i in idx],
        advantages=tg.advantages.float()[idx],
        reward_prob=tg.reward_prob[idx],
        step=step,
        rank=0,
        shard_units=units,
        num_pairs=pairs,
        states=rb.states[:, idx] if sde else None,
        log_probs=rb.log_probs[:, idx] if sde else None,
        sigmas=rb.sigmas if sde else None,
    )


def _record(learner: Learner) -> list[dict]:
    """Record, at every optimiser step, the weights the gradient was taken at and the gradient."""
    steps: list[dict] = []
    orig = learner.opt.step

    def step(*args, **kwargs):
        steps.append(
            {
                "params": [p.detach().clone() for p in learner.params],
                "grad": torch.cat([p.grad.detach().flatten() for p in learner.params]).clone(),
            }
        )
        return orig(*args, **kwargs)

    learner.opt.step = step
    return steps


def _micro_losses(learner: Learner) -> list[tuple[int, float]]:
    calls: list[tuple[int, float]] = []
    orig = learner._micro_loss

    def wrapped(data, rows):
        loss, terms, metrics = orig(data, rows)
        calls.append((len(rows), float(loss.detach())))
        return loss, terms, metrics

    learner._micro_loss = wrapped
    return calls


class F64:
    """The learner's model in float64 with given trainable weights (policy), the reference and a call."""

    def __init__(self, learner: Learner, weights: list[torch.Tensor], *, trainable: bool) -> None:
        gen = learner.gen
        self.gen = gen
        self.module = copy.deepcopy(gen.transformer).double()
        names = [n for n, p in gen.transformer.named_parameters() if p.requires_grad]
        own = dict(self.module.named_parameters())
        self.params = [own[n] for n in names]
        with torch.no_grad():
            for p, w in zip(self.params, weights):
                p.copy_(w.double())
        for p in self.module.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(trainable)

    def __call__(self, x, sigma, prompts):
        cond = self.gen.encode_prompts(prompts)
        cond = type(cond)({k: v.double() for k, v in cond.tensors.items()})
        return self.gen._call_backbone(self.module, x.double(), sigma.double(), cond)


def _ref_module(learner: Learner) -> F64:
    ref = F64(learner, [p for p in learner.params], trainable=False)
    ref.module = copy.deepcopy(learner.gen._reference).double()
    return ref


def _mean_d(t: torch.Tensor) -> torch.Tensor:
    return t.mean(dim=tuple(range(1, t.ndim)))


def _two_steps(cfg, assets):
    learner = Learner.from_config(cfg, str(assets.model_path))
    theta0 = [p.detach().clone() for p in learner.params]
    learner.update(_batch(cfg, assets, 0))
    batch = _batch(cfg, assets, 1)
    rec, calls = _record(learner), _micro_losses(learner)
    learner.update(batch)
    return learner, theta0, batch, rec, calls


def _last_minibatch(learner: Learner, batch: TrainBatch, calls) -> tuple[torch.Tensor, TrainingPoints, float]:
    pts = learner._points(batch, 0)
    rows, total = learner._minibatches(batch, 0)[-1]
    n_rows, loss = 0, 0.0
    for n, value in reversed(calls):  # the last mini-batch's micro-batches
        if n_rows >= len(rows):
            break
        loss += value * n / total
        n_rows += n
    return rows, pts, loss


def _forward_points(batch: TrainBatch, pts: TrainingPoints, rows: torch.Tensor):
    """The source's forward-process points in float64: x0, eps, t, t broadcast, x_t = (1 - t) x0 + t eps, prompts."""
    s = pts.sample[rows]
    x0, eps, t = batch.latents[s].double(), pts.noise[rows].double(), pts.sigma[rows].double()
    te = t.view(-1, 1, 1, 1)
    return x0, eps, t, te, (1 - te) * x0 + te * eps, [batch.prompts[i] for i in s]


def _compare(loss_ref: torch.Tensor, params: list[torch.Tensor], loss_learner: float, grad_learner: torch.Tensor):
    grad_ref = torch.cat([g.flatten() for g in torch.autograd.grad(loss_ref, params)]).float()
    assert loss_learner == pytest.approx(float(loss_ref.detach()), rel=2e-4, abs=1e-7)
    rel = float((grad_learner - grad_ref).norm() / grad_ref.norm())
    assert rel < 2e-3, f"gradient differs from the float64 source objective: relative error {rel:.2e}"


def test_diffusion_nft_matches_the_source(digits_assets):
    cfg = _cfg("diffusion_nft", "loss.beta=0.5")
    learner, theta0, batch, rec, calls = _two_steps(cfg, digits_assets)
    theta1 = rec[-1]["params"]
    d = 0.001  # return_decay(global_step=1, decay_type=1)
    old = F64(learner, [d * a + (1 - d) * b for a, b in zip(theta0, theta1)], trainable=False)
    pol, ref = F64(learner, theta1, trainable=True), _ref_module(learner)
    rows, pts, loss_l = _last_minibatch(learner, batch, calls)
    x0, eps, t, te, xt, prompts = _forward_points(batch, pts, rows)
    v, v_old, v_ref = pol(xt, t, prompts), old(xt, t, prompts).detach(), ref(xt, t, prompts).detach()
    beta, m = 0.5, 5.0
    r = (batch.advantages[pts.sample[rows]].double().clamp(-m, m) / m / 2 + 0.5).clamp(0, 1)
    pos = beta * v + (1 - beta) * v_old
    neg = (1 + beta) * v_old - beta * v

    def err(pred):
        x0p = xt - te * pred
        w = (x0p.detach() - x0).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
        return _mean_d((x0p - x0) ** 2 / w)

    ori = r * err(pos) / beta + (1 - r) * err(neg) / beta
    loss = (ori * m).mean() + 1e-4 * _mean_d((v - v_ref) ** 2).mean()
    _compare(loss, pol.params, loss_l, rec[-1]["grad"])
    assert not torch.allclose(v, v_old), "the old policy must lag the trained one"


def test_awm_matches_the_source(digits_assets):
    cfg = _cfg("awm", "loss.clip_range=0.5", "loss.kl_weight=1e-3")
    learner, theta0, batch, rec, calls = _two_steps(cfg, digits_assets)
    theta1 = rec[-1]["params"]
    old = F64(learner, theta1, trainable=False)  # on-policy: the sampling policy is theta_1
    d = 0.001  # min(0.3, 0.001 * global_step)
    ema = F64(learner, [d * a + (1 - d) * b for a, b in zip(theta0, theta1)], trainable=False)
    pol, ref = F64(learner, theta1, trainable=True), _ref_module(learner)
    rows, pts, loss_l = _last_minibatch(learner, batch, calls)
    x0, eps, t, te, xt, prompts = _forward_points(batch, pts, rows)
    v = pol(xt, t, prompts)

    def lp(pred):  # compute_log_prob_awm, weighting='ghuber', ghuber_power=0.25
        mse = _mean_d((pred - (eps - x0)) ** 2)
        return -(torch.pow(mse + 1e-10, 0.25) - math.pow(1e-10, 0.25)) * t / 0.25

    with torch.no_grad():
        lp_old, v_ref, v_ema = lp(old(xt, t, prompts)), ref(xt, t, prompts), ema(xt, t, prompts)
    adv = batch.advantages[pts.sample[rows]].double().clamp(-5, 5) / 5 * 1.0
    ratio = torch.exp(lp(v) - lp_old)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 0.5, 1 + 0.5)).mean()
    loss = policy + 1e-3 * _mean_d((v - v_ref) ** 2).mean() + 1.0 * _mean_d((v - v_ema) ** 2).mean()
    _compare(loss, pol.params, loss_l, rec[-1]["grad"])


def test_flow_grpo_matches_the_source(digits_assets):
    cfg = _cfg("flow_grpo", "loss.clip_range=0.2")
    learner, _, batch, rec, calls = _two_steps(cfg, digits_assets)
    assert len(rec) == 2, "Flow-GRPO takes two optimiser steps per RL step"
    pol, ref = F64(learner, rec[-1]["params"], trainable=True), _ref_module(learner)
    rows, pts, loss_l = _last_minibatch(learner, batch, calls)
    s, k = pts.sample[rows], pts.step_k[rows]
    x, x_next = batch.states[k, s].double(), batch.states[k + 1, s].double()
    sig, sig_next = batch.sigmas[k].double(), batch.sigmas[k + 1].double()
    prompts = [batch.prompts[i] for i in s]
    a = 0.7
    se, sne = sig.view(-1, 1, 1, 1), sig_next.view(-1, 1, 1, 1)
    dt = sne - se
    std_t = a * torch.sqrt(se / (1 - torch.where(se == 1, sne, se)))  # sigma_max = sigmas[1] at sigma = 1

    def mean(v):  # sd3_sde_with_logprob
        return x * (1 + std_t**2 / (2 * se) * dt) + v * (1 + std_t**2 * (1 - se) / (2 * se)) * dt

    m, m_ref = mean(pol(x, sig, prompts)), mean(ref(x, sig, prompts).detach())
    sd = std_t * torch.sqrt(-dt)
    log_prob = _mean_d(-((x_next - m) ** 2) / (2 * sd**2) - torch.log(sd) - math.log(math.sqrt(2 * math.pi)))
    ratio = torch.exp(log_prob - batch.log_probs[k, s].double())
    adv = batch.advantages[s].double().clamp(-5, 5)
    policy = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - 0.2, 1 + 0.2)).mean()
    kl = (_mean_d((m - m_ref) ** 2) / (2 * std_t.flatten() ** 2)).mean()
    _compare(policy + 0.04 * kl, pol.params, loss_l, rec[-1]["grad"])


def test_flow_dpo_matches_the_source(digits_assets):
    cfg = _cfg("flow_dpo")
    learner, _, batch, rec, calls = _two_steps(cfg, digits_assets)
    pol, ref = F64(learner, rec[-1]["params"], trainable=True), _ref_module(learner)
    rows, pts, loss_l = _last_minibatch(learner, batch, calls)
    w, lo = pts.sample[rows], pts.loser[rows]
    eps, t = pts.noise[rows].double(), pts.sigma[rows].double()
    te = t.view(-1, 1, 1, 1)

    def errors(model, idx):
        x0 = batch.latents[idx].double()
        v = model((1 - te) * x0 + te * eps, t, [batch.prompts[i] for i in idx])
        return _mean_d((v - (eps - x0)) ** 2)

    model_diff = errors(pol, w) - errors(pol, lo)
    with torch.no_grad():
        ref_diff = errors(ref, w) - errors(ref, lo)
    loss = -F.logsigmoid(-0.5 * 100.0 * (model_diff - ref_diff)).mean()
    _compare(loss, pol.params, loss_l, rec[-1]["grad"])


def test_nft_gradient_depends_on_beta_once_the_old_policy_lags(digits_assets):
    """At the first mini-batch theta == old and NFT's gradient is (2r - 1) dl for every beta; from the
    second on (the weights have moved, the old policy has not) beta changes it."""
    grads = {}
    for beta in (0.1, 1.0):
        cfg = _cfg("diffusion_nft", f"loss.beta={beta}", "learner.updates_per_step=2", "loss.kl_weight=0")
        learner = Learner.from_config(cfg, str(digits_assets.model_path))
        rec = _record(learner)
        metrics = learner.update(_batch(cfg, digits_assets, 0))
        assert metrics["learner/updates"] == 2.0 and metrics["learner/old_policy_gap"] > 0
        grads[beta] = [r["grad"] for r in rec]
    first = float((grads[0.1][0] - grads[1.0][0]).norm() / grads[1.0][0].norm())
    second = float((grads[0.1][1] - grads[1.0][1]).norm() / grads[1.0][1].norm())
    assert first < 1e-5, f"at theta == old beta must not act (relative difference {first:.1e})"
    assert second > 100 * max(first, 1e-7), f"beta must act once theta != old ({second:.1e} vs {first:.1e})"


def test_grpo_clip_engages_after_the_first_minibatch(digits_assets):
    cfg = _cfg("flow_grpo")  # source clip_range 1e-4
    learner = Learner.from_config(cfg, str(digits_assets.model_path))
    per_call: list[dict] = []
    orig = learner._micro_loss

    def wrapped(*args):
        loss, terms, metrics = orig(*args)
        per_call.append({k: float(v) for k, v in metrics.items()})
        return loss, terms, metrics

    learner._micro_loss = wrapped
    batch = _batch(cfg, digits_assets, 0)
    metrics = learner.update(batch)
    first_rows = len(learner._minibatches(batch, 0)[0][0])
    done, first, later = 0, [], []
    for m in per_call:
        (first if done < first_rows else later).append(m)
        done += cfg.learner.micro_batch
    assert metrics["learner/updates"] == 2.0
    assert all(m["loss/clip_frac"] == 0.0 for m in first), "the first mini-batch is on-policy (ratio 1)"
    assert max(m["loss/clip_frac"] for m in later) > 0, "the clip must engage after the first update"
    assert metrics["loss/clip_frac"] > 0 and "loss/ratio_mean" in metrics
