"""The colour task's assets: its VAE and generator (``services.models.colour``) and its scorers, cached.

``prepare_colour`` trains (or loads) the VAE, the generator and then the scorers: the CLIP proxy and the
attribute judge on real images, the realism detector on real images vs. base-model samples at 4 and
20 Euler steps (half at guidance 1, half at the task's default guidance 4), like the digits task's
``services.prepare.prepare_embedded``; then the preference proxy ``colour_pref``
(``services.rewards.colour_pref``, on preference pairs of real scenes), cached in its own directory
under the scorers' so that adding it left the scorers' cache valid. ``colour_preview`` writes sample grids and scores them through
the one evaluation path (``services.evaluation``) with the judge's features against held-out real data.

Measured (alone under the shared lock, 2 CPU cores, torch threads 2, default settings, cache version 2):
VAE 218 s, transformer 210 s, scorers 99 s (of which 1024 base samples 12 s), 8.8 min in all. The base
model, 96 prompts x 4 samples, 20 / 4 Euler steps, at guidance 4: judge 0.82 / 0.63 (real 0.94), proxy
colour_clip 0.150 / 0.104 (real 0.179), colour_jpeg 0.34 / 0.33 (real 0.45), realism 0.43 / 0.30 (real
scenes 0.51, their VAE reconstructions 0.58), Frechet distance in the judge's features 11.7 / 29.7. The
judge reads the colour of 77 % of the VAE's reconstructions of held-out scenes right (100 % of the scenes).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from normguard_core.seeding import FAKE_SAMPLES_STREAM, offset_seed
from services.data.colour import all_prompts, real_colour_images
from services.models.cache import BUILD_THREADS, pinned_threads
from services.models.colour import (
    DEFAULT_GUIDANCE,
    ColourGenerator,
    colour_cache_path,
    load_colour_generator,
    load_or_pretrain_colour,
)
from services.types import EmbeddedAssets

if TYPE_CHECKING:
    from services.rewards.base import RewardScorer

__all__ = ["COLOUR_SCORERS", "colour_preview", "colour_scorers", "prepare_colour"]

COLOUR_SCORERS = (
    "colour_clip",
    "colour_jpeg",
    "colour_pref",
    "colour_judge",
    "colour_realism",
    "colour_brightness",
    "colour_saturation",
    "colour_contrast",
    "colour_texture",
)
SCORER_VERSION = "r2"  # r2: the realism detector's real class is VAE reconstructions of real scenes
MEASURED_SECONDS = {"vae": 218.0, "transformer": 210.0, "scorers": 99.0}  # the run of the module docstring


def _base_samples(gen: ColourGenerator, *, num: int, seed: int) -> torch.Tensor:
    """``(num, 3, 32, 32)`` base-model samples in [-1, 1]: 4 / 20 steps x guidance 1 / default, shuffled."""
    from services.models.sampling import fixed_noise, sample

    prompts = all_prompts()
    settings = [(4, 1.0), (20, 1.0), (4, DEFAULT_GUIDANCE), (20, DEFAULT_GUIDANCE)]
    out = []
    for i, (steps, guidance) in enumerate(settings):
        part = [prompts[j % len(prompts)] for j in range(i, num, len(settings))]
        noise = fixed_noise(gen, len(part), offset_seed(seed, FAKE_SAMPLES_STREAM, i))  # as the digits' fakes
        images = sample(gen, part, noise=noise, num_steps=steps, guidance_scale=guidance, measure_ratio=False).images
        out.append(images * 2.0 - 1.0)
    fake = torch.cat(out)
    return fake[torch.randperm(len(fake), generator=torch.Generator().manual_seed(seed))]


def _vae_round_trip(gen: ColourGenerator) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> decode(encode(x))`` through the generator's VAE, in [-1, 1], batched, no grad."""
    from services.models.colour_vae import decode_latents, encode_images

    @torch.no_grad()
    def round_trip(images: torch.Tensor) -> torch.Tensor:
        parts = [decode_latents(gen.vae, encode_images(gen.vae, p)).clamp(-1, 1) for p in images.split(256)]
        return torch.cat(parts)

    return round_trip


# ``duplicates`` pairs this with prepare.prepare_embedded: the two embedded tasks share the outline (keyword
# settings, the generator cached, its scorers trained if missing) and no step (each trains its own models)
def prepare_colour(
    *,
    vae_steps: int = 800,
    pretrain_steps: int = 1200,
    scorer_steps: int = 400,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    num_fake: int = 1024,
    log: Callable[[str], None] = print,
) -> EmbeddedAssets:
    """Train / load the colour VAE + generator and its scorers (both cached; the scorers under ``scorers/``), built
    on ``BUILD_THREADS`` torch threads whatever the machine (``services.models.cache``: the same base model on any
    core count)."""
    with pinned_threads(BUILD_THREADS):
        return _prepare_colour(vae_steps, pretrain_steps, scorer_steps, seed, cache_dir, num_fake, log)


def _prepare_colour(
    vae_steps: int,
    pretrain_steps: int,
    scorer_steps: int,
    seed: int,
    cache_dir: str | Path | None,
    num_fake: int,
    log: Callable[[str], None],
) -> EmbeddedAssets:
    import time

    from services.assets import restore_committed
    from services.rewards.colour_pref import build_colour_pref
    from services.rewards.colour_training import train_colour_scorers

    restore_committed(colour_cache_path(vae_steps=vae_steps, steps=pretrain_steps, seed=seed, cache_dir=cache_dir), log)
    model_path = load_or_pretrain_colour(
        vae_steps=vae_steps, steps=pretrain_steps, seed=seed, cache_dir=cache_dir, log=log
    )
    scorer_path = model_path / f"scorers-{scorer_steps}-{num_fake}-{SCORER_VERSION}"
    if not (scorer_path / "meta.json").is_file():
        log("training the colour scorers (CLIP proxy, judge, realism detector) ...")
        t0 = time.time()
        gen = load_colour_generator(model_path)
        fake = _base_samples(gen, num=num_fake, seed=seed)
        log(f"  {num_fake} base-model samples ({time.time() - t0:.0f} s)")
        train_colour_scorers(
            scorer_path, fake_images=fake, reconstruct=_vae_round_trip(gen), seed=seed, steps=scorer_steps, log=log
        )
        log(f"  scorers done ({time.time() - t0:.0f} s)")
    build_colour_pref(scorer_path, steps=scorer_steps, seed=seed, log=log)  # the preference proxy, issue #36
    return EmbeddedAssets(model_path=model_path, scorer_path=scorer_path)


def colour_scorers(assets: EmbeddedAssets, device: str = "cpu") -> dict[str, RewardScorer]:
    """Every colour scorer by name (the proxies, the judges and the statistics)."""
    from services.rewards import build_scorer

    return {name: build_scorer(name, path=str(assets.scorer_path), device=device) for name in COLOUR_SCORERS}


def colour_preview(
    assets: EmbeddedAssets,
    out_dir: str | Path,
    *,
    steps: tuple[int, ...] = (4, 20),
    guidance_scale: float = DEFAULT_GUIDANCE,
    samples_per_prompt: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Write ``colour_{n}steps.png`` (24 of the 96 prompts, two per row) and return the eval metrics of all 96."""
    from services.evaluation import EvalPlan, evaluate, in_process
    from services.report import save_image_grid

    gen = load_colour_generator(assets.model_path)
    scorers = colour_scorers(assets)
    plan = EvalPlan(
        prompts=tuple(all_prompts()),
        samples_per_prompt=samples_per_prompt,
        steps=steps,
        scorers=tuple(scorers),
        guidance_scale=guidance_scale,
        seed=1234,
    )
    real = real_colour_images(1024, split="test")
    res = evaluate(plan, in_process(gen, scorers, judge="colour_judge", real_images=real))
    out_dir = Path(out_dir)
    for n, images in res.images.items():
        picked = [k * 4 + k % 4 for k in range(24)]  # every shape x colour, the backgrounds in turn
        rows = torch.cat([images[p * samples_per_prompt : (p + 1) * samples_per_prompt] for p in picked])
        log(f"wrote {save_image_grid(rows, out_dir / f'colour_{n}steps.png', nrow=samples_per_prompt * 2)}")
    return res.metrics
