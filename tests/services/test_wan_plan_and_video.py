"""The Wan family's data, plan and video plumbing, without sampling (``tests/e2e/test_family_wan.py`` samples).

* The plan's counts are the published configs' on the meta device (``benchmarks/meta_families.py`` builds them);
  Flow-Factory's Wan LoRA targets resolve there and on the tiny pipeline (``tests/tiny_wan.py``).
* ``deploy/configs/wan21_t2v_14b_nft.yaml`` (Flow-Factory's recipe: 256 px, 5 frames, group 16) fits one
  8 x 80 GB node by ``normguard plan``, and the plan's activations grow with the frames.
* A video reward is the mean of the per-frame scores unless the scorer takes clips; serving encodes a video as an
  animated PNG of every frame; evaluation grids lay a video's frames side by side.
"""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import meta_families as mf
from services.config import load_config
from services.config.families import LORA_DEFAULTS, VARIANTS, spec

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_wan  # noqa: E402

pytestmark = pytest.mark.service
ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "deploy" / "configs" / "wan21_t2v_14b_nft.yaml"


@pytest.mark.parametrize("name", ["wan2.1-t2v-14b", "wan2.1-t2v-1.3b"])
def test_plan_counts_are_the_published_configs_on_meta(name):
    model = mf.build(name)
    assert mf.parameters(model) == VARIANTS[name].transformer_params
    matched = mf.matched(model, LORA_DEFAULTS["wan"].targets)
    assert all(matched.values()), {t for t, m in matched.items() if not m}  # every Flow-Factory target resolves
    assert mf.lora_per_rank(model, LORA_DEFAULTS["wan"].targets) == VARIANTS[name].lora_per_rank


def test_the_wan22_plan_variant_holds_both_experts():
    model = mf.build("wan2.2-t2v-a14b")  # one expert's published config
    v = spec("wan").variant("/mnt/checkpoints/models/Wan2.2-T2V-A14B-Diffusers")
    assert v.name == "wan2.2-t2v-a14b" and v.transformer_params == 2 * mf.parameters(model)
    assert v.lora_per_rank == 2 * mf.lora_per_rank(model, LORA_DEFAULTS["wan"].targets)


def test_family_facts():
    wan = spec("wan")
    assert wan.variant("/models/Wan2.1-T2V-1.3B-Diffusers").name == "wan2.1-t2v-1.3b"
    assert wan.variant("/mnt/checkpoints/models/wan2.1-t2v-14b").name == "wan2.1-t2v-14b"
    assert [wan.latent_frames(n) for n in (None, 1, 5, 81)] == [2, 1, 2, 21]
    assert wan.text_tokens(512) == 512 and LORA_DEFAULTS["wan"].rank == 64
    assert spec("sd3").latent_frames(None) == 1


def test_lora_targets_resolve_on_the_tiny_pipeline(tmp_path):
    from services.config import ModelConfig
    from services.models import build_generator

    path = tiny_wan.save_tiny_wan(tmp_path / "wan")
    gen = build_generator(ModelConfig(kind="wan", path=str(path), resolution=32, lora_rank=4))
    adapted = {
        n.removesuffix(".lora_A.default") for n, _ in gen.transformer.named_modules() if n.endswith("lora_A.default")
    }
    for t in LORA_DEFAULTS["wan"].targets:
        assert any(a.endswith("." + t) for a in adapted), t


def test_the_deploy_config_fits_one_8_gpu_node_at_the_sources_recipe():
    from services.cluster.plan import nodes_from_file, plan_run, run_demand

    cfg = load_config(CONFIG, [])
    m, r = cfg.model, cfg.rollout
    assert (m.resolution, m.num_frames, r.group_size, m.lora_rank, m.lora_alpha) == (256, 5, 16, 64, 128)
    plan = plan_run(run_demand(cfg), nodes_from_file(ROOT / "deploy" / "clusters" / "one_8gpu_node.yaml"))
    assert plan.ok and not plan.warnings, (plan.unplaced, plan.warnings)


def test_the_plans_activations_grow_with_the_frames():
    from services.cluster.memory import rollout_terms, training_terms

    five, nine = load_config(CONFIG, []), load_config(CONFIG, ["model.num_frames=9"])
    fam = spec("wan").variant(five.model.path).name
    saved5, saved9 = training_terms(five, fam)[0].gb, training_terms(nine, fam)[0].gb
    assert saved5 < saved9 <= 1.5 * saved5  # 768 video tokens, not 512; the text-side parts do not grow
    assert rollout_terms(nine, fam, 8)[1].gb > rollout_terms(five, fam, 8)[1].gb  # decode and the frames kept


class _Mean:
    name = "mean"

    def score(self, images, prompts):
        assert images.ndim == 4
        return images.mean(dim=(1, 2, 3))


class _Clip(_Mean):
    takes_clips = True

    def score(self, images, prompts):
        assert images.ndim == 5
        return images[:, -1].mean(dim=(1, 2, 3))


def test_video_rewards_average_the_frames_unless_the_scorer_takes_clips():
    from services.training.scoring import ScorerWorker

    worker = ScorerWorker({}, score_batch=1)
    worker.scorers, worker._takes_metadata = {"mean": _Mean(), "clip": _Clip()}, {"mean": False, "clip": False}
    videos = torch.rand(3, 5, 3, 8, 8)
    out = worker.score(videos, ["a", "b", "c"])
    torch.testing.assert_close(out["mean"], videos.mean(dim=(1, 2, 3, 4)))
    torch.testing.assert_close(out["clip"], videos[:, -1].mean(dim=(1, 2, 3)))


def test_a_served_video_is_an_animated_png_of_every_frame_and_an_image_is_unchanged():
    import numpy as np
    from PIL import Image, ImageSequence

    from services.serving.generator import _png_b64

    video = torch.rand(5, 3, 8, 8)
    im = Image.open(io.BytesIO(base64.b64decode(_png_b64(video))))
    frames = np.stack([np.array(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    assert im.format == "PNG" and frames.shape == (5, 8, 8, 3)
    assert np.array_equal(frames, (video.permute(0, 2, 3, 1) * 255).round().byte().numpy())
    still = Image.open(io.BytesIO(base64.b64decode(_png_b64(video[0]))))
    assert getattr(still, "n_frames", 1) == 1


def test_a_video_grid_lays_the_frames_side_by_side():
    from services.report import grid_tensor

    videos = torch.rand(2, 5, 3, 64, 64)
    assert torch.equal(grid_tensor(videos, nrow=1, pad=0), grid_tensor(videos.flatten(0, 1), nrow=5, pad=0))


def test_the_model_card_loads_the_lora_into_the_stock_wan_pipeline_and_asks_for_frames():
    from services.config import ExperimentConfig
    from services.serving.export import _usage

    cfg = ExperimentConfig(model={"kind": "wan", "path": "base/dir", "lora_rank": 4, "resolution": 256})
    assert _usage(cfg, "base/dir") == (
        'pipe = WanPipeline.from_pretrained("base/dir")\npipe.load_lora_weights("<this directory>")\n'
        "video = pipe(prompt, height=256, width=256, num_frames=5, max_sequence_length=128).frames[0]  # as trained"
    )
