"""Wan 2.1 text-to-video (``model.kind: wan``) end to end on a tiny random ``WanPipeline`` (``tests/tiny_wan.py``:
5 frames of 32x32, latents ``(16, 2, 4, 4)``).

* Our sampler gives the stock ``WanPipeline``'s latents and frames (fp32) with and without CFG, on a pipeline that
  carries a ``FlowMatchEulerDiscreteScheduler`` at the published ``flow_shift`` (3.0, Wan2.2-T2V-A14B-Diffusers'
  ``scheduler_config.json``). The published scheduler itself is UniPC (second order, its own grid): with it our
  generator samples on the same Euler grid at that shift, which is *not* the stock pipeline's sampler (checked:
  the grids differ).
* ``normguard train`` through Ray, 2 RL steps with LoRA on Flow-Factory's Wan targets and a tiny CLIP-preference
  reward scored per frame and averaged; ``normguard serve``: one video over HTTP, an animated PNG of 5 frames;
  ``normguard export``; the export loaded by ``WanPipeline.load_lora_weights`` gives the service's frames.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import cli_env, free_port

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_models  # noqa: E402
import tiny_wan  # noqa: E402
from test_real_model_path import _served_png  # noqa: E402

pytestmark = [pytest.mark.e2e]
BIN = Path(sys.executable).parent
SEED, STEPS, PROMPT, RES, FRAMES, TOKENS = 7, 3, "a photo of a cat", 32, 5, 16
PUBLISHED = tiny_models.published_config("wan2.2-t2v-a14b", "scheduler")  # UniPC, flow_shift 3.0
EULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "shift": PUBLISHED["flow_shift"],
    "num_train_timesteps": 1000,
}


def _model(path: Path, **extra):
    from services.config import ModelConfig

    return ModelConfig(kind="wan", path=str(path), resolution=RES, max_sequence_length=TOKENS, **extra)


def _stock(pipe, noise: torch.Tensor, steps: int, guidance: float, output_type: str) -> torch.Tensor:
    out = pipe(
        PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(), num_frames=FRAMES,
        max_sequence_length=TOKENS, height=RES, width=RES, output_type=output_type,
    )  # fmt: skip
    return out.frames


def test_sampler_equals_stock_pipeline_with_the_published_shift(tmp_path):
    """Latents and frames, 4 and 10 steps, guidance 1 (no CFG) and 5 (Wan 2.1's default: two calls in the
    pipeline, one batched call here)."""
    from diffusers import WanPipeline

    from services.models import build_generator
    from services.models.sampling import sample

    path = tiny_wan.save_tiny_wan(tmp_path / "wan", EULER)
    gen = build_generator(_model(path))
    assert gen.latent_shape == (16, 2, RES // 8, RES // 8) and gen.num_frames == FRAMES
    pipe = WanPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    for steps, guidance in ((4, 1.0), (10, 1.0), (4, 5.0)):
        noise = torch.randn(1, *gen.latent_shape, generator=torch.Generator().manual_seed(SEED))
        ours = sample(gen, [PROMPT], noise=noise, num_steps=steps, guidance_scale=guidance, measure_ratio=False)
        stock = _stock(pipe, noise, steps, guidance, "latent")
        assert torch.equal(ours.trajectory.sigmas, pipe.scheduler.sigmas)
        torch.testing.assert_close(ours.trajectory.x0, stock, rtol=1e-5, atol=1e-6)
        frames = _stock(pipe, noise, steps, guidance, "pt")  # (1, F, 3, H, W) in [0, 1]
        assert ours.images.shape == frames.shape == (1, FRAMES, 3, RES, RES)
        torch.testing.assert_close(ours.images, frames, rtol=1e-5, atol=1e-5)


def test_wan22_two_experts_equal_the_stock_pipeline_and_export_one_lora_each(tmp_path):
    """Wan 2.2 A14B's layout (``transformer`` for ``t >= 875``, ``transformer_2`` below): latents equal the stock
    pipeline's (4 steps: the first on the high-noise expert, three on the low; 10 steps with CFG 4.0, both experts
    at that scale, the pipeline's ``guidance_scale_2`` default). With LoRA on both experts (random ``lora_B``, as
    after training), ``normguard export``'s writer gives two files that the stock pipeline loads
    (``load_into_transformer_2`` for the second) into the same frames."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from services.config import ExperimentConfig
    from services.models import build_generator
    from services.models.families import family
    from services.models.sampling import sample
    from services.serving.export import LORA_FILE, _export_lora

    path = tiny_wan.save_tiny_wan(tmp_path / "wan22", EULER, boundary_ratio=0.875)
    pipe = WanPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    gen = build_generator(_model(path))
    noise = torch.randn(1, *gen.latent_shape, generator=torch.Generator().manual_seed(SEED))
    for steps, guidance in ((4, 1.0), (10, 4.0)):
        ours = sample(gen, [PROMPT], noise=noise, num_steps=steps, guidance_scale=guidance, measure_ratio=False)
        torch.testing.assert_close(
            ours.trajectory.x0, _stock(pipe, noise, steps, guidance, "latent"), rtol=1e-5, atol=1e-6
        )

    model = _model(path, lora_rank=4)
    gen = build_generator(model)
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) * 0.1 if "lora_B" in k else v for k, v in gen.trainable_state_dict().items()}
    gen.load_trainable_state_dict(state)
    assert {k.split(".")[0] for k in state} == {"transformer", "transformer_2"}
    ours = sample(gen, [PROMPT], noise=noise, num_steps=4, measure_ratio=False).images
    files = _export_lora(ExperimentConfig(model=model.model_dump()), state, tmp_path / "export")
    assert files == [LORA_FILE, "pytorch_lora_weights_transformer_2.safetensors"]
    base = _stock(pipe, noise, 4, 1.0, "pt")
    pipe.load_lora_weights(str(tmp_path / "export"))
    pipe.load_lora_weights(str(tmp_path / "export"), weight_name=files[1], load_into_transformer_2=True)
    stock = _stock(pipe, noise, 4, 1.0, "pt")
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    assert (stock - base).abs().max().item() > 1e-3  # the LoRA (of both experts) changes the frames

    full = build_generator(_model(path))  # a full fine-tune exports both experts' folders
    state = {k: v + 0.01 for k, v in full.trainable_state_dict().items()}
    assert family("wan").export_transformer(str(path), state, tmp_path / "full") == ["transformer/", "transformer_2/"]
    low = WanTransformer3DModel.from_pretrained(str(tmp_path / "full"), subfolder="transformer_2")
    torch.testing.assert_close(low.state_dict()["proj_out.weight"], state["transformer_2.proj_out.weight"])


def test_the_published_unipc_scheduler_gives_the_euler_grid_at_its_shift(tmp_path):
    """What the equality above does not cover: with the published UniPC config our grid is Euler's at
    ``flow_shift``; the stock pipeline's UniPC grid is another (so its samples differ)."""
    from diffusers import UniPCMultistepScheduler

    from normguard_core.conventions import sigma_grid
    from services.models import build_generator

    gen = build_generator(_model(tiny_wan.save_tiny_wan(tmp_path / "wan", PUBLISHED)))
    assert torch.equal(gen.sigma_grid(10), sigma_grid(10, shift=PUBLISHED["flow_shift"]))
    unipc = UniPCMultistepScheduler.from_config(PUBLISHED)
    unipc.set_timesteps(10)
    assert not torch.allclose(gen.sigma_grid(10), unipc.sigmas.float(), atol=1e-3)


def test_frames_must_be_4k_plus_1_and_images_have_none():
    from services.config import ModelConfig

    assert ModelConfig(kind="wan", path="x", num_frames=9).num_frames == 9
    for bad in (4, 6):
        with pytest.raises(ValueError, match="4 k \\+ 1"):
            ModelConfig(kind="wan", path="x", num_frames=bad)
    with pytest.raises(ValueError, match="num_frames must be unset"):
        ModelConfig(kind="sd3", path="x", num_frames=5)


def _config(assets, root: Path) -> Path:
    cfg = {
        "model": {"kind": "wan", "path": str(assets["wan"]), "lora_rank": 4, "resolution": RES,
                  "num_frames": FRAMES, "max_sequence_length": TOKENS},
        "prompts": [PROMPT, "a red bicycle", "a bowl of ramen", "a lighthouse at dusk"],
        "rollout": {"num_samplers": 1, "prompts_per_step": 2, "group_size": 2, "num_steps": 2, "shift": 3.0},
        "reward": {"scorers": [{"name": "pickscore", "path": str(assets["clip"])}],
                   "eval_scorers": [{"name": "pickscore", "path": str(assets["clip"]), "pool": "judge"}],
                   "num_actors": 1},
        "loss": {"name": "diffusion_nft"},
        "normguard": {"weight": 0.1},
        "learner": {"lr": 0.02, "micro_batch": 8, "timesteps_per_sample": 1},
        "resources": {"num_learners": 1, "learner_cpus": 1, "sampler_cpus": 0.25, "scorer_cpus": 0.25},
        "train": {"steps": 2, "eval_every": 0, "checkpoint_every": 1, "output_dir": str(root), "run_name": "wan"},
        "eval": {"num_prompts": 2, "samples_per_prompt": 1, "few_steps": 2, "full_steps": STEPS},
        "logging": {"log_images": False},
    }  # fmt: skip
    path = root / "wan.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _frames(png_b64: str) -> torch.Tensor:
    """An animated PNG's frames ``(F, 3, H, W)`` uint8."""
    from PIL import Image, ImageSequence

    im = Image.open(io.BytesIO(base64.b64decode(png_b64)))
    frames = [np.array(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)


def _serve_one_video(run: Path, port: int) -> torch.Tensor:
    return _frames(_served_png(run, port))


def _stock_frames(base: Path, lora_dir: Path | None) -> torch.Tensor:
    """The stock WanPipeline with the exported LoRA, from the service's noise, on its grid (shift 3: the tiny
    pipeline's Euler scheduler's)."""
    from diffusers import WanPipeline

    from services.models import build_generator

    shape = build_generator(_model(base)).latent_shape
    noise = torch.randn(1, *shape, generator=torch.Generator().manual_seed(SEED))
    pipe = WanPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    return _stock(pipe, noise, STEPS, 1.0, "pt")[0]


@pytest.mark.slow
def test_train_serve_export_and_load_in_stock_wan_pipeline(tmp_path):
    assets = {
        "wan": tiny_wan.save_tiny_wan(tmp_path / "wan-base"),
        "clip": tiny_models.save_tiny_clip(tmp_path / "clip"),
    }
    out = subprocess.run(
        [str(BIN / "normguard"), "train", str(_config(assets, tmp_path))],
        capture_output=True, text=True, timeout=900, env=cli_env(),
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    run = tmp_path / "wan"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["train/steps_done"] == 2
    assert any(k.startswith("eval/pickscore") for k in summary["after"]), sorted(summary["after"])

    served = _serve_one_video(run, port=free_port())
    assert served.shape == (FRAMES, 3, RES, RES)

    export_dir = tmp_path / "export"
    ex = subprocess.run(
        [str(BIN / "normguard"), "export", str(run), "--out", str(export_dir)],
        capture_output=True, text=True, timeout=600, env=cli_env(),
    )  # fmt: skip
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert (export_dir / "pytorch_lora_weights.safetensors").is_file()
    assert "WanPipeline.from_pretrained" in (export_dir / "README.md").read_text()

    stock = _stock_frames(assets["wan"], export_dir)
    base = _stock_frames(assets["wan"], None)
    diff = ((stock * 255).round().int() - served.int()).abs().max().item()
    assert diff <= 1, f"stock WanPipeline + export differs from the service by {diff}/255"
    assert (stock - base).abs().max().item() > 1e-3  # the exported LoRA changes the stock pipeline's frames


def test_wan22_gradient_checkpointing_reaches_both_experts_and_keeps_the_gradient(tmp_path):
    """``model.gradient_checkpointing: true`` on Wan 2.2 A14B's two experts (it raised before: the pair module had
    no ``enable_gradient_checkpointing``): both experts checkpoint, and one backward through a batch that mixes
    high- and low-noise timesteps gives the gradients of the run without checkpointing."""
    from services.models import build_generator

    path = tiny_wan.save_tiny_wan(tmp_path / "wan22", EULER, boundary_ratio=0.875)
    grads = []
    for ckpt in (False, True):
        gen = build_generator(_model(path, gradient_checkpointing=ckpt))
        experts = gen.transformer
        assert [experts.transformer.gradient_checkpointing, experts.transformer_2.gradient_checkpointing] == [ckpt] * 2
        torch.manual_seed(0)
        x = torch.randn(2, *gen.latent_shape)
        text = torch.randn(2, TOKENS, experts.config.text_dim)
        experts.train()
        out = experts(hidden_states=x, timestep=torch.tensor([950.0, 100.0]), encoder_hidden_states=text)[0]
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in experts.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert {n.split(".")[0] for n in grads[0]} == {"transformer", "transformer_2"}  # both experts were in the batch
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-5, atol=1e-6)
