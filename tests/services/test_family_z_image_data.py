"""Z-Image's data and plan (``services.config.families_z_image``, ``services.models.families.z_image``).

* The published transformer (``deploy/architectures/z-image``) on the meta device has the plan's parameter count
  and, with Flow-Factory's ``default_target_modules``, the plan's LoRA parameters per rank; every target resolves,
  in the 30 main layers and in both refiners.
* The plan's activation count (``ZImageFamily.plan_inputs`` on meta) equals a real CPU forward's on a tiny
  Z-Image with the LoRA (1 %: the FlashAttention op's RNG-state tensors, as for SD3 in ``test_plan_memory``).
* ``deploy/configs/z_image_nft.yaml`` (Flow-Factory's Z-Image recipe: 512 px, 48 prompts x 16, guidance 4 = our
  w 5, r 64) fits one node of 8 x 80 GB (``normguard plan``'s placement).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.cluster import activations as act
from services.config.families import LORA_DEFAULTS, VARIANTS

pytestmark = pytest.mark.service

ROOT = Path(__file__).parents[2]
TARGETS = LORA_DEFAULTS["z_image"].targets
TINY = dict(
    _class_name="ZImageTransformer2DModel", dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
    cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32],
)  # fmt: skip


def test_published_counts_and_lora_targets_are_the_plans():
    from peft import LoraConfig

    config = json.loads((ROOT / "deploy" / "architectures" / "z-image" / "transformer_config.json").read_text())
    with torch.device("meta"):
        tr = act.build_transformer(config, torch.bfloat16, None, TARGETS)
    assert sum(p.numel() for p in tr.parameters()) == VARIANTS["z-image"].transformer_params
    tr.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in tr.named_parameters() if ".lora_A." in n}
    assert sum(p.numel() for n, p in tr.named_parameters() if "lora_" in n) == 4 * VARIANTS["z-image"].lora_per_rank
    for target in TARGETS:
        stacks = {n.split(".")[0] for n in adapted if n.endswith("." + target)}
        assert stacks == {"layers", "noise_refiner", "context_refiner"}, (target, stacks)


def _tiny(device: str):
    torch.manual_seed(0)
    with torch.device(device):
        tr = act.build_transformer(TINY, torch.float32, 4, TARGETS)
    return tr, act.transformer_inputs(tr, 16, 7, device=device)


def _tensors(kwargs: dict) -> list[torch.Tensor]:
    flat = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    return flat + [t for v in kwargs.values() if isinstance(v, list) for t in v]


def _real_saved_bytes(tr, kwargs) -> int:
    """Saved storages of a real CPU forward (deduplicated by data pointer, less weights and inputs)."""
    skip = {t.untyped_storage().data_ptr() for t in [*tr.parameters(), *tr.buffers(), *_tensors(kwargs)]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (out,) = tr(**kwargs)[0]
    out.float().pow(2).mean().backward()
    assert any(p.grad is not None for p in tr.parameters() if p.requires_grad)
    return sum(seen.values())


def test_the_meta_count_equals_a_real_cpu_forward_on_a_tiny_z_image():
    meta = act.measure(*_tiny("meta"), torch.float32)
    tr, kwargs = _tiny("cpu")
    real = _real_saved_bytes(tr, kwargs)
    assert real > 0 and abs(meta.saved - real) <= 0.01 * real, (meta.saved, real)
    cpu = act.measure(tr, kwargs, torch.float32, flash=False)
    assert cpu.no_grad_peak > 0 and abs(meta.no_grad_peak - cpu.no_grad_peak) <= 0.01 * cpu.no_grad_peak


def test_the_recipe_fits_one_8_gpu_node():
    from services.cluster.plan import nodes_from_file, plan_run, run_demand
    from services.config import load_config

    cfg = load_config(ROOT / "deploy" / "configs" / "z_image_nft.yaml", [])
    m = cfg.model
    assert (m.kind, m.resolution, m.lora_rank, m.lora_alpha) == ("z_image", 512, 64, 128)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.rollout.shift) == (48, 16, None)
    plan = plan_run(run_demand(cfg), nodes_from_file(ROOT / "deploy" / "clusters" / "one_8gpu_node.yaml"))
    assert plan.ok and not plan.warnings, (plan.unplaced, plan.warnings)
    assert plan.totals()[1] == 8
