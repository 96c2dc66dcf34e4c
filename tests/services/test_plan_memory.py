"""``normguard plan``'s memory terms (services.cluster.memory / activations) against measurements.

* The meta-device count of what autograd saves equals a real CPU forward's, on a tiny SD3 with the LoRA
  adapters (float32, real storages deduplicated by data pointer, CPU's own attention kernel): tolerance
  1 %, which covers the FlashAttention op's two RNG-state tensors (24 bytes per attention call) that the
  meta count has and CPU's kernel does not.
* The per-sample count scales with the batch (the plan measures one sample and multiplies).
* The live-bytes tracker gives the peak of a hand-built sequence exactly, and the meta peak of a no-grad
  forward equals the real CPU forward's.
* A rollout that cannot fit a card fails the plan, naming the term and the knob.
* Only the components in ``model_index.json`` are weights (not a stray ``text_encoders/`` folder).
* ``slow``: the real SD3.5-M at 512 px, one sample, in bf16: the GiB the learner saves per sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.cluster import activations as act
from services.cluster.memory import pipeline_bytes
from services.config.families import LORA_DEFAULTS

pytestmark = pytest.mark.service

ROOT = Path(__file__).parents[2]
TINY_SD3 = dict(
    _class_name="SD3Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
    pooled_projection_dim=16, pos_embed_max_size=16, dual_attention_layers=[0], qk_norm="rms_norm",
)  # fmt: skip
TARGETS = LORA_DEFAULTS["sd3"].targets


def _tiny(device: str, batch: int = 1):
    torch.manual_seed(0)
    with torch.device(device):
        tr = act.build_transformer(TINY_SD3, torch.float32, 4, TARGETS)
    kwargs = act.transformer_inputs(tr, 16, 7, device=device)
    if batch > 1:
        kwargs = {k: v.repeat(batch, *[1] * (v.ndim - 1)) if isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}  # fmt: skip
    return tr, kwargs


def _real_saved_bytes(tr, kwargs) -> int:
    """Saved storages of a real CPU forward, deduplicated by data pointer, less weights and inputs."""
    skip = {t.untyped_storage().data_ptr() for t in [*tr.parameters(), *tr.buffers(), *kwargs.values()]
            if isinstance(t, torch.Tensor)}  # fmt: skip
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tr(**kwargs)[0]
    out.float().pow(2).mean().backward()  # the graph is a real one: backward runs on what was saved
    assert any(p.grad is not None for p in tr.parameters() if p.requires_grad)
    return sum(seen.values())


def test_the_meta_count_equals_a_real_cpu_forward_on_a_tiny_sd3():
    meta = act.measure(*_tiny("meta"), torch.float32)
    tr, kwargs = _tiny("cpu")
    real = _real_saved_bytes(tr, kwargs)
    assert real > 0 and abs(meta.saved - real) <= 0.01 * real, (meta.saved, real)
    cpu = act.measure(tr, kwargs, torch.float32, flash=False)
    assert cpu.no_grad_peak > 0 and abs(meta.no_grad_peak - cpu.no_grad_peak) <= 0.01 * cpu.no_grad_peak


def test_the_per_sample_count_scales_with_the_batch():
    one, three = act.measure(*_tiny("meta"), torch.float32), act.measure(*_tiny("meta", batch=3), torch.float32)
    assert abs(three.saved - 3 * one.saved) <= 0.01 * three.saved, (one.saved, three.saved)


def test_the_live_peak_of_a_known_sequence():
    with act.LivePeak() as live:
        a = torch.zeros(1000, device="meta")  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        c = b + 1  # 8000 live again (a was freed)
        d = torch.cat([b, c])  # 16000: b, c and d (8000)
    assert live.peak == 16000 and d.numel() == 2000


def test_the_cuda_autocast_casts_as_cuda_does():
    """CUDA's lists: a matmul in bf16, a layer norm in float32 (CPU autocast would keep bf16)."""
    x = torch.zeros(2, 8, device="meta")
    w = torch.zeros(8, 8, device="meta", dtype=torch.bfloat16)
    with act.CudaAutocast(torch.bfloat16):
        y = torch.nn.functional.linear(x, w)
        z = torch.nn.functional.layer_norm(y, (8,))
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32


def test_a_rollout_that_cannot_fit_fails_the_plan_with_the_reason(monkeypatch):
    from services.cluster.plan import nodes_from_file, plan_run, run_demand
    from services.config import load_config

    sizes = act.measure(*_tiny("meta"), torch.float32)  # a real measurement (tiny), scaled to a GPU model's size
    big = act.TransformerBytes(saved=sizes.saved * 10**4, no_grad_peak=sizes.no_grad_peak * 10**3)
    monkeypatch.setattr(act, "transformer_bytes", lambda *a, **k: big)
    monkeypatch.setattr(act, "vae_decode_bytes", lambda *a, **k: 10**9)  # 1 GB per image
    nodes = nodes_from_file(ROOT / "deploy" / "clusters" / "two_8gpu_nodes.yaml")
    cfg = load_config(ROOT / "deploy" / "configs" / "sd35_medium_nft.yaml", ["rollout.decode_batch=null"])
    plan = plan_run(run_demand(cfg), nodes)
    assert not plan.ok and not plan.unplaced
    share = cfg.samples_per_step // cfg.rollout.num_samplers
    assert any(m.startswith("sampler:") and f"decode of {share} images" in m and "rollout.decode_batch" in m
               for m in plan.memory), plan.memory  # fmt: skip
    fixed = load_config(ROOT / "deploy" / "configs" / "sd35_medium_nft.yaml", ["rollout.decode_batch=4"])
    sampler = next(a for a in run_demand(fixed) if a.role == "sampler")
    assert not any(m.startswith("sampler:") for m in plan_run(run_demand(fixed), nodes).memory), sampler.terms


def test_only_the_pipelines_components_are_weights(tmp_path: Path):
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "image_encoder": [None, None]}  # fmt: skip
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    files = {"transformer/a.safetensors": 1000, "transformer/a.bin": 900, "text_encoder/m.safetensors": 500,
             "text_encoders/t5xxl.safetensors": 9999, "image_encoder/x.safetensors": 7}  # fmt: skip
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"\0" * size)
    assert pipeline_bytes(tmp_path) == {"transformer": 1000.0, "text_encoder": 500.0}


@pytest.mark.slow
def test_sd35_medium_saves_about_two_gib_per_sample_at_512px():
    """The learner's activations at micro-batch 1 (bf16 base, LoRA r=32, 77 + 128 text tokens)."""
    per = act.transformer_bytes("sd3.5-medium", resolution=512, text_tokens=77 + 128, dtype="bfloat16",
                                lora_rank=32, targets=TARGETS)  # fmt: skip
    assert 1.5 * 2**30 < per.saved < 3 * 2**30 and 0 < per.no_grad_peak < per.saved
