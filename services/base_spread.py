"""The base model's spread across evaluation seeds: where the positive control's margins come from.

A trained run is read against the base model on the same evaluation noise (its step-0 point). How much
would the base model's own figures move with another evaluation noise? This evaluates the base model
of a config's task exactly as a training run does (the config's ``eval`` section: its prompts, samples,
step counts and guidance; the training proxies and every evaluation scorer with their options) at
``--seeds`` evaluation seeds, ``EVAL_SEED + k`` (k = 0 is the seed every run uses), and prints per metric
the mean, the standard deviation over seeds and the margin ``--k`` x SD (docs/tasks/colour.md, the
positive control):

    python -m services.base_spread deploy/configs/colour_nft.yaml --seeds 5

``--extra`` adds scorers that the config does not train on (default: the colour proxies), so one run
gives the margins of every candidate proxy.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.config import ExperimentConfig
    from services.rewards.base import RewardScorer

__all__ = ["base_spread", "main"]


def _scorers(cfg: ExperimentConfig, scorer_path: str, extra: Sequence[str]) -> dict[str, RewardScorer]:
    from services.rewards import build_scorer

    specs = {s.name: s for s in (*cfg.reward.scorers, *cfg.reward.eval_scorers)}
    out = {
        name: build_scorer(name, path=s.path or scorer_path, options=s.options, impl=s.impl)
        for name, s in specs.items()
    }
    for name in extra:
        out.setdefault(name, build_scorer(name, path=scorer_path))
    return out


def base_spread(cfg: ExperimentConfig, *, seeds: int = 5, extra: Sequence[str] = ()) -> dict[str, list[float]]:
    """``eval/<metric>_<steps>steps`` -> its values over ``seeds`` evaluation seeds of the base model."""
    from pathlib import Path

    from services.config.families import require
    from services.data.colour import real_colour_images
    from services.evaluation import EVAL_SEED, EvalPlan, evaluate, in_process
    from services.models.colour import load_colour_generator
    from services.prepare import prepare_task

    require(cfg.model.kind, "colour", f"base_spread is built for the colour task; model.kind is {cfg.model.kind!r}")
    assets = prepare_task(cfg.model)
    gen = load_colour_generator(assets.model_path)
    scorers = _scorers(cfg, str(assets.scorer_path), extra)
    if cfg.data.train_prompts is None:
        raise ValueError("base_spread evaluates the config's data.train_prompts; the config names no file")
    prompts = [line.strip() for line in Path(cfg.data.train_prompts).read_text().splitlines() if line.strip()]
    ev = in_process(gen, scorers, judge="colour_judge", real_images=real_colour_images(1024, split="test"))
    values: dict[str, list[float]] = {}
    for k in range(seeds):
        plan = EvalPlan(
            prompts=tuple(prompts[: cfg.eval.num_prompts]),
            samples_per_prompt=cfg.eval.samples_per_prompt,
            steps=(cfg.eval.few_steps, cfg.eval.full_steps),
            scorers=tuple(scorers),
            guidance_scale=cfg.eval.guidance_scale,
            shift=cfg.rollout.shift,
            seed=EVAL_SEED + k,
        )
        for key, v in evaluate(plan, ev).metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                values.setdefault(key, []).append(float(v))
    return values


def main(argv: list[str] | None = None) -> None:
    from services.config import load_config

    ap = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--k", type=float, default=3.0, help="margin = k x the standard deviation over seeds")
    ap.add_argument("--extra", default="colour_clip,colour_pref,colour_jpeg")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    values = base_spread(cfg, seeds=args.seeds, extra=[e for e in args.extra.split(",") if e])
    print(f"base model, {args.seeds} evaluation seeds; margin = {args.k:g} x SD\n")
    print("| metric | mean | SD over seeds | margin | values |")
    print("|---|---|---|---|---|")
    for key in sorted(values):
        vals = values[key]
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
        shown = ", ".join(f"{v:.4g}" for v in vals)
        print(f"| {key} | {mean:.4g} | {sd:.3g} | {args.k * sd:.3g} | {shown} |")


if __name__ == "__main__":
    main()
