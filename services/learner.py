"""The Learner: base loss + NormGuard on one data-parallel shard (a plain, testable class).

Per RL step each worker builds training points from its shard and minimises
``compose_objective(base, NormGuard, KL)`` at those points:

* NFT / AWM / DPO (forward-process losses): ``timesteps_per_sample`` sigmas and noises per
  sample, seeded by (seed, step, rank); ``x_sigma = (1 - sigma) x0 + sigma eps``. The
  sampling-policy velocity ``v_old`` is computed with the weights the samplers used (the
  learner's weights before this step's update: rollouts are on-policy after each sync) and
  the reference velocity ``v_ref`` with adapters disabled / the frozen copy, both no_grad.
  DPO pairs share sigma and eps (winner row i and loser row P + i).
* GRPO: the stored SDE trajectory; ``timesteps_per_sample`` steps per sample are re-evaluated,
  their log-probs recomputed from the stored states (``sde_step(x_next=...)``).

Gradients are averaged over all workers with one all-reduce of the flattened gradient over the
Ray Train process group (gloo on CPU, NCCL on GPU). This is DDP's arithmetic, done explicitly
so that shards of unequal size (DPO pairs after ties) cannot deadlock the bucket hooks. A
non-finite loss or gradient on any worker skips the step on every worker and is reported.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from normguard_core.conventions import interpolate, sample_sigmas
from normguard_core.losses import LossBatch, NormGuardParams, compose_objective
from normguard_core.samplers import sde_step
from services.models import build_generator
from services.types import TrainBatch

__all__ = ["Learner", "loss_kwargs"]


def loss_kwargs(loss_cfg) -> dict:
    """The base loss's hyperparameters from its config section (explicit, no ``**cfg`` splat)."""
    if loss_cfg.name == "diffusion_nft":
        return dict(beta=loss_cfg.beta, adaptive_weighting=loss_cfg.adaptive_weighting)
    if loss_cfg.name == "awm":
        return dict(weighting=loss_cfg.weighting, clip_range=loss_cfg.clip_range, adv_clip_max=loss_cfg.adv_clip_max)
    if loss_cfg.name == "flow_dpo":
        return dict(beta=loss_cfg.beta)
    if loss_cfg.name == "flow_grpo":
        return dict(clip_range=loss_cfg.clip_range, adv_clip_max=loss_cfg.adv_clip_max)
    raise KeyError(f"unknown loss {loss_cfg.name!r}")


class Learner:
    """Owns the trainable generator, optimiser and EMA of one data-parallel worker."""

    def __init__(self, cfg, model_path: str, *, device: str = "cpu", distributed: bool = False) -> None:
        torch.set_num_threads(cfg.resources.learner_threads or cfg.resources.torch_threads)
        self.cfg = cfg
        self.gen = build_generator(cfg.model, path=model_path, device=device)
        self.params = self.gen.trainable_parameters()
        self.opt = torch.optim.AdamW(self.params, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
        self.ema = [p.detach().clone() for p in self.params] if cfg.learner.ema_decay else None
        self.distributed = distributed and dist.is_available() and dist.is_initialized()
        self.step_count = 0
        self.version = 0
        ng = cfg.normguard
        self.normguard = NormGuardParams(weight=ng.weight, margin=ng.margin, power=ng.power, scale=ng.scale)
        self.loss_kwargs = loss_kwargs(cfg.loss)
        # the frozen reference forward is skipped only when nothing reads it (benchmarks)
        self._needs_ref = (
            ng.weight > 0 or cfg.learner.kl_weight > 0 or cfg.learner.track_norm_ratio or cfg.loss.name == "flow_dpo"
        )

    # ---- training points ------------------------------------------------------------------
    def _points(self, batch: TrainBatch) -> dict[str, Tensor]:
        """Forward-process training points (NFT / AWM / DPO), repeated ``timesteps_per_sample``."""
        lc, k = self.cfg.learner, self.cfg.learner.timesteps_per_sample
        g = torch.Generator().manual_seed(hash((self.cfg.train.seed, batch.step, batch.rank)) % 2**63)
        x0 = batch.latents.repeat(k, *([1] * (batch.latents.ndim - 1)))
        n = x0.shape[0]
        sigma = sample_sigmas(n, scheme=lc.sigma_scheme, low=lc.sigma_min, high=lc.sigma_max, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if batch.num_pairs:  # losers share the winners' sigma and eps, block by block
            p, size = batch.num_pairs, batch.latents.shape[0]
            for r in range(k):
                lo = r * size
                sigma[lo + p : lo + 2 * p] = sigma[lo : lo + p]
                noise[lo + p : lo + 2 * p] = noise[lo : lo + p]
        return dict(
            x0=x0,
            noise=noise,
            sigma=sigma,
            adv=batch.advantages.repeat(k),
            r=batch.reward_prob.repeat(k),
            prompt_idx=torch.arange(batch.latents.shape[0]).repeat(k),
        )

    def _micro_loss(self, batch: TrainBatch, pts: dict[str, Tensor], idx: Tensor, cond) -> tuple[Tensor, dict]:
        """Objective of micro-batch ``idx`` of the forward-process points."""
        dev = self.gen.device
        x0, noise, sigma = pts["x0"][idx].to(dev), pts["noise"][idx].to(dev), pts["sigma"][idx].to(dev)
        c = cond.index(pts["prompt_idx"][idx].to(dev))
        x = interpolate(x0, noise, sigma)
        v_ref = self.gen.velocity(x, sigma, c, reference=True) if self._needs_ref else None
        v_old = pts["v_old"][idx].to(dev)
        v_theta = self.gen.velocity(x, sigma, c)
        winners = losers = None
        if batch.num_pairs:
            half = len(idx) // 2
            winners, losers = torch.arange(half), torch.arange(half, 2 * half)
        lb = LossBatch(
            v_theta=v_theta,
            v_ref=v_ref,
            v_old=v_old,
            x0=x0,
            noise=noise,
            sigma=sigma,
            advantages=pts["adv"][idx].to(dev),
            reward_prob=pts["r"][idx].to(dev),
            winners=winners,
            losers=losers,
        )
        out = compose_objective(
            self.cfg.loss.name,
            lb,
            loss_kwargs=self.loss_kwargs,
            normguard=self.normguard,
            kl_weight=self.cfg.learner.kl_weight,
        )
        return out.loss, out.metrics

    def _grpo_loss(self, batch: TrainBatch, idx: Tensor, step_k: Tensor, cond) -> tuple[Tensor, dict]:
        dev = self.gen.device
        b = idx.to(dev)
        x = batch.states[step_k, idx].to(dev)
        x_next = batch.states[step_k + 1, idx].to(dev)
        s, s_next = batch.sigmas[step_k].to(dev), batch.sigmas[step_k + 1].to(dev)
        c = cond.index(b)
        v_theta = self.gen.velocity(x, s, c)
        v_ref = self.gen.velocity(x, s, c, reference=True) if self._needs_ref else None
        step = sde_step(x, v_theta, s, s_next, noise_level=self.cfg.rollout.sde_noise_level, x_next=x_next)
        lb = LossBatch(
            v_theta=v_theta,
            v_ref=v_ref,
            log_prob=step.log_prob,
            old_log_prob=batch.log_probs[step_k, idx].to(dev),
            advantages=batch.advantages[idx].to(dev),
        )
        out = compose_objective(
            "flow_grpo",
            lb,
            loss_kwargs=self.loss_kwargs,
            normguard=self.normguard,
            kl_weight=self.cfg.learner.kl_weight,
        )
        return out.loss, out.metrics

    # ---- one update -----------------------------------------------------------------------
    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One optimiser step on this shard; returns float metrics (averaged over micro-batches)."""
        self.gen.transformer.train()
        cond = self.gen.encode_prompts(batch.prompts)
        micro = self.cfg.learner.micro_batch
        sums: dict[str, float] = {}
        count = 0
        self.opt.zero_grad(set_to_none=False)
        if self.cfg.loss.name == "flow_grpo":
            n, t = batch.latents.shape[0], batch.log_probs.shape[0]
            g = torch.Generator().manual_seed(hash((self.cfg.train.seed, batch.step, batch.rank)) % 2**63)
            steps = torch.stack(
                [torch.randperm(t, generator=g)[: self.cfg.learner.timesteps_per_sample] for _ in range(n)], dim=1
            )  # (K, N)
            work = [
                (torch.arange(n)[i : i + micro], steps[j, i : i + micro])
                for j in range(steps.shape[0])
                for i in range(0, n, micro)
            ]
            total = steps.numel()
            global_total = batch.global_count * steps.shape[0]
        else:
            pts = self._points(batch)
            with torch.no_grad():  # the sampling policy's velocity, before this step changes the weights
                self.gen.transformer.eval()
                x = interpolate(pts["x0"], pts["noise"], pts["sigma"]).to(self.gen.device)
                pts["v_old"] = torch.cat(
                    [
                        self.gen.velocity(
                            x[i : i + micro],
                            pts["sigma"][i : i + micro].to(self.gen.device),
                            cond.index(pts["prompt_idx"][i : i + micro].to(self.gen.device)),
                        )
                        for i in range(0, x.shape[0], micro)
                    ]
                ).cpu()
                self.gen.transformer.train()
            total = pts["x0"].shape[0]
            global_total = batch.global_count * self.cfg.learner.timesteps_per_sample
            step_size = micro if not batch.num_pairs else 2 * batch.num_pairs  # a DPO micro-batch holds whole pairs
            work = [(torch.arange(total)[i : i + step_size], None) for i in range(0, total, step_size)]
        for idx, step_k in work:
            if step_k is None:
                loss, metrics = self._micro_loss(batch, pts, idx, cond)
            else:
                loss, metrics = self._grpo_loss(batch, idx, step_k, cond)
            (loss * len(idx) / global_total).backward()  # sum over shards of these = the global mean
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
            count += len(idx)
        del total
        return self._apply(sums, count)

    def _apply(self, sums: dict[str, float], count: int) -> dict[str, float]:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.flatten() for g in grads])
        finite = torch.tensor([float(torch.isfinite(flat).all())])
        if self.distributed:
            dist.all_reduce(flat)  # the per-shard gradients were pre-scaled by 1 / global_total
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        if finite.item() < 1 or any(not np.isfinite(v) for v in metrics.values()):
            self.opt.zero_grad(set_to_none=False)
            metrics["learner/skipped_nonfinite"] = 1.0
            return metrics
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()
        metrics["learner/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.learner.grad_clip))
        self.opt.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p.detach(), 1.0 - self.cfg.learner.ema_decay)
        self.step_count += 1
        self.version += 1
        metrics["learner/skipped_nonfinite"] = 0.0
        return metrics

    def policy_weights(self) -> dict[str, Tensor]:
        """Weights shipped to the samplers (the EMA when enabled)."""
        state = self.gen.trainable_state_dict()
        if self.ema is not None:
            names = [n for n, p in self.gen.transformer.named_parameters() if p.requires_grad]
            state = {n: e.detach().cpu().clone() for n, e in zip(names, self.ema)}
        return state

    # ---- checkpoints ----------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write weights, optimiser, EMA, RNG states, step and version atomically to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
        torch.save(
            {
                "weights": self.gen.trainable_state_dict(),
                "optimizer": self.opt.state_dict(),
                "ema": self.ema,
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                "step": self.step_count,
                "version": self.version,
                "extra": extra or {},
            },
            tmp / "learner.pt",
        )
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    def load(self, path: str | Path) -> dict:
        """Restore from :meth:`save`; returns its ``extra``."""
        state = torch.load(Path(path) / "learner.pt", map_location="cpu", weights_only=False)
        self.gen.load_trainable_state_dict(state["weights"])
        self.opt.load_state_dict(state["optimizer"])
        self.ema = state["ema"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.step_count, self.version = state["step"], state["version"]
        return state["extra"]
