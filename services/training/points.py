"""Training points of one RL step on one learner shard: which (sample, sigma, noise) or stored SDE
step each optimiser step trains on, seeded by (seed, step, rank, epoch).

Forward-process methods (NFT, AWM, Flow-DPO) draw ``timesteps_per_sample`` sigmas per sample (or
pair) as the method's source does (the sampler's own grid, stratified grid indices, uniform or
logit-normal) and fresh noise; Flow-GRPO draws stored SDE steps. The units (samples or pairs) are
shuffled and split into ``updates_per_step`` mini-batches, each one optimiser step. The sampler's grid
and the shift of the shifted schemes are the generator family's (``services.models.schedules``), the
grid the samplers integrate on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normguard_core.conventions import sample_sigmas
from services.models.schedules import FlowSchedule
from services.types import TrainBatch

__all__ = ["PointPlan"]


class PointPlan:
    """The training points of a method: rows ``unit * K + j`` (K = ``timesteps``) of each epoch."""

    def __init__(self, spec, method, schedule: FlowSchedule | None = None) -> None:
        """``spec``: a :class:`~services.training.learner.LearnerSpec`; ``schedule``: the generator's
        (``gen.schedule``; default: the digits grid)."""
        self.schedule = schedule or FlowSchedule()
        self.seed, self.rollout, self.learner_cfg = spec.seed, spec.rollout, spec.learner
        self.data, self.method, self.loss_cfg = method.data, method, spec.loss
        self.timesteps, self.updates_per_step = spec.timesteps, spec.updates_per_step

    def generator(self, batch: TrainBatch, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, batch.step, batch.rank, epoch)) % 2**63)

    def sigmas(self, n: int, g: torch.Generator) -> Tensor:
        """``(n, K)`` training sigmas of the forward-process methods."""
        k, ro, lc = self.timesteps, self.rollout, self.learner_cfg
        scheme = self.method.train_sigmas(self.loss_cfg)  # forward / pair methods only
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

    def points(self, batch: TrainBatch, epoch: int) -> dict[str, Tensor]:
        """Rows ``unit * K + j`` of this epoch's training points (see the module docstring)."""
        g, k, n = self.generator(batch, epoch), self.timesteps, batch.units
        unit = torch.arange(n).repeat_interleave(k)  # (n K,)
        if self.data == "trajectory":
            t = batch.log_probs.shape[0]
            if k > t:
                raise ValueError(f"timesteps_per_sample={k} > the {t} rollout steps")
            steps = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(n)]).flatten() if n else unit
            return dict(unit=unit, sample=unit, step_k=steps, adv=batch.advantages[unit])
        sigma = self.sigmas(n, g).flatten()  # (n K,)
        if self.data == "pairs":
            p = batch.num_pairs
            noise = torch.randn((n * k, *batch.latents.shape[1:]), generator=g)
            return dict(unit=unit, sample=unit, loser=unit + p, sigma=sigma, noise=noise)
        noise = torch.randn((n * k, *batch.latents.shape[1:]), generator=g)
        return dict(
            unit=unit, sample=unit, sigma=sigma, noise=noise, adv=batch.advantages[unit], r=batch.reward_prob[unit]
        )

    def minibatches(self, batch: TrainBatch, epoch: int) -> list[tuple[Tensor, int]]:
        """``updates_per_step`` (rows, global point count) pairs: shuffled units, split evenly."""
        g = self.generator(batch, 1_000 + epoch)
        u, k = self.updates_per_step, self.timesteps
        chunks = torch.tensor_split(torch.randperm(batch.units, generator=g), u)
        sizes = [torch.tensor_split(torch.arange(m), u) for m in batch.shard_units]
        out = []
        for i, units in enumerate(chunks):
            rows = (units[:, None] * k + torch.arange(k)[None]).flatten()
            out.append((rows, k * sum(len(s[i]) for s in sizes)))
        return out
