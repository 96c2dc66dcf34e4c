"""The Learner: base loss + NormGuard on one data-parallel shard (a plain, testable class).

One RL step is the training loop of the method's source (``services.methods``), for every method:

* ``epochs_per_step`` passes (the sources' ``num_inner_epochs``) over the shard. Each pass draws
  fresh training points: ``timesteps_per_sample`` per sample (or pair), with fresh noise for the
  forward-process methods (sigmas from the sampler's grid, stratified grid indices, uniform or
  logit-normal, as the method says) or the stored SDE steps for Flow-GRPO, seeded by
  (seed, step, rank, epoch).
* The units (samples, or pairs) are shuffled and split into ``updates_per_step`` mini-batches; each
  mini-batch is one optimiser step (micro-batched backward passes, one gradient all-reduce, clip,
  AdamW). From the second mini-batch on, the weights differ from the sampling policy, so the PPO
  ratio of Flow-GRPO / AWM-clip moves and clips, and NFT's ``beta`` acts.
* The "old" policy is a separate copy of the trainable weights: the weights the samplers sample with
  (what :meth:`policy_weights` ships), whose velocity ``v_old`` the loss reads. After the step's
  updates it moves toward the trained weights, ``old <- d old + (1 - d) theta`` with the method's
  schedule (``normguard_core.lagged``): DiffusionNFT ``min(0.001 k, 0.5)``, the others ``d = 0``
  (on-policy: old = theta). AWM's EMA-KL keeps a second lagged copy the same way. ``v_old`` / ``v_ema``
  are evaluated with the copy's weights swapped into the model under ``no_grad`` (exactly restored).

Gradients are averaged over all workers with one all-reduce of the flattened gradient over the
Ray Train process group (gloo on CPU, NCCL on GPU): DDP's arithmetic, done explicitly so that
shards of unequal size (DPO pairs after ties, dropped zero-advantage samples) cannot deadlock.
Every rank splits its units into the same number of mini-batches and knows every rank's unit
count (``TrainBatch.shard_units``), so each mini-batch's loss is the mean over its points on all
ranks. A non-finite loss or gradient on any worker skips that optimiser step on every worker.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from normguard_core.constraint import bin_means, sigma_bins, update_log_multipliers
from normguard_core.conventions import interpolate, sample_sigmas, sigma_grid
from normguard_core.lagged import lag_decay, update_lagged
from normguard_core.losses import LossBatch, NormGuardParams, compose_objective
from normguard_core.losses.normguard import normguard_penalty
from normguard_core.metrics import velocity_norm
from normguard_core.optim import SplitAdamW
from normguard_core.samplers import cfg_combine, sde_step
from services.checkpoints import WEIGHTS, load_weights
from services.methods import get_method
from services.models import build_generator
from services.types import TrainBatch

__all__ = ["Learner"]


class Learner:
    """Owns the trainable generator, optimiser and lagged copies of one data-parallel worker."""

    def __init__(self, cfg, model_path: str, *, device: str = "cpu", distributed: bool = False) -> None:
        torch.set_num_threads(cfg.resources.learner_threads or cfg.resources.torch_threads)
        self.cfg = cfg
        self.method = get_method(cfg.loss.name)
        self.gen = build_generator(cfg.model, path=model_path, device=device)
        self.params = self.gen.trainable_parameters()
        # AdamW; with a split force (constraint mode) NormGuard's gradient stays out of the momentum
        self.split_force = cfg.normguard.split_force
        opt_cls = SplitAdamW if self.split_force else torch.optim.AdamW
        self.opt = opt_cls(self.params, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
        self._force = [torch.zeros_like(p) for p in self.params] if self.split_force else None
        self.old = [p.detach().clone() for p in self.params]  # the sampling ("old") policy
        # the pipelined loop trains on samples one version behind: keep the old copy of that version too
        self._keep_versions = 2 if cfg.train.pipeline == "async" and cfg.rollout.max_staleness > 0 else 1
        self._old_versions: dict[int, list[Tensor]] = {}
        self.ema_schedule = self.method.ema_schedule(cfg.loss)
        self.ema = [p.detach().clone() for p in self.params] if self.ema_schedule else None
        self.distributed = distributed and dist.is_available() and dist.is_initialized()
        self.step_count = 0  # optimiser steps (the sources' global_step: drives the lag schedules)
        self.version = 0  # policy versions shipped to the samplers (one per RL step with an update)
        ng, lc, loss = cfg.normguard, cfg.learner, cfg.loss
        self.normguard = NormGuardParams(
            weight=ng.weight,
            margin=ng.margin,
            power=ng.power,
            scale=ng.scale,
            floor=ng.floor if ng.mode == "constraint" else None,
        )
        self.loss_kwargs = self.method.loss_kwargs(loss)
        self.updates_per_step = lc.updates_per_step or self.method.updates_per_step
        self.timesteps = lc.timesteps_per_sample or self.method.timesteps_per_sample(cfg)
        # the frozen reference forward is skipped only when nothing reads it (benchmarks)
        self._needs_ref = ng.active or self.method.needs_ref(loss) or lc.track_norm_ratio
        # NormGuard as a constraint: one log-multiplier per sigma bin (normguard_core.constraint)
        self.log_lam = torch.full((ng.bins,), math.log(ng.lambda_init), dtype=torch.float64)
        self.log_mu = torch.full((ng.bins,), math.log(ng.lambda_init), dtype=torch.float64)  # the floor side
        self.prev_ratio = torch.full((ng.bins,), float("nan"), dtype=torch.float64)  # the derivative term's memory
        self._bins: dict[str, Tensor] = {}
        self._uncovered: Tensor | None = None  # sigma bins no training point reached at the last RL step
        self._needs_old = self.method.reads_v_old(loss) or lc.track_old_policy_gap
        self._remember_old()
        ro = cfg.rollout
        self._guidance = ro.guidance_scale if getattr(loss, "train_cfg", False) else 1.0

    # ---- training points ------------------------------------------------------------------
    def _generator(self, batch: TrainBatch, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.cfg.train.seed, batch.step, batch.rank, epoch)) % 2**63)

    def _sigmas(self, n: int, g: torch.Generator) -> Tensor:
        """``(n, K)`` training sigmas of the forward-process methods."""
        k, ro, lc = self.timesteps, self.cfg.rollout, self.cfg.learner
        scheme = self.method.train_sigmas(self.cfg.loss)
        grid = sigma_grid(ro.num_steps, shift=ro.shift)[:-1]  # (T,) the sampler's grid, without the final 0
        if n == 0:  # an empty shard (fewer pairs / kept samples than ranks) still joins every all-reduce
            return torch.zeros(0, k)
        if scheme == "sampler_grid":  # DiffusionNFT: K of the T grid sigmas, permuted per sample
            if k > len(grid):
                raise ValueError(f"timesteps_per_sample={k} > the {len(grid)} sampler steps")
            return torch.stack([grid[torch.randperm(len(grid), generator=g)[:k]] for _ in range(n)])
        if scheme == "grid_stratified":  # AWM discrete_wo_init: one index per stratum of [1, 0.9 T]
            bounds = torch.linspace(1, max(int(len(grid) * 0.9), 2), k + 1).long()
            lo, hi = bounds[:-1], bounds[1:]
            idx = lo + (torch.rand(n, k, generator=g) * (hi - lo)).long()
            return grid[idx.clamp_max(len(grid) - 1)]
        flat = sample_sigmas(n * k, scheme=scheme, shift=ro.shift, low=lc.sigma_min, high=lc.sigma_max, generator=g)
        return flat.view(n, k)

    def _points(self, batch: TrainBatch, epoch: int) -> dict[str, Tensor]:
        """Rows ``unit * K + j`` of this epoch's training points (see the module docstring)."""
        g, k, n = self._generator(batch, epoch), self.timesteps, batch.units
        unit = torch.arange(n).repeat_interleave(k)  # (n K,)
        if self.method.data == "trajectory":
            t = batch.log_probs.shape[0]
            if k > t:
                raise ValueError(f"timesteps_per_sample={k} > the {t} rollout steps")
            steps = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(n)]).flatten() if n else unit
            return dict(unit=unit, sample=unit, step_k=steps, adv=batch.advantages[unit])
        sigma = self._sigmas(n, g).flatten()  # (n K,)
        if self.method.data == "pairs":
            p = batch.num_pairs
            noise = torch.randn((n * k, *batch.latents.shape[1:]), generator=g)
            return dict(unit=unit, sample=unit, loser=unit + p, sigma=sigma, noise=noise)
        noise = torch.randn((n * k, *batch.latents.shape[1:]), generator=g)
        return dict(
            unit=unit, sample=unit, sigma=sigma, noise=noise, adv=batch.advantages[unit], r=batch.reward_prob[unit]
        )

    def _minibatches(self, batch: TrainBatch, epoch: int) -> list[tuple[Tensor, int]]:
        """``updates_per_step`` (rows, global point count) pairs: shuffled units, split evenly."""
        g = self._generator(batch, 1_000 + epoch)
        u, k = self.updates_per_step, self.timesteps
        chunks = torch.tensor_split(torch.randperm(batch.units, generator=g), u)
        sizes = [torch.tensor_split(torch.arange(m), u) for m in batch.shard_units]
        out = []
        for i, units in enumerate(chunks):
            rows = (units[:, None] * k + torch.arange(k)[None]).flatten()
            out.append((rows, k * sum(len(s[i]) for s in sizes)))
        return out

    # ---- velocities -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _weights(self, tensors: list[Tensor]) -> Iterator[None]:
        """Evaluate with ``tensors`` as the trainable weights; the trained ones are restored exactly."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, t in zip(self.params, tensors):
                p.copy_(t)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def _velocity(self, x: Tensor, sigma: Tensor, cond, null, *, reference: bool = False) -> Tensor:
        """Policy (or reference) velocity; with train-time CFG the unconditional branch is detached."""
        if null is None:
            return self.gen.velocity(x, sigma, cond, reference=reference)
        v_c = self.gen.velocity(x, sigma, cond, reference=reference)
        v_u = self.gen.velocity(x, sigma, null, reference=reference).detach()
        return cfg_combine(v_c, v_u, self._guidance)

    def _inputs(self, batch: TrainBatch, pts: dict[str, Tensor], rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, sigma, condition rows)`` at ``rows``; pair methods stack winners then losers."""
        dev = self.gen.device
        if self.method.data == "trajectory":
            s, k = pts["sample"][rows], pts["step_k"][rows]
            return batch.states[k, s].to(dev), batch.sigmas[k].to(dev), s
        sigma, noise = pts["sigma"][rows], pts["noise"][rows]
        idx = pts["sample"][rows]
        if self.method.data == "pairs":
            idx = torch.cat([idx, pts["loser"][rows]])
            sigma, noise = torch.cat([sigma, sigma]), torch.cat([noise, noise])
        x0 = batch.latents[idx]
        return interpolate(x0, noise, sigma).to(dev), sigma.to(dev), idx

    # ---- the old (sampling) policy of every version still in flight ---------------------------
    def _remember_old(self) -> None:
        """Record the old copy as the policy of ``self.version`` (what :meth:`policy_weights` ships)."""
        if self._keep_versions > 1:
            self._old_versions[self.version] = [t.clone() for t in self.old]
            for v in [v for v in self._old_versions if v <= self.version - self._keep_versions]:
                del self._old_versions[v]

    def old_policy(self, version: int) -> list[Tensor]:
        """The old copy as shipped at ``version``: the policy that sampled a row tagged ``version``."""
        if version == self.version:
            return self.old
        if version not in self._old_versions:
            raise RuntimeError(
                f"a sample of policy v{version} reached the learner at v{self.version}; it keeps "
                f"{sorted(self._old_versions) or [self.version]} (train.pipeline async runs one version behind)"
            )
        return self._old_versions[version]

    @torch.no_grad()
    def _lagged_velocities(self, batch: TrainBatch, pts: dict[str, Tensor], cond, null) -> None:
        """``v_old`` (and ``v_ema``) at every point of the epoch, with the copy's weights swapped in.

        ``v_old`` of a row is the old copy of the version that sampled it (``batch.versions``): the
        sampling policy, as NFT's old policy and AWM-clip's PPO ratio need it, also when the
        pipelined loop trains on samples one version behind."""
        n = len(pts["unit"])
        row_version = batch.versions[pts["sample"]] if batch.versions is not None else torch.full((n,), self.version)
        copies = [("v_old", int(v), self.old_policy(int(v))) for v in row_version.unique()] if self._needs_old else []
        if self.ema is not None:
            copies.append(("v_ema", None, self.ema))
        if not copies:
            return
        self.gen.transformer.eval()
        micro = self.cfg.learner.micro_batch
        for key, version, weights in copies:
            rows_of = torch.arange(n) if version is None else (row_version == version).nonzero().flatten()
            if key not in pts:
                pts[key] = None
            with self._weights(weights):
                for i in range(0, len(rows_of), micro):
                    rows = rows_of[i : i + micro]
                    m = len(rows)  # pair methods: only the winners (their lagged velocity is a metric only)
                    x, sigma, idx = (t[:m] for t in self._inputs(batch, pts, rows))
                    c, nc = cond.index(idx.to(self.gen.device)), null.index(idx.to(self.gen.device)) if null else None
                    v = self._velocity(x, sigma, c, nc).cpu()
                    if pts[key] is None:
                        pts[key] = torch.zeros((n, *v.shape[1:]), dtype=v.dtype)
                    pts[key][rows] = v
            if pts[key] is None:
                pts[key] = torch.zeros(0)
        self.gen.transformer.train()

    # ---- the objective of one micro-batch -------------------------------------------------
    def _micro_loss(
        self, batch: TrainBatch, pts: dict[str, Tensor], rows: Tensor, cond, null
    ) -> tuple[Tensor, dict[str, Tensor], dict]:
        """``(loss, its named terms, metrics)`` of one micro-batch (``compose_objective``'s terms)."""
        dev, loss_cfg, data = self.gen.device, self.cfg.loss, self.method.data
        x, sigma, idx = self._inputs(batch, pts, rows)
        c, nc = cond.index(idx.to(dev)), null.index(idx.to(dev)) if null else None
        v_theta = self._velocity(x, sigma, c, nc)
        v_ref = self._velocity(x, sigma, c, nc, reference=True) if self._needs_ref else None
        # Flow-DPO reads no v_old (its lagged rows are the winners', for the gap metric only)
        v_old = pts["v_old"][rows].to(dev) if "v_old" in pts and data != "pairs" else None
        v_ema = pts["v_ema"][rows].to(dev) if "v_ema" in pts else None
        fields: dict = dict(v_theta=v_theta, v_ref=v_ref, sigma=sigma)
        if data == "trajectory":
            s_idx, k = pts["sample"][rows], pts["step_k"][rows]
            s_next = batch.sigmas[k + 1].to(dev)
            noise_level = self.cfg.rollout.sde_noise_level
            step = sde_step(
                x, v_theta, sigma, s_next, noise_level=noise_level, x_next=batch.states[k + 1, s_idx].to(dev)
            )
            fields.update(
                log_prob=step.log_prob,
                old_log_prob=batch.log_probs[k, s_idx].to(dev),
                advantages=pts["adv"][rows].to(dev),
                kl_scale=self.method.kl_scale(loss_cfg, sigma=sigma, sigma_next=s_next, noise_level=noise_level),
                sigma=None,
            )
            if getattr(loss_cfg, "guard", False):  # GRPO-Guard: the sampling policy's SDE mean at the same state
                old = sde_step(
                    x, pts["v_old"][rows].to(dev), sigma, s_next, noise_level=noise_level, x_next=step.x_next
                )
                fields.update(mean=step.mean, old_mean=old.mean, step_std=step.std)
        else:
            noise = pts["noise"][rows]
            x0 = batch.latents[idx].to(dev)
            fields.update(
                x0=x0,
                noise=torch.cat([noise, noise]).to(dev) if data == "pairs" else noise.to(dev),
                v_old=v_old,
                v_ema=v_ema,
                kl_scale=self.method.kl_scale(loss_cfg, sigma=sigma, sigma_next=None, noise_level=0.0),
            )
            if data == "pairs":
                half = len(rows)
                fields.update(winners=torch.arange(half), losers=torch.arange(half, 2 * half))
            else:
                fields.update(advantages=pts["adv"][rows].to(dev), reward_prob=pts["r"][rows].to(dev))
        if v_ref is not None:
            self._track_bins(v_theta, v_ref, sigma.detach(), fields)
        out = compose_objective(
            loss_cfg.name,
            LossBatch(**fields),
            loss_kwargs=self.loss_kwargs,
            normguard=self.normguard,
            kl_weight=loss_cfg.kl_weight,
        )
        metrics = dict(out.metrics)
        if "v_old" in pts:
            old = pts["v_old"][rows].to(dev)
            gap = velocity_norm(v_theta.detach()[: len(rows)] - old) / velocity_norm(old).clamp_min(1e-12)
            metrics["learner/old_policy_gap"] = gap.mean()
        return out.loss, out.terms, metrics

    # ---- NormGuard's per-sigma-bin ratios and multipliers -----------------------------------
    def _track_bins(
        self, v_theta: Tensor, v_ref: Tensor, sigma: Tensor, fields: dict, *, training: bool = True
    ) -> None:
        """Accumulate the step's per-bin norm ratios; in constraint mode give each point its bin's lambda."""
        ng = self.cfg.normguard
        bins = sigma_bins(sigma.cpu(), ng.bins)
        ratio = velocity_norm(v_theta.detach().float()) / velocity_norm(v_ref.detach().float()).clamp_min(1e-12)
        sums, counts = bin_means(ratio, bins, ng.bins)
        zeros = torch.zeros(ng.bins, dtype=torch.float64)
        self._bins["sum"] = self._bins.get("sum", zeros) + sums
        self._bins["count"] = self._bins.get("count", zeros) + counts
        self._bins["train"] = self._bins.get("train", zeros) + (counts if training else zeros)
        if ng.mode == "constraint":
            fields["normguard_weight"] = self.log_lam.exp().float()[bins].to(v_theta.device)
            if ng.floor is not None:  # constraint mode only
                fields["floor_weight"] = self.log_mu.exp().float()[bins].to(v_theta.device)

    def _probe(self, batch: TrainBatch, pts: dict[str, Tensor], rows: Tensor, cond, null, global_rows: int, epoch: int):
        """Constraint mode: NormGuard's force at one extra point per sample of the mini-batch, in the sigma
        bins that no training point reached at the last RL step (``normguard.probe_uncovered``).

        AWM's stratified training sigmas stop short of both ends of the grid and Flow-DPO's rarely
        reach them, so without probes the bound is never enforced at the first and last sampling
        steps. A probe is the sample's clean latent noised to a sigma drawn uniformly inside an
        uncovered bin (fresh noise, seeded like the training points); it carries only the force and
        the ratio statistics of its bin, never the base loss.
        """
        ng, dev = self.cfg.normguard, self.gen.device
        if ng.mode != "constraint" or not ng.probe_uncovered or self._uncovered is None or not self._uncovered.any():
            return
        units = pts["sample"][rows].unique()
        if len(units) == 0:
            return
        g = torch.Generator().manual_seed(
            hash((self.cfg.train.seed, batch.step, batch.rank, epoch, int(rows[0]), 7)) % 2**63
        )
        open_bins = self._uncovered.nonzero().flatten()
        b = open_bins[torch.randint(len(open_bins), (len(units),), generator=g)]
        u = torch.rand(len(units), generator=g, dtype=torch.float64)
        sigma = (1.0 - (b.double() + u) / ng.bins).float().clamp(1e-3, 1.0)
        noise = torch.randn((len(units), *batch.latents.shape[1:]), generator=g)
        x = interpolate(batch.latents[units], noise, sigma).to(dev)
        c, nc = cond.index(units.to(dev)), null.index(units.to(dev)) if null else None
        v_theta = self._velocity(x, sigma.to(dev), c, nc)
        with torch.no_grad():
            v_ref = self._velocity(x, sigma.to(dev), c, nc, reference=True)
        fields: dict = {}
        self._track_bins(v_theta, v_ref, sigma, fields, training=False)
        out = normguard_penalty(
            v_theta=v_theta,
            v_ref=v_ref,
            weight=fields["normguard_weight"],
            margin=ng.margin,
            power=ng.power,
            scale=ng.scale,
        )
        force = out.loss * (len(units) * self.timesteps / global_rows)  # the mini-batch mean over its units
        if float(force.detach()) <= 0:
            return
        if self.split_force:
            self._backward_force(force)
        else:
            force.backward()

    def _advance_multipliers(self) -> dict[str, float]:
        """After the RL step: all-reduce the per-bin ratios; in constraint mode, one dual-ascent step."""
        ng = self.cfg.normguard
        if "sum" not in self._bins:
            self._bins = {k: torch.zeros(ng.bins, dtype=torch.float64) for k in ("sum", "count", "train")}
        stats = torch.stack([self._bins["sum"], self._bins["count"], self._bins["train"]])
        self._bins = {}
        if self.distributed:
            dist.all_reduce(stats)
        sums, counts, trained = stats
        if counts.sum() == 0:
            return {}
        self._uncovered = trained == 0
        ratio = sums / counts.clamp_min(1)
        out = {f"normguard/ratio_bin{b}": float(ratio[b]) for b in range(ng.bins) if counts[b] > 0}
        if ng.mode == "constraint":
            dual = dict(
                rate=ng.dual_rate,
                tolerance=ng.tolerance,
                lam_min=ng.lambda_min,
                lam_max=ng.lambda_max,
                previous=self.prev_ratio,
                kd=ng.dual_kd,
            )
            self.log_lam = update_log_multipliers(self.log_lam, ratio, counts, bound=1.0 + ng.margin, **dual)
            if ng.floor is not None:
                self.log_mu = update_log_multipliers(self.log_mu, ratio, counts, bound=ng.floor, side="lower", **dual)
                mu = self.log_mu.exp()
                out["normguard/floor_mu"] = float(mu.mean())
                out.update({f"normguard/floor_mu_bin{b}": float(mu[b]) for b in range(ng.bins)})
            self.prev_ratio = torch.where(counts > 0, ratio, self.prev_ratio)
            lam = self.log_lam.exp()
            out["normguard/lambda"] = float(lam.mean())
            out["normguard/lambda_max_bin"] = float(lam.max())
            out.update({f"normguard/lambda_bin{b}": float(lam[b]) for b in range(ng.bins)})
        return out

    # ---- one RL step ----------------------------------------------------------------------
    def update(self, batch: TrainBatch) -> dict[str, float]:
        """The RL step's optimiser steps on this shard; returns float metrics (means over its points)."""
        self.gen.transformer.train()
        cond = self.gen.encode_prompts(batch.prompts)
        null = (
            self.gen.encode_prompts([""]).index(torch.zeros(len(batch.prompts), dtype=torch.long))
            if (self._guidance != 1.0)
            else None
        )
        micro = self.cfg.learner.micro_batch
        sums: dict[str, float] = {}
        count, applied, skipped, grad_norms = 0, 0, 0, []
        for epoch in range(self.cfg.learner.epochs_per_step):
            pts = self._points(batch, epoch)
            self._lagged_velocities(batch, pts, cond, null)
            for rows, global_rows in self._minibatches(batch, epoch):
                if global_rows == 0:  # empty on every rank (e.g. fewer pairs than mini-batches)
                    continue
                self._zero_grad()
                for i in range(0, len(rows), micro):
                    part = rows[i : i + micro]
                    loss, terms, metrics = self._micro_loss(batch, pts, part, cond, null)
                    scale = len(part) / global_rows  # summed over ranks: the mini-batch mean
                    if self.split_force and "normguard" in terms:
                        if float(terms["normguard"].detach()) > 0:  # an inactive hinge has no gradient: skip its pass
                            self._backward_force(terms["normguard"] * scale)
                        loss = terms["rest"]
                    (loss * scale).backward()
                    for key, v in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(v) * len(part)
                    count += len(part)
                self._probe(batch, pts, rows, cond, null, global_rows, epoch)
                norm = self._apply()
                if norm is None:
                    skipped += 1
                else:
                    applied += 1
                    grad_norms.append(norm)
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        metrics.update(self._advance_multipliers())  # every rank joins this all-reduce, also an empty shard
        metrics["learner/updates"] = float(applied)
        metrics["learner/skipped_nonfinite"] = skipped / max(applied + skipped, 1)
        if grad_norms:
            metrics["learner/grad_norm"] = float(np.mean(grad_norms))
        if applied:
            metrics.update(self._advance_lagged())
            self.version += 1
            self._remember_old()
        return metrics

    def _zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        if self._force is not None:
            for f in self._force:
                f.zero_()

    def _backward_force(self, force: Tensor) -> None:
        """Back-propagate the NormGuard term alone into ``self._force`` (``.grad`` is left as it was)."""
        grads = torch.autograd.grad(force, self.params, retain_graph=True, allow_unused=True)
        for acc, g in zip(self._force, grads):
            if g is not None:
                acc.add_(g)

    def _apply(self) -> float | None:
        """All-reduce, clip and step; ``None`` (and no step) when any worker saw a non-finite value.

        With a split force its gradient rides in the same all-reduce, is clipped on its own to
        ``grad_clip`` and reaches the optimiser as ``force`` (``SplitAdamW``); the base gradient is
        clipped as the sources clip it.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        parts = grads + (self._force or [])
        flat = torch.cat([g.flatten() for g in parts])
        finite = torch.tensor([float(torch.isfinite(flat).all())])
        if self.distributed:
            dist.all_reduce(flat)  # the per-shard gradients were pre-scaled by 1 / global points
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            self._zero_grad()
            return None
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
            offset += g.numel()
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.learner.grad_clip))
        if self._force is None:
            self.opt.step()
        else:
            force = []
            for f in self._force:
                force.append(flat[offset : offset + f.numel()].view_as(f).clone())
                offset += f.numel()
            force_norm = float(torch.linalg.vector_norm(torch.stack([f.norm() for f in force])))
            if force_norm > self.cfg.learner.grad_clip:
                for f in force:
                    f.mul_(self.cfg.learner.grad_clip / force_norm)
            self.opt.step(force=force)
        self.step_count += 1
        return norm

    def _advance_lagged(self) -> dict[str, float]:
        """After the RL step: old (and EMA) <- d copy + (1 - d) theta, d from the optimiser-step count."""
        d_old = lag_decay(self.step_count, self.method.old_schedule(self.cfg.loss))
        update_lagged(self.old, self.params, d_old)
        out = {"learner/old_policy_decay": d_old}
        if self.ema is not None:
            d_ema = lag_decay(self.step_count, self.ema_schedule)
            update_lagged(self.ema, self.params, d_ema)
            out["learner/ema_decay"] = d_ema
        return out

    def policy_weights(self) -> dict[str, Tensor]:
        """Weights shipped to the samplers: the old (sampling) policy."""
        names = [n for n, p in self.gen.transformer.named_parameters() if p.requires_grad]
        return {n: t.detach().cpu().clone() for n, t in zip(names, self.old)}

    # ---- checkpoints ----------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the learner's state atomically to ``path``, with no pickle a reader has to trust.

        * ``weights.safetensors``: the trainable weights (all that serving and export read);
        * ``learner_state.safetensors``: the old / EMA copies, torch's RNG state and the constraint's
          multipliers;
        * ``optimizer.pt``: the optimiser's state dict, tensors and numbers only (read back with
          ``weights_only=True``);
        * ``learner.json``: step, version, numpy's and Python's RNG states and ``extra``.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
        save_file(self.gen.trainable_state_dict(), tmp / WEIGHTS)
        state = {f"old.{i}": t.detach().cpu().contiguous() for i, t in enumerate(self.old)}
        state.update({f"ema.{i}": t.detach().cpu().contiguous() for i, t in enumerate(self.ema or [])})
        state["rng.torch"] = torch.get_rng_state()
        state["log_lambda"], state["log_mu"], state["prev_ratio"] = self.log_lam, self.log_mu, self.prev_ratio
        if self._uncovered is not None:
            state["uncovered"] = self._uncovered
        save_file(state, tmp / "learner_state.safetensors")
        torch.save(self.opt.state_dict(), tmp / "optimizer.pt")
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        py_version, py_state, py_gauss = random.getstate()
        meta = {
            "step": self.step_count,
            "version": self.version,
            "rng": {
                "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
                "python": [py_version, list(py_state), py_gauss],
            },
            "extra": extra or {},
        }
        (tmp / "learner.json").write_text(json.dumps(meta))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    def load(self, path: str | Path) -> dict:
        """Restore from :meth:`save` (nothing is unpickled); returns its ``extra``."""
        from safetensors.torch import load_file

        path = Path(path)
        self.gen.load_trainable_state_dict(load_weights(path))
        state = load_file(path / "learner_state.safetensors")
        self.opt.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        dev = self.params[0].device if self.params else "cpu"
        self.old = [state[f"old.{i}"].to(dev) for i in range(len(self.old))]
        if self.ema is not None and "ema.0" in state:
            self.ema = [state[f"ema.{i}"].to(dev) for i in range(len(self.ema))]
        meta = json.loads((path / "learner.json").read_text())
        torch.set_rng_state(state["rng.torch"])
        kind, keys, pos, has_gauss, gauss = meta["rng"]["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        py_version, py_state, py_gauss = meta["rng"]["python"]
        random.setstate((py_version, tuple(py_state), py_gauss))
        self.step_count, self.version = meta["step"], meta["version"]
        self._old_versions = {}  # checkpoints are taken with no rollout in flight: only this version samples
        self._remember_old()
        self.log_lam, self.log_mu = state["log_lambda"].double(), state["log_mu"].double()
        self.prev_ratio, self._uncovered = state["prev_ratio"].double(), state.get("uncovered")
        return meta["extra"]
