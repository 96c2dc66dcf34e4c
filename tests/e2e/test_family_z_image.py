"""Z-Image (``model.kind: z_image``) against the stock ``ZImagePipeline`` of diffusers 0.42.1, on a tiny random
pipeline (``tests/tiny_z_image.py``) carrying Z-Image-Turbo's published scheduler config
(``deploy/architectures/z-image/scheduler_config.json``: static shift 3).

* The sampler's latents equal the stock pipeline's bit for bit (fp32, CPU) for a batch of two prompts: without
  CFG (NormGuard's ``guidance_scale`` 1 = the pipeline's 0) at 4 and 10 steps, with CFG (w = 3: the pipeline's
  ``pos + 2 (pos - neg)``, one batched call), and with the pipeline's ``cfg_truncation`` and
  ``cfg_normalization``, which are checked to change the result (not a vacuous match).
* Prompts looked up in the run's table (``model.prompt_embeddings: once``) give the condition encoded on the fly.

The two-step training run through Ray, serving and export are ``tests/e2e/test_real_model_path.py``'s
parametrised test (``z_image``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_models  # noqa: E402
import tiny_z_image  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PROMPTS, SEED, RES = ["a photo of a cat", "a dog"], 7, 64


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from diffusers import ZImagePipeline

    from services.config import ModelConfig
    from services.models import build_generator

    path = tiny_z_image.save_tiny_z_image(
        tmp_path_factory.mktemp("z_image") / "pipe", tiny_models.published_config("z-image", "scheduler")
    )
    pipe = ZImagePipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return path, build_generator(ModelConfig(kind="z_image", path=str(path), resolution=RES)), pipe


def _both(gen, pipe, steps: int, w: float, truncation: float = 1.0, normalization: float = 0.0):
    """``(ours, stock)`` final latents from the same noise."""
    from services.models.sampling import sample

    gen.cfg_truncation, gen.cfg_normalization = truncation, normalization
    noise = torch.randn(len(PROMPTS), *gen.latent_shape, generator=torch.Generator().manual_seed(SEED))
    ours = sample(gen, PROMPTS, noise=noise, num_steps=steps, guidance_scale=w, measure_ratio=False).trajectory
    stock = pipe(
        list(PROMPTS),
        num_inference_steps=steps,
        guidance_scale=w - 1.0,  # ZImagePipeline's s in pos + s (pos - neg)
        cfg_truncation=truncation,
        cfg_normalization=normalization,
        latents=noise.clone(),
        max_sequence_length=gen.max_sequence_length,
        height=RES,
        width=RES,
        output_type="latent",
    ).images
    assert torch.equal(ours.sigmas, pipe.scheduler.sigmas)  # the grid: torch.linspace(1, 1/N, N), shift 3
    return ours.x0, stock


@pytest.mark.parametrize(("steps", "w"), [(4, 1.0), (10, 1.0), (4, 3.0)])
def test_sampler_equals_stock_pipeline_with_the_published_scheduler(published, steps, w):
    _, gen, pipe = published
    assert gen.schedule.mu is None and gen.schedule.shift == 3.0
    ours, stock = _both(gen, pipe, steps, w)
    assert torch.equal(ours, stock), (ours - stock).abs().max()


def test_cfg_truncation_and_normalization_equal_the_stock_pipeline(published):
    _, gen, pipe = published
    plain, _ = _both(gen, pipe, 6, 5.0)
    ours, stock = _both(gen, pipe, 6, 5.0, truncation=0.5, normalization=1.05)
    gen.cfg_truncation, gen.cfg_normalization = 1.0, 0.0
    assert torch.equal(ours, stock), (ours - stock).abs().max()
    assert (ours - plain).abs().max() > 1e-3  # truncation and the norm clip acted


def test_prompt_table_gives_the_condition_encoded_on_the_fly(published, tmp_path):
    from services.config import ModelConfig
    from services.models.pipelines import encode_prompt_file
    from services.models.prompt_embeddings import PromptEmbeddings

    path, gen, _ = published
    table = encode_prompt_file(ModelConfig(kind="z_image", path=str(path)), str(path), [*PROMPTS, ""], tmp_path / "t")
    looked_up = PromptEmbeddings(table).lookup(["", PROMPTS[1], PROMPTS[0]])
    fresh = gen.encode_prompts(["", PROMPTS[1], PROMPTS[0]]).tensors
    assert set(looked_up) == set(fresh) == {"prompt_embeds", "prompt_mask"}
    assert torch.equal(looked_up["prompt_mask"], fresh["prompt_mask"])
    torch.testing.assert_close(looked_up["prompt_embeds"], fresh["prompt_embeds"], rtol=0, atol=1e-6)
    lengths = fresh["prompt_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and max(lengths) < gen.max_sequence_length  # unpadded, variable length
