"""Training points of one RL step on one learner shard (the point sources the method plug-ins own):
which (sample, sigma, noise) or stored SDE step each optimiser step trains on, seeded by (seed, step,
rank, epoch), and the typed loss batch of a micro-batch of them.

One :class:`PointSource` per kind of training data; each method plug-in (``services.methods``)
names its own, so the learner never asks which kind it trains on:

* :class:`SamplePoints` (DiffusionNFT, AWM): ``timesteps_per_sample`` sigmas per sample as the
  method's source draws them (the sampler's own grid, stratified grid indices, uniform or
  logit-normal) and fresh noise, on the rollout's clean samples; a :class:`SampleDraw`, micro-batches
  of ``normguard_core.losses.SampleBatch``;
* :class:`PairPoints` (Flow-DPO): the same per winner/loser pair, both sharing sigma and noise; a
  :class:`PairDraw`, micro-batches of ``PairBatch``;
* :class:`TrajectoryPoints` (Flow-GRPO): stored SDE steps of the rollout's trajectories; a
  :class:`StepDraw`, micro-batches of ``StepBatch``.

The units (samples or pairs) are shuffled and split into ``updates_per_step`` mini-batches, each one
optimiser step. The sampler's grid and the shift of the shifted schemes are the generator family's
(``gen.schedule``, a ``services.models.schedules.FlowSchedule``), the grid the samplers integrate on.
This module sits in the plug-ins' layer (it imports no generator), so each plug-in names its source. A
source returns frozen draws; the lagged velocities read at them are a separate :class:`LaggedVelocities`.
As facebookresearch/flow_matching's ``ProbPath.sample`` returns one typed ``PathSample``
(``flow_matching/path/path.py``), a source's :meth:`PointSource.micro` returns one typed batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import torch
from torch import Tensor

from normguard_core.conventions import interpolate, sample_sigmas
from normguard_core.losses import GuardTerms, PairBatch, SampleBatch, StepBatch
from normguard_core.samplers import sde_step
from normguard_core.seeding import MINIBATCH_STREAM, rng
from services.types import TrainBatch

if TYPE_CHECKING:
    from services.config import LearnerConfig, RolloutConfig

__all__ = [
    "Evaluated",
    "LaggedVelocities",
    "Micro",
    "PairDraw",
    "PairPoints",
    "PointMethod",
    "PointSource",
    "PointSpec",
    "SampleDraw",
    "SamplePoints",
    "SigmaSchedule",
    "StepDraw",
    "TrainingPoints",
    "TrajectoryPoints",
]


# What a source reads of the three objects it is built from, named here so that this layer imports neither
# the method plug-ins (which import it), nor the generators, nor the training service above it.
class SigmaSchedule(Protocol):
    """The generator family's sigma grid (``services.models.schedules.FlowSchedule``, ``gen.schedule``)."""

    def sigma_grid(self, num_steps: int, shift: float | None = None) -> Tensor: ...

    def train_shift(self, shift: float | None = None, *, num_steps: int | None = None) -> float: ...


class PointMethod(Protocol):
    """The two questions a source asks its (bound) method plug-in (``services.methods.Method``)."""

    def train_sigmas(self) -> str: ...

    def kl_scale(self, sigma: Tensor, sigma_next: Tensor | None, noise_level: float) -> Tensor: ...


class PointSpec(Protocol):
    """The learner's frozen spec as a source reads it (``services.training.learner_spec.LearnerSpec``)."""

    # read-only members (a frozen dataclass satisfies them), one property each: the five alike lines that
    # ``duplicates`` pairs are the protocol's syntax, not logic to share

    @property
    def rollout(self) -> RolloutConfig: ...
    @property
    def learner(self) -> LearnerConfig: ...
    @property
    def seed(self) -> int: ...
    @property
    def timesteps(self) -> int: ...
    @property
    def updates_per_step(self) -> int: ...


@dataclass(frozen=True)
class TrainingPoints:
    """One epoch's training points on a shard: row ``unit * K + j`` is the ``j``-th of the K points
    of unit ``unit`` (M = units x K rows; a unit is a sample, or a pair for pair methods). Each source
    draws its own subclass.

    Attributes:
        unit: ``(M,)`` long, the unit of each row.
        sample: ``(M,)`` long, the shard row of its sample (a pair's winner).
    """

    unit: Tensor
    sample: Tensor

    @property
    def size(self) -> int:
        """M, the number of rows."""
        return len(self.unit)


@dataclass(frozen=True)
class SampleDraw(TrainingPoints):
    """:class:`SamplePoints`' rows: ``sigma`` ``(M,)`` float32 training sigmas, ``noise`` ``(M, *D)``
    fresh noise, ``adv`` ``(M,)`` the unit's advantage, ``r`` ``(M,)`` DiffusionNFT's optimality probability."""

    sigma: Tensor
    noise: Tensor
    adv: Tensor
    r: Tensor


@dataclass(frozen=True)
class PairDraw(TrainingPoints):
    """:class:`PairPoints`' rows: ``loser`` ``(M,)`` long, the shard row of the pair's loser; ``sigma`` and
    ``noise`` as :class:`SampleDraw`'s, shared by winner and loser."""

    loser: Tensor
    sigma: Tensor
    noise: Tensor


@dataclass(frozen=True)
class StepDraw(TrainingPoints):
    """:class:`TrajectoryPoints`' rows: ``step_k`` ``(M,)`` long, the stored SDE step; ``adv`` ``(M,)``."""

    step_k: Tensor
    adv: Tensor


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


@dataclass(frozen=True)
class Evaluated:
    """A micro-batch's velocity call as the learner made it (what :meth:`PointSource.inputs` returned
    and the velocities there).

    Attributes:
        x: ``(R, *D)`` the inputs; sigma: ``(R,)``; idx: ``(R,)`` their shard rows (CPU).
        v_theta: ``(R, *D)`` the policy velocity (carries grad).
        v_ref: ``(R, *D)`` the frozen reference's, or ``None`` where nothing reads it.
        device: where the objective is computed.
    """

    x: Tensor
    sigma: Tensor
    idx: Tensor
    v_theta: Tensor
    v_ref: Tensor | None
    device: torch.device | str


P = TypeVar("P", bound=TrainingPoints)
B = TypeVar("B")


@dataclass(frozen=True)
class Micro(Generic[B]):
    """What a source emits for one micro-batch: its method's loss ``batch`` and the ``(R,)`` KL weight
    ``kl_scale`` at the same points (the ``normguard_core.losses.Reference``'s)."""

    batch: B
    kl_scale: Tensor


class PointSource(Generic[P, B]):
    """The training points of one kind of data; subclasses draw them (``P``) and build a micro-batch's
    typed loss batch (``B``).

    Args:
        spec: the learner's spec (a :class:`PointSpec`: ``services.training.learner_spec.LearnerSpec``).
        method: the bound method plug-in (its ``kl_scale`` and ``train_sigmas``).
        schedule: the generator's sigma schedule (``gen.schedule``).
    """

    def __init__(self, spec: PointSpec, method: PointMethod, schedule: SigmaSchedule) -> None:
        self.schedule = schedule
        self.seed, self.rollout, self.learner_cfg = spec.seed, spec.rollout, spec.learner
        self.method = method
        self.timesteps, self.updates_per_step = spec.timesteps, spec.updates_per_step

    def generator(self, batch: TrainBatch, epoch: int) -> torch.Generator:
        return rng(self.seed, batch.step, batch.rank, epoch)

    def draw(self, batch: TrainBatch, epoch: int) -> P:
        """This epoch's training points (rows ``unit * K + j``)."""
        raise NotImplementedError

    def inputs(
        self, batch: TrainBatch, pts: P, rows: Tensor, device: torch.device | str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(x (R, *D), sigma (R,), condition rows (R,))`` of the velocity call at ``rows`` (on ``device``,
        the condition rows on the CPU)."""
        raise NotImplementedError

    def lagged_inputs(self, batch: TrainBatch, pts: P, rows: Tensor, device: torch.device | str) -> tuple[Tensor, ...]:
        """:meth:`inputs` of the lagged copies: one per row (a pair's winner only)."""
        return tuple(t[: len(rows)] for t in self.inputs(batch, pts, rows, device))

    def micro(self, batch: TrainBatch, pts: P, lagged: LaggedVelocities, rows: Tensor, at: Evaluated) -> Micro[B]:
        """The typed loss batch of ``rows`` and the KL weight at its points."""
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


class _ForwardSource(PointSource[P, B]):
    """Forward-process points: the method's training sigmas on the sampler's grid (samples and pairs)."""

    def sigmas(self, n: int, g: torch.Generator) -> Tensor:
        """``(n, K)`` training sigmas, drawn as the method says (``Method.train_sigmas``)."""
        k, ro, lc = self.timesteps, self.rollout, self.learner_cfg
        scheme = self.method.train_sigmas()
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
        shift = self.schedule.train_shift(ro.shift, num_steps=ro.num_steps)
        flat = sample_sigmas(n * k, scheme=scheme, shift=shift, low=lc.sigma_min, high=lc.sigma_max, generator=g)
        return flat.view(n, k)

    def _sigma_noise(self, batch: TrainBatch, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(unit, sigma, noise)`` of every row: ``(n K,)``, ``(n K,)``, ``(n K, *D)``."""
        g, k, n = self.generator(batch, epoch), self.timesteps, batch.units
        unit = torch.arange(n).repeat_interleave(k)  # (n K,)
        sigma = self.sigmas(n, g).flatten()  # (n K,)
        noise = torch.randn((n * k, *batch.latents.shape[1:]), generator=g)
        return unit, sigma, noise


class SamplePoints(_ForwardSource[SampleDraw, SampleBatch]):
    """Forward-process points on the clean samples (DiffusionNFT, AWM): fresh noise, the method's sigmas."""

    def draw(self, batch: TrainBatch, epoch: int) -> SampleDraw:
        unit, sigma, noise = self._sigma_noise(batch, epoch)
        adv, r = batch.advantages[unit], batch.reward_prob[unit]
        return SampleDraw(unit=unit, sample=unit, sigma=sigma, noise=noise, adv=adv, r=r)

    def inputs(
        self, batch: TrainBatch, pts: SampleDraw, rows: Tensor, device: torch.device | str
    ) -> tuple[Tensor, Tensor, Tensor]:
        sigma, noise, idx = pts.sigma[rows], pts.noise[rows], pts.sample[rows]
        return interpolate(batch.latents[idx], noise, sigma).to(device), sigma.to(device), idx

    def micro(
        self, batch: TrainBatch, pts: SampleDraw, lagged: LaggedVelocities, rows: Tensor, at: Evaluated
    ) -> Micro[SampleBatch]:
        dev = at.device
        loss_batch = SampleBatch(
            v_theta=at.v_theta,
            x0=batch.latents[at.idx].to(dev),
            noise=pts.noise[rows].to(dev),
            sigma=at.sigma,
            advantages=pts.adv[rows].to(dev),
            reward_prob=pts.r[rows].to(dev),
            v_old=lagged.v_old[rows].to(dev) if lagged.v_old is not None else None,
            v_ema=lagged.v_ema[rows].to(dev) if lagged.v_ema is not None else None,
        )
        return Micro(loss_batch, self.method.kl_scale(at.sigma, None, 0.0))


class PairPoints(_ForwardSource[PairDraw, PairBatch]):
    """Flow-DPO's points: per winner/loser pair K sigmas and noises, shared by both; a micro-batch
    stacks the winners' rows, then the losers'."""

    def draw(self, batch: TrainBatch, epoch: int) -> PairDraw:
        unit, sigma, noise = self._sigma_noise(batch, epoch)
        return PairDraw(unit=unit, sample=unit, loser=unit + batch.num_pairs, sigma=sigma, noise=noise)

    def inputs(
        self, batch: TrainBatch, pts: PairDraw, rows: Tensor, device: torch.device | str
    ) -> tuple[Tensor, Tensor, Tensor]:
        sigma, noise = pts.sigma[rows], pts.noise[rows]
        idx = torch.cat([pts.sample[rows], pts.loser[rows]])
        sigma, noise = torch.cat([sigma, sigma]), torch.cat([noise, noise])
        return interpolate(batch.latents[idx], noise, sigma).to(device), sigma.to(device), idx

    def micro(
        self, batch: TrainBatch, pts: PairDraw, lagged: LaggedVelocities, rows: Tensor, at: Evaluated
    ) -> Micro[PairBatch]:
        """Flow-DPO reads no lagged velocity (its lagged rows are the winners', for the gap metric only)."""
        if at.v_ref is None:
            raise ValueError("pair points feed Flow-DPO, which reads the reference velocity v_ref")
        dev, noise, half = at.device, pts.noise[rows], len(rows)
        loss_batch = PairBatch(
            v_theta=at.v_theta,
            v_ref=at.v_ref,
            x0=batch.latents[at.idx].to(dev),
            noise=torch.cat([noise, noise]).to(dev),
            sigma=at.sigma,
            winners=torch.arange(half),
            losers=torch.arange(half, 2 * half),
        )
        return Micro(loss_batch, self.method.kl_scale(at.sigma, None, 0.0))


def _trajectory(batch: TrainBatch) -> tuple[Tensor, Tensor, Tensor]:
    """The batch's stored SDE ``(states, log_probs, sigmas)``; a batch of an ODE rollout has none."""
    if batch.states is None or batch.log_probs is None or batch.sigmas is None:
        raise ValueError("trajectory points (Flow-GRPO) need the batch's SDE states, log_probs and sigmas")
    return batch.states, batch.log_probs, batch.sigmas


class TrajectoryPoints(PointSource[StepDraw, StepBatch]):
    """Flow-GRPO's points: K of the T stored SDE steps per sample, permuted per sample.

    Args:
        guard: GRPO-Guard: also give the sampling policy's SDE mean at the same state (from ``v_old``).
    """

    def __init__(self, spec: PointSpec, method: PointMethod, schedule: SigmaSchedule, *, guard: bool = False) -> None:
        super().__init__(spec, method, schedule)
        self.guard, self.noise_level = guard, spec.rollout.sde_noise_level

    def draw(self, batch: TrainBatch, epoch: int) -> StepDraw:
        g, k, n = self.generator(batch, epoch), self.timesteps, batch.units
        unit = torch.arange(n).repeat_interleave(k)  # (n K,)
        t = _trajectory(batch)[1].shape[0]
        if k > t:
            raise ValueError(f"timesteps_per_sample={k} > the {t} rollout steps")
        steps = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(n)]).flatten() if n else unit
        return StepDraw(unit=unit, sample=unit, step_k=steps, adv=batch.advantages[unit])

    def inputs(
        self, batch: TrainBatch, pts: StepDraw, rows: Tensor, device: torch.device | str
    ) -> tuple[Tensor, Tensor, Tensor]:
        s, k = pts.sample[rows], pts.step_k[rows]
        states, _, sigmas = _trajectory(batch)
        return states[k, s].to(device), sigmas[k].to(device), s

    def micro(
        self, batch: TrainBatch, pts: StepDraw, lagged: LaggedVelocities, rows: Tensor, at: Evaluated
    ) -> Micro[StepBatch]:
        """The stored SDE step's log-prob under theta and at sampling time."""
        dev, x, sigma = at.device, at.x, at.sigma
        s_idx, k = pts.sample[rows], pts.step_k[rows]
        states, log_probs, sigmas = _trajectory(batch)
        s_next = sigmas[k + 1].to(dev)
        x_next = states[k + 1, s_idx].to(dev)
        step = sde_step(x, at.v_theta, sigma, s_next, noise_level=self.noise_level, x_next=x_next)
        assert step.log_prob is not None, "sde_step gives the log-prob of the x_next it is handed"
        guard = None
        if self.guard:  # GRPO-Guard: the sampling policy's SDE mean at the same state
            if lagged.v_old is None:
                raise ValueError("GRPO-Guard needs v_old, the sampling policy's velocity")
            v_old = lagged.v_old[rows].to(dev)
            old = sde_step(x, v_old, sigma, s_next, noise_level=self.noise_level, x_next=step.x_next)
            guard = GuardTerms(mean=step.mean, old_mean=old.mean, step_std=step.std)
        loss_batch = StepBatch(
            log_prob=step.log_prob,
            old_log_prob=log_probs[k, s_idx].to(dev),
            advantages=pts.adv[rows].to(dev),
            guard=guard,
        )
        return Micro(loss_batch, self.method.kl_scale(sigma, s_next, self.noise_level))
