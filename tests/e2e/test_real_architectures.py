"""The real SD3.5-M / SD3.5-L / FLUX.1-dev transformers without weights (deploy/architectures).

* On the meta device: parameter counts equal what ``normguard plan`` assumes (``services.config.families``),
  transformer and LoRA (the family targets of ``services.config.families``; that they resolve is
  ``tests/services/test_models.py``'s test).
* ``slow``: SD3.5-M at its real depth and width (24 joint blocks, 13 with the dual attention, qk RMS-norm) in
  bfloat16 on CPU with random weights, the family LoRA attached by ``FlowGenerator`` (fp32 adapters), one
  DiffusionNFT + NormGuard loss (``compose_objective``, as the learner calls it) on one 8x8 latent (16 image
  tokens) and 4 text tokens, forward and backward. CPU bf16 matmuls are slow (a 16x16 latent's forward
  took ~47 s on the shared 2-core machine), hence the few tokens; the depth and width are the real ones.
  Measured there (load ~7 on 2 cores): 132 s (37 s building), 8.0 GiB peak RSS.
"""

import json
import resource
import time
from pathlib import Path

import pytest
import torch

from services.config.families import LORA_DEFAULTS, VARIANTS  # the counts normguard plan uses

pytestmark = pytest.mark.e2e

ARCH = Path(__file__).parents[2] / "deploy" / "architectures"
MODELS = {"sd3.5-medium": ("sd3", "sd3.5-medium"), "sd3.5-large": ("sd3", "sd3.5-large"), "flux1-dev": ("flux", "flux")}


def _build(model: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    config = json.loads((ARCH / model / "transformer_config.json").read_text())
    cls = FluxTransformer2DModel if model.startswith("flux") else SD3Transformer2DModel
    return cls.from_config(config)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_meta_parameter_counts_are_the_plans(model):
    from peft import LoraConfig

    kind, fam = MODELS[model]
    with torch.device("meta"):
        tr = _build(model)
    assert sum(p.numel() for p in tr.parameters()) == VARIANTS[fam].transformer_params
    tr.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(LORA_DEFAULTS[kind].targets)))
    lora = sum(p.numel() for n, p in tr.named_parameters() if "lora_" in n)
    assert lora == 4 * VARIANTS[fam].lora_per_rank


def _generator(transformer, rank: int):
    """A FlowGenerator around a bare transformer (no text encoders / VAE: the conditions are given)."""
    from services.models.base import FlowGenerator
    from services.models.pipelines import SD3Generator

    class Bare(FlowGenerator):
        name = "sd3"
        compute_dtype = torch.bfloat16
        _call_backbone = SD3Generator._call_backbone

    targets = LORA_DEFAULTS["sd3"].targets
    return Bare(
        transformer, lora_rank=rank, lora_alpha=LORA_DEFAULTS["sd3"].alpha_per_rank * rank, lora_targets=targets
    )


def _random_bf16_sd35m():
    """SD3.5-M in bfloat16 with random weights: built on meta, storage allocated in bf16, a cheap normal fill."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    with torch.device("meta"):
        tr = _build("sd3.5-medium").to(torch.bfloat16)
    tr = tr.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    bank = (0.02 * torch.randn(2**22 + 7, generator=g)).to(torch.bfloat16)  # normal_ on 2.2 B values: ~25 s
    with torch.no_grad():
        for i, (name, p) in enumerate(tr.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # the norms' weights
                p.fill_(1.0)
            else:  # a window of the random bank, from a per-tensor offset, repeated
                flat, start = p.view(-1), (7919 * i) % (2**22)
                for j in range(0, flat.numel(), 2**22 - start):
                    part = flat[j : j + 2**22 - start]
                    part.copy_(bank[start : start + part.numel()])
        pe = tr.pos_embed  # the sincos table is a buffer: recompute it as PatchEmbed does
        table = get_2d_sincos_pos_embed(pe.pos_embed.shape[-1], pe.pos_embed_max_size, base_size=pe.base_size,
                                        interpolation_scale=pe.interpolation_scale, output_type="pt")  # fmt: skip
        pe.pos_embed.copy_(table.unsqueeze(0))
    return tr


@pytest.mark.slow
def test_real_depth_sd35m_lora_forward_backward_through_the_loss():
    from normguard_core.conventions import interpolate
    from normguard_core.losses import NormGuardParams, Reference, SampleBatch, compose_objective
    from services.config import load_config
    from services.methods import get_method
    from services.models.base import Condition

    t0 = time.perf_counter()
    torch.manual_seed(0)
    tr = _random_bf16_sd35m()
    assert len(tr.transformer_blocks) == 24 and sum(b.attn2 is not None for b in tr.transformer_blocks) == 13
    assert tr.transformer_blocks[0].attn.norm_q is not None  # qk RMS-norm
    gen = _generator(tr, rank=4)
    built = time.perf_counter() - t0
    lora = gen.trainable_parameters()
    assert lora and {p.dtype for p in lora} == {torch.float32}
    assert all("lora_" in n for n, p in gen.transformer.named_parameters() if p.requires_grad)
    frozen = [p for p in gen.transformer.parameters() if not p.requires_grad]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    with torch.no_grad():  # move the LoRA B off zero so that policy != reference
        for n, p in gen.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.01)

    b, g, side = 1, torch.Generator().manual_seed(1), 8  # 8x8 latent: 16 image tokens (2x2 patches), 4 text
    cond = Condition(
        {"prompt_embeds": torch.randn(b, 4, 4096, generator=g), "pooled": torch.randn(b, 2048, generator=g)}
    )
    x0, noise = torch.randn(b, 16, side, side, generator=g), torch.randn(b, 16, side, side, generator=g)
    sigma = torch.tensor([0.7])
    x = interpolate(x0, noise, sigma)
    cfg = load_config(None, ["normguard.weight=0.5", "normguard.margin=0.0"])
    v_theta = gen.velocity(x, sigma, cond)
    v_ref = gen.velocity(x, sigma, cond, reference=True)
    assert v_theta.dtype == torch.float32 and v_theta.requires_grad and not v_ref.requires_grad
    assert torch.isfinite(v_theta).all() and not torch.equal(v_theta, v_ref)
    batch = SampleBatch(v_theta=v_theta, x0=x0, noise=noise, sigma=sigma, advantages=torch.tensor([1.0]),
                        reward_prob=torch.tensor([0.8]), v_old=v_ref, v_ema=None)  # fmt: skip
    ref = Reference(v_theta=v_theta, v_ref=v_ref, kl_scale=torch.ones(b))
    ng = NormGuardParams(weight=cfg.normguard.weight, margin=cfg.normguard.margin, power=cfg.normguard.power)
    method = get_method(cfg.loss)
    out = compose_objective(method.loss, batch, ref, normguard=ng, kl_weight=method.kl_weight)
    assert cfg.loss.name == "diffusion_nft" and "normguard" in out.terms and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in lora]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(float(gr.abs().sum()) for gr in grads) > 0
    assert all(p.grad is None for p in frozen)
    wall = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print(
        f"\nSD3.5-M real depth bf16 LoRA fwd+bwd: built in {built:.1f} s, total {wall:.1f} s, peak RSS {peak_gib:.1f} GiB"
    )
    # printed, not asserted: a time or memory bound on a shared machine is a benchmark, not a test
