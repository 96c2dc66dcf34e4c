"""Generators: tiny SD3 / FLUX round-trip through the real loading path; the digits default."""

import sys
from pathlib import Path

import pytest
import torch

from normguard_core.conventions import sigma_grid
from normguard_core.samplers import sample_trajectory
from services.config import ModelConfig
from services.models import build_generator
from services.models.digits import parse_digit_prompt

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_models  # noqa: E402

pytestmark = pytest.mark.service


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3": tiny_models.save_tiny_sd3(root / "sd3"), "flux": tiny_models.save_tiny_flux(root / "flux")}


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("lora_rank", [None, 4])
def test_pipeline_round_trip_and_reference(pipelines, kind, lora_rank):
    cfg = ModelConfig(kind=kind, path=str(pipelines[kind]), resolution=64, lora_rank=lora_rank)
    gen = build_generator(cfg)
    prompts = ["a photo of a cat", "a dog"]
    cond, null = gen.encode_prompts(prompts), gen.encode_prompts(["", ""])
    x = torch.randn(2, *gen.latent_shape)
    traj = sample_trajectory(gen.guided_velocity_fn(cond, null, 3.0), x, sigma_grid(3, shift=3.0))
    images = gen.decode(traj.x0)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    sigma = torch.full((2,), 0.6)
    v_pol, v_ref = gen.velocity(x, sigma, cond), gen.velocity(x, sigma, cond, reference=True)
    assert torch.allclose(v_pol, v_ref, atol=1e-5)  # identical at init (LoRA B = 0 / frozen copy)
    # perturb the trainable weights: the policy moves, the reference does not
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in gen.trainable_state_dict().items()}
    gen.load_trainable_state_dict(state)
    assert not torch.allclose(gen.velocity(x, sigma, cond), v_pol, atol=1e-5)
    assert torch.allclose(gen.velocity(x, sigma, cond, reference=True), v_ref, atol=1e-6)
    if lora_rank:
        assert all("lora" in k for k in state)
        assert (
            sum(p.numel() for p in gen.trainable_parameters())
            < sum(p.numel() for p in gen.transformer.parameters()) / 2
        )


def test_decode_rejects_wrong_shape(pipelines):
    gen = build_generator(ModelConfig(kind="sd3", path=str(pipelines["sd3"]), resolution=64))
    with pytest.raises(ValueError, match=r"\(B, \(16, 32, 32\)\)"):
        gen.decode(torch.zeros(1, 4, 8, 8))


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        build_generator(ModelConfig(kind="sd3", path=str(tmp_path / "does-not-exist")))


def test_digits_generator(digits_assets):
    gen = build_generator(ModelConfig(kind="digits"), path=str(digits_assets.model_path))
    assert gen.latent_shape == (1, 16, 16)
    cond = gen.encode_prompts(["a handwritten digit 3", ""])
    v = gen.velocity(torch.randn(2, 1, 16, 16), torch.full((2,), 0.5), cond)
    assert v.shape == (2, 1, 16, 16)
    assert gen.decode(torch.zeros(2, 1, 16, 16)).shape == (2, 3, 16, 16)


def test_digit_prompts():
    assert parse_digit_prompt("a handwritten digit 7") == 7 and parse_digit_prompt("digit 0") == 0
    assert parse_digit_prompt("") == 10
    with pytest.raises(ValueError, match="a handwritten digit 3"):
        parse_digit_prompt("a photo of a cat")
