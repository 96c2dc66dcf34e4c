"""Which way is each reward proxy easiest to climb? Gradient ascent on it through the decoder, in seconds.

Before any RL (issue #36): from base-model samples ``z`` (the generator's clean latents, in the space
its velocity lives in), climb each proxy ``R(decode(z), prompt)`` with steps of a fixed length, and
print per step the proxy, the latent norm ``||z|| / ||z_0||``, the cosine of the ascent direction with
``z`` (its radial part: > 0 means the easiest way up grows the norm), the attribute judge and the
colour statistics as gaps to the held-out data. A proxy whose easiest direction grows ``||z||`` (and so
the velocity's magnitude near the data, where ``v ~ eps - x0``) is one a norm guard can act on; one that
climbs at a constant norm is not.

    python -m services.probe_proxies deploy/configs/colour_nft.yaml

Each step moves every sample by ``step_size * ||z_0||`` along its own ascent direction (normalised per
sample), so proxies of different scales climb at the same speed in ``z``. ``colour_jpeg`` (a file size)
has no gradient; its ascent direction is estimated by antithetic Gaussian smoothing, ``g = mean_k
(R(z + s e_k) - R(z - s e_k)) e_k / 2s`` (the evolution-strategies estimator of Salimans et al. 2017),
with ``s = 0.1`` and ``--es-pairs`` pairs per sample. Nothing here trains: the generator and the scorers
are the cached ones of ``normguard prepare`` (built first if missing).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from services.models.colour import ColourGenerator
    from services.rewards.base import RewardScorer

__all__ = ["ProbeConfig", "ascend", "main"]

STAT_KEYS = ("brightness", "saturation", "contrast", "texture")


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's scale: ``steps`` ascent steps of ``step_size * ||z_0||`` each, per sample."""

    steps: int = 20
    step_size: float = 0.02
    es_pairs: int = 24
    es_sigma: float = 0.1


def _es_gradient(score: Callable[[Tensor], Tensor], z: Tensor, pairs: int, sigma: float, seed: int) -> Tensor:
    """Antithetic Gaussian-smoothing estimate of ``d score / dz`` per sample (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(pairs, *z.shape, generator=gen)  # (K, B, *D)
    zs = torch.cat([z[None] + sigma * eps, z[None] - sigma * eps]).flatten(0, 1)  # (2K B, *D)
    r = score(zs).view(2, pairs, len(z))
    weight = (r[0] - r[1]) / (2 * sigma)  # (K, B)
    return (weight.view(pairs, len(z), *([1] * (z.ndim - 1))) * eps).mean(dim=0)


def ascend(
    z0: Tensor,
    score: Callable[[Tensor], Tensor],
    measure: Callable[[Tensor], dict[str, float]],
    cfg: ProbeConfig,
    *,
    differentiable: bool = True,
) -> list[dict[str, float]]:
    """Fixed-length ascent steps on ``score(z) -> (B,)`` from ``z0``; ``measure(z)`` per step.

    Returns one row per step (0 = the base samples): the mean proxy, ``||z|| / ||z_0||``, the mean cosine of
    the ascent direction with ``z`` and what ``measure`` reports.
    """
    z = z0.clone()
    n0 = z0.flatten(1).norm(dim=1)
    rows = []
    for k in range(cfg.steps + 1):
        if differentiable:
            zz = z.clone().requires_grad_(True)
            value = score(zz)
            (grad,) = torch.autograd.grad(value.sum(), zz)
        else:
            with torch.no_grad():
                value = score(z)
            grad = _es_gradient(score, z, cfg.es_pairs, cfg.es_sigma, seed=k)
        g, flat = grad.flatten(1), z.flatten(1)
        cos = (g * flat).sum(1) / (g.norm(dim=1) * flat.norm(dim=1)).clamp_min(1e-12)
        rows.append(
            {
                "step": k,
                "proxy": float(value.detach().mean()),
                "norm_ratio": float((flat.norm(dim=1) / n0).mean()),
                "cos_grad_z": float(cos.mean()),
                **measure(z.detach()),
            }
        )
        if k < cfg.steps:
            unit = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            z = (flat + cfg.step_size * n0[:, None] * unit).view_as(z).detach()
    return rows


def _setup(config_path: str, samples: int):
    """The cached generator and scorers of the config's task, and base samples' latents and prompts."""
    from services.config import load_config
    from services.config.families import require
    from services.data.colour import all_prompts
    from services.models.colour import load_colour_generator
    from services.models.sampling import fixed_noise, sample
    from services.prepare import prepare_task

    cfg = load_config(config_path)
    require(cfg.model.kind, "colour", f"the proxy probe is built for the colour task; model.kind is {cfg.model.kind!r}")
    assets = prepare_task(cfg.model)
    gen = load_colour_generator(assets.model_path)
    prompts = [all_prompts()[(k * 5) % 96] for k in range(samples)]  # every shape, colour and background
    noise = fixed_noise(gen, samples, 1234)
    base = sample(
        gen, prompts, noise=noise, num_steps=cfg.eval.full_steps, guidance_scale=cfg.eval.guidance_scale
    ).trajectory.x0
    return cfg, assets, gen, prompts, base.detach().cpu()


def _decoder(gen: ColourGenerator) -> Callable[[Tensor], Tensor]:
    from services.models.colour_vae import decode_latents

    def decode(z: Tensor) -> Tensor:  # with gradients, as the pipeline decodes (clamped to [0, 1])
        return ((decode_latents(gen.vae, z) + 1.0) / 2.0).clamp(0.0, 1.0)

    return decode


def _measure(
    decode: Callable[[Tensor], Tensor], judge: RewardScorer, stats: dict, prompts: Sequence[str]
) -> Callable[[Tensor], dict[str, float]]:
    from services.rewards.colour import colour_stats

    @torch.no_grad()
    def measure(z: Tensor) -> dict[str, float]:
        images = decode(z)
        out = {"judge": float(judge.score(images, prompts).mean())}
        s = colour_stats(images)
        out.update({f"d_{k}": float(s[k].mean()) - stats[k] for k in STAT_KEYS})
        return out

    return measure


def _proxy_fn(
    name: str, scorer_path: str, decode: Callable[[Tensor], Tensor], prompts: Sequence[str]
) -> tuple[Callable[[Tensor], Tensor], bool]:
    from services.rewards import DifferentiableScorer, build_scorer

    scorer = build_scorer(name, path=scorer_path)
    if isinstance(scorer, DifferentiableScorer):
        differentiable = scorer
        return (lambda z: differentiable.differentiable_score(decode(z), prompts)), True

    def batched(z: Tensor) -> Tensor:  # ES: many perturbed copies of every sample, prompts repeated
        reps = len(z) // len(prompts)
        with torch.no_grad():
            return scorer.score(decode(z), list(prompts) * reps)

    return batched, False


def _print_table(name: str, rows: list[dict[str, float]], seconds: float, every: int) -> None:
    cols = ["step", "proxy", "norm_ratio", "cos_grad_z", "judge", *(f"d_{k}" for k in STAT_KEYS)]
    print(f"\n**{name}** ({seconds:.0f} s)\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if r["step"] % every == 0 or r["step"] == rows[-1]["step"]:
            print("| " + " | ".join(str(r[c]) if c == "step" else f"{r[c]:+.4f}" for c in cols) + " |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("config", help="an experiment config of the colour task (its cached assets are used)")
    ap.add_argument("--proxies", default="colour_clip,colour_pref,colour_jpeg")
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--steps", type=int, default=ProbeConfig.steps)
    ap.add_argument("--step-size", type=float, default=ProbeConfig.step_size)
    ap.add_argument("--es-pairs", type=int, default=ProbeConfig.es_pairs)
    ap.add_argument("--print-every", type=int, default=2)
    args = ap.parse_args(argv)
    from services.data.colour import real_colour_images
    from services.rewards import build_scorer
    from services.rewards.colour import colour_stats

    torch.manual_seed(0)
    _, assets, gen, prompts, z0 = _setup(args.config, args.samples)
    decode = _decoder(gen)
    real = colour_stats(real_colour_images(1024, split="test"))
    stats = {k: float(real[k].mean()) for k in STAT_KEYS}
    judge = build_scorer("colour_judge", path=str(assets.scorer_path))
    measure = _measure(decode, judge, stats, prompts)
    cfg = ProbeConfig(steps=args.steps, step_size=args.step_size, es_pairs=args.es_pairs)
    print(f"{args.samples} base samples, ||z_0|| mean {float(z0.flatten(1).norm(dim=1).mean()):.2f}; {cfg}")
    print(
        "d_*: the colour statistic minus the held-out data's mean ("
        + ", ".join(f"{k} {v:.3f}" for k, v in stats.items())
        + ")"
    )
    for name in args.proxies.split(","):
        fn, differentiable = _proxy_fn(name, str(assets.scorer_path), decode, prompts)
        t0 = time.time()
        rows = ascend(z0, fn, measure, cfg, differentiable=differentiable)
        _print_table(name if differentiable else f"{name} (ES gradient)", rows, time.time() - t0, args.print_every)


if __name__ == "__main__":
    main()
