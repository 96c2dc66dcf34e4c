"""FLUX.2's data and plan (``services.config.families_flux2``, ``services.models.families.flux2``), torch on meta only.

* Each variant's plan figures are the meta-device counts of its published config (``deploy/architectures``):
  transformer parameters and LoRA parameters per rank over the family's targets, which are Flow-Factory's
  ``default_target_modules`` (``benchmarks.meta_families``' copy of the list); what each target matches: the
  twelve double-stream names only the double-stream blocks, ``attn.to_qkv_mlp_proj`` only the single-stream
  blocks, whose output projection ``attn.to_out`` (a bare Linear) no target reaches.
* ``model.path`` picks the variant; the variant's text encoders are what the plan counts.
* The grid's ``mu`` is diffusers' ``compute_empirical_mu`` at every token / step count, on both branches (4300).
* ``normguard plan`` of ``deploy/configs/flux2_klein_9b_nft.yaml`` fits one 8 x 80 GB node; the transformer's
  activation figures come from ``plan_inputs`` on the published config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import meta_families as mf
from services.config.families import VARIANTS, spec
from services.config.families_flux2 import FLUX2_TARGETS

pytestmark = pytest.mark.service
ROOT = Path(__file__).parents[2]
DOUBLE, SINGLE = "transformer_blocks.", "single_transformer_blocks."


def test_the_targets_are_flow_factorys():
    assert spec("flux2").lora.targets == FLUX2_TARGETS
    assert FLUX2_TARGETS == tuple(dict.fromkeys(mf.BY_NAME["flux2-dev"].targets))  # its list, "attn.to_out.0" once
    assert spec("flux2").lora.rank == 64 and spec("flux2").lora.alpha_per_rank == 2.0


@pytest.mark.parametrize("name", ["flux2-dev", "flux2-klein-4b", "flux2-klein-9b"])
def test_plan_figures_are_the_meta_counts_and_each_target_is_recorded(name):
    tr, v = mf.build(name), VARIANTS[name]
    assert mf.parameters(tr) == v.transformer_params
    assert mf.lora_per_rank(tr, FLUX2_TARGETS) == v.lora_per_rank
    c = tr.config
    for target, modules in mf.matched(tr, FLUX2_TARGETS).items():
        if target == "attn.to_qkv_mlp_proj":
            assert modules == [f"{SINGLE}{i}.attn.{target[5:]}" for i in range(c.num_single_layers)]
        else:
            assert len(modules) == c.num_layers and all(m.startswith(DOUBLE) for m in modules), target
    linears = {n for n, m in tr.named_modules() if type(m).__name__ == "Linear"}
    fused = set(mf.matched(tr, FLUX2_TARGETS)["attn.to_qkv_mlp_proj"])
    unadapted = {n for n in linears if n.startswith(SINGLE)} - fused
    assert unadapted == {f"{SINGLE}{i}.attn.to_out" for i in range(c.num_single_layers)}


def test_the_model_path_picks_the_variant_and_its_text_encoder():
    variant = spec("flux2").variant
    assert variant("black-forest-labs/FLUX.2-dev").name == "flux2-dev"
    assert variant("/mnt/checkpoints/models/flux2-klein-base-9b").name == "flux2-klein-9b"
    assert variant("black-forest-labs/FLUX.2-klein-4B").name == "flux2-klein-4b"
    assert variant("black-forest-labs/FLUX.2-klein-4B").components_b < variant("x/FLUX.2-klein-9B").components_b
    assert variant("black-forest-labs/FLUX.2-dev").components_b is None  # the family's: Mistral-Small 24 B + VAE
    assert spec("flux2").text_tokens(512) == 512 and spec("flux2").latent_patch == 2


def test_mu_is_the_pipelines_empirical_fit_in_tokens_and_steps():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from services.models.schedules import FlowSchedule, empirical_mu

    for tokens in (16, 256, 576, 1024, 4300, 4301, 16384):
        for steps in (1, 4, 8, 10, 28, 50):
            assert empirical_mu(tokens, steps) == compute_empirical_mu(tokens, steps)
    sched = FlowSchedule.from_scheduler_config({"use_dynamic_shifting": True}, base="flux", image_seq_len=1024,
                                               mu_of_steps=lambda n: empirical_mu(1024, n))  # fmt: skip
    assert sched.mu is None and sched.mu_at(8) != sched.mu_at(28)
    with pytest.raises(ValueError, match="num_steps"):
        sched.train_shift()
    static = FlowSchedule.from_scheduler_config({}, base="flux", image_seq_len=1024, mu_of_steps=lambda n: 9.0)
    assert static.mu_of_steps is None and static.train_shift(num_steps=8) == 1.0  # no dynamic shifting: ignored


def test_the_klein_recipe_fits_one_8_gpu_node():
    from services.cluster.plan import nodes_from_file, plan_run, run_demand
    from services.config import load_config

    cfg = load_config(ROOT / "deploy" / "configs" / "flux2_klein_9b_nft.yaml", [])
    assert cfg.model.kind == "flux2" and spec("flux2").variant(cfg.model.path).name == "flux2-klein-9b"
    plan = plan_run(run_demand(cfg), nodes_from_file(ROOT / "deploy" / "clusters" / "one_8gpu_node.yaml"))
    assert plan.ok and not plan.warnings, (plan.unplaced, plan.warnings, plan.memory)


def test_the_dev_recipe_fits_one_8_gpu_node_only_with_activation_checkpointing():
    """FLUX.2 [dev]'s 64.45 GB bf16 transformer leaves no room for one sample's saved activations (25 GB at
    512 px and 512 text rows); with ``model.gradient_checkpointing`` the plan counts the blocks' inputs and the
    largest block re-materialised in backward, and the learner fits."""
    from services.cluster.plan import nodes_from_file, plan_run, run_demand
    from services.config import load_config

    nodes = nodes_from_file(ROOT / "deploy" / "clusters" / "one_8gpu_node.yaml")
    path = ROOT / "deploy" / "configs" / "flux2_dev_nft.yaml"
    cfg = load_config(path, [])
    assert cfg.model.gradient_checkpointing and spec("flux2").variant(cfg.model.path).name == "flux2-dev"
    plan = plan_run(run_demand(cfg), nodes)
    assert plan.ok and not plan.warnings, (plan.unplaced, plan.warnings, plan.memory)
    (learner,) = [a for a in run_demand(cfg) if a.role == "learner"]
    terms = {t.name: t.gb for t in learner.terms}
    recompute = terms["backward: one checkpointed block recomputed"]
    full = load_config(path, ["model.gradient_checkpointing=false"])
    (plain,) = [a for a in run_demand(full) if a.role == "learner"]
    saved = {t.name: t.gb for t in plain.terms}["activations of 1 samples (saved for backward)"]
    assert 0 < recompute < saved and terms["activations of 1 samples (saved for backward)"] < saved / 10
    assert not plan_run(run_demand(full), nodes).ok


def test_activation_checkpointing_trains_the_same_lora_gradients(tmp_path):
    """``model.gradient_checkpointing`` turns on diffusers' checkpointing in the generator; the LoRA gradients of
    one velocity loss are those without it (float32 CPU: the recompute runs the same kernels)."""
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_flux2

    from services.config import ModelConfig
    from services.models import build_generator

    path = str(tiny_flux2.save_tiny_flux2_klein(tmp_path / "klein"))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation in both
        gen = build_generator(ModelConfig(kind="flux2", path=path, resolution=32, lora_rank=2,
                                          gradient_checkpointing=ckpt))  # fmt: skip
        assert gen.transformer.is_gradient_checkpointing == ckpt
        cond = gen.encode_prompts(["a photo of a cat"])
        x = torch.randn(1, *gen.latent_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for p in gen.trainable_parameters():
                p.add_(0.01)  # LoRA B starts at zero: move it so the A gradients are non-zero too
        gen.velocity(x, torch.tensor([0.6]), cond).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.trainable_parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)
