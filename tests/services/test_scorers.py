"""Every reward scorer passes one contract; the judge responds to its token probabilities."""

import json
import math
import sys
from pathlib import Path

import httpx
import pytest
import torch

from services.rewards import available_scorers, build_scorer, combine_scores, is_groupwise
from services.rewards.judges import HTTPJudge, probs_to_score

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_models  # noqa: E402

pytestmark = pytest.mark.service
PROMPTS = [
    "a handwritten digit 1",
    "a handwritten digit 7",
    "a handwritten digit 3",
    "a handwritten digit 0",
    "a handwritten digit 9",
]


def _save_tiny_vit(path: Path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=2,
        id2label={0: "generated", 1: "real"},
        label2id={"generated": 0, "real": 1},
    )
    ViTForImageClassification(cfg).save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def _save_aesthetic_head(path: Path, clip: Path) -> Path:
    """A random head of improved-aesthetic-predictor's layout, sized to the tiny CLIP's projection."""
    from transformers import CLIPConfig

    from services.rewards.aesthetic import AestheticHead

    torch.manual_seed(0)
    torch.save(AestheticHead(CLIPConfig.from_pretrained(clip).projection_dim).state_dict(), path)
    return path


def _openai_mock(p_yes: float):
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
        top = [{"token": "Yes", "logprob": math.log(p_yes)}, {"token": "No", "logprob": math.log(1 - p_yes)}]
        return httpx.Response(200, json={"choices": [{"logprobs": {"content": [{"top_logprobs": top}]}}]})

    return httpx.MockTransport(handler)


def _unified_mock():
    answer = {"choices": [{"message": {"content": "Final Score: 4"}}]}
    return httpx.MockTransport(lambda request: httpx.Response(200, json=answer))


@pytest.fixture(scope="module")
def scorers(tmp_path_factory, digits_assets):
    root = tmp_path_factory.mktemp("scorers")
    clip = tiny_models.save_tiny_clip(root / "clip")
    out = {
        "pickscore": build_scorer("pickscore", path=str(clip)),
        "hpsv2": build_scorer("hpsv2", path=str(clip)),
        "clip_group_rank": build_scorer("clip_group_rank", path=str(clip)),
        "vlm_judge": build_scorer("vlm_judge", path=str(tiny_models.save_tiny_llava(root / "llava"))),
        "vlm_judge_rating": build_scorer(
            "vlm_judge", path=str(root / "llava"), options={"mode": "rating", "num_ratings": 5}
        ),
        "realism_detector": build_scorer("realism_detector", path=str(_save_tiny_vit(root / "vit"))),
        "http_judge": HTTPJudge("http_judge", "http://judge.test/v1", transport=_openai_mock(0.8)),
        "laion_aesthetic": build_scorer(
            "laion_aesthetic", path=str(_save_aesthetic_head(root / "head.pth", clip)), options={"clip": str(clip)}
        ),
        "image_reward": build_scorer(
            "image_reward",
            path=str(tiny_models.save_tiny_image_reward(root / "image_reward")),
            options={"tokenizer": str(root / "image_reward" / "tokenizer"), "vision_heads": 4},
        ),
        "unified_reward": build_scorer(
            "unified_reward", path="http://judge.test/v1", options={"transport": _unified_mock(), "concurrency": 2}
        ),
        "ocr": build_scorer(
            "ocr", path=str(tiny_models.save_tiny_trocr(root / "trocr")), options={"max_new_tokens": 6}
        ),
    }
    for name in ("digits_classifier", "digits_ink", "digits_judge", "digits_realism"):
        out[name] = build_scorer(name, path=str(digits_assets.scorer_path))
    return out


def test_every_registered_scorer_is_covered(scorers):
    # the colour task's scorers need its prompts and assets: tests/services/test_colour_task.py covers each one
    registered = {n for n in available_scorers() if not n.startswith("colour_")}
    assert registered <= {n.removesuffix("_rating") for n in scorers}


@pytest.mark.parametrize(
    "name",
    [
        "pickscore",
        "hpsv2",
        "vlm_judge",
        "vlm_judge_rating",
        "realism_detector",
        "http_judge",
        "laion_aesthetic",
        "image_reward",
        "unified_reward",
        "ocr",
        "digits_classifier",
        "digits_ink",
        "digits_judge",
        "digits_realism",
    ],
)
def test_scorer_contract(scorers, name):
    scorer = scorers[name]
    images = torch.rand(5, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    s = scorer.score(images, PROMPTS)
    assert not is_groupwise(scorer)
    assert s.shape == (5,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.equal(s, scorer.score(images, PROMPTS))  # deterministic in eval mode
    halves = torch.cat([scorer.score(images[:2], PROMPTS[:2]), scorer.score(images[2:], PROMPTS[2:])])
    assert torch.allclose(s, halves, atol=1e-4)  # batching does not change scores
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        scorer.score(torch.rand(5, 24, 24), PROMPTS)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(images, PROMPTS[:3])


def test_group_rank_scorer_ranks_within_each_group(scorers):
    """The built-in group-wise scorer: the CLIP preference's rank inside each prompt group, in [0, 1]."""
    scorer, inner = scorers["clip_group_rank"], scorers["pickscore"]
    assert is_groupwise(scorer)
    images = torch.rand(6, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    prompts, groups = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3, torch.tensor([0, 0, 0, 1, 1, 1])
    s = scorer.score(images, prompts, groups)
    raw = inner.score(images, prompts)
    for g in (0, 1):
        idx = torch.nonzero(groups == g).flatten()
        assert torch.equal(torch.argsort(s[idx]), torch.argsort(raw[idx]))
        assert sorted(s[idx].tolist()) == [0.0, 0.5, 1.0]
    alone = scorer.score(images[:3], prompts[:3], groups[:3])  # other groups do not change a group's score
    assert torch.equal(alone, s[:3])


def test_scorer_by_import_path_and_its_errors():
    ink = build_scorer("ink", impl="user_rewards:InkScorer", options={"scale": 2.0})
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ink.score(images, PROMPTS[:4]), 2 * images.mean(dim=(1, 2, 3)))
    assert is_groupwise(build_scorer("rank", impl="user_rewards:InkRankInGroup"))
    with pytest.raises(ImportError, match="cannot import module 'no_such_pkg.rewards'"):
        build_scorer("x", impl="no_such_pkg.rewards:Mine")
    with pytest.raises(AttributeError, match="has no attribute 'Missing'"):
        build_scorer("x", impl="user_rewards:Missing")
    with pytest.raises(TypeError, match="without a score method"):
        build_scorer("x", impl="user_rewards:NotAScorer")
    with pytest.raises(TypeError, match="must accept"):
        build_scorer("x", impl="user_rewards:InkScorer", options={"bogus": 1})
    with pytest.raises(ValueError, match="package.module:ClassName"):
        build_scorer("x", impl="user_rewards.InkScorer")


def test_probs_to_score():
    assert torch.allclose(probs_to_score(torch.tensor([[0.3, 0.1]]), mode="yes_no"), torch.tensor([0.75]))
    assert torch.allclose(probs_to_score(torch.tensor([[0.0, 0.0, 1.0]]), mode="rating"), torch.tensor([1.0]))
    assert torch.allclose(probs_to_score(torch.tensor([[1.0, 1.0, 1.0]]), mode="rating"), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="yes_no"):
        probs_to_score(torch.ones(1, 2), mode="stars")


def test_local_judge_score_follows_its_token_probabilities(scorers):
    judge = scorers["vlm_judge"]
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    before = judge.score(images, PROMPTS[:3])
    head = judge.model.get_output_embeddings()
    yes_id = judge.answer_ids[0]
    with torch.no_grad():
        saved = head.weight[yes_id].clone()
        head.weight[yes_id] += 5.0 * head.weight.abs().mean() * torch.sign(torch.randn_like(saved))
        probs = judge.answer_probs(images, PROMPTS[:3])
        after = judge.score(images, PROMPTS[:3])
        head.weight[yes_id] = saved
    assert torch.allclose(after, probs[:, 0] / probs.sum(dim=1), atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def test_http_judge_reads_logprobs_and_retries():
    calls = {"n": 0}
    inner = _openai_mock(0.9)

    def flaky(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return httpx.Response(503)
        return inner.handle_request(request)

    judge = HTTPJudge("j", "http://judge.test/v1", transport=httpx.MockTransport(flaky), backoff_s=0.0)
    s = judge.score(torch.rand(1, 3, 8, 8), ["a cat"])
    assert s.item() == pytest.approx(0.9, abs=1e-5) and judge.failures == 1
    dead = HTTPJudge(
        "j",
        "http://judge.test/v1",
        transport=httpx.MockTransport(lambda r: httpx.Response(500)),
        retries=1,
        backoff_s=0.0,
    )
    with pytest.raises(RuntimeError, match="failed after 2 tries"):
        dead.score(torch.rand(1, 3, 8, 8), ["a cat"])


def test_aesthetic_head_has_the_published_keys_and_refuses_others(tmp_path):
    from services.rewards.aesthetic import AestheticHead, AestheticScorer

    keys = set(AestheticHead(768).state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    assert AestheticHead(768).state_dict()["layers.0.weight"].shape == (1024, 768)
    clip = tiny_models.save_tiny_clip(tmp_path / "clip")
    torch.save({"fc.weight": torch.zeros(1, 4)}, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="not the aesthetic head's layout"):
        AestheticScorer("a", str(tmp_path / "bad.pth"), clip=str(clip))


def test_registry_errors(tmp_path):
    with pytest.raises(KeyError, match="pickscore"):
        build_scorer("aesthetic")
    with pytest.raises(FileNotFoundError, match="missing-clip"):
        build_scorer("pickscore", path=str(tmp_path / "missing-clip"))


def test_combine_scores():
    out = combine_scores({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5, 0.5])}, {"a": 1.0, "b": -2.0})
    assert torch.equal(out, torch.tensor([0.0, 1.0]))
    with pytest.raises(KeyError, match="c"):
        combine_scores({"a": torch.ones(2)}, {"c": 1.0})


def _hf_to_open_clip(sd: dict, n_text: int, n_vision: int) -> dict:
    """transformers' CLIPModel keys written back in open_clip's layout (the layout HPSv2 is published in)."""
    out = {}
    for src, dst, n in (
        ("text_model.encoder", "transformer", n_text),
        ("vision_model.encoder", "visual.transformer", n_vision),
    ):
        for i in range(n):
            a, b = f"{src}.layers.{i}", f"{dst}.resblocks.{i}"
            att = f"{a}.self_attn"
            out[f"{b}.attn.in_proj_weight"] = torch.cat([sd[f"{att}.{x}_proj.weight"] for x in "qkv"])
            out[f"{b}.attn.in_proj_bias"] = torch.cat([sd[f"{att}.{x}_proj.bias"] for x in "qkv"])
            for o, h in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):  # fmt: skip
                out[f"{b}.{o}.weight"], out[f"{b}.{o}.bias"] = sd[f"{a}.{h}.weight"], sd[f"{a}.{h}.bias"]
    out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    out["ln_final.weight"], out["ln_final.bias"] = (
        sd["text_model.final_layer_norm.weight"],
        sd["text_model.final_layer_norm.bias"],
    )
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = (
        sd["vision_model.pre_layrnorm.weight"],
        sd["vision_model.pre_layrnorm.bias"],
    )
    out["visual.ln_post.weight"], out["visual.ln_post.bias"] = (
        sd["vision_model.post_layernorm.weight"],
        sd["vision_model.post_layernorm.bias"],
    )
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    out["logit_scale"] = sd["logit_scale"]
    return {f"module.{k}": v for k, v in out.items()}  # HPSv2's files were saved from DDP


def test_hpsv2_loads_its_published_open_clip_state_dict(tmp_path):
    """HPSv2 / v2.1 ship as open_clip state dicts ({"state_dict": ...}); converted into a CLIPModel with the
    base architecture's config, the scores equal those of the same weights loaded as a CLIPModel."""
    from transformers import CLIPModel

    clip = tiny_models.save_tiny_clip(tmp_path / "clip")
    model = CLIPModel.from_pretrained(clip)
    cfg = model.config
    sd = _hf_to_open_clip(model.state_dict(), cfg.text_config.num_hidden_layers, cfg.vision_config.num_hidden_layers)
    with torch.no_grad():  # a "fine-tuned" CLIP: the preference head differs from the base weights
        sd["module.visual.proj"] += 0.1 * torch.randn_like(sd["module.visual.proj"])
    (tmp_path / "hps").mkdir()
    torch.save({"state_dict": sd}, tmp_path / "hps" / "HPS_v2.1_compressed.pt")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a red bicycle", "a bowl of ramen"]
    from_open_clip = build_scorer("hpsv2", path=str(tmp_path / "hps"), options={"base": str(clip)})
    assert from_open_clip.model.visual_projection.weight.sum() != model.visual_projection.weight.sum()
    reference = build_scorer("hpsv2", path=str(clip))
    reference.model.visual_projection.weight.data = sd["module.visual.proj"].T.contiguous()
    torch.testing.assert_close(from_open_clip.score(images, prompts), reference.score(images, prompts))
    with pytest.raises(ValueError, match="open_clip state dict; pass options: {base:"):
        build_scorer("hpsv2", path=str(tmp_path / "hps" / "HPS_v2.1_compressed.pt"))


def test_pickscore_takes_its_processor_from_a_separate_path(tmp_path):
    """PickScore_v1 ships a CLIPModel without a processor (it lives in CLIP-ViT-H-14's repository)."""
    from transformers import CLIPModel

    clip = tiny_models.save_tiny_clip(tmp_path / "clip")
    CLIPModel.from_pretrained(clip).save_pretrained(tmp_path / "pickscore")  # weights and config only
    with pytest.raises(Exception, match="pickscore processor|preprocessor|tokenizer"):
        build_scorer("pickscore", path=str(tmp_path / "pickscore"))
    split = build_scorer("pickscore", path=str(tmp_path / "pickscore"), options={"processor_path": str(clip)})
    whole = build_scorer("pickscore", path=str(clip))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(split.score(images, ["a cat", "a dog"]), whole.score(images, ["a cat", "a dog"]))


def test_frechet_distance_offsets_a_singular_covariance_product_without_a_warning():
    """A dead feature makes both covariances singular: pytorch-fid's 1e-6 I on the diagonals, silently;
    a well-posed product is left as it was (the value is the plain formula)."""
    import warnings

    import numpy as np
    from scipy import linalg

    from services.rewards.digits import FD_EPS, frechet_distance

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 16, generator=g), torch.randn(50, 16, generator=g) + 0.3
    a[:, 3], b[:, 3] = 0.0, 0.0
    s_a, s_b = np.cov(a.double().numpy(), rowvar=False), np.cov(b.double().numpy(), rowvar=False)
    off = np.eye(16) * FD_EPS
    root = linalg.sqrtm((s_a + off) @ (s_b + off)).real
    mu = (a.double().mean(0) - b.double().mean(0)).numpy()
    expected = float((mu**2).sum() + np.trace(s_a + s_b - 2.0 * root))
    with warnings.catch_warnings():
        warnings.simplefilter("error", linalg.LinAlgWarning)
        warnings.simplefilter("error", DeprecationWarning)  # sqrtm's disp argument is deprecated: not passed
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    c, d = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)
    s_c, s_d = np.cov(c.double().numpy(), rowvar=False), np.cov(d.double().numpy(), rowvar=False)
    plain = ((c.double().mean(0) - d.double().mean(0)) ** 2).sum().item() + np.trace(
        s_c + s_d - 2.0 * linalg.sqrtm(s_c @ s_d).real
    )
    assert frechet_distance(c, d) == pytest.approx(plain, rel=1e-12)


def test_frechet_distance_keeps_a_negligible_imaginary_part_and_refuses_a_large_one(monkeypatch):
    """pytorch-fid's rule on a complex root: its real part when the diagonal's imaginary part is within
    1e-3 of 0, else a ValueError naming the imaginary part."""
    import numpy as np
    from scipy import linalg

    from services.rewards.digits import frechet_distance

    g = torch.Generator().manual_seed(0)
    c, d = torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g)
    real = frechet_distance(c, d)
    root = linalg.sqrtm
    for imag, ok in ((1e-5, True), (1e-1, False)):
        monkeypatch.setattr(linalg, "sqrtm", lambda m, imag=imag: root(m) + 1j * imag * np.eye(len(m)))
        if ok:
            assert frechet_distance(c, d) == pytest.approx(real, rel=1e-12)
        else:
            with pytest.raises(ValueError, match="imaginary part 0.1"):
                frechet_distance(c, d)
