"""The reward server's wire format, its client's failure handling and the HTTP judge's bounded concurrency,
on mock transports (no Ray, no sockets: about a second in all)."""

import base64
import io
import json
import math
import threading
import time

import httpx
import pytest
import torch
from pydantic import ValidationError

from services.config.sections import ScorerSpec
from services.rewards import build_scorer
from services.rewards.judges import HTTPJudge
from services.rewards.remote import RemoteScorer, RewardServerError
from services.rewards.wire import WireError, decode_image, encode_png, parse_body, parse_scores, to_uint8
from services.training.remote import CallStats, call_with_retries
from services.training.scoring import ScorerWorker
from services.types import ScorerBuild, ScoreRequest

pytestmark = pytest.mark.service
URL = "http://rewards.test/mean"


def test_a_scorer_entry_points_at_a_server_and_the_config_checks_it():
    spec = ScorerSpec(name="pickscore", server={"url": "http://h:8000/pickscore", "concurrency": 2})
    assert spec.server.url.endswith("/pickscore") and spec.server.concurrency == 2
    with pytest.raises(ValidationError, match="exactly one of url"):
        ScorerSpec(name="p", server={"url": "http://h/p", "app": "p"})
    with pytest.raises(ValidationError, match="exactly one of url"):
        ScorerSpec(name="p", server={})
    with pytest.raises(ValidationError, match="extra"):
        ScorerSpec(name="p", server={"app": "p", "pickle": True})
    with pytest.raises(ValidationError, match="the server builds the scorer"):
        ScorerSpec(name="p", path="/ckpt", server={"app": "p"})
    from services.training.build import _remote_build

    built = _remote_build(spec)
    assert built.impl == "services.rewards.remote:RemoteScorer" and built.options["scorer"] == "pickscore"


def test_png_round_trip_is_exact_and_flow_grpo_fields_are_accepted():
    u8 = to_uint8(torch.rand(2, 3, 9, 7))
    assert torch.equal(decode_image(encode_png(u8[0]), max_pixels=100), u8[0])
    assert torch.equal(decode_image("data:image/png;base64," + encode_png(u8[1]), max_pixels=100), u8[1])
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (5, 4), (10, 20, 30)).save(buf, "JPEG")  # flow_grpo's clients send JPEG
    assert decode_image(base64.b64encode(buf.getvalue()).decode(), max_pixels=100).shape == (3, 4, 5)
    with pytest.raises(WireError, match="larger than"):
        decode_image(encode_png(u8[0]), max_pixels=62)
    body = parse_body(json.dumps({"images": ["x"], "meta_datas": [{"tag": 1}]}).encode())
    assert body.metadata == [{"tag": 1}]
    with pytest.raises(WireError, match="prompts has 2 entries for 1 images"):
        parse_body(json.dumps({"images": ["x"], "prompts": ["a", "b"]}).encode())
    with pytest.raises(WireError, match="not JSON"):
        parse_body(b"\x80\x04garbage")
    assert parse_scores({"outputs": [1, 2.5]}, 2) == [1.0, 2.5]
    with pytest.raises(WireError, match="finite"):
        parse_scores({"scores": [float("nan")]}, 1)


def _server(reply, seen=None):
    """A mock reward server: ``reply(body, request) -> httpx.Response``."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if seen is not None:
            seen.append(request)
        return reply(body, request)

    return httpx.MockTransport(handler)


def _means(body, request):
    scores = [float(decode_image(s, max_pixels=1 << 20).float().mean() / 255) for s in body["images"]]
    return httpx.Response(200, json={"scorer": "mean", "scores": scores})


def _remote(transport, **kw):
    return RemoteScorer(scorer="mean", url=URL, transport=transport, backoff_s=0.0, **kw)


def test_remote_scorer_sends_pngs_with_the_token_in_bounded_chunks(monkeypatch):
    monkeypatch.setenv("NORMGUARD_REWARD_KEY", "k1")
    seen = []
    images = torch.rand(5, 3, 8, 8)
    got = _remote(_server(_means, seen), images_per_request=2).score(images, list("abcde"))
    assert torch.allclose(got, to_uint8(images).float().mean(dim=(1, 2, 3)) / 255, atol=1e-6)
    assert len(seen) == 3 and all(r.headers["authorization"] == "Bearer k1" for r in seen)
    assert all(r.url.path == "/mean/score" for r in seen)


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (lambda b, r: httpx.Response(200, content=b"<html>oops</html>"), "malformed reply"),
        (lambda b, r: httpx.Response(200, json={"scores": [1.0, 2.0]}), "2 scores for 1 images"),
        (lambda b, r: httpx.Response(200, json={"scores": [1.0] * 300_000}), "max_reply_bytes"),
        (lambda b, r: httpx.Response(401, json={"error": "token"}), "HTTP 401"),
        (lambda b, r: httpx.Response(500, json={"error": "mean: boom"}), "HTTP 500"),
    ],
)
def test_a_wrong_answer_is_an_error_naming_the_scorer_at_once(reply, match):
    seen = []
    with pytest.raises(RewardServerError, match=match) as err:
        _remote(_server(reply, seen)).score(torch.rand(1, 3, 4, 4), ["a"])
    assert str(err.value).startswith("mean: ") and len(seen) == 1  # not resent: reward.retries decides


def test_a_slow_server_is_an_error_naming_the_scorer():
    def slow(request):
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(RewardServerError, match=r"mean: .* did not answer within 1.5 s"):
        _remote(httpx.MockTransport(slow), timeout_s=1.5).score(torch.rand(1, 3, 4, 4), ["a"])


def test_no_replica_answering_is_waited_for_bounded_and_logged(caplog):
    calls = {"n": 0}

    def restarting(body, request):
        calls["n"] += 1
        return httpx.Response(503) if calls["n"] <= 2 else _means(body, request)

    assert _remote(_server(restarting), connect_retries=3).score(torch.rand(1, 3, 4, 4), ["a"]).shape == (1,)
    assert calls["n"] == 3 and sum("no replica" in r.message for r in caplog.records) == 2

    def refused(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(RewardServerError, match="no replica of .* answered in 3 tries"):
        _remote(httpx.MockTransport(refused), connect_retries=2).score(torch.rand(1, 3, 4, 4), ["a"])


def test_reward_retries_decide_a_served_scorers_failure_as_for_a_local_one():
    """The scorer worker calls the client like any scorer: a server answering garbage fails the call,
    ``call_with_retries`` (``reward.retries``) redoes it, then gives up with the scorer's name."""
    seen = []
    garbage = _server(lambda b, r: httpx.Response(200, json={"nope": 1}), seen)
    opts = {"scorer": "judge", "url": URL, "transport": garbage, "backoff_s": 0.0}
    worker = ScorerWorker({"judge": ScorerBuild(options=opts, impl="services.rewards.remote:RemoteScorer")})
    req = ScoreRequest(images=torch.rand(2, 3, 4, 4), prompts=["a", "b"], group_ids=torch.tensor([0, 0]))
    stats = CallStats()
    with pytest.raises(RuntimeError, match=r"reward.score_batch failed after 3 tries: RewardServerError: judge: "):
        call_with_retries(worker, "score_batch", req, timeout_s=5, retries=2, stats=stats, name="reward", backoff_s=0)
    assert len(seen) == 3 and stats.retries == 2 and stats.failures == 1


def test_built_by_name_it_follows_the_protocol():
    sc = build_scorer("m", options={"scorer": "m", "app": "m"}, impl="services.rewards.remote:RemoteScorer")
    assert sc.name == "m" and not sc.groupwise


def test_http_judge_sends_concurrently_but_bounded():
    lock, state = threading.Lock(), {"now": 0, "peak": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        p = 0.1 + 0.1 * int(body["messages"][0]["content"][1]["text"].split("digit ")[1][0])
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.02)  # a judge's round trip
        with lock:
            state["now"] -= 1
        top = [{"token": "Yes", "logprob": math.log(p)}, {"token": "No", "logprob": math.log(1 - p)}]
        return httpx.Response(200, json={"choices": [{"logprobs": {"content": [{"top_logprobs": top}]}}]})

    prompts = [f"a handwritten digit {i % 8}" for i in range(16)]
    judge = HTTPJudge("j", "http://judge.test/v1", transport=httpx.MockTransport(handler), concurrency=4)
    got = judge.score(torch.rand(16, 3, 8, 8), prompts)
    assert torch.allclose(got, torch.tensor([0.1 + 0.1 * (i % 8) for i in range(16)]), atol=1e-5)  # in order
    assert 1 < state["peak"] <= 4
    state["peak"] = 0
    HTTPJudge("j", "http://judge.test/v1", transport=httpx.MockTransport(handler), concurrency=1).score(
        torch.rand(3, 3, 8, 8), prompts[:3]
    )
    assert state["peak"] == 1
