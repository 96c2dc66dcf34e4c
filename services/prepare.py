"""The embedded default's assets: the pretrained digits generator and its scorers, cached.

``normguard prepare`` pretrains (or loads) the generator, trains the reward proxy and the
independent judges (the realism detector on real digits vs. base-model samples), and writes a
PNG grid of digits at few and full steps with their scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from normguard_core.seeding import FAKE_SAMPLES_STREAM, offset_seed
from services.config import ExperimentConfig, ModelConfig
from services.config.families import EMBEDDED_KINDS, spec
from services.data.digits import digit_prompt, digits_dataset, split_indices
from services.models.digits import load_digits_generator, load_or_pretrain_digits
from services.rewards import RewardScorer, build_scorer
from services.types import EmbeddedAssets

__all__ = ["EmbeddedAssets", "EmbeddedTask", "embedded_task", "prepare_embedded", "real_test_images"]


def real_test_images(resolution: int = 16) -> torch.Tensor:
    """Held-out real digits as ``(N, 3, R, R)`` images in [0, 1] (for the Frechet distance)."""
    x, y = digits_dataset(resolution)
    _, te = split_indices(len(y))
    return ((x[te] + 1) / 2).repeat(1, 3, 1, 1)


def prepare_embedded(
    *,
    resolution: int = 16,
    pretrain_steps: int = 600,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    num_fake: int = 1200,
    log: Callable[[str], None] = print,
) -> EmbeddedAssets:
    """Pretrain / load the digits generator and train / load its scorers (both cached)."""
    from services.models.sampling import fixed_noise, sample
    from services.rewards.digits import train_digit_scorers

    model_path = load_or_pretrain_digits(
        resolution=resolution, steps=pretrain_steps, seed=seed, cache_dir=cache_dir, log=log
    )
    scorer_path = model_path / "scorers"
    if not (scorer_path / "meta.json").is_file():
        log("training the digit scorers (proxy classifier, judge, realism detector) ...")
        gen = load_digits_generator(model_path)
        prompts = [digit_prompt(i % 10) for i in range(num_fake)]
        fakes = []
        for i, steps in enumerate((4, 20)):  # the detector sees both few- and full-step samples
            half = prompts[i::2]
            noise = fixed_noise(gen, len(half), offset_seed(seed, FAKE_SAMPLES_STREAM, i))
            fakes.append(
                sample(gen, half, noise=noise, num_steps=steps, measure_ratio=False).trajectory.x0.clamp(-1, 1)
            )
        fake = torch.cat(fakes)[torch.randperm(num_fake, generator=torch.Generator().manual_seed(seed))]
        train_digit_scorers(scorer_path, fake_images=fake, resolution=resolution, seed=seed, log=log)
    return EmbeddedAssets(model_path=model_path, scorer_path=scorer_path)


def embedded_scorers(assets: EmbeddedAssets, device: str = "cpu") -> dict[str, RewardScorer]:
    """The proxy and the independent judges of the embedded default, by name."""
    return {
        name: build_scorer(name, path=str(assets.scorer_path), device=device)
        for name in ("digits_classifier", "digits_judge", "digits_realism")
    }


def preview(
    assets: EmbeddedAssets,
    out_dir: str | Path,
    *,
    steps: tuple[int, ...] = (4, 20),
    guidance_scale: float = 1.0,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Write ``digits_{n}steps.png`` grids (one row per digit) and print their scores."""
    from services.evaluation import EvalPlan, evaluate, in_process
    from services.report import format_table, save_image_grid, split_eval_key

    gen = load_digits_generator(assets.model_path)
    scorers = embedded_scorers(assets)
    plan = EvalPlan(
        prompts=tuple(digit_prompt(d) for d in range(10)),
        samples_per_prompt=8,
        steps=steps,
        scorers=tuple(scorers),
        guidance_scale=guidance_scale,
        seed=1234,
    )
    res = evaluate(plan, in_process(gen, scorers, judge="digits_judge", real_images=real_test_images(gen.resolution)))
    out_dir = Path(out_dir)
    for n, images in res.images.items():
        path = save_image_grid(images, out_dir / f"digits_{n}steps.png", nrow=8, row_labels=[str(d) for d in range(10)])
        log(f"wrote {path}")
    rows = [
        {
            "steps": n,
            **{
                sk[0].removeprefix("eval/"): v
                for k, v in res.metrics.items()
                if (sk := split_eval_key(k)) and sk[1] == n
            },
        }
        for n in steps
    ]
    log(format_table(rows))
    return res.metrics


def prepare_and_preview(cfg: ExperimentConfig, out: str | None = None) -> EmbeddedAssets:
    """``normguard prepare``: build (or load) the embedded generator and scorers of ``cfg.model``, and
    write the task's preview grids to ``out`` (default: beside the runs; digits: guidance 1, the RL setting,
    and 3)."""
    return embedded_task(cfg.model.kind).preview(cfg, out or str(cfg.run_dir.parent / "preview"))


def _digits_preview(cfg: ExperimentConfig, out: str) -> EmbeddedAssets:
    m = cfg.model
    assets = prepare_embedded(resolution=m.resolution, pretrain_steps=m.pretrain_steps, cache_dir=m.cache_dir)
    print(f"generator: {assets.model_path}\nscorers:   {assets.scorer_path}")
    print("\nguidance 1.0 (the RL setting):")
    preview(assets, out, steps=(cfg.eval.few_steps, cfg.eval.full_steps), guidance_scale=1.0)
    print("\nguidance 3.0:")
    preview(assets, Path(out) / "cfg3", steps=(cfg.eval.full_steps,), guidance_scale=3.0)
    return assets


def _colour_preview(cfg: ExperimentConfig, out: str) -> EmbeddedAssets:
    from services.prepare_colour import colour_preview

    assets = prepare_task(cfg.model)
    print(f"generator: {assets.model_path}\nscorers:   {assets.scorer_path}")
    colour_preview(assets, out, steps=(cfg.eval.few_steps, cfg.eval.full_steps), guidance_scale=cfg.eval.guidance_scale)
    return assets


@dataclass(frozen=True)
class ResolvedModel:
    """Where a generator loads from, and (the embedded default) its scorers' directory."""

    path: str
    scorer_dir: str | None = None


def resolve_model(model_cfg: ModelConfig, *, log: Callable[[str], None] = print) -> ResolvedModel:
    """The one model-path resolver (training, serving, export): SD3 / FLUX load from ``model.path``; the
    embedded digits default is pretrained once and cached with its scorers (``prepare_embedded``),
    unless ``model.path`` names a prepared directory."""
    if not spec(model_cfg.kind).embedded:
        assert model_cfg.path, "ModelConfig._needs_path requires model.path for a non-embedded kind"
        return ResolvedModel(model_cfg.path)
    if model_cfg.path:
        # digits keeps its scorers in scorers/, colour in scorers-<steps>-<fakes>/
        found = sorted(p.parent for p in Path(model_cfg.path).glob("scorers*/meta.json"))
        return ResolvedModel(model_cfg.path, str(found[0]) if found else None)
    assets = prepare_task(model_cfg, log=log)
    return ResolvedModel(str(assets.model_path), str(assets.scorer_path))


def prepare_task(model_cfg: ModelConfig, *, log: Callable[[str], None] = print) -> EmbeddedAssets:
    """The embedded task's generator and scorers, built once and cached: digits (``prepare_embedded``) or
    colour (``services.prepare_colour.prepare_colour``, its transformer trained ``model.pretrain_steps``)."""
    return embedded_task(model_cfg.kind).prepare(model_cfg, log)


def _prepare_digits(m: ModelConfig, log: Callable[[str], None]) -> EmbeddedAssets:
    return prepare_embedded(resolution=m.resolution, pretrain_steps=m.pretrain_steps, cache_dir=m.cache_dir, log=log)


def _prepare_colour(m: ModelConfig, log: Callable[[str], None]) -> EmbeddedAssets:
    from services.prepare_colour import prepare_colour

    return prepare_colour(pretrain_steps=m.pretrain_steps, cache_dir=m.cache_dir, log=log)


def _real_colour_images(resolution: int) -> torch.Tensor:
    """1024 held-out scenes (the colour task's own resolution)."""
    from services.data.colour import real_colour_images

    return real_colour_images(1024, split="test")


@dataclass(frozen=True)
class EmbeddedTask:
    """The assets half of an embedded family (``FamilySpec.embedded``), in the layer above the generators and
    scorers it builds: ``prepare`` (generator and scorers, cached), ``preview`` (``normguard prepare``'s grids),
    ``real_images`` (the held-out images its judge's features are compared with, by resolution)."""

    kind: str
    prepare: Callable[[ModelConfig, Callable[[str], None]], EmbeddedAssets]
    preview: Callable[[ExperimentConfig, str], EmbeddedAssets]
    real_images: Callable[[int], torch.Tensor]


EMBEDDED_TASKS = {
    t.kind: t
    for t in (
        EmbeddedTask("digits", _prepare_digits, _digits_preview, real_test_images),
        EmbeddedTask("colour", _prepare_colour, _colour_preview, _real_colour_images),
    )
}
if set(EMBEDDED_TASKS) != EMBEDDED_KINDS:
    raise ImportError(f"embedded tasks {sorted(EMBEDDED_TASKS)} are not the embedded families {sorted(EMBEDDED_KINDS)}")


def embedded_task(kind: str) -> EmbeddedTask:
    """The embedded task of ``model.kind``; ``TypeError`` for a family loaded from ``model.path``."""
    if not spec(kind).embedded:
        raise TypeError(f"model.kind={kind!r} loads from model.path; `prepare` builds the embedded tasks")
    return EMBEDDED_TASKS[kind]
