"""RolloutSampler: a plain class (tested in-process), wrapped as a Ray actor by the coordinator.

It holds a generator synced to a policy version, generates groups of samples with per-sample
seeds, records the velocity-norm ratio against the reference along every rollout, and keeps
the SDE trajectory when the loss needs log-probs (Flow-GRPO).
"""

from __future__ import annotations

import torch
from torch import Tensor

from normguard_core.conventions import sigma_grid
from normguard_core.metrics import velocity_norm
from normguard_core.samplers import euler_step, sde_step
from services.models import build_generator
from services.types import RolloutBatch, RolloutRequest, StaleSamplerError

__all__ = ["RolloutSampler", "StaleSamplerError"]  # StaleSamplerError is defined in services.types


def _per_sample_noise(seeds: list[int], shape: tuple[int, ...], *, offset: int) -> Tensor:
    """``(B, *shape)`` normal noise, sample b drawn from its own generator seeded ``seeds[b] + offset``."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s + offset)) for s in seeds])


class RolloutSampler:
    """Generates rollouts with the policy snapshot it was last synced to."""

    def __init__(self, model_cfg, model_path: str, *, device: str = "cpu", torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.gen = build_generator(model_cfg, path=model_path, device=device)
        self.version = 0

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

    @torch.no_grad()
    def generate(self, req: RolloutRequest) -> RolloutBatch:
        """Sample ``req``; every sample is tagged with the version held now."""
        if self.version < req.min_version:
            raise StaleSamplerError(f"sampler holds policy v{self.version}, request needs >= v{req.min_version}")
        gen = self.gen
        b = len(req.prompts)
        policy, reference = gen.velocity_fns(req.prompts, req.guidance_scale)
        sigmas = sigma_grid(req.num_steps, shift=req.shift)
        x = _per_sample_noise(req.seeds, gen.latent_shape, offset=0).to(gen.device)
        use_sde = req.sde_noise_level > 0
        states, log_probs, ratios = [x], [], []
        for k in range(req.num_steps):
            s, s_next = sigmas[k].expand(b), sigmas[k + 1].expand(b)
            v = policy(x, s)
            ratios.append(velocity_norm(v) / velocity_norm(reference(x, s)).clamp_min(1e-12))
            if use_sde:
                eps = _per_sample_noise(req.seeds, gen.latent_shape, offset=1000 * (k + 1)).to(gen.device)
                step = sde_step(x, v, s, s_next, noise_level=req.sde_noise_level, noise=eps)
                log_probs.append(step.log_prob)
            else:
                step = euler_step(x, v, s, s_next)
            x = step.x_next
            if use_sde:
                states.append(x)
        return RolloutBatch(
            latents=x.cpu(),
            images=gen.decode(x).cpu(),
            prompts=list(req.prompts),
            group_ids=torch.tensor(req.group_ids, dtype=torch.long),
            seeds=list(req.seeds),
            versions=torch.full((b,), self.version, dtype=torch.long),
            norm_ratio=torch.stack(ratios).cpu(),
            sigmas=sigmas,
            states=torch.stack(states).cpu() if use_sde else None,
            log_probs=torch.stack(log_probs).cpu() if use_sde else None,
        )

    def eval_samples(
        self,
        prompts: list[str],
        *,
        num_steps: int,
        guidance_scale: float = 1.0,
        shift: float = 1.0,
        seed: int = 0,
        renormalize: bool = False,
    ) -> dict[str, Tensor]:
        """Fixed-noise ODE samples with the per-step norm ratio ``(T, B)`` against the reference."""
        from services.evaluation import generate

        latents, images, ratio = generate(
            self.gen,
            prompts,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            shift=shift,
            seed=seed,
            renormalize=renormalize,
        )
        return {"latents": latents.cpu(), "images": images.cpu(), "ratio": ratio.cpu()}
