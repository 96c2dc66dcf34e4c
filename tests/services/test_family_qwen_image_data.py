"""Qwen-Image's family data and the parts of its behaviour that need no pipeline (``model.kind: qwen_image``).

* the published transformer (``deploy/architectures/qwen-image``) on the meta device has the parameter count the
  plan uses, and verl-omni's twelve LoRA targets all resolve (60 blocks each; the count per rank is the plan's),
  while Flow-Factory's two ``*.net.2.proj`` names match nothing (why the family follows verl-omni);
* the grid of the published scheduler config (dynamic ``mu``, ``shift_terminal`` 0.02) equals the stock
  scheduler's at several resolutions and step counts (one step is refused: the stock stretch gives NaN), and the
  stretch also follows a static shift;
* true CFG rescales each token to the conditional prediction's norm, and is off at a scale <= 1;
* ``deploy/configs/qwen_image_nft.yaml`` fits one 8 x 80 GB node (``normguard plan``), with the learner's terms
  measured on the meta device;
* the model card loads the export with the stock ``QwenImagePipeline``.

Equality with the stock pipeline's sampling: ``tests/e2e/test_family_qwen_image.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.config import ExperimentConfig, ModelConfig
from services.config.families import VARIANTS, spec

pytestmark = pytest.mark.service

ROOT = Path(__file__).resolve().parents[2]
ARCH = ROOT / "deploy" / "architectures" / "qwen-image"
FLOW_FACTORY_DEAD = ("img_mlp.net.2.proj", "txt_mlp.net.2.proj")  # Flow-Factory qwen_image.py default_target_modules


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's suffix match


def test_published_transformer_counts_and_verl_omni_targets():
    from diffusers import QwenImageTransformer2DModel
    from peft import LoraConfig

    with torch.device("meta"):
        tr = QwenImageTransformer2DModel.from_config(json.loads((ARCH / "transformer_config.json").read_text()))
    v = VARIANTS["qwen-image"]
    assert spec("qwen_image").variant("Qwen/Qwen-Image") is v
    assert sum(p.numel() for p in tr.parameters()) == v.transformer_params
    linears = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = spec("qwen_image").lora.targets
    assert all(sum(_matches(n, t) for n in linears) == 60 for t in targets), targets
    assert not any(_matches(n, t) for n in linears for t in FLOW_FACTORY_DEAD)
    tr.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    assert sum(p.numel() for n, p in tr.named_parameters() if "lora_" in n) == 4 * v.lora_per_rank


def test_family_facts():
    m = ModelConfig(kind="qwen_image", path="p", lora_rank=64)
    assert m.lora_alpha == 128 and m.lora_targets == spec("qwen_image").lora.targets
    assert ExperimentConfig(model={"kind": "qwen_image", "path": "p"}).rollout.shift is None  # the scheduler's grid
    s = spec("qwen_image")
    assert s.text_tokens(128) == 128 and s.latent_patch == 2 and s.text_parts == ("text_encoder", "tokenizer")


def _stock_grid(config: dict, steps: int, tokens: int) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    c = sched.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # QwenImagePipeline.__call__
    return sched.sigmas


@pytest.mark.parametrize("resolution", [64, 512, 1024])
def test_the_grid_is_the_stock_schedulers(resolution):
    from services.models.schedules import FlowSchedule

    config = json.loads((ARCH / "scheduler_config.json").read_text())
    tokens = (resolution // 16) ** 2
    schedule = FlowSchedule.from_scheduler_config(config, base="flux", image_seq_len=tokens)
    assert schedule.shift_terminal == 0.02
    for steps in (2, 4, 10, 28):
        grid = schedule.sigma_grid(steps)
        assert torch.equal(grid, _stock_grid(config, steps, tokens)), (resolution, steps)
        assert grid[-2].item() == pytest.approx(0.02, abs=1e-6) and grid[-1] == 0  # float32 arithmetic
    with np.errstate(invalid="ignore"):  # one step: the stock stretch divides 0 by 0; ours refuses
        assert _stock_grid(config, 1, tokens)[0].isnan()
    with pytest.raises(ValueError, match="needs >= 2 steps"):
        schedule.sigma_grid(1)


def test_the_stretch_follows_a_static_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from services.models.schedules import FlowSchedule

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.05)
    schedule = FlowSchedule.from_scheduler_config(dict(sched.config), base="scheduler", image_seq_len=0)
    for steps in (4, 10):
        sched.set_timesteps(steps)
        assert torch.equal(schedule.sigma_grid(steps), sched.sigmas)


def test_true_cfg_rescales_each_token_to_the_conditional_norm():
    from services.models.families.qwen_image import true_cfg

    g = torch.Generator().manual_seed(0)
    cond, neg = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    out = true_cfg(cond, neg, 4.0)
    torch.testing.assert_close(out.norm(dim=-1), cond.norm(dim=-1))
    comb = neg + 4.0 * (cond - neg)
    torch.testing.assert_close(out / out.norm(dim=-1, keepdim=True), comb / comb.norm(dim=-1, keepdim=True))
    assert true_cfg(cond, neg, 1.0) is cond and true_cfg(cond, neg, 0.5) is cond  # the pipeline: no CFG


def test_the_deploy_config_fits_one_8x80gb_node():
    """Measured on the meta device (about 10 s): per learner 40.86 GB of bf16 transformer, 10.19 GB of LoRA
    state (r=64, 6 fp32 copies), 24.8 GB saved for backward at micro-batch 1 (2 rows of 1024 + 128 tokens)."""
    from services.cluster.plan import nodes_from_file, plan_run, run_demand
    from services.config import load_config

    cfg = load_config(ROOT / "deploy" / "configs" / "qwen_image_nft.yaml", [])
    assert cfg.model.kind == "qwen_image" and cfg.model.lora_alpha == 128 and cfg.rollout.shift is None
    plan = plan_run(run_demand(cfg), nodes_from_file(ROOT / "deploy" / "clusters" / "one_8gpu_node.yaml"))
    assert plan.ok and not plan.warnings, (plan.unplaced, plan.memory, plan.warnings)
    learner = next(a for a in plan.actors if a.role == "learner")
    terms = {t.name: t.gb for t in learner.terms}
    assert terms["transformer"] == pytest.approx(VARIANTS["qwen-image"].transformer_params * 2 / 1e9)
    saved = next(gb for name, gb in terms.items() if name.endswith("(saved for backward)"))
    assert 20 < saved < 30 and learner.memory_gb < 80  # 24.8 GB and 78.1 GB measured


def test_model_card_loads_the_export_in_the_stock_pipeline():
    from services.serving.export import _usage

    cfg = ExperimentConfig(model={"kind": "qwen_image", "path": "base/dir", "lora_rank": 4})
    assert _usage(cfg, "base/dir").startswith('pipe = QwenImagePipeline.from_pretrained("base/dir")\n')
