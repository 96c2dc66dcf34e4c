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

Gradients are averaged over all workers (``optim_step``: one all-reduce of the flattened gradient,
DDP's arithmetic done explicitly, so shards of unequal size cannot deadlock). Every rank splits its units into the same number of mini-batches and knows every rank's unit
count (``TrainBatch.shard_units``), so each mini-batch's loss is the mean over its points on all
ranks. A non-finite loss or gradient on any worker skips that optimiser step on every worker.

The pipelined loop (``train.pipeline: async``) trains on samples one policy version behind: the
learner keeps the old copy of the previous version too, and each row's ``v_old`` is the old copy of
the version that sampled it (:meth:`Learner.old_policy`).

Beside this file: ``points`` (which training points each optimiser step sees), ``optim_step``,
``policy_copies`` (old / EMA), ``constraint`` (NormGuard's per-sigma-bin ratios and multipliers),
``learner_state`` (the checkpoint files).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from normguard_core.conventions import interpolate
from normguard_core.losses import LossBatch, NormGuardParams, compose_objective
from normguard_core.losses.normguard import normguard_penalty
from normguard_core.metrics import velocity_norm
from normguard_core.samplers import cfg_combine, sde_step
from services.methods import get_method
from services.models import build_generator
from services.training.constraint import BinMultipliers
from services.training.learner_spec import LearnerSpec
from services.training.learner_state import load_learner, save_learner
from services.training.optim_step import OptimStep, all_reduce_via
from services.training.points import PointPlan
from services.training.policy_copies import PolicyCopies, swapped_in
from services.types import TrainBatch

__all__ = ["Learner", "LearnerSpec"]


class Learner:
    """Owns the trainable generator, optimiser and lagged copies of one data-parallel worker."""

    def __init__(self, spec: LearnerSpec, model_path: str, *, device: str = "cpu", distributed: bool = False) -> None:
        torch.set_num_threads(spec.threads)
        self.cfg = cfg = spec  # the spec's sections carry the experiment config's names
        self.method = get_method(cfg.loss.name)
        with torch.random.fork_rng():  # LoRA's random init (peft's A) from train.seed, not the process's
            torch.manual_seed(spec.seed)  # history: same seed, same initial policy, in any process
            self.gen = build_generator(
                cfg.model, path=model_path, device=device, prompt_embeddings=spec.prompt_embeddings
            )
        self.params = self.gen.trainable_parameters()
        # AdamW; with a split force (constraint mode) NormGuard's gradient stays out of the momentum
        self.split_force = cfg.normguard.split_force
        self.distributed = distributed and dist.is_available() and dist.is_initialized()
        lc = cfg.learner
        self.optim = OptimStep(
            self.params,
            lr=lc.lr,
            weight_decay=lc.weight_decay,
            grad_clip=lc.grad_clip,
            split_force=self.split_force,
            distributed=self.distributed,
        )
        self.opt = self.optim.opt
        # the old (sampling) policy and AWM's EMA; the pipelined loop trains one version behind: keep two
        self.copies = PolicyCopies(
            self.params,
            old_schedule=self.method.old_schedule(cfg.loss),
            ema_schedule=self.method.ema_schedule(cfg.loss),
            keep_versions=spec.keep_versions,
        )
        self.version = 0  # policy versions shipped to the samplers (one per RL step with an update)
        ng, loss = cfg.normguard, cfg.loss
        self.normguard = NormGuardParams(
            weight=ng.weight,
            margin=ng.margin,
            power=ng.power,
            scale=ng.scale,
            floor=ng.floor if ng.mode == "constraint" else None,
        )
        self.loss_kwargs = self.method.loss_kwargs(loss)
        self.updates_per_step, self.timesteps = spec.updates_per_step, spec.timesteps
        self.plan = PointPlan(spec, self.method, self.gen.schedule)  # the samplers' grid
        # the frozen reference forward is skipped only when nothing reads it (benchmarks)
        self._needs_ref = ng.active or self.method.needs_ref(loss) or lc.track_norm_ratio
        self.bins = BinMultipliers(ng)  # NormGuard's per-sigma-bin ratios and multipliers
        self._needs_old = self.method.reads_v_old(loss) or lc.track_old_policy_gap
        self.copies.remember(self.version)
        ro = cfg.rollout
        self._guidance = ro.guidance_scale if getattr(loss, "train_cfg", False) else 1.0

    # ---- training points (services.training.points) -------------------------------------------
    def _points(self, batch: TrainBatch, epoch: int) -> dict[str, Tensor]:
        return self.plan.points(batch, epoch)

    def _minibatches(self, batch: TrainBatch, epoch: int) -> list[tuple[Tensor, int]]:
        return self.plan.minibatches(batch, epoch)

    # ---- velocities -----------------------------------------------------------------------
    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Sample with the policy separate samplers would hold (``resources.placement: hybrid``): the old
        copy swapped into the model (``swapped_in``) in eval mode, then all restored."""
        was_training = self.gen.transformer.training
        self.gen.transformer.eval()
        try:
            with swapped_in(self.params, self.copies.old):
                yield
        finally:
            self.gen.transformer.train(was_training)

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

    @classmethod
    def from_config(cls, cfg, model_path: str, *, prompt_embeddings: str | None = None, **kw) -> Learner:
        """A learner of an ExperimentConfig (``LearnerSpec.from_config``)."""
        return cls(LearnerSpec.from_config(cfg, prompt_embeddings=prompt_embeddings), model_path, **kw)

    @property
    def step_count(self) -> int:
        """Optimiser steps taken (the sources' ``global_step``)."""
        return self.optim.count

    def old_policy(self, version: int) -> list[Tensor]:
        """The old copy as shipped at ``version``: the policy that sampled a row tagged ``version``."""
        return self.copies.old_at(version, self.version)

    @torch.no_grad()
    def _lagged_velocities(self, batch: TrainBatch, pts: dict[str, Tensor], cond, null) -> None:
        """``v_old`` (and ``v_ema``) at every point of the epoch, with the copy's weights swapped in.

        ``v_old`` of a row is the old copy of the version that sampled it (``batch.versions``): the
        sampling policy, as NFT's old policy and AWM-clip's PPO ratio need it, also when the
        pipelined loop trains on samples one version behind."""
        n = len(pts["unit"])
        row_version = batch.versions[pts["sample"]] if batch.versions is not None else torch.full((n,), self.version)
        copies = [("v_old", int(v), self.old_policy(int(v))) for v in row_version.unique()] if self._needs_old else []
        if self.copies.ema is not None:
            copies.append(("v_ema", None, self.copies.ema))
        if not copies:
            return
        self.gen.transformer.eval()
        micro = self.cfg.learner.micro_batch
        for key, version, weights in copies:
            rows_of = torch.arange(n) if version is None else (row_version == version).nonzero().flatten()
            if key not in pts:
                pts[key] = None
            with swapped_in(self.params, weights):
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
        dev, loss_cfg = self.gen.device, self.cfg.loss
        x, sigma, idx = self._inputs(batch, pts, rows)
        c, nc = cond.index(idx.to(dev)), null.index(idx.to(dev)) if null else None
        v_theta = self._velocity(x, sigma, c, nc)
        v_ref = self._velocity(x, sigma, c, nc, reference=True) if self._needs_ref else None
        fields: dict = dict(v_theta=v_theta, v_ref=v_ref, sigma=sigma)
        if self.method.data == "trajectory":
            fields.update(self._trajectory_fields(batch, pts, rows, x, sigma, v_theta))
        else:
            fields.update(self._forward_fields(batch, pts, rows, sigma, idx))
        if v_ref is not None:
            self.bins.track(v_theta, v_ref, sigma, fields)
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

    def _trajectory_fields(self, batch, pts, rows, x: Tensor, sigma: Tensor, v_theta: Tensor) -> dict:
        """Flow-GRPO's fields: the stored SDE step's log-prob under theta and at sampling time."""
        dev, loss_cfg, noise_level = self.gen.device, self.cfg.loss, self.cfg.rollout.sde_noise_level
        s_idx, k = pts["sample"][rows], pts["step_k"][rows]
        s_next = batch.sigmas[k + 1].to(dev)
        step = sde_step(x, v_theta, sigma, s_next, noise_level=noise_level, x_next=batch.states[k + 1, s_idx].to(dev))
        fields = dict(
            log_prob=step.log_prob,
            old_log_prob=batch.log_probs[k, s_idx].to(dev),
            advantages=pts["adv"][rows].to(dev),
            kl_scale=self.method.kl_scale(loss_cfg, sigma=sigma, sigma_next=s_next, noise_level=noise_level),
            sigma=None,
        )
        if getattr(loss_cfg, "guard", False):  # GRPO-Guard: the sampling policy's SDE mean at the same state
            old = sde_step(x, pts["v_old"][rows].to(dev), sigma, s_next, noise_level=noise_level, x_next=step.x_next)
            fields.update(mean=step.mean, old_mean=old.mean, step_std=step.std)
        return fields

    def _forward_fields(self, batch, pts, rows, sigma: Tensor, idx: Tensor) -> dict:
        """The forward-process methods' fields (NFT, AWM; Flow-DPO's pairs stack winners then losers)."""
        dev, data = self.gen.device, self.method.data
        noise = pts["noise"][rows]
        fields = dict(
            x0=batch.latents[idx].to(dev),
            noise=torch.cat([noise, noise]).to(dev) if data == "pairs" else noise.to(dev),
            # Flow-DPO reads no v_old (its lagged rows are the winners', for the gap metric only)
            v_old=pts["v_old"][rows].to(dev) if "v_old" in pts and data != "pairs" else None,
            v_ema=pts["v_ema"][rows].to(dev) if "v_ema" in pts else None,
            kl_scale=self.method.kl_scale(self.cfg.loss, sigma=sigma, sigma_next=None, noise_level=0.0),
        )
        if data == "pairs":
            half = len(rows)
            fields.update(winners=torch.arange(half), losers=torch.arange(half, 2 * half))
        else:
            fields.update(advantages=pts["adv"][rows].to(dev), reward_prob=pts["r"][rows].to(dev))
        return fields

    # ---- constraint mode: probes of the sigma bins no training point reached ---------------------
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
        units = pts["sample"][rows].unique()
        g = torch.Generator().manual_seed(
            hash((self.cfg.seed, batch.step, batch.rank, epoch, int(rows[0]) if len(rows) else 0, 7)) % 2**63
        )
        sigma = self.bins.probe_sigmas(len(units), g) if len(units) else None
        if sigma is None:
            return
        noise = torch.randn((len(units), *batch.latents.shape[1:]), generator=g)
        x = interpolate(batch.latents[units], noise, sigma).to(dev)
        c, nc = cond.index(units.to(dev)), null.index(units.to(dev)) if null else None
        v_theta = self._velocity(x, sigma.to(dev), c, nc)
        with torch.no_grad():
            v_ref = self._velocity(x, sigma.to(dev), c, nc, reference=True)
        fields: dict = {}
        self.bins.track(v_theta, v_ref, sigma, fields, training=False)
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
            self.optim.backward_force(force)
        else:
            force.backward()

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
                self.optim.zero_grad()
                for i in range(0, len(rows), micro):
                    part = rows[i : i + micro]
                    loss, terms, metrics = self._micro_loss(batch, pts, part, cond, null)
                    scale = len(part) / global_rows  # summed over ranks: the mini-batch mean
                    if self.split_force and "normguard" in terms:
                        if float(terms["normguard"].detach()) > 0:  # an inactive hinge has no gradient: skip its pass
                            self.optim.backward_force(terms["normguard"] * scale)
                        loss = terms["rest"]
                    (loss * scale).backward()
                    for key, v in metrics.items():
                        sums[key] = sums.get(key, 0.0) + float(v) * len(part)
                    count += len(part)
                self._probe(batch, pts, rows, cond, null, global_rows, epoch)
                norm = self.optim.apply()
                if norm is None:
                    skipped += 1
                else:
                    applied += 1
                    grad_norms.append(norm)
        metrics = {k: v / max(count, 1) for k, v in sums.items()}
        reduce = all_reduce_via(self.gen.device) if self.distributed else None  # NCCL: through the GPU
        metrics.update(self.bins.advance(reduce))  # every rank, also empty
        metrics["learner/updates"] = float(applied)
        metrics["learner/skipped_nonfinite"] = skipped / max(applied + skipped, 1)
        if grad_norms:
            metrics["learner/grad_norm"] = float(np.mean(grad_norms))
        if applied:
            metrics.update(self.copies.advance(self.params, self.optim.count))
            self.version += 1
            self.copies.remember(self.version)
        return metrics

    def policy_weights(self) -> dict[str, Tensor]:
        """Weights shipped to the samplers: the old (sampling) policy."""
        names = [n for n, p in self.gen.transformer.named_parameters() if p.requires_grad]
        return {n: t.detach().cpu().clone() for n, t in zip(names, self.copies.old)}

    # ---- checkpoints (services.training.learner_state) -----------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the learner's state atomically to ``path`` (no pickle a reader has to trust)."""
        return save_learner(self, path, extra)

    def load(self, path: str | Path) -> dict:
        """Restore from :meth:`save`; returns its ``extra``."""
        extra = load_learner(self, path)
        self.copies.forget()  # checkpoints are taken with no rollout in flight: only this version samples
        self.copies.remember(self.version)
        return extra
