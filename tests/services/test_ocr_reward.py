"""The OCR reward (services/rewards/ocr.py): flow_grpo's rule exactly, a TrOCR-layout reader, a pluggable one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from services.rewards import build_scorer
from services.rewards.ocr import edit_distance, ocr_reward, quoted_text

sys.path.insert(0, str(Path(__file__).parents[1]))
import tiny_models  # noqa: E402


@pytest.mark.parametrize(
    ("prompt", "target"),
    [
        ('a sign that says "Open Late"', "Open Late"),
        ('"Hello" and "World" on a wall', "HelloWorld"),
        ("a neon sign reading 'Bar'", "Bar"),
        ("the dog's bowl, 'Rex' on it", "Rex"),  # an apostrophe inside a word is no quote
        ("a photo of a cat", ""),
        ("double \"wins\" over 'single'", "wins"),
    ],
)
def test_quoted_text(prompt, target):
    assert quoted_text(prompt) == target


@pytest.mark.parametrize(
    ("a", "b", "d"), [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("ab", "ba", 2)]
)
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


@pytest.mark.parametrize(
    ("target", "read", "reward"),
    [
        ("Open Late", "open late", 1.0),  # case and spaces do not count
        ("Open Late", "OPENLATE", 1.0),
        ("Open Late", "xx open late yy", 1.0),  # the target inside the reading: distance 0
        ("Open Late", "Opem Late", 1 - 1 / 8),
        ("Open Late", "", 0.0),  # distance 8 of 8
        ("Bar", "a long unrelated reading", 0.0),  # the distance is clipped to len(target)
        ("", "anything", 1.0),  # no text asked for
        ("", "", 1.0),
    ],
)
def test_ocr_reward_follows_flow_grpo(target, read, reward):
    assert ocr_reward(target, read) == pytest.approx(reward, abs=1e-12)


def test_reader_callable_supplies_the_text():
    seen = []

    def reader(arrays):
        seen.extend(a.shape for a in arrays)
        return ["open late", "nothing", "rex"]

    scorer = build_scorer("ocr", options={"reader": reader, "batch_size": 8})
    prompts = ['a sign "Open Late"', 'a sign "Open Late"', "a bowl with 'Rex'"]
    s = scorer.score(torch.rand(3, 3, 12, 10), prompts)
    assert seen == [(12, 10, 3)] * 3  # (H, W, 3) uint8 arrays, as PaddleOCR takes
    expected = [1.0, 1 - min(edit_distance("nothing", "openlate"), 8) / 8, 1.0]
    assert s.dtype == torch.float32 and torch.allclose(s, torch.tensor(expected))


def test_reader_errors():
    with pytest.raises(ValueError, match="exactly one"):
        build_scorer("ocr")
    bad = build_scorer("ocr", options={"reader": lambda arrays: ["one"]})
    with pytest.raises(ValueError, match="one string per image"):
        bad.score(torch.rand(2, 3, 8, 8), ['"a"', '"b"'])
    with pytest.raises(ValueError, match="package.module:function"):
        build_scorer("ocr", options={"reader": "no_colon"})


def test_trocr_model_reads_and_scores(tmp_path):
    path = tiny_models.save_tiny_trocr(tmp_path / "trocr")
    scorer = build_scorer("ocr", path=str(path), options={"batch_size": 2, "max_new_tokens": 6})
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    texts = scorer.read(images)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    prompts = ['a "cat"', "no quote", "a 'dog' sign"]
    s = scorer.score(images, prompts)
    expected = torch.tensor([ocr_reward(quoted_text(p), t) for p, t in zip(prompts, texts)])
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.allclose(s, expected)
    assert s[1] == 1.0 and ((s >= 0) & (s <= 1)).all()
    assert torch.equal(s, scorer.score(images, prompts))  # greedy decoding is deterministic
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        scorer.score(torch.rand(3, 24, 24), prompts)
