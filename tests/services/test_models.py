"""Generators: tiny SD3 / FLUX round-trip through the real loading path; the digits default."""

import sys
from pathlib import Path

import pytest
import torch

from normguard_core.conventions import sigma_grid
from normguard_core.samplers import sample_trajectory
from services.config import ModelConfig
from services.data.digits import parse_digit_prompt
from services.models import build_generator

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


# ---- each family's sampling grid (services.models.schedules) -------------------------------------


def _diffusers_grid(config: dict, base: str, n: int, seq_len: int) -> torch.Tensor:
    """The grid the stock pipeline hands its scheduler: SD3 ``set_timesteps(N[, mu])``, FLUX
    ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=calculate_shift(seq_len))``."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    c = sched.config
    mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    if base == "flux":
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    else:
        sched.set_timesteps(n, mu=mu if c.use_dynamic_shifting else None)
    return sched.sigmas


PUBLISHED = {
    "sd3.5-medium": "scheduler",
    "sd3.5-large": "scheduler",
    "flux1-dev": "flux",
}


@pytest.mark.parametrize("model", list(PUBLISHED))
@pytest.mark.parametrize("seq_len", [256, 576, 1024, 4096])
def test_family_grid_is_the_stock_schedulers_bit_for_bit(model, seq_len):
    from services.models.schedules import FlowSchedule

    config, base = tiny_models.published_config(model, "scheduler"), PUBLISHED[model]
    for variant in (config, {**config, "time_shift_type": "linear"}, {**config, "use_dynamic_shifting": True}):
        schedule = FlowSchedule.from_scheduler_config(variant, base=base, image_seq_len=seq_len)
        for n in (1, 2, 4, 10, 28):
            assert torch.equal(schedule.sigma_grid(n), _diffusers_grid(variant, base, n, seq_len)), (variant, n)


def test_the_issues_four_step_grids():
    """SD3.5's static shift 3 and FLUX.1-dev's mu = 0.63 at 512 px (1024 image tokens) at 4 steps."""
    from services.models.schedules import FlowSchedule

    sd35 = FlowSchedule.from_scheduler_config(
        tiny_models.published_config("sd3.5-medium", "scheduler"), base="scheduler", image_seq_len=1024
    )
    flux = FlowSchedule.from_scheduler_config(
        tiny_models.published_config("flux1-dev", "scheduler"), base="flux", image_seq_len=1024
    )
    assert flux.mu == pytest.approx(0.63) and flux.train_shift() == pytest.approx(1.8776, abs=1e-4)
    assert sd35.sigma_grid(4).tolist() == pytest.approx([1, 0.8577, 0.6022, 0.0089, 0], abs=1e-4)
    assert flux.sigma_grid(4).tolist() == pytest.approx([1, 0.8492, 0.6525, 0.3849, 0], abs=1e-4)
    assert torch.equal(sd35.sigma_grid(10), sigma_grid(10, shift=3.0))  # SD3: the core's grid, unchanged
    with pytest.warns(UserWarning, match="replaces this scheduler's resolution-dependent shift"):
        static = flux.sigma_grid(4, shift=3.0)  # an explicit shift is honoured, and says what it replaces
    assert static.tolist() == pytest.approx([1, 0.9, 0.75, 0.5, 0], abs=1e-6)


def test_digits_grid_and_shift_config_are_unchanged(digits_assets):
    from services.config import load_config

    gen = build_generator(ModelConfig(kind="digits"), path=str(digits_assets.model_path))
    for n, shift in ((4, None), (10, 1.0), (20, 3.0)):
        assert torch.equal(gen.sigma_grid(n, shift=shift), sigma_grid(n, shift=1.0 if shift is None else shift))
    assert load_config(None, []).rollout.shift == 1.0  # filled in: serving and analyze read a number
    flux = load_config(Path(__file__).parents[2] / "deploy" / "configs" / "flux_dev_nft.yaml")
    assert flux.rollout.shift is None  # FluxPipeline's dynamic mu, not a static 3


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generators_take_their_scheduler_configs_schedule(tmp_path, kind):
    model = "sd3.5-medium" if kind == "sd3" else "flux1-dev"
    published = tiny_models.published_config(model, "scheduler")
    save = tiny_models.save_tiny_sd3 if kind == "sd3" else tiny_models.save_tiny_flux
    gen = build_generator(ModelConfig(kind=kind, path=str(save(tmp_path / kind, published)), resolution=128))
    tokens = (128 // 2 // 2) ** 2  # the tiny VAE halves, the 2x2 patches / packing halve again
    assert torch.equal(gen.sigma_grid(6), _diffusers_grid(published, PUBLISHED[model], 6, tokens))
    assert (gen.schedule.mu is not None) == (kind == "flux")


# ---- LoRA targets of the sources, per family (services.config.families) ---------------------------


def _unmatched(targets, names) -> list[str]:
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def test_lora_targets_resolve_on_the_tiny_and_the_real_architectures(pipelines):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from services.config.families import LORA_DEFAULTS

    for kind, path in pipelines.items():
        gen = build_generator(ModelConfig(kind=kind, path=str(path), resolution=64, lora_rank=4))
        targets = ModelConfig(kind=kind, path=str(path)).lora_targets
        assert targets == LORA_DEFAULTS[kind].targets
        adapted = [
            n.removesuffix(".lora_A.default")
            for n, _ in gen.transformer.named_modules()
            if n.endswith("lora_A.default")
        ]
        assert _unmatched(targets, adapted) == [], kind  # each listed name adapts >= 1 module
    for model, cls in (("sd3.5-medium", SD3Transformer2DModel), ("sd3.5-large", SD3Transformer2DModel),
                       ("flux1-dev", FluxTransformer2DModel)):  # fmt: skip
        with torch.device("meta"):
            real = cls.from_config(tiny_models.published_config(model, "transformer"))
        names = [n for n, _ in real.named_modules()]
        assert _unmatched(LORA_DEFAULTS["flux" if "flux" in model else "sd3"].targets, names) == [], model


def test_lora_alpha_defaults_to_the_sources_scale():
    assert ModelConfig(kind="sd3", path="p", lora_rank=32).lora_alpha == 64  # flow_grpo / DiffusionNFT: 32 / 64
    assert ModelConfig(kind="flux", path="p", lora_rank=64).lora_alpha == 128  # flow_grpo FLUX: 64 / 128
    assert ModelConfig(kind="sd3", path="p", lora_rank=8, lora_alpha=8).lora_alpha == 8  # given: kept
    assert ModelConfig(kind="digits", lora_rank=4).lora_alpha is None  # digits: alpha = rank, as before
    assert ModelConfig(kind="digits").lora_targets == ("to_q", "to_k", "to_v", "to_out.0")


# ---- precision: what trains in float32, the frozen base in bfloat16 -------------------------------


def test_bf16_base_trains_fp32_lora_and_adam_state(pipelines):
    from services.config import load_config
    from services.training.learner import Learner
    from services.types import TrainBatch

    cfg = load_config(None, [
        "model.kind=sd3", f"model.path={pipelines['sd3']}", "model.resolution=64", "model.lora_rank=4",
        "model.dtype=bfloat16", "rollout.num_steps=2", "rollout.group_size=2", "rollout.prompts_per_step=2",
        "learner.timesteps_per_sample=1", "learner.micro_batch=4", "learner.lr=1e-2", "resources.num_learners=1",
    ])  # fmt: skip
    learner = Learner.from_config(cfg, str(pipelines["sd3"]))
    tr = learner.gen.transformer
    assert {p.dtype for p in learner.params} == {torch.float32}
    assert {p.dtype for p in tr.parameters() if not p.requires_grad} == {torch.bfloat16}
    seen = []
    tr.register_forward_pre_hook(lambda m, a, kw: seen.append((kw["timestep"], kw["hidden_states"])), with_kwargs=True)
    before = [p.detach().clone() for p in learner.params]
    prompts = ["a photo of a cat"] * 2 + ["a dog"] * 2
    batch = TrainBatch(
        latents=torch.randn(4, *learner.gen.latent_shape, generator=torch.Generator().manual_seed(0)),
        prompts=prompts,
        advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
        reward_prob=torch.tensor([0.75, 0.25, 0.6, 0.4]),
        step=0,
        rank=0,
        shard_units=(4,),
    )
    metrics = learner.update(batch)
    assert metrics["learner/skipped_nonfinite"] == 0.0 and metrics["learner/updates"] == 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.params))
    state = [learner.opt.state[p] for p in learner.params]
    assert state and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in state)
    assert {p.dtype for p in learner.params} == {torch.float32}  # still, after the step
    # the transformer sees float32 timesteps (1000 sigma, exactly) and latents; autocast does the rest
    assert seen and all(t.dtype == x.dtype == torch.float32 for t, x in seen)
    grid = learner.gen.sigma_grid(2)[:-1] * 1000.0
    assert all(bool(torch.isin(t, grid).all()) for t, _ in seen)
    v = learner.gen.velocity(batch.latents[:1], torch.full((1,), 0.5), learner.gen.encode_prompts(prompts[:1]))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
