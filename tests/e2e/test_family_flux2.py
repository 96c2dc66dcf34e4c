"""FLUX.2 ([dev] ``Flux2Pipeline``, [klein] ``Flux2KleinPipeline``) on tiny random pipelines (``tests/tiny_flux2.py``).

* Our sampler gives the stock pipelines' latents, same noise, at 4 and 10 steps, with [dev]'s guidance
  embedding at the pipeline's default 4.0 and at 2.5, [klein]'s real CFG off (scale 1) and on (scale 4,
  against the empty negative prompt), and a distilled [klein] that ignores the scale as its pipeline does.
  The tiny pipelines carry FLUX.1-dev's published scheduler config (dynamic shifting, its base / max shift
  and sequence lengths): FLUX.2's own ``scheduler_config.json`` was not readable here, and the pipelines
  compute ``mu`` themselves (``compute_empirical_mu``), so the grid must ignore those fields; it is
  asserted equal to the scheduler's and its ``mu`` unequal to FLUX.1's ``calculate_shift``.
* ``normguard train`` through Ray (2 RL steps, LoRA on the family's Flow-Factory targets, prompts encoded
  once into the table), ``normguard serve`` one image, ``normguard export``, and the export loaded into the
  stock pipeline gives the service's image (as ``tests/e2e/test_real_model_path.py`` does for SD3 / FLUX).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli_env, free_port

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
import tiny_flux2  # noqa: E402
import tiny_models  # noqa: E402
from test_real_model_path import _serve_one_image  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
SEED, STEPS, PROMPT, RES = 7, 3, "a photo of a cat", 64
SAVERS = {"dev": tiny_flux2.save_tiny_flux2_dev, "klein": tiny_flux2.save_tiny_flux2_klein}


def _pipe(path: Path):
    from services.models.families import family

    pipe = family("flux2").pipeline_class(str(path)).from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_latents(pipe, noise: torch.Tensor, steps: int, guidance: float, msl: int) -> torch.Tensor:
    """The stock pipeline's final latents: packed ``(B, L, C)`` from ``Flux2Pipeline``, de-normalised and
    unpatchified ``(B, 32, H/8, W/8)`` from ``Flux2KleinPipeline``."""
    return pipe(
        prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
        max_sequence_length=msl, height=RES, width=RES, output_type="latent",
    ).images  # fmt: skip


def _as_stock(pipe, x0: torch.Tensor) -> torch.Tensor:
    """Our final latents ``(B, 128, H/16, W/16)`` in the stock pipeline's output layout, by its own helpers."""
    if type(pipe).__name__ == "Flux2Pipeline":
        return pipe._pack_latents(x0)
    vae = pipe.vae
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return pipe._unpatchify_latents(x0 * std + vae.bn.running_mean.view(1, -1, 1, 1))


# (tiny pipeline, is_distilled, [dev]'s embedded guidance, the pipeline's guidance_scale = our CFG scale for Klein)
CASES = {
    "dev": ("dev", False, 4.0, 4.0),
    "dev-guidance-2.5": ("dev", False, 2.5, 2.5),
    "klein": ("klein", False, None, 1.0),
    "klein-cfg-4": ("klein", False, None, 4.0),
    "klein-distilled-4": ("klein", True, None, 4.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampler_equals_stock_pipeline(tmp_path, case):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from services.models.families.flux2 import Flux2Generator
    from services.models.sampling import sample

    which, distilled, embedded, scale = CASES[case]
    scheduler = tiny_models.published_config("flux1-dev", "scheduler")
    kw = dict(is_distilled=True) if distilled else {}
    path = SAVERS[which](tmp_path / which, scheduler, **kw)
    gen = Flux2Generator(str(path), resolution=RES, **({"guidance": embedded} if embedded else {}))
    pipe = _pipe(path)
    assert gen.is_distilled == distilled and gen.schedule.mu is None
    cfg = scale if which == "klein" else 1.0  # [dev]: the scale is the embedding's, no CFG
    for steps in (4, 10):
        noise = torch.randn(1, *gen.latent_shape, generator=torch.Generator().manual_seed(SEED))
        ours = sample(gen, [PROMPT], noise=noise, num_steps=steps, guidance_scale=cfg, measure_ratio=False)
        stock = _stock_latents(pipe, noise, steps, scale, gen.max_sequence_length)
        assert torch.equal(ours.trajectory.sigmas, pipe.scheduler.sigmas)
        fit = calculate_shift(gen._side**2, *(scheduler[k] for k in ("base_image_seq_len", "max_image_seq_len")),
                              scheduler["base_shift"], scheduler["max_shift"])  # fmt: skip
        assert abs(gen.schedule.mu_at(steps) - fit) > 0.5  # FLUX.2's empirical mu, not FLUX.1's line
        if cfg > 1.0 and not distilled:  # one batched CFG call against the pipeline's two
            torch.testing.assert_close(_as_stock(pipe, ours.trajectory.x0), stock, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(_as_stock(pipe, ours.trajectory.x0), stock)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    return {
        "dev": tiny_flux2.save_tiny_flux2_dev(root / "dev"),
        "clip": tiny_models.save_tiny_clip(root / "clip"),
        "vlm": tiny_models.save_tiny_llava(root / "llava"),
    }


def _write_config(assets, which: str, root: Path) -> Path:
    cfg = {
        "model": {"kind": "flux2", "path": str(assets[which]), "lora_rank": 4, "resolution": RES},
        "prompts": [PROMPT, "a red bicycle", "a bowl of ramen", "a lighthouse at dusk"],
        "rollout": {"num_samplers": 1, "prompts_per_step": 2, "group_size": 2, "num_steps": 2},  # the family's grid
        "reward": {
            "scorers": [{"name": "pickscore", "path": str(assets["clip"])}],
            "eval_scorers": [{"name": "vlm_judge", "path": str(assets["vlm"]), "pool": "judge"}],
            "num_actors": 1,
        },
        "loss": {"name": "diffusion_nft"},
        "normguard": {"weight": 0.1},
        "learner": {"lr": 0.02, "micro_batch": 8, "timesteps_per_sample": 1},
        "resources": {"num_learners": 1, "learner_cpus": 1, "sampler_cpus": 0.25, "scorer_cpus": 0.25},
        "train": {"steps": 2, "eval_every": 0, "checkpoint_every": 1, "output_dir": str(root), "run_name": which},
        "eval": {"num_prompts": 2, "samples_per_prompt": 1, "few_steps": 2, "full_steps": STEPS},
        "logging": {"log_images": False},
    }
    path = root / f"{which}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stock_image(base: Path, lora_dir: Path | None) -> torch.Tensor:
    """The stock pipeline (with the exported LoRA) from the service's noise: the seed's own draw in the
    pipeline's layout, so the stock pipeline's ``generator`` gives the same noise."""
    from services.config import ModelConfig

    pipe = _pipe(base)
    if lora_dir is not None:
        pipe.load_lora_weights(str(lora_dir))
    out = pipe(
        prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=4.0,  # dev's embedding: the generator's 4.0
        generator=torch.Generator().manual_seed(SEED), max_sequence_length=ModelConfig().max_sequence_length,
        height=RES, width=RES, output_type="pt",
    ).images[0]  # fmt: skip
    return out.clamp(0, 1)


def test_train_serve_export_and_load_in_stock_diffusers(assets, tmp_path):
    which = "dev"
    out = subprocess.run(
        [str(BIN / "normguard"), "train", str(_write_config(assets, which, tmp_path))],
        capture_output=True, text=True, timeout=900, env=cli_env(),
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    run = tmp_path / which
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["train/steps_done"] == 2
    assert any(k.startswith("eval/vlm_judge") for k in summary["after"]), sorted(summary["after"])
    assert list((run / "prompt_embeddings").glob("*.safetensors"))  # encoded once, looked up by the actors

    served = _serve_one_image(run, port=free_port())

    export_dir = tmp_path / "export"
    ex = subprocess.run(
        [str(BIN / "normguard"), "export", str(run), "--out", str(export_dir)],
        capture_output=True, text=True, timeout=600, env=cli_env(),
    )  # fmt: skip
    assert ex.returncode == 0, ex.stderr[-3000:]
    assert (export_dir / "pytorch_lora_weights.safetensors").is_file()
    assert f"base_model: {assets[which]}" in (export_dir / "README.md").read_text()

    stock = _stock_image(assets[which], export_dir)
    base = _stock_image(assets[which], None)
    diff = ((stock * 255).round().int() - served.int()).abs().max().item()
    assert diff <= 1, f"stock diffusers + export differs from the service by {diff}/255"
    assert (stock - base).abs().max().item() > 1e-3  # the exported LoRA changes the stock pipeline's image
