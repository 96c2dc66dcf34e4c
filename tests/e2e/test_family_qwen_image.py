"""Qwen-Image (``model.kind: qwen_image``) against the stock ``QwenImagePipeline``, on a tiny random pipeline that
carries the published scheduler config (``deploy/architectures/qwen-image``: dynamic ``mu`` up to 8192 tokens,
``shift_terminal`` 0.02, exponential time shift; ``tests/tiny_qwen_image.py``).

* our sampler's latents equal the stock pipeline's for the same noise, without guidance and with true CFG
  (``true_cfg_scale`` 4 and the null prompt as the negative: the norm-rescaled combination), on one prompt and
  on a batch of two prompts of different lengths (the per-batch padding and mask);
* the prompt table (``model.prompt_embeddings: once``) gives the conditions the generator encodes itself.

The two-step training run, serving and export of a tiny Qwen-Image are in ``test_real_model_path.py``'s
parametrised test.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_qwen_image  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SEED, PROMPTS = 7, ["a photo of a cat", "a bowl of ramen at dusk"]  # 5 and 6 tokens: padded, masked


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from diffusers import QwenImagePipeline

    from services.config import ModelConfig
    from services.models import build_generator

    path = tiny_qwen_image.save_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "qwen-image")
    gen = build_generator(ModelConfig(kind="qwen_image", path=str(path), resolution=64))
    pipe = QwenImagePipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return path, gen, pipe


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("batch", [1, 2])
def test_sampler_equals_stock_pipeline_with_the_published_scheduler(tiny, guidance, batch):
    """At 64 px the packed latent is 64 tokens (mu = 0.490: below the base 0.5, fewer tokens than the base 256);
    the grid ends at 0.02 then 0. The stock pipeline runs CFG only with a negative prompt: ours is ``""``."""
    from services.models.sampling import sample

    _, gen, pipe = tiny
    prompts = PROMPTS[:batch]
    steps = 4
    noise = torch.randn(batch, *gen.latent_shape, generator=torch.Generator().manual_seed(SEED))
    ours = sample(gen, prompts, noise=noise, num_steps=steps, guidance_scale=guidance, measure_ratio=False)
    stock = pipe(
        prompts,
        negative_prompt=[""] * batch if guidance > 1 else None,
        true_cfg_scale=guidance,
        num_inference_steps=steps,
        latents=noise.clone(),
        max_sequence_length=gen.max_sequence_length,
        height=64,
        width=64,
        output_type="latent",
    ).images
    assert torch.equal(ours.trajectory.sigmas, pipe.scheduler.sigmas)
    assert ours.trajectory.sigmas[-2].item() == pytest.approx(0.02)
    torch.testing.assert_close(ours.trajectory.x0, stock, rtol=1e-5, atol=1e-6)
    if guidance > 1:  # not vacuous: the guidance moves the latents
        plain = sample(gen, prompts, noise=noise, num_steps=steps, measure_ratio=False).trajectory.x0
        assert (plain - stock).abs().max() > 1e-3


def test_decode_equals_the_stock_pipeline(tiny):
    _, gen, pipe = tiny
    noise = torch.randn(1, *gen.latent_shape, generator=torch.Generator().manual_seed(SEED))
    stock = pipe(PROMPTS[0], num_inference_steps=2, latents=noise.clone(), height=64, width=64, output_type="pt")
    from services.models.sampling import sample

    ours = sample(gen, PROMPTS[:1], noise=noise, num_steps=2, measure_ratio=False)
    torch.testing.assert_close(ours.images, stock.images, rtol=1e-5, atol=1e-5)


def test_the_prompt_table_gives_the_generators_own_conditions(tiny, tmp_path):
    from services.config import ModelConfig
    from services.models import build_generator
    from services.models.pipelines import encode_prompt_file

    path, gen, _ = tiny
    cfg = ModelConfig(kind="qwen_image", path=str(path), resolution=64)
    table = encode_prompt_file(cfg, str(path), ["", *PROMPTS], tmp_path / "t.safetensors")
    looked_up = build_generator(cfg, prompt_embeddings=table)
    assert looked_up.pipe.text_encoder is None
    for prompts in (PROMPTS, [""]):
        own, got = gen.encode_prompts(prompts).tensors, looked_up.encode_prompts(prompts).tensors
        assert set(own) == set(got) == {"prompt_embeds", "prompt_embeds_mask"}
        assert got["prompt_embeds"].shape == (len(prompts), cfg.max_sequence_length, 32)
        torch.testing.assert_close(got["prompt_embeds"], own["prompt_embeds"], rtol=1e-5, atol=1e-6)
        assert torch.equal(got["prompt_embeds_mask"], own["prompt_embeds_mask"])
