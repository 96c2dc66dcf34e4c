"""ImageReward (services/rewards/image_reward.py): the published key layout, loaded whole, scores as the source does."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.rewards import build_scorer
from services.rewards.base import load_state_file
from services.rewards.image_reward import SCORE_MEAN, SCORE_STD, preprocess, to_hf_keys

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_models  # noqa: E402

pytestmark = pytest.mark.service
PROMPTS = ["a photo of a cat", "a red dog", "a blue sign"]
# names read in THUDM/ImageReward's source (ImageReward.py; models/BLIP/vit.py, med.py, blip_pretrain.py)
PUBLISHED_KEYS = [
    "blip.visual_encoder.cls_token",
    "blip.visual_encoder.pos_embed",
    "blip.visual_encoder.patch_embed.proj.weight",
    "blip.visual_encoder.blocks.0.norm1.weight",
    "blip.visual_encoder.blocks.0.attn.qkv.weight",
    "blip.visual_encoder.blocks.0.attn.qkv.bias",
    "blip.visual_encoder.blocks.0.attn.proj.weight",
    "blip.visual_encoder.blocks.1.mlp.fc2.bias",
    "blip.visual_encoder.norm.weight",
    "blip.text_encoder.embeddings.word_embeddings.weight",
    "blip.text_encoder.embeddings.position_embeddings.weight",
    "blip.text_encoder.embeddings.LayerNorm.bias",
    "blip.text_encoder.encoder.layer.0.attention.self.query.weight",
    "blip.text_encoder.encoder.layer.0.attention.output.LayerNorm.weight",
    "blip.text_encoder.encoder.layer.0.crossattention.self.query.weight",
    "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight",
    "blip.text_encoder.encoder.layer.1.crossattention.output.dense.weight",
    "blip.text_encoder.encoder.layer.1.intermediate.dense.weight",
    "blip.text_encoder.encoder.layer.1.output.LayerNorm.bias",
    "blip.vision_proj.weight",
    "blip.text_proj.weight",
    "mlp.layers.0.weight",
    "mlp.layers.2.weight",
    "mlp.layers.4.weight",
    "mlp.layers.6.weight",
    "mlp.layers.7.bias",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_models.save_tiny_image_reward(tmp_path_factory.mktemp("image_reward") / "ImageReward")


@pytest.fixture(scope="module")
def scorer(ckpt):
    return build_scorer(
        "image_reward", path=str(ckpt), options={"tokenizer": str(ckpt / "tokenizer"), "vision_heads": 4}
    )


def _ln(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _lin(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _attend(q, k, v, heads, bias=None):
    (b, n, d), m = q.shape, k.shape[1]
    q, k, v = (t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    att = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
    att = att if bias is None else att + bias
    return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d), m


def _reference_vit(sd, x, heads=4):
    """vit.py's VisionTransformer.forward, written from its source over the raw keys."""
    v = "blip.visual_encoder"
    x = F.conv2d(x, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=8)
    x = torch.cat([sd[f"{v}.cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + sd[f"{v}.pos_embed"][:, : x.shape[1]]
    for i in range(2):
        b = f"{v}.blocks.{i}"
        q, k, w = _lin(_ln(x, sd, f"{b}.norm1", 1e-6), sd, f"{b}.attn.qkv").chunk(3, dim=-1)  # (q | k | v) rows
        x = x + _lin(_attend(q, k, w, heads)[0], sd, f"{b}.attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, f"{b}.norm2", 1e-6), sd, f"{b}.mlp.fc1")), sd, f"{b}.mlp.fc2")
    return _ln(x, sd, f"{v}.norm", 1e-6)


def _reference_score(sd, pixels, ids, mask, heads=4):
    """ImageReward.score: med.py's multimodal BertModel over the ViT's tokens, [CLS] -> MLP -> normalised."""
    img = _reference_vit(sd, pixels)
    t = "blip.text_encoder"
    h = (
        sd[f"{t}.embeddings.word_embeddings.weight"][ids]
        + sd[f"{t}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    h = _ln(h, sd, f"{t}.embeddings.LayerNorm", 1e-12)
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(2):
        b = f"{t}.encoder.layer.{i}"
        for att, src, bias in (("attention", None, pad), ("crossattention", img, None)):
            kv = h if src is None else src
            ctx, _ = _attend(
                _lin(h, sd, f"{b}.{att}.self.query"),
                _lin(kv, sd, f"{b}.{att}.self.key"),
                _lin(kv, sd, f"{b}.{att}.self.value"),
                heads,
                bias,
            )
            h = _ln(_lin(ctx, sd, f"{b}.{att}.output.dense") + h, sd, f"{b}.{att}.output.LayerNorm", 1e-12)
        ff = _lin(F.gelu(_lin(h, sd, f"{b}.intermediate.dense")), sd, f"{b}.output.dense")
        h = _ln(ff + h, sd, f"{b}.output.LayerNorm", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = _lin(r, sd, f"mlp.layers.{i}")
    return ((r - SCORE_MEAN) / SCORE_STD).squeeze(-1)


def test_checkpoint_has_the_published_key_names(ckpt):
    state = load_state_file(ckpt / "ImageReward.pt", what="image_reward")
    assert set(PUBLISHED_KEYS) <= set(state)
    assert state["blip.visual_encoder.blocks.0.attn.qkv.weight"].shape == (96, 32)  # fused q, k, v
    assert state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (32, 32)  # from the ViT


def test_every_key_is_consumed_and_none_missing(ckpt, scorer):
    state = load_state_file(ckpt / "ImageReward.pt", what="image_reward")
    vision, text, head = to_hf_keys(state)
    unused = {k for k in state if k.startswith(("blip.vision_proj.", "blip.text_proj."))}
    unused.add("blip.text_encoder.embeddings.position_ids")
    assert len(vision) + len(text) + len(head) + len(unused) == len(state)
    model = scorer.model
    assert set(vision) == set(model.visual.state_dict())
    assert set(text) == set(model.text.state_dict())
    assert set(head) == set(model.mlp.state_dict())
    loaded = model.visual.state_dict()["encoder.layers.0.self_attn.qkv.weight"]
    assert torch.equal(loaded, state["blip.visual_encoder.blocks.0.attn.qkv.weight"])
    with pytest.raises(KeyError, match="outside ImageReward's layout"):
        to_hf_keys({**state, "blip.itm_head.weight": torch.zeros(2, 32)})


def test_score_equals_the_reference_computation(ckpt, scorer):
    sd = load_state_file(ckpt / "ImageReward.pt", what="image_reward")
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    got = scorer.score(images, PROMPTS)
    tok = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok["input_ids"].shape == (3, 35)
    want = _reference_score(sd, preprocess(images, 32), tok["input_ids"], tok["attention_mask"])
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # batching does not change a score
    torch.testing.assert_close(scorer.score(images[1:2], PROMPTS[1:2]), got[1:2], atol=1e-5, rtol=1e-5)


def test_score_depends_on_the_prompt_and_the_image(scorer):
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    a = scorer.score(images.expand(2, -1, -1, -1), ["a photo of a cat", "a blue sign open late"])
    assert abs(a[0] - a[1]) > 1e-4
    b = scorer.score(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)), ["a photo of a cat"])
    assert abs(a[0] - b[0]) > 1e-4


def test_preprocess_resizes_the_short_side_and_center_crops():
    img = torch.zeros(1, 3, 40, 80)
    img[..., 20:60] = 1.0  # a white centre band, 40 px wide, in an 80-px-wide frame
    x = preprocess(img, 20)  # short side 40 -> 20: the frame becomes 20 x 40, the crop is its middle 20 x 20
    assert x.shape == (1, 3, 20, 20)
    white = (1.0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    torch.testing.assert_close(x[0, :, 10, 10], white, atol=1e-5, rtol=0)


class Payload:
    """Stands for any object a pickle could run code to build."""


def test_loading_refuses_a_pickled_payload(tmp_path, ckpt):
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1), "x": Payload()}, tmp_path / "ImageReward.pt")
    with pytest.raises(ValueError, match="not unpickled"):
        load_state_file(tmp_path / "ImageReward.pt", what="image_reward")
    with pytest.raises(ValueError, match="not unpickled"):
        build_scorer(
            "image_reward", path=str(tmp_path / "ImageReward.pt"), options={"tokenizer": str(ckpt / "tokenizer")}
        )


def test_needs_a_tokenizer(ckpt):
    with pytest.raises(ValueError, match="tokenizer"):
        build_scorer("image_reward", path=str(ckpt))
