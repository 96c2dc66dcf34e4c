"""Prompts encoded once (``model.prompt_embeddings: once``): the precomputed table equals on-the-fly encoding
(bit for bit in the same batch; CLIP's pooled projection rounds differently in another batch, on the fly as
well), a generator built on it loads no text encoder and is the same model, ``model.max_sequence_length``
reaches the tokenizers, an unknown prompt fails by name, and the digits default is untouched."""

import sys
from pathlib import Path

import pytest
import torch

from services.config import ExperimentConfig, ModelConfig
from services.models import build_generator
from services.models.pipelines import encode_prompt_file, encode_with_pipeline
from services.models.prompt_embeddings import ENCODE_BATCH, PromptEmbeddings, unique_prompts
from services.models.sampling import sample
from services.training.backends import LocalBackend
from services.training.build import prompt_embeddings
from services.training.prompts import PromptSet

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_models  # noqa: E402

pytestmark = pytest.mark.service

# more than one pre-pass batch of distinct prompts
PROMPTS = tuple(f"a photo of a {w} {i}" for i in range(ENCODE_BATCH // 2 + 3) for w in ("cat", "dog"))
_TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3": tiny_models.save_tiny_sd3(root / "sd3"), "flux": tiny_models.save_tiny_flux(root / "flux")}


@pytest.fixture(scope="module")
def tables(pipelines, tmp_path_factory):
    """``{(kind, max_sequence_length): (model config, table file)}`` of PROMPTS and ""."""
    root, out = tmp_path_factory.mktemp("tables"), {}
    for kind, path in pipelines.items():
        for length in (128, 24):
            cfg = ModelConfig(kind=kind, path=str(path), resolution=64, max_sequence_length=length)
            file = encode_prompt_file(cfg, str(path), unique_prompts(PROMPTS), root / f"{kind}-{length}.safetensors")
            out[kind, length] = (cfg, file)
    return out


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("length", [128, 24])
def test_table_equals_on_the_fly_encoding_at_the_configured_length(tables, kind, length):
    cfg, file = tables[kind, length]
    gen, table = build_generator(cfg), PromptEmbeddings(file)
    batch = list(unique_prompts(PROMPTS)[:ENCODE_BATCH])  # the pre-pass's first batch, encoded the same way
    live = encode_with_pipeline(gen.pipe, kind, batch, max_sequence_length=length, device="cpu")
    for name, tensor in table.lookup(batch).items():
        assert torch.equal(tensor, live[name]), name  # bit for bit
    # in another batch (repeats, other neighbours) the same prompts differ at most by float rounding
    mixed = [*PROMPTS[::-1], "", PROMPTS[0]]
    for name, tensor in gen.encode_prompts(mixed).tensors.items():
        torch.testing.assert_close(table.lookup(mixed)[name], tensor, rtol=1e-5, atol=1e-6)
    # max_sequence_length reached the T5 tokenizer: SD3's rows are CLIP's 77 + T5's, FLUX's are T5's
    assert live["prompt_embeds"].shape[1] == (77 + length if kind == "sd3" else length)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generator_on_the_table_loads_no_text_encoder_and_samples_the_same(tables, kind):
    cfg, file = tables[kind, 128]
    full, cached = build_generator(cfg), build_generator(cfg, prompt_embeddings=file)
    assert all(getattr(cached.pipe, part, None) is None for part in _TEXT_PARTS)
    assert any(getattr(full.pipe, part, None) is not None for part in _TEXT_PARTS)
    kept = {id(p) for m in (cached.pipe.transformer, cached.pipe.vae) for p in m.parameters()}
    held = [p for m in cached.pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()]
    assert held and all(id(p) in kept for p in held)  # only the transformer's and the VAE's weights
    prompts = list(PROMPTS[:3])
    noise = torch.randn(3, *full.latent_shape, generator=torch.Generator().manual_seed(0))
    cond, sigma = cached.encode_prompts(prompts), torch.full((3,), 0.5)
    assert torch.equal(cached.velocity(noise, sigma, cond), full.velocity(noise, sigma, cond))  # the same model
    guidance = 4.5 if kind == "sd3" else 1.0  # SD3 with CFG also reads the null prompt from the table
    kw = dict(noise=noise, num_steps=3, guidance_scale=guidance, measure_ratio=False)
    a, b = sample(full, prompts, **kw).trajectory.x0, sample(cached, prompts, **kw).trajectory.x0
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)  # the conditions' batching: float rounding only


def test_unknown_prompt_and_mismatched_length_fail_clearly(tables):
    cfg, file = tables["sd3", 128]
    gen = build_generator(cfg, prompt_embeddings=file)
    with pytest.raises(KeyError, match="a photo of a horse"):
        gen.encode_prompts([PROMPTS[0], "a photo of a horse"])
    with pytest.raises(ValueError, match="max_sequence_length=128"):
        build_generator(cfg.model_copy(update={"max_sequence_length": 24}), prompt_embeddings=file)


def test_pre_pass_encodes_once_and_is_reused(pipelines, tmp_path):
    model = {"kind": "sd3", "path": str(pipelines["sd3"]), "resolution": 64}
    cfg = ExperimentConfig.model_validate(
        {"model": model, "prompts": list(PROMPTS[:4]), "train": {"output_dir": str(tmp_path), "run_name": "r"}}
    )
    sets = (PromptSet(PROMPTS[:4]), PromptSet(PROMPTS[2:6]))
    first = prompt_embeddings(cfg, model["path"], sets, backend=LocalBackend())
    assert Path(first).parent == cfg.run_dir / "prompt_embeddings"
    table = PromptEmbeddings(first)
    assert len(table) == 1 + 6 and "" in table  # each prompt of both sets once, and CFG's null prompt
    stamp = Path(first).stat().st_mtime_ns
    assert (
        prompt_embeddings(cfg, model["path"], sets, backend=LocalBackend()) == first
    )  # a resume: reused, not re-encoded
    assert Path(first).stat().st_mtime_ns == stamp
    per_actor = cfg.model_copy(update={"model": cfg.model.model_copy(update={"prompt_embeddings": "per_actor"})})
    assert prompt_embeddings(per_actor, model["path"], sets, backend=LocalBackend()) is None


def test_digits_keeps_encoding_in_model(tmp_path):
    """The embedded default has no text encoder: nothing is precomputed (its generator is built as before,
    so its rollouts, updates and evaluation do not change) and a table handed to it is refused."""
    cfg = ExperimentConfig()
    assert cfg.model.prompt_embeddings == "once"
    assert prompt_embeddings(cfg, str(tmp_path), (PromptSet(cfg.prompts),), backend=LocalBackend()) is None
    with pytest.raises(ValueError, match="no text encoder"):
        build_generator(cfg.model, path=str(tmp_path), prompt_embeddings="unused.safetensors")
