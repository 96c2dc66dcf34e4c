"""Issue #37's four new families: the published transformers built on the meta device (``benchmarks/meta_families.py``).

Each ``deploy/architectures/<model>/transformer_config.json`` is built with the installed diffusers class
under ``torch.device("meta")`` (no storage; ~12 s for all eight on the shared 2-core machine) and checked:

* its parameter count is the published size at the precision the publisher states it (Qwen-Image "20B",
  FLUX.2 [dev] "32B", FLUX.2 [klein] "4B" / "9B", Z-Image "6B", Wan 14B); the exact counts are pinned so a
  change of the config or of diffusers shows up. Qwen-Image's 20,430,401,088 is also the figure a
  third-party analysis derives from the published bf16 shard sizes (docs/wip/families.md). Wan2.1's
  "1.3B" is nominal: the published config builds 1.419 B (the 4096 -> 1536 text embedder and the
  cross-attention are in it), so that one is checked to 10 %;
* the LoRA targets of X-GenGroup/Flow-Factory's ``default_target_modules`` resolve in the diffusers class,
  except the two that do not exist there (Qwen-Image ``img_mlp.net.2.proj`` / ``txt_mlp.net.2.proj``: the
  second FFN Linear is ``net.2`` itself; verl-omni's list names it ``img_mlp.net.2``), and FLUX.2's
  ``attn.to_out.0`` does not reach the single-stream blocks' output projection (``attn.to_out``, a bare
  Linear), so those blocks get only ``to_qkv_mlp_proj`` adapted;
* the activation shapes a memory plan needs (width, blocks, heads, image tokens at the recipe's resolution);
* two grid facts of the published scheduler configs a sampler must reproduce (Qwen-Image's ``shift_terminal``,
  Wan's integer UniPC timesteps and the expert boundary).
"""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from benchmarks import meta_families as mf

pytestmark = pytest.mark.service

# (exact count on meta, published headline in parameters, tolerance of the headline)
PUBLISHED = {
    "qwen-image": (20_430_401_088, 20e9, 0.5e9),
    "flux2-dev": (32_223_281_152, 32e9, 0.5e9),
    "flux2-klein-4b": (3_875_544_576, 4e9, 0.5e9),
    "flux2-klein-9b": (9_078_581_248, 9e9, 0.5e9),
    "z-image": (6_154_908_736, 6e9, 0.5e9),
    "wan2.1-t2v-14b": (14_288_491_584, 14e9, 0.5e9),
    "wan2.1-t2v-1.3b": (1_418_996_800, 1.3e9, 0.13e9),
    "wan2.2-t2v-a14b": (14_288_491_584, 14e9, 0.5e9),  # per expert; the pipeline loads two
}
# LoRA parameters per unit of rank over the Flow-Factory targets that resolve (in + out of each Linear).
LORA_PER_RANK = {
    "qwen-image": 4_792_320,
    "flux2-dev": 4_816_896,
    "flux2-klein-4b": 1_198_080,
    "flux2-klein-9b": 2_228_224,
    "z-image": 2_480_640,
    "wan2.1-t2v-14b": 4_792_320,
    "wan2.1-t2v-1.3b": 1_367_040,
    "wan2.2-t2v-a14b": 4_792_320,
}
DEAD_TARGETS = {"qwen-image": {"img_mlp.net.2.proj", "txt_mlp.net.2.proj"}}
# (hidden, blocks, heads, image tokens at the Flow-Factory examples/grpo/lora recipe's resolution and frames)
SHAPES = {
    "qwen-image": (3072, 60, 24, 1024),  # 512 px
    "flux2-dev": (6144, 56, 48, 1024),  # 512 px, 8 double + 48 single
    "flux2-klein-4b": (3072, 25, 24, 576),  # 384 px, 5 + 20
    "flux2-klein-9b": (4096, 32, 32, 576),  # 384 px, 8 + 24
    "z-image": (3840, 34, 30, 1024),  # 512 px, 30 main + 2 noise + 2 context refiners
    "wan2.1-t2v-14b": (5120, 40, 40, 512),  # 256 px, 5 frames -> 2 latent frames
    "wan2.1-t2v-1.3b": (1536, 30, 12, 512),
    "wan2.2-t2v-a14b": (5120, 40, 40, 1800),  # 480 px, 5 frames
}


@pytest.fixture(scope="module")
def built():
    return {m.name: mf.build(m.name) for m in mf.MODELS}


def test_every_model_is_covered():
    assert set(PUBLISHED) == set(LORA_PER_RANK) == set(SHAPES) == set(mf.BY_NAME)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_is_the_published_size(built, name):
    exact, headline, tol = PUBLISHED[name]
    tr = built[name]
    assert all(p.device.type == "meta" for p in tr.parameters())
    n = mf.parameters(tr)
    assert n == exact
    assert abs(n - headline) <= tol


@pytest.mark.parametrize("name", sorted(LORA_PER_RANK))
def test_flow_factory_lora_targets_resolve(built, name):
    tr = built[name]
    hits = mf.matched(tr, mf.BY_NAME[name].targets)
    dead = {t for t, mods in hits.items() if not mods}
    assert dead == DEAD_TARGETS.get(name, set())
    assert mf.lora_per_rank(tr, mf.BY_NAME[name].targets) == LORA_PER_RANK[name]


def test_flux2_single_blocks_adapt_only_the_fused_projection(built):
    tr = built["flux2-klein-4b"]
    hits = mf.matched(tr, mf.BY_NAME["flux2-klein-4b"].targets)
    single = {n for mods in hits.values() for n in mods if n.startswith("single_transformer_blocks.")}
    assert single == {f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj" for i in range(20)}
    assert isinstance(tr.single_transformer_blocks[0].attn.to_out, torch.nn.Linear)


def test_qwen_image_second_ffn_linear_is_net_2(built):
    block = built["qwen-image"].transformer_blocks[0]
    assert isinstance(block.img_mlp.net[2], torch.nn.Linear)
    assert not hasattr(block.img_mlp.net[2], "proj")


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_activation_shapes(built, name):
    s = mf.shapes(name, built[name])
    assert (s["hidden"], s["blocks"], s["heads"], s["image_tokens"]) == SHAPES[name]


def test_qwen_image_grid_ends_at_shift_terminal():
    """Qwen-Image's published scheduler stretches the shifted grid so that its last non-zero sigma is 0.02."""
    c = json.loads((mf.ARCH / "qwen-image" / "scheduler_config.json").read_text())
    s = FlowMatchEulerDiscreteScheduler.from_config(c)
    mu = calculate_shift(1024, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10), mu=mu)
    assert s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0
    assert abs(float(s.sigmas[-2]) - 0.02) < 1e-6


def test_wan22_grid_is_integer_and_hits_the_boundary():
    """UniPC's flow grid: int64 timesteps (truncated sigma * 1000), a first sigma of 1 - 1e-6, and at the published
    shift 3 / 10 steps a timestep exactly at the 0.875 boundary, which WanPipeline gives the high-noise expert."""
    c = json.loads((mf.ARCH / "wan2.2-t2v-a14b" / "scheduler_config.json").read_text())
    s = UniPCMultistepScheduler.from_config(c)
    s.set_timesteps(10)
    assert s.timesteps.dtype == torch.int64
    assert s.timesteps[0] == 999 and float(s.sigmas[0]) < 1.0
    assert 875 in s.timesteps.tolist()
    assert (s.timesteps == (s.sigmas[:-1].double() * 1000).floor().long()).all()
