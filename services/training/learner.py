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

Beside this file: ``services.points`` (the method's point source: which training points each optimiser step
sees, and a micro-batch's typed loss batch, so this file never asks which kind of data a method trains on),
``epoch`` (what the loop over one RL step carries), ``optim_step``,
``policy_copies`` (old / EMA), ``constraint`` (NormGuard's per-sigma-bin ratios and multipliers),
``learner_state`` (the checkpoint files).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from normguard_core.conventions import interpolate
from normguard_core.losses import NormGuardParams, Reference, compose_objective, normguard_objective
from normguard_core.metrics import norm_ratio, velocity_norm
from normguard_core.seeding import PROBE_STREAM, rng
from services.methods import get_method
from services.models import build_generator
from services.points import Evaluated, LaggedVelocities, TrainingPoints
from services.training.constraint import BinMultipliers
from services.training.epoch import EpochData, StepTally
from services.training.learner_spec import LearnerSpec
from services.training.learner_state import load_learner, save_learner
from services.training.optim_step import OptimStep, all_reduce_via
from services.training.policy_copies import PolicyCopies, swapped_in
from services.types import TrainBatch

if TYPE_CHECKING:
    from services.config import ExperimentConfig

__all__ = ["Learner", "LearnerSpec"]


class Learner:
    """Owns the trainable generator, optimiser and lagged copies of one data-parallel worker."""

    def __init__(self, spec: LearnerSpec, model_path: str, *, device: str = "cpu", distributed: bool = False) -> None:
        torch.set_num_threads(spec.threads)
        self.cfg = cfg = spec  # the spec's sections carry the experiment config's names
        self.method = get_method(cfg.loss)  # bound to its section once
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
            old_schedule=self.method.old_schedule(),
            ema_schedule=self.method.ema_schedule(),
            keep_versions=spec.keep_versions,
        )
        self.version = 0  # policy versions shipped to the samplers (one per RL step with an update)
        ng = cfg.normguard
        self.normguard = NormGuardParams(
            weight=ng.weight,
            margin=ng.margin,
            power=ng.power,
            scale=ng.scale,
            floor=ng.floor if ng.mode == "constraint" else None,
        )
        self.updates_per_step, self.timesteps = spec.updates_per_step, spec.timesteps
        self.points = self.method.point_source(spec, self.gen.schedule)  # on the samplers' grid
        # the frozen reference forward is skipped only when nothing reads it (benchmarks)
        self._needs_ref = ng.active or self.method.needs_ref() or lc.track_norm_ratio
        self.bins = BinMultipliers(ng)  # NormGuard's per-sigma-bin ratios and multipliers
        self._needs_old = self.method.reads_v_old() or lc.track_old_policy_gap
        self.copies.remember(self.version)
        self._guidance = self.gen.cfg_scale(self.method.train_guidance(cfg.rollout))

    # ---- training points (services.points: the method's point source) ----------------
    def _points(self, batch: TrainBatch, epoch: int) -> TrainingPoints:
        return self.points.draw(batch, epoch)

    def _minibatches(self, batch: TrainBatch, epoch: int) -> list[tuple[Tensor, int]]:
        return self.points.minibatches(batch, epoch)

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
        return self.gen.combine_guidance(v_c, v_u, self._guidance)

    def _conditions(self, cond, null, idx: Tensor):
        """The (conditional, null) prompt embeddings of the shard rows ``idx``."""
        dev = self.gen.device
        return cond.index(idx.to(dev)), null.index(idx.to(dev)) if null else None

    @classmethod
    def from_config(
        cls, cfg: ExperimentConfig, model_path: str, *, prompt_embeddings: str | None = None, **kw
    ) -> Learner:
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
    def _lagged_velocities(self, batch: TrainBatch, pts: TrainingPoints, cond, null) -> LaggedVelocities:
        """``v_old`` (and ``v_ema``) at every point of the epoch, with the copy's weights swapped in.

        ``v_old`` of a row is the old copy of the version that sampled it (``batch.versions``): the
        sampling policy, as NFT's old policy and AWM-clip's PPO ratio need it, also when the
        pipelined loop trains on samples one version behind."""
        n = pts.size
        row_version = batch.versions[pts.sample] if batch.versions is not None else torch.full((n,), self.version)
        copies = [("v_old", int(v), self.old_policy(int(v))) for v in row_version.unique()] if self._needs_old else []
        if self.copies.ema is not None:
            copies.append(("v_ema", None, self.copies.ema))
        if not copies:
            return LaggedVelocities()
        self.gen.transformer.eval()
        out: dict[str, Tensor | None] = {}
        for key, version, weights in copies:
            rows_of = torch.arange(n) if version is None else (row_version == version).nonzero().flatten()
            with swapped_in(self.params, weights):
                out[key] = self._fill_velocities(batch, pts, rows_of, cond, null, into=out.get(key))
        self.gen.transformer.train()
        return LaggedVelocities(**{k: torch.zeros(0) if v is None else v for k, v in out.items()})

    def _fill_velocities(self, batch, pts: TrainingPoints, rows_of: Tensor, cond, null, *, into: Tensor | None):
        """Write the current weights' velocity at ``rows_of`` into ``into`` (``(M, *D)``, allocated on
        the first micro-batch); ``None`` when there are no rows and nothing was allocated."""
        micro = self.cfg.learner.micro_batch
        for i in range(0, len(rows_of), micro):
            rows = rows_of[i : i + micro]
            x, sigma, idx = self.points.lagged_inputs(batch, pts, rows, self.gen.device)
            v = self._velocity(x, sigma, *self._conditions(cond, null, idx)).cpu()
            if into is None:
                into = torch.zeros((pts.size, *v.shape[1:]), dtype=v.dtype)
            into[rows] = v
        return into

    # ---- the objective of one micro-batch -------------------------------------------------
    def _micro_loss(self, data: EpochData, rows: Tensor) -> tuple[Tensor, dict[str, Tensor], dict]:
        """``(loss, its named terms, metrics)`` of one micro-batch (``compose_objective``'s terms)."""
        dev, batch = self.gen.device, data.batch
        x, sigma, idx = self.points.inputs(batch, data.points, rows, dev)
        c, nc = self._conditions(data.cond, data.null, idx)
        v_theta = self._velocity(x, sigma, c, nc)
        v_ref = self._velocity(x, sigma, c, nc, reference=True) if self._needs_ref else None
        at = Evaluated(x=x, sigma=sigma, idx=idx, v_theta=v_theta, v_ref=v_ref, device=dev)
        micro = self.points.micro(batch, data.points, data.lagged, rows, at)
        ref = None
        if v_ref is not None:  # the constraint's multipliers depend only on each point's sigma bin
            bins = self.bins.weights(sigma, v_theta.device)
            ref = Reference(v_theta=v_theta, v_ref=v_ref, kl_scale=micro.kl_scale, bins=bins)
        out = compose_objective(
            self.method.loss, micro.batch, ref, normguard=self.normguard, kl_weight=self.method.kl_weight
        )
        if out.norm_ratio is not None:
            self.bins.accumulate(out.norm_ratio, sigma)
        metrics = dict(out.metrics)
        if data.lagged.v_old is not None:
            old = data.lagged.v_old[rows].to(dev)
            gap = norm_ratio(velocity_norm(v_theta.detach()[: len(rows)] - old), velocity_norm(old))
            metrics["learner/old_policy_gap"] = gap.mean()
        return out.loss, out.terms, metrics

    # ---- constraint mode: probes of the sigma bins no training point reached ---------------------
    def _probe(self, data: EpochData, *, rows: Tensor, global_rows: int) -> None:
        """Constraint mode: NormGuard's force at one extra point per sample of the mini-batch ``rows``, in
        the sigma bins that no training point reached at the last RL step (``normguard.probe_uncovered``).

        AWM's stratified training sigmas stop short of both ends of the grid and Flow-DPO's rarely
        reach them, so without probes the bound is never enforced at the first and last sampling
        steps. A probe is the sample's clean latent noised to a sigma drawn uniformly inside an
        uncovered bin (fresh noise, seeded like the training points); it carries only NormGuard's
        term (``normguard_objective``: the bound and, with ``normguard.probe_floor``, the floor) and the ratio
        statistics of its bin, never the base loss. ``global_rows``: the mini-batch's points on all ranks.
        """
        batch, units = data.batch, data.points.sample[rows].unique()
        g = rng(self.cfg.seed, batch.step, batch.rank, data.epoch, int(rows[0]) if len(rows) else 0, PROBE_STREAM)
        sigma = self.bins.probe_sigmas(len(units), g) if len(units) else None
        if sigma is None:
            return
        noise = torch.randn((len(units), *batch.latents.shape[1:]), generator=g)
        dev = self.gen.device
        x = interpolate(batch.latents[units], noise, sigma).to(dev)
        c, nc = self._conditions(data.cond, data.null, units)
        v_theta = self._velocity(x, sigma.to(dev), c, nc)
        with torch.no_grad():
            v_ref = self._velocity(x, sigma.to(dev), c, nc, reference=True)
        bins = self.bins.weights(sigma, v_theta.device)
        if bins is not None and not self.cfg.normguard.probe_floor:  # the published probes held the bound only
            bins = dataclasses.replace(bins, floor=None)
        out = normguard_objective(v_theta=v_theta, v_ref=v_ref, bins=bins, normguard=self.normguard)
        self.bins.accumulate(out.norm_ratio, sigma, training=False)
        force = out.loss * (len(units) * self.timesteps / global_rows)  # the mini-batch mean over its units
        if float(force.detach()) <= 0:  # neither side of the hinge acts: no gradient, no pass
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
        null = None
        if self._guidance != 1.0:
            null = self.gen.encode_prompts([""]).index(torch.zeros(len(batch.prompts), dtype=torch.long))
        tally = StepTally()
        for epoch in range(self.cfg.learner.epochs_per_step):
            pts = self._points(batch, epoch)
            data = EpochData(batch, pts, self._lagged_velocities(batch, pts, cond, null), cond, null, epoch)
            for rows, global_rows in self._minibatches(batch, epoch):
                if global_rows > 0:  # 0: empty on every rank (e.g. fewer pairs than mini-batches)
                    self._optimiser_step(data, rows, global_rows, tally)
        return self._step_metrics(tally)

    def _optimiser_step(self, data: EpochData, rows: Tensor, global_rows: int, tally: StepTally) -> None:
        """One mini-batch: micro-batched backward passes, the probes, then one optimiser step."""
        self.optim.zero_grad()
        micro = self.cfg.learner.micro_batch
        for i in range(0, len(rows), micro):
            part = rows[i : i + micro]
            loss, terms, metrics = self._micro_loss(data, part)
            scale = len(part) / global_rows  # summed over ranks: the mini-batch mean
            if self.split_force and "normguard" in terms:
                self._backward_force(terms["normguard"], scale)
                loss = terms["rest"]
            (loss * scale).backward()
            tally.add(metrics, len(part))
        self._probe(data, rows=rows, global_rows=global_rows)
        tally.applied(self.optim.apply())

    def _backward_force(self, force: Tensor, scale: float) -> None:
        """NormGuard's force on its own (constraint mode); an inactive hinge has no gradient: no pass."""
        if float(force.detach()) > 0:
            self.optim.backward_force(force * scale)

    def _step_metrics(self, tally: StepTally) -> dict[str, float]:
        """The RL step's metrics (every rank, also empty: the bins all-reduce) and the lagged copies' step."""
        metrics = tally.means()
        reduce = all_reduce_via(self.gen.device) if self.distributed else None  # NCCL: through the GPU
        metrics.update(self.bins.advance(reduce))
        metrics.update(tally.counts())
        if tally.updates:
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
