"""Training points of one RL step on one learner shard (the point sources the method plug-ins own): which (sample, sigma, noise) or stored SDE
step each optimiser step trains on, seeded by (seed, step, rank, epoch), and the loss fields of a
micro-batch of them.

One :class:`PointSource` per kind of training data; each method plug-in (``services.methods``)
names its own, so the learner never asks which kind it trains on:

* :class:`SamplePoints` (DiffusionNFT, AWM): ``timesteps_per_sample`` sigmas per sample as the
  method's source draws them (the sampler's own grid, stratified grid indices, uniform or
  logit-normal) and fresh noise, on the rollout's clean samples;
* :class:`PairPoints` (Flow-DPO): the same per winner/loser pair, both sharing sigma and noise;
* :class:`TrajectoryPoints` (Flow-GRPO): stored SDE steps of the rollout's trajectories.

The units (samples or pairs) are shuffled and split into ``updates_per_step`` mini-batches, each one
optimiser step. The sampler's grid and the shift of the shifted schemes are the generator family's
(``gen.schedule``, a ``services.models.schedules.FlowSchedule``), the grid the samplers integrate on.
This module sits in the plug-ins' layer (it imports no generator), so each plug-in names its source. A source returns frozen
:class:`TrainingPoints`; the lagged velocities read at them are a separate :class:`LaggedVelocities`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from normguard_core.conventions import interpolate, sample_sigmas
from normguard_core.samplers import sde_step
from normguard_core.seeding import MINIBATCH_STREAM, rng
from services.types import TrainBatch

if TYPE_CHECKING:
    from services.config import LearnerConfig, LossConfig, RolloutConfig

__all__ = [
    "LaggedVelocities",
    "PairPoints",
    "PointMethod",
    "PointSource",
    "PointSpec",
    "SamplePoints",
    "SigmaSchedule",
    "TrainingPoints",
    "TrajectoryPoints",
]


# What a source reads of the three objects it is built from, named here so that this layer imports neither
# the method plug-ins (which import it), nor the generators, nor the training service above it.
class SigmaSchedule(Protocol):
    """The generator family's sigma grid (``services.models.schedules.FlowSchedule``, ``gen.schedule``)."""

    def sigma_grid(self, num_steps: int, shift: float | None = None) -> Tensor: ...

    def train_shift(self, shift: float | None = None) -> float: ...


class PointMethod(Protocol):
    """The two questions a source asks its method plug-in (``services.methods.Method``)."""

    def train_sigmas(self, loss_cfg: LossConfig) -> str: ...

    def kl_scale(
        self, loss_cfg: LossConfig, *, sigma: Tensor, sigma_next: Tensor | None, noise_level: float
    ) -> Tensor | None: ...


class PointSpec(Protocol):
    """The learner's frozen spec as a source reads it (``services.training.learner_spec.LearnerSpec``)."""

    # read-only members (a frozen dataclass satisfies them), one property each: the six alike lines that
    # ``duplicates`` pairs are the protocol's syntax, not logic to share

    @property
    def rollout(self) -> RolloutConfig: ...
    @property
    def learner(self) -> LearnerConfig: ...
    @property
    def loss(self) -> LossConfig: ...
    @property
    def seed(self) -> int: ...
    @property
    def timesteps(self) -> int: ...
    @property
    def updates_per_step(self) -> int: ...


@dataclass(frozen=True)
class TrainingPoints:
    """One epoch's training points on a shard: row ``unit * K + j`` is the ``j``-th of the K points
    of unit ``unit`` (M = units x K rows; a unit is a sample, or a pair for pair methods).

    Attributes:
        unit: ``(M,)`` long, the unit of each row.
        sample: ``(M,)`` long, the shard row of its sample (a pair's winner).
        sigma: ``(M,)`` float32 training sigmas (forward-process sources), else ``None``.
        noise: ``(M, *D)`` float32 fresh noise (forward-process sources), else ``None``.
        loser: ``(M,)`` long, the shard row of a pair's loser (pair sources), else ``None``.
        step_k: ``(M,)`` long, the stored SDE step of each row (trajectory sources), else ``None``.
        adv: ``(M,)`` the unit's advantage (not for pairs), else ``None``.
        r: ``(M,)`` DiffusionNFT's optimality probability (sample sources), else ``None``.
    """

    unit: Tensor
    sample: Tensor
    # optional tensors declared alike, as normguard_core.types.SampleResult's (``duplicates`` pairs them):
    # other fields; issue #39 item 1 gives each source its own batch type without the optionals
    sigma: Tensor | None = None
    noise: Tensor | None = None
    loser: Tensor | None = None
    step_k: Tensor | None = None
    adv: Tensor | None = None
    r: Tensor | None = None

    @property
    def size(self) -> int:
        """M, the number of rows."""
        return len(self.unit)


@dataclass(frozen=True)
class LaggedVelocities:
    """Velocities of the lagged weight copies at an epoch's training points (``None``: not read).

    Attributes:
        v_old: ``(M, *D)`` the old (sampling) policy's velocity at every row (pair sources: the
            winner's), or ``None``.
        v_ema: ``(M, *D)`` AWM's EMA copy's velocity, or ``None``.
    """

    v_old: Tensor | None = None
    v_ema: Tensor | None = None


class PointSource:
    """The training points of one kind of data; subclasses draw them and build a micro-batch's fields.

    Args:
        spec: the learner's spec (a :class:`PointSpec`: ``services.training.learner_spec.LearnerSpec``).
        method: the method plug-in (its ``kl_scale`` and ``train_sigmas``).
        schedule: the generator's sigma schedule (``gen.schedule``).
    """

    def __init__(self, spec: PointSpec, method: PointMethod, schedule: SigmaSchedule) -> None:
        self.schedule = schedule
        self.seed, self.rollout, self.learner_cfg = spec.seed, spec.rollout, spec.learner
        self.method, self.loss_cfg = method, spec.loss
        self.timesteps, self.updates_per_step = spec.timesteps, spec.updates_per_step

    def generator(self, batch: TrainBatch, epoch: int) -> torch.Generator:
        return rng(self.seed, batch.step, batch.rank, epoch)

    def draw(self, batch: TrainBatch, epoch: int) -> TrainingPoints:
        """This epoch's training points (rows ``unit * K + j``)."""
        raise NotImplementedError

    def inputs(self, batch: TrainBatch, pts: TrainingPoints, rows: Tensor, device) -> tuple[Tensor, Tensor, Tensor]:
        """``(x (R, *D), sigma (R,), condition rows (R,))`` of the velocity call at ``rows`` (on ``device``,
        the condition rows on the CPU)."""
        raise NotImplementedError

    def lagged_inputs(self, batch: TrainBatch, pts: TrainingPoints, rows: Tensor, device) -> tuple[Tensor, ...]:
        """:meth:`inputs` of the lagged copies: one per row (a pair's winner only)."""
        return tuple(t[: len(rows)] for t in self.inputs(batch, pts, rows, device))

    def fields(self, batch: TrainBatch, pts: TrainingPoints, lagged: LaggedVelocities, rows: Tensor, **at) -> dict:
        """The loss fields of ``rows`` beside ``v_theta`` / ``v_ref`` / ``sigma`` (``LossBatch`` names).

        ``at``: ``x``, ``sigma``, ``idx`` (what :meth:`inputs` returned), ``v_theta`` and ``device``.
        """
        raise NotImplementedError

    def minibatches(self, batch: TrainBatch, epoch: int) -> list[tuple[Tensor, int]]:
        """``updates_per_step`` (rows, global point count) pairs: shuffled units, split evenly."""
        g = self.generator(batch, MINIBATCH_STREAM + epoch)
        u, k = self.updates_per_step, self.timesteps
        chunks = torch.tensor_split(torch.randperm(batch.units, generator=g), u)
        sizes = [torch.tensor_split(torch.arange(m), u) for m in batch.shard_units]
        out = []
        for i, units in enumerate(chunks):
            rows = (units[:, None] * k + torch.arange(k)[None]).flatten()
            out.append((rows, k * sum(len(s[i]) for s in sizes)))
        return out

    def kl_scale(self, sigma: Tensor, sigma_next: Tensor | None = None, noise_level: float = 0.0) -> Tensor | None:
        return self.method.kl_scale(self.loss_cfg, sigma=sigma, sigma_next=sigma_next, noise_level=noise_level)


class SamplePoints(PointSource):
    """Forward-process points on the clean samples (DiffusionNFT, AWM): fresh noise, the method's sigmas."""

    def sigmas(self, n: int, g: torch.Generator) -> Tensor:
        """``(n, K)`` training sigmas, drawn as the method says (``Method.train_sigmas``)."""
        k, ro, lc = self.timesteps, self.rollout, self.learner_cfg
        scheme = self.method.train_sigmas(self.loss_cfg)
        grid = self.schedule.sigma_grid(ro.num_steps, shift=ro.shift)[:-1]  # (T,) the sampler's grid, without 0
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
        shift = self.schedule.train_shift(ro.shift)
        flat = sample_sigmas(n * k, scheme=scheme, shift=shift, low=lc.sigma_min, high=lc.sigma_max, generator=g)
        return flat.view(n, k)

    def draw(self, batch: TrainBatch, epoch: int) -> TrainingPoints:
        g, k, n = self.generator(batch, epoch), self.timesteps, batch.units
        unit = torch.arange(n).repeat_interleave(k)  # (n K,)
        sigma = self.sigmas(n, g).flatten()  # (n K,)
        noise = torch.randn((n * k, *batch.latents.shape[1:]), generator=g)
        adv, r = batch.advantages[unit], batch.reward_prob[unit]
        return TrainingPoints(unit=unit, sample=unit, sigma=sigma, noise=noise, adv=adv, r=r)

    def inputs(self, batch: TrainBatch, pts: TrainingPoints, rows: Tensor, device) -> tuple[Tensor, Tensor, Tensor]:
        sigma, noise, idx = pts.sigma[rows], pts.noise[rows], pts.sample[rows]
        return interpolate(batch.latents[idx], noise, sigma).to(device), sigma.to(device), idx

    def fields(self, batch: TrainBatch, pts: TrainingPoints, lagged: LaggedVelocities, rows: Tensor, **at) -> dict:
        dev = at["device"]
        return dict(
            x0=batch.latents[at["idx"]].to(dev),
            noise=pts.noise[rows].to(dev),
            v_old=lagged.v_old[rows].to(dev) if lagged.v_old is not None else None,
            v_ema=lagged.v_ema[rows].to(dev) if lagged.v_ema is not None else None,
            kl_scale=self.kl_scale(at["sigma"]),
            advantages=pts.adv[rows].to(dev),
            reward_prob=pts.r[rows].to(dev),
        )


class PairPoints(SamplePoints):
    """Flow-DPO's points: per winner/loser pair K sigmas and noises, shared by both; a micro-batch
    stacks the winners' rows, then the losers'."""

    def draw(self, batch: TrainBatch, epoch: int) -> TrainingPoints:
        g, k, n = self.generator(batch, epoch), self.timesteps, batch.units
        unit = torch.arange(n).repeat_interleave(k)  # (n K,)
        sigma = self.sigmas(n, g).flatten()  # (n K,)
        noise = torch.randn((n * k, *batch.latents.shape[1:]), generator=g)
        return TrainingPoints(unit=unit, sample=unit, loser=unit + batch.num_pairs, sigma=sigma, noise=noise)

    def inputs(self, batch: TrainBatch, pts: TrainingPoints, rows: Tensor, device) -> tuple[Tensor, Tensor, Tensor]:
        sigma, noise = pts.sigma[rows], pts.noise[rows]
        idx = torch.cat([pts.sample[rows], pts.loser[rows]])
        sigma, noise = torch.cat([sigma, sigma]), torch.cat([noise, noise])
        return interpolate(batch.latents[idx], noise, sigma).to(device), sigma.to(device), idx

    def fields(self, batch: TrainBatch, pts: TrainingPoints, lagged: LaggedVelocities, rows: Tensor, **at) -> dict:
        dev, noise, half = at["device"], pts.noise[rows], len(rows)
        return dict(
            x0=batch.latents[at["idx"]].to(dev),
            noise=torch.cat([noise, noise]).to(dev),
            v_old=None,  # Flow-DPO reads no v_old (its lagged rows are the winners', for the gap metric only)
            v_ema=lagged.v_ema[rows].to(dev) if lagged.v_ema is not None else None,
            kl_scale=self.kl_scale(at["sigma"]),
            winners=torch.arange(half),
            losers=torch.arange(half, 2 * half),
        )


class TrajectoryPoints(PointSource):
    """Flow-GRPO's points: K of the T stored SDE steps per sample, permuted per sample.

    Args:
        guard: GRPO-Guard: also give the sampling policy's SDE mean at the same state (from ``v_old``).
    """

    def __init__(self, spec: PointSpec, method: PointMethod, schedule: SigmaSchedule, *, guard: bool = False) -> None:
        super().__init__(spec, method, schedule)
        self.guard, self.noise_level = guard, spec.rollout.sde_noise_level

    def draw(self, batch: TrainBatch, epoch: int) -> TrainingPoints:
        g, k, n = self.generator(batch, epoch), self.timesteps, batch.units
        unit = torch.arange(n).repeat_interleave(k)  # (n K,)
        t = batch.log_probs.shape[0]
        if k > t:
            raise ValueError(f"timesteps_per_sample={k} > the {t} rollout steps")
        steps = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(n)]).flatten() if n else unit
        return TrainingPoints(unit=unit, sample=unit, step_k=steps, adv=batch.advantages[unit])

    def inputs(self, batch: TrainBatch, pts: TrainingPoints, rows: Tensor, device) -> tuple[Tensor, Tensor, Tensor]:
        s, k = pts.sample[rows], pts.step_k[rows]
        return batch.states[k, s].to(device), batch.sigmas[k].to(device), s

    def fields(self, batch: TrainBatch, pts: TrainingPoints, lagged: LaggedVelocities, rows: Tensor, **at) -> dict:
        """The stored SDE step's log-prob under theta and at sampling time (``sigma`` is not a field)."""
        dev, x, sigma = at["device"], at["x"], at["sigma"]
        s_idx, k = pts.sample[rows], pts.step_k[rows]
        s_next = batch.sigmas[k + 1].to(dev)
        x_next = batch.states[k + 1, s_idx].to(dev)
        step = sde_step(x, at["v_theta"], sigma, s_next, noise_level=self.noise_level, x_next=x_next)
        fields = dict(
            log_prob=step.log_prob,
            old_log_prob=batch.log_probs[k, s_idx].to(dev),
            advantages=pts.adv[rows].to(dev),
            kl_scale=self.kl_scale(sigma, s_next, self.noise_level),
            sigma=None,
        )
        if self.guard:  # GRPO-Guard: the sampling policy's SDE mean at the same state
            v_old = lagged.v_old[rows].to(dev)
            old = sde_step(x, v_old, sigma, s_next, noise_level=self.noise_level, x_next=step.x_next)
            fields.update(mean=step.mean, old_mean=old.mean, step_std=step.std)
        return fields
