"""The real-model path end to end: tiny SD3 / FLUX / Qwen-Image / Z-Image pipelines through the Ray service.

For each of a tiny SD3, FLUX, Qwen-Image and Z-Image pipeline (random init, saved with ``save_pretrained``;
Qwen-Image's carries its published scheduler config, ``tests/tiny_qwen_image.py``):
``normguard train`` through Ray for 2 RL steps with LoRA, a tiny CLIP-preference reward (PickScore's
loader) and a tiny VLM judge in the evaluation; ``normguard serve`` of that run, one image over HTTP;
``normguard export``; then the export loaded into a stock diffusers pipeline
(``load_lora_weights``) gives the service's image for the same seed and steps. And our sampler gives the
stock pipelines' latents for tiny pipelines that carry the real models' published scheduler configs
(``deploy/architectures``: SD3.5's static shift 3, FLUX.1-dev's resolution-dependent ``mu``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from conftest import cli_env, free_port

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_models  # noqa: E402
import tiny_qwen_image  # noqa: E402
import tiny_z_image  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
SEED, STEPS, PROMPT = 7, 3, "a photo of a cat"
# the tiny pipelines' grid: their scheduler's static shift, or None: the family's (Qwen-Image's dynamic mu, stretched)
SHIFT = {"sd3": 3.0, "flux": 1.0, "qwen_image": None, "z_image": 3.0}
# the stock pipeline's guidance as the service samples: none (SD3; Qwen-Image's true CFG off), FLUX.1's embedding
STOCK_GUIDANCE = {
    "sd3": dict(guidance_scale=1.0),
    "flux": dict(guidance_scale=3.5),
    "qwen_image": dict(true_cfg_scale=1.0),
    "z_image": dict(guidance_scale=0.0),  # ZImagePipeline's s = w - 1 (its __call__ default is 5.0)
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {
        "sd3": tiny_models.save_tiny_sd3(root / "sd3"),
        "flux": tiny_models.save_tiny_flux(root / "flux"),
        "qwen_image": tiny_qwen_image.save_tiny_qwen_image(root / "qwen_image"),
        "z_image": tiny_z_image.save_tiny_z_image(root / "z_image"),
        "clip": tiny_models.save_tiny_clip(root / "clip"),
        "vlm": tiny_models.save_tiny_llava(root / "llava"),
    }


def _write_config(assets, kind: str, root: Path) -> Path:
    cfg = {
        "model": {"kind": kind, "path": str(assets[kind]), "lora_rank": 4, "resolution": 64},
        "prompts": [PROMPT, "a red bicycle", "a bowl of ramen", "a lighthouse at dusk"],
        "rollout": {"num_samplers": 1, "prompts_per_step": 2, "group_size": 2, "num_steps": 2, "shift": SHIFT[kind]},
        "reward": {
            "scorers": [{"name": "pickscore", "path": str(assets["clip"])}],
            "eval_scorers": [{"name": "vlm_judge", "path": str(assets["vlm"]), "pool": "judge"}],
            "num_actors": 1,
        },
        "loss": {"name": "diffusion_nft"},
        "normguard": {"weight": 0.1},
        "learner": {"lr": 0.02, "micro_batch": 8, "timesteps_per_sample": 1},  # a large lr: the LoRA visibly moves
        "resources": {"num_learners": 1, "learner_cpus": 1, "sampler_cpus": 0.25, "scorer_cpus": 0.25},
        "train": {"steps": 2, "eval_every": 0, "checkpoint_every": 1, "output_dir": str(root), "run_name": kind},
        "eval": {"num_prompts": 2, "samples_per_prompt": 1, "few_steps": 2, "full_steps": STEPS},
        "logging": {"log_images": False},
    }
    path = root / f"{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _served_png(run: Path, port: int) -> str:
    """``normguard serve`` of ``run``: one sample of the trained checkpoint, its base64 PNG (a video family's: APNG)."""
    proc = subprocess.Popen(
        [str(BIN / "normguard"), "serve", str(run), "--port", str(port), "--num-cpus", "2"],
        env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("normguard serve did not come up in 240 s")
        models = httpx.get(f"{url}/v1/models", timeout=30).json()
        assert "trained" in json.dumps(models)
        body = {"prompt": PROMPT, "checkpoint": "trained", "seed": SEED, "num_steps": STEPS, "guidance_scale": 1.0}
        r = httpx.post(f"{url}/v1/generate", json=body, timeout=300)
        assert r.status_code == 200, r.text
        (png,) = r.json()["images"]
        return png
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _serve_one_image(run: Path, port: int) -> torch.Tensor:
    from PIL import Image

    png = _served_png(run, port)
    return torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(png))))).permute(2, 0, 1)


def _stock_image(kind: str, base: Path, lora_dir: Path | None) -> torch.Tensor:
    """The stock diffusers pipeline, with the exported LoRA, from the service's noise and grid."""
    import diffusers

    from services.config import ModelConfig
    from services.config.families import spec
    from services.models import build_generator

    shape = build_generator(ModelConfig(kind=kind, path=str(base), resolution=64)).latent_shape
    latents = torch.randn(1, *shape, generator=torch.Generator().manual_seed(SEED))  # the service's noise
    pipe = getattr(diffusers, spec(kind).pipeline_class).from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    # the service samples on the family's grid: the stock pipeline's own from the step count
    out = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        **STOCK_GUIDANCE[kind],
        latents=latents,
        max_sequence_length=ModelConfig().max_sequence_length,  # the service's T5 length (128, the sources')
        height=64,
        width=64,
        output_type="pt",
    ).images[0]
    return out.clamp(0, 1)


@pytest.mark.parametrize("kind", ["sd3", "flux", "qwen_image", "z_image"])
def test_train_serve_export_and_load_in_stock_diffusers(assets, kind, tmp_path):
    config = _write_config(assets, kind, tmp_path)
    out = subprocess.run(
        [str(BIN / "normguard"), "train", str(config)], capture_output=True, text=True, timeout=900, env=cli_env()
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    run = tmp_path / kind
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["train/steps_done"] == 2
    assert any(k.startswith("eval/vlm_judge") for k in summary["after"]), sorted(summary["after"])
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / "weights.safetensors").is_file() and not list(ckpt.glob("*.pkl"))

    served = _serve_one_image(run, port=free_port())

    export_dir = tmp_path / f"export-{kind}"
    ex = subprocess.run(
        [str(BIN / "normguard"), "export", str(run), "--out", str(export_dir)],
        capture_output=True, text=True, timeout=600, env=cli_env(),
    )  # fmt: skip
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert (export_dir / "pytorch_lora_weights.safetensors").is_file()
    card = (export_dir / "README.md").read_text()
    assert f"base_model: {assets[kind]}" in card and "diffusion_nft" in card and "NormGuard" in card

    stock = _stock_image(kind, assets[kind], export_dir)
    base = _stock_image(kind, assets[kind], None)
    diff = ((stock * 255).round().int() - served.int()).abs().max().item()
    assert diff <= 1, f"stock diffusers + export differs from the service by {diff}/255"
    # not a vacuous match: the exported LoRA changes the stock pipeline's image (2 RL steps move it a little)
    assert (stock - base).abs().max().item() > 1e-3


@pytest.mark.parametrize("model", ["sd3.5-medium", "sd3.5-large", "flux1-dev"])
def test_sampler_equals_stock_pipeline_with_the_published_scheduler(tmp_path, model):
    """Latents of our sampler (``rollout.shift: null``: the family's grid) and of the stock pipeline, same noise,
    at 4 and 10 steps; FLUX at 128 px = 1024 packed image tokens, so mu = 0.63 (not the base 0.5), as at 512 px
    for FLUX.1-dev. Before the family grids: 1.6e-2 (FLUX, static shift 1) to 2.7e-2 (shift 3) relative at 4 steps."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    from services.config import ModelConfig
    from services.models import build_generator
    from services.models.sampling import sample

    kind, res = ("flux", 128) if "flux" in model else ("sd3", 64)
    save = tiny_models.save_tiny_flux if kind == "flux" else tiny_models.save_tiny_sd3
    path = save(tmp_path / model, tiny_models.published_config(model, "scheduler"))
    gen = build_generator(ModelConfig(kind=kind, path=str(path), resolution=res))
    pipe = (FluxPipeline if kind == "flux" else StableDiffusion3Pipeline).from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    assert (gen.schedule.mu is not None) == (kind == "flux") and gen.schedule.mu != 0.5
    for steps in (4, 10):
        noise = torch.randn(1, *gen.latent_shape, generator=torch.Generator().manual_seed(SEED))
        ours = sample(gen, [PROMPT], noise=noise, num_steps=steps, measure_ratio=False).trajectory
        stock = pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=3.5 if kind == "flux" else 1.0,
            latents=noise.clone(),
            max_sequence_length=gen.max_sequence_length,  # ours: the sources' 128; diffusers' default 256 / 512
            height=res,
            width=res,
            output_type="latent",
        ).images
        assert torch.equal(ours.sigmas, pipe.scheduler.sigmas)
        torch.testing.assert_close(ours.x0, stock, rtol=1e-5, atol=1e-6)
