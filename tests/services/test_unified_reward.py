"""UnifiedReward through the HTTP judge (services/rewards/unified_reward.py): flow_grpo's request and parse rule."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
import torch

from services.rewards import build_scorer
from services.rewards.unified_reward import QUESTION, UnifiedRewardJudge, UnparsableAnswer, parse_final_score

pytestmark = pytest.mark.service


def _server(answers: dict[str, str], seen: list):
    """A fake OpenAI-style /chat/completions endpoint answering by the caption in the question."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append((request, body))
        text = body["messages"][0]["content"][1]["text"]
        caption = text.rsplit("Text Caption: [", 1)[1].removesuffix("]")
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": answers[caption]}}]})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("The image matches.\nFinal Score: 4", 0.8),
        ("Final Score:3.5 overall", 0.7),
        ("Final Score: 5\nFinal Score: 1", 1.0),  # the first one counts
        ("Final Score:  1", 0.2),
    ],
)
def test_parse_follows_flow_grpo(text, score):
    assert parse_final_score(text) == pytest.approx(score)


@pytest.mark.parametrize("text", ["Score: 4", "Final Score: 0", "Final Score: seven", "", None])
def test_unparsable_answer_names_the_scorer(text):
    with pytest.raises(UnparsableAnswer, match=r"unified_reward: no 'Final Score"):
        parse_final_score(text)


def test_request_carries_the_template_and_the_image_and_scores_normalised():
    seen: list = []
    answers = {"a red cat": "Alignment is good.\nFinal Score: 4", "a blue sign": "Final Score: 2.5"}
    judge = build_scorer(
        "unified_reward",
        path="http://judge.test/v1",
        options={"transport": _server(answers, seen), "api_key": "k", "concurrency": 2},
    )
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    scores = judge.score(images, ["a red cat", "a blue sign"])
    torch.testing.assert_close(scores, torch.tensor([0.8, 0.5]))
    assert len(seen) == 2
    from PIL import Image

    for request, body in seen:
        assert request.url.path == "/v1/chat/completions"
        assert request.headers["authorization"] == "Bearer k"
        assert body["model"] == "UnifiedReward-7b-v1.5" and body["temperature"] == 0
        image, text = body["messages"][0]["content"]
        assert text["text"] in {QUESTION.format(prompt=p) for p in answers}
        assert (
            text["text"].startswith("<image>\nYou are given a text caption") and "after 'Final Score:'" in text["text"]
        )
        url = image["image_url"]["url"]
        assert url.startswith("data:image;base64,")
        png = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert png.format == "PNG" and png.size == (512, 512)  # flow_grpo resizes to 512 x 512


def test_unparsable_answer_fails_the_call_with_the_scorer_name_and_is_not_retried():
    seen: list = []
    judge = UnifiedRewardJudge(
        "unified_reward", "http://judge.test/v1", transport=_server({"a cat": "I like it."}, seen), backoff_s=0.0
    )
    with pytest.raises(UnparsableAnswer, match=r"unified_reward: .*'I like it\.'"):
        judge.score(torch.rand(1, 3, 8, 8), ["a cat"])
    assert len(seen) == 1  # at temperature 0 the same answer would come back
    zero = UnifiedRewardJudge(
        "unified_reward", "http://judge.test/v1", transport=_server({"a cat": "I like it."}, []), unparsable="zero"
    )
    assert zero.score(torch.rand(1, 3, 8, 8), ["a cat"]).item() == 0.0  # flow_grpo's rule, when asked for


def test_failed_requests_are_retried_then_raise_naming_the_scorer():
    calls = {"n": 0}
    good = _server({"a cat": "Final Score: 3"}, [])

    def flaky(request):
        calls["n"] += 1
        return httpx.Response(503) if calls["n"] == 1 else good.handle_request(request)

    judge = UnifiedRewardJudge(
        "unified_reward", "http://judge.test/v1", transport=httpx.MockTransport(flaky), backoff_s=0.0
    )
    assert judge.score(torch.rand(1, 3, 8, 8), ["a cat"]).item() == pytest.approx(0.6)
    assert judge.failures == 1
    dead = UnifiedRewardJudge(
        "unified_reward",
        "http://judge.test/v1",
        transport=httpx.MockTransport(lambda r: httpx.Response(200, json={"choices": []})),
        retries=1,
        backoff_s=0.0,
    )
    with pytest.raises(RuntimeError, match="unified_reward: judge request failed after 2 tries"):
        dead.score(torch.rand(1, 3, 8, 8), ["a cat"])
    with pytest.raises(ValueError, match="unparsable"):
        UnifiedRewardJudge("unified_reward", "http://judge.test/v1", unparsable="ignore")
