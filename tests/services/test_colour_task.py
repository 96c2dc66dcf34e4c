"""The colour task end to end at tiny settings: data, VAE scaling, generator and CFG, every scorer."""

import math

import pytest
import torch

from services.data.colour import (
    BACKGROUNDS,
    COLOURS,
    NULL_LABEL,
    SHAPES,
    all_prompts,
    colour_dataset,
    colour_prompt,
    parse_colour_prompt,
)
from services.rewards.colour import JpegScorer, colour_stats

pytestmark = pytest.mark.service


def test_dataset_is_deterministic_in_range_and_mid_toned():
    a, la = colour_dataset(64, seed=3)
    b, lb = colour_dataset(64, seed=3)
    c, _ = colour_dataset(64, seed=4)
    assert a.shape == (64, 3, 32, 32) and la.shape == (64, 3)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    stats = colour_stats((a + 1) / 2)
    assert 0.4 < float(stats["brightness"].mean()) < 0.6
    assert 0.05 < float(stats["saturation"].mean()) < 0.35


def test_prompts_round_trip_and_reject_others():
    for s in range(len(SHAPES)):
        for c in range(len(COLOURS)):
            for b in range(len(BACKGROUNDS)):
                assert parse_colour_prompt(colour_prompt(s, c, b)) == (s, c, b)
    assert len(set(all_prompts())) == 96
    assert parse_colour_prompt("a red circle on a dark striped background") == (0, 0, 3)
    assert parse_colour_prompt("") == NULL_LABEL
    with pytest.raises(ValueError, match="colour prompts look like"):
        parse_colour_prompt("a handwritten digit 3")


def test_colour_stats_on_known_images():
    grey = torch.full((2, 3, 8, 8), 0.5)
    s = colour_stats(grey)
    assert torch.allclose(s["saturation"], torch.zeros(2)) and torch.allclose(s["brightness"], torch.full((2,), 0.5))
    assert torch.allclose(s["contrast"], torch.zeros(2)) and torch.allclose(s["texture"], torch.zeros(2), atol=1e-7)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    assert float(colour_stats(red)["saturation"]) == pytest.approx(1.0)
    assert float(colour_stats(red)["brightness"]) == pytest.approx(0.299)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None]) % 2
    s = colour_stats(checker.float().expand(1, 3, 8, 8))
    assert float(s["contrast"]) > 0.4 and float(s["texture"]) > 0.3


def test_jpeg_reward_is_higher_for_noise_than_for_a_flat_image():
    flat = torch.full((1, 3, 32, 32), 0.4)
    noisy = (0.4 + 0.2 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    prompts = [""] * 2
    norm, raw = JpegScorer(), JpegScorer(raw=True)
    s = norm.score(torch.cat([flat, noisy]), prompts)
    assert s.shape == (2,) and s.dtype == torch.float32 and s[1] > s[0] + 0.3
    assert abs(float(s[0])) < 0.05
    kb = raw.score(torch.cat([flat, noisy]), prompts)
    assert 0.3 < float(kb[0]) < float(kb[1]) < 5.0  # kB, as DDPO's


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    from services.prepare_colour import prepare_colour

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("colour")
    return prepare_colour(
        vae_steps=3, pretrain_steps=3, scorer_steps=3, num_fake=16, cache_dir=root, log=lambda s: None
    )


def test_assets_are_built_on_one_thread_whatever_the_process_runs(tiny_assets):
    """The fixture's process runs two torch threads; the build pins one (services.models.cache.BUILD_THREADS: on
    two threads the colour base model differs) and restores the process's count after."""
    import json

    meta = json.loads((tiny_assets.model_path / "meta.json").read_text())
    assert meta["torch_threads"] == 1 and meta["v"] == 3
    assert torch.get_num_threads() == 2


def test_vae_normalisation_is_set_and_used(tiny_assets):
    from services.models.colour import load_colour_generator

    gen = load_colour_generator(tiny_assets.model_path)
    cfg = gen.vae.config
    assert all(map(lambda v: torch.isfinite(torch.tensor(v)), (cfg.shift_factor, cfg.scaling_factor)))
    assert cfg.scaling_factor != 1.0 and cfg.shift_factor != 0.0  # measured, not the defaults
    z = torch.randn(2, *gen.latent_shape)
    expected = gen.vae.decode(z / cfg.scaling_factor + cfg.shift_factor).sample
    assert torch.allclose(gen.decode(z), ((expected + 1) / 2).clamp(0, 1), atol=1e-6)


def test_generator_shapes_cfg_and_lora(tiny_assets):
    from services.models.colour import load_colour_generator
    from services.models.sampling import sample

    gen = load_colour_generator(tiny_assets.model_path, lora_rank=2)
    prompts = [all_prompts()[0], all_prompts()[50]]
    assert gen.latent_shape == (4, 8, 8) and gen.trainable_parameters()
    cond = gen.encode_prompts(prompts + [""])
    assert cond.tensors["prompt_embeds"].shape == (3, 4, 64) and cond.tensors["pooled"].shape == (3, 64)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = sample(gen, prompts, noise=noise, num_steps=2)
    guided = sample(gen, prompts, noise=noise, num_steps=2, guidance_scale=4.0)
    assert plain.images.shape == (2, 3, 32, 32) and 0 <= plain.images.min() and plain.images.max() <= 1
    assert plain.ratio.shape == (2, 2) and not torch.equal(plain.trajectory.x0, guided.trajectory.x0)
    with pytest.raises(ValueError, match="colour prompts"):
        gen.encode_prompts(["a photo of a cat"])


def test_every_scorer_is_registered_with_shape_and_range(tiny_assets):
    from services.prepare_colour import COLOUR_SCORERS, colour_scorers
    from services.rewards import available_scorers

    assert set(COLOUR_SCORERS) == {n for n in available_scorers() if n.startswith("colour_")}  # each one checked here
    scorers = colour_scorers(tiny_assets)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = all_prompts()[:3]
    ranges = {"colour_clip": (-1, 1), "colour_jpeg": (-0.2, 1.5), "colour_pref": (-1e4, 1e4)}  # pref: an open logit
    for name, scorer in scorers.items():
        s = scorer.score(images, prompts)
        lo, hi = ranges.get(name, (0, 1))
        assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all(), name
        assert lo <= float(s.min()) and float(s.max()) <= hi, (name, s)
        assert torch.equal(s, scorer.score(images, prompts)), name  # deterministic
    assert scorers["colour_judge"].features(images).shape == (3, 128)
    with pytest.raises(ValueError, match="must name a shape"):
        scorers["colour_judge"].score(images[:1], [""])


def test_a_colour_run_trains_and_evaluates_in_the_judges_features(tiny_assets, tmp_path):
    """The colour config end to end in one process: resolve the prepared assets, train 2 RL steps,
    evaluate the proxy, the judges and the colour-statistic gaps, FD in the judge's features."""
    from pathlib import Path

    from services.config import load_config
    from services.training.run import run_training

    root = Path(__file__).parents[2]
    over = [
        f"model.path={tiny_assets.model_path}",
        f"data.train_prompts={root / 'deploy/prompts/colour.txt'}",
        f"train.output_dir={tmp_path}",
        "train.run_name=colour-tiny",
        "train.steps=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.compare_baseline=false",
        "rollout.prompts_per_step=2",
        "rollout.group_size=4",
        "rollout.num_samplers=1",
        "rollout.num_steps=4",
        "resources.num_learners=1",
        "eval.num_prompts=2",
        "eval.samples_per_prompt=2",
        "eval.few_steps=2",
        "eval.full_steps=4",
    ]
    cfg = load_config(root / "deploy/configs/colour_nft.yaml", over)
    summary = run_training(cfg, local=True, progress=False)
    steps = [r for r in summary.history if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["normguard/ratio_mean"] > 0 for r in steps)
    for key in ("colour_clip", "colour_judge", "colour_saturation", "frechet", "norm_ratio"):
        assert math.isfinite(summary.after[f"eval/{key}_4steps"]), key
    assert 0 <= summary.after["eval_renorm/colour_judge_2steps"] <= 1  # the inference-time baseline too
