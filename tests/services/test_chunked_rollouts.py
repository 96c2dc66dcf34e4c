"""Memory-aware rollouts: ``rollout.micro_batch`` / ``rollout.decode_batch`` / ``reward.score_batch`` split
the transformer calls, the VAE decode and the scoring into chunks without changing the result beyond float32
rounding (to the bit on CPUs whose kernels do not change with the batch size; see CASES)."""

import sys
from pathlib import Path

import pytest
import torch

from services.config import ModelConfig, load_config
from services.training.rollout import RolloutSampler
from services.training.scoring import ScorerWorker
from services.types import RolloutRequest, ScorerBuild

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_models  # noqa: E402

pytestmark = pytest.mark.service

FIELDS = ("latents", "images", "norm_ratio", "sigmas", "states", "log_probs")


def _request(prompts, *, sde: float, guidance: float, steps: int = 3) -> RolloutRequest:
    n = len(prompts)
    return RolloutRequest(
        prompts=list(prompts),
        group_ids=[i // 2 for i in range(n)],
        seeds=[100 + 7 * i for i in range(n)],
        num_steps=steps,
        guidance_scale=guidance,
        shift=None,
        sde_noise_level=sde,
    )


def _assert_same(a, b, chunks, atol=None):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            same = torch.equal(x, y) if atol is None else torch.allclose(x, y, rtol=0, atol=atol)
            assert same, f"{f} differs with {chunks}"


def _calls(gen) -> list[int]:
    seen = []
    gen.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw.get("hidden_states") if "hidden_states" in kw else a[0]).shape[0]),
        with_kwargs=True,
    )
    return seen


def _check_chunking(make_sampler, prompts, *, sde, guidance, micro, decode, atol=None):
    whole = make_sampler(None, None)
    chunked = make_sampler(micro, decode)
    rows = _calls(chunked.gen)
    req = _request(prompts, sde=sde, guidance=guidance)
    a, b = whole.generate(req), chunked.generate(req)
    _assert_same(a, b, (micro, decode), atol)
    per_row = 2 if guidance != 1.0 else 1
    assert rows and max(rows) <= per_row * micro  # the chunks really were that small
    ev_a = whole.eval_samples(prompts, num_steps=2, guidance_scale=guidance, seed=3)
    ev_b = chunked.eval_samples(prompts, num_steps=2, guidance_scale=guidance, seed=3)
    assert all(torch.allclose(ev_a[k], ev_b[k], rtol=0, atol=atol or 0.0) for k in ev_a)
    return a


# (batch, guidance, micro_batch, decode_batch): chunks that divide the batch and chunks with a remainder. Each
# transformer call carries >= 4 rows and each decode >= 2 latents. On the CPU these tests were first run on,
# that made the chunked rollout equal to the bit; on another Xeon (2026-12-02) the kernels (MKL's sgemm, the
# VAE's convolutions) pick another code path by batch size and the results agree to float32 rounding only. The
# bits are a property of the kernels, not of the chunking, so the check is float32 rounding (CHUNK_ATOL).
CASES = ((12, 1.0, 4, 5), (10, 3.0, 4, 4), (10, 3.0, 2, 6))
CHUNK_ATOL = 1e-5


@pytest.mark.parametrize("sde", [0.0, 0.7])
def test_digits_chunked_rollouts_agree_to_float_rounding(digits_assets, sde):
    cfg = load_config(None, [])
    assert cfg.rollout.micro_batch is None and cfg.rollout.decode_batch is None  # the default: whole share
    assert cfg.reward.score_batch is None
    path = str(digits_assets.model_path)

    def make(micro, decode):
        return RolloutSampler(cfg.model, path, micro_batch=micro, decode_batch=decode)

    for b, guidance, micro, decode in CASES:
        prompts = [f"a handwritten digit {i % 10}" for i in range(b)]
        out = _check_chunking(make, prompts, sde=sde, guidance=guidance, micro=micro, decode=decode, atol=CHUNK_ATOL)
        assert (out.log_probs is not None) == (sde > 0)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return tiny_models.save_tiny_sd3(tmp_path_factory.mktemp("chunk") / "sd3")


@pytest.mark.parametrize("lora_rank", [None, 4])
def test_tiny_sd3_chunked_rollouts_agree_to_float_rounding(tiny_sd3, lora_rank):
    model = ModelConfig(kind="sd3", path=str(tiny_sd3), resolution=64, lora_rank=lora_rank)

    moved = {}  # the same moved policy in every sampler (peft draws lora_A at random per build)

    def make(micro, decode):
        sampler = RolloutSampler(model, str(tiny_sd3), micro_batch=micro, decode_batch=decode)
        if not moved:
            g = torch.Generator().manual_seed(0)
            own = sampler.gen.trainable_state_dict()
            moved.update({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in own.items()})
        sampler.set_weights(moved, 1)  # policy != reference
        return sampler

    words = ["a photo of a cat", "a dog", "a cat", "a photo of a dog", "a digit"]
    for (b, guidance, micro, decode), sde in zip(CASES, (0.7, 0.0, 0.7)):
        prompts = [words[i % len(words)] for i in range(b)]
        out = _check_chunking(make, prompts, sde=sde, guidance=guidance, micro=micro, decode=decode, atol=CHUNK_ATOL)
        assert not torch.allclose(out.norm_ratio, torch.ones_like(out.norm_ratio))  # policy moved


def test_one_sample_chunks_agree_to_float_rounding(tiny_sd3):
    model = ModelConfig(kind="sd3", path=str(tiny_sd3), resolution=64)
    make = lambda micro, decode: RolloutSampler(model, str(tiny_sd3), micro_batch=micro, decode_batch=decode)  # noqa: E731
    _check_chunking(make, ["a cat", "a dog", "a digit"], sde=0.7, guidance=1.0, micro=1, decode=1, atol=1e-5)


class _CountingScorer:
    name = "count"

    def __init__(self, path=None, device="cpu", **options):
        self.calls = []

    def score(self, images, prompts, metadata=None):
        self.calls.append(len(prompts))
        assert metadata is None or len(metadata) == len(prompts)
        return images.mean(dim=(1, 2, 3)) * 10 + torch.tensor([len(p) for p in prompts], dtype=torch.float32)


class _GroupScorer(_CountingScorer):
    name = "group"
    groupwise = True

    def score(self, images, prompts, group_ids, metadata=None):
        self.calls.append(len(prompts))
        means = images.mean(dim=(1, 2, 3))
        return means - torch.stack([means[group_ids == g].mean() for g in group_ids])


def test_scorer_worker_scores_in_chunks_with_the_same_scores(digits_assets):
    specs = {
        "count": ScorerBuild(path=None, options={}, impl=f"{__name__}:_CountingScorer"),
        "group": ScorerBuild(path=None, options={}, impl=f"{__name__}:_GroupScorer"),
        "digits_ink": ScorerBuild(path=str(digits_assets.scorer_path), options={}),
    }
    images = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = [f"a handwritten digit {i % 10}" for i in range(12)]
    groups = torch.arange(12) // 3
    meta = [{"i": i} for i in range(12)]
    # chunks of >= 4 images (the CNN's linears at fewer rows: float rounding, see CASES)
    whole, chunked = ScorerWorker(specs), ScorerWorker(specs, score_batch=4)
    for kw in ({}, {"metadata": meta}):
        a = whole.score(images, prompts, group_ids=groups, **kw)
        b = chunked.score(images, prompts, group_ids=groups, **kw)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert chunked.scorers["count"].calls == [4, 4, 4] * 2  # per-image: chunks of score_batch
    assert chunked.scorers["group"].calls == [12, 12]  # group-wise: the whole request
    assert whole.scorers["count"].calls == [12, 12]
    odd = ScorerWorker({"count": specs["count"]}, score_batch=5)  # a remainder chunk, metadata sliced along
    assert torch.equal(odd.score(images, prompts, metadata=meta)["count"], a["count"])
    assert odd.scorers["count"].calls == [5, 5, 2]
