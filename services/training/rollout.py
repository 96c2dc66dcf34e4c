"""RolloutSampler: a plain class (tested in-process), wrapped as a Ray actor by the coordinator.

It holds a generator synced to a policy version, generates groups of samples with per-sample
seeds, records the velocity-norm ratio against the reference along every rollout, and keeps
the SDE trajectory when the loss needs log-probs (Flow-GRPO). Sampling is the one loop of
``services.models.sampling``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from normguard_core.samplers import per_sample_noise
from normguard_core.seeding import sde_noise_offset
from services.models import build_generator
from services.models.sampling import fixed_noise, sample
from services.training.probe import ActorProbe, probe_process
from services.types import RolloutBatch, RolloutRequest, StaleSamplerError

if TYPE_CHECKING:
    from services.config import ExperimentConfig, ModelConfig

__all__ = ["RolloutSampler", "StaleSamplerError"]  # StaleSamplerError is defined in services.types


class RolloutSampler:
    """Generates rollouts with the policy snapshot it was last synced to."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        model_path: str,
        *,
        device: str = "cpu",
        torch_threads: int = 1,
        micro_batch: int | None = None,
        decode_batch: int | None = None,
        prompt_embeddings: str | None = None,
    ) -> None:
        """``micro_batch`` / ``decode_batch``: ``rollout.micro_batch`` / ``rollout.decode_batch``, samples per
        transformer call / per VAE decode (``None``: the whole share at once; the samples are the same).
        ``prompt_embeddings``: the run's precomputed table (``model.prompt_embeddings: once``): no text encoder
        is loaded (``services.models.prompt_embeddings``)."""
        torch.set_num_threads(torch_threads)
        self.gen = build_generator(model_cfg, path=model_path, device=device, prompt_embeddings=prompt_embeddings)
        self.version = 0
        self.chunks = {"micro_batch": micro_batch, "decode_batch": decode_batch}

    @classmethod
    def over(cls, gen, *, micro_batch: int | None = None, decode_batch: int | None = None) -> RolloutSampler:
        """A sampler on an existing generator, built by someone else (``resources.placement: hybrid``: the
        learner's own, with the sampling policy swapped in around each call by ``Learner.sampling``)."""
        sampler = cls.__new__(cls)
        sampler.gen, sampler.version = gen, 0
        sampler.chunks = {"micro_batch": micro_batch, "decode_batch": decode_batch}
        return sampler

    def set_weights(self, state: dict[str, Tensor], version: int) -> int:
        """Load trainable weights of policy ``version``; returns the version now held."""
        self.gen.load_trainable_state_dict(state)
        self.version = version
        return version

    def get_version(self) -> int:
        """The policy version held."""
        return self.version

    def weights_checksum(self) -> float:
        """Sum of the trainable weights (lets tests check that a sync really landed)."""
        return float(sum(t.double().sum() for t in self.gen.trainable_state_dict().values()))

    def probe(self) -> ActorProbe:
        """This sampler process's peak memory and its transformer's dtypes / devices (reads only)."""
        return probe_process(self.gen.transformer)

    def generate(self, req: RolloutRequest) -> RolloutBatch:
        """Sample ``req``; every sample is tagged with the version held now. Sample ``b``'s noise (and
        SDE noise) comes from its own seed, so a redone request reproduces it exactly."""
        if self.version < req.min_version:
            raise StaleSamplerError(f"sampler holds policy v{self.version}, request needs >= v{req.min_version}")
        shape, b = self.gen.latent_shape, len(req.prompts)
        out = sample(
            self.gen,
            req.prompts,
            noise=per_sample_noise(req.seeds, shape),
            num_steps=req.num_steps,
            guidance_scale=req.guidance_scale,
            shift=req.shift,
            sde_noise_level=req.sde_noise_level,
            sde_noise=lambda k: per_sample_noise(req.seeds, shape, offset=sde_noise_offset(k)),
            record_states=req.sde_noise_level > 0,
            **self.chunks,
        )
        traj = out.trajectory
        return RolloutBatch(
            latents=traj.x0.cpu(),
            images=out.images.cpu(),
            prompts=list(req.prompts),
            group_ids=torch.tensor(req.group_ids, dtype=torch.long),
            seeds=list(req.seeds),
            versions=torch.full((b,), self.version, dtype=torch.long),
            norm_ratio=out.ratio.cpu(),
            sigmas=traj.sigmas.cpu(),
            states=traj.states.cpu() if traj.states is not None else None,
            log_probs=traj.log_probs.cpu() if traj.log_probs is not None else None,
        )

    def eval_samples(
        self,
        prompts: list[str],
        *,
        num_steps: int,
        guidance_scale: float = 1.0,
        shift: float | None = None,
        seed: int = 0,
        renormalize: bool = False,
    ) -> dict[str, Tensor]:
        """Fixed-noise ODE samples (one generator seeded ``seed`` for the batch, the same for every model
        compared) on the generator's grid (``shift``: a static override) with the per-step norm ratio
        ``(T, B)`` against the reference."""
        noise = fixed_noise(self.gen, len(prompts), seed)
        out = sample(
            self.gen,
            prompts,
            noise=noise,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            shift=shift,
            renormalize=renormalize,
            **self.chunks,
        )
        return {"latents": out.trajectory.x0.cpu(), "images": out.images.cpu(), "ratio": out.ratio.cpu()}


def rollout_chunks(cfg: ExperimentConfig) -> dict:
    """A rollout's transformer / VAE chunk sizes (``rollout.micro_batch``, ``rollout.decode_batch``), as
    :class:`RolloutSampler` and :meth:`RolloutSampler.over` take them."""
    return {"micro_batch": cfg.rollout.micro_batch, "decode_batch": cfg.rollout.decode_batch}
