"""Serving pieces in process, no Ray cluster: flags against the serve YAML, the bearer scheme, the model
cards of GET /v1/models, and the gateway's failover decision with a stand-in handle."""

import asyncio
import json

import pytest
from fastapi import HTTPException
from ray.exceptions import ActorDiedError

from services.cli import build_parser
from services.config import ModelConfig, load_config
from services.serving.app import serve_config_for
from services.serving.catalog import describe, model_cards
from services.serving.config import ServeConfig
from services.serving.failover import forward_with_failover
from services.serving.generator import GenerationItem
from services.serving.http import bearer_token

pytestmark = pytest.mark.service


def test_serve_flags_override_the_yaml_only_when_given(tmp_path):
    yaml = tmp_path / "serve.yaml"
    yaml.write_text("model: {kind: digits}\nport: 8012\nhost: 0.0.0.0\n")
    args = build_parser().parse_args(["serve", str(yaml)])
    assert args.port is None and args.host is None  # so the YAML's values stand
    cfg = serve_config_for(str(yaml), host=args.host, port=args.port)
    assert (cfg.host, cfg.port) == ("0.0.0.0", 8012)
    args = build_parser().parse_args(["serve", str(yaml), "--port", "9001", "--host", "127.0.0.2"])
    cfg = serve_config_for(str(yaml), host=args.host, port=args.port)
    assert (cfg.host, cfg.port) == ("127.0.0.2", 9001)
    assert (serve_config_for(None).host, serve_config_for(None).port) == ("127.0.0.1", 8000)  # the defaults


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", b"abc"),
        ("bearer abc", b"abc"),
        ("BeArEr abc", b"abc"),
        ("  Bearer   abc  ", b"abc"),
        ("Basic abc", b""),
        ("Bearerabc", b""),
        ("abc", b""),
        ("", b""),
        ("Bearer", b""),
    ],
)
def test_bearer_scheme_is_case_insensitive(header, token):
    assert bearer_token(header) == token


def test_model_cards_name_models_not_paths(tmp_path, digits_assets):
    from services.training.learner import Learner

    cfg = load_config(None, ["model.pretrain_steps=5", "normguard.mode=constraint", "loss.name=awm"])
    run = tmp_path / "runs" / "my-run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(cfg.model_dump_json())
    learner = Learner.from_config(cfg, str(digits_assets.model_path))
    learner.optim.count = 7  # as if 7 optimiser steps had run
    learner.save(run / "checkpoints" / "step_000007")
    card = describe("trained", str(run / "checkpoints" / "step_000007"), "digits")
    assert (card.id, card.base_model, card.step, card.method, card.normguard) == (
        "trained",
        "digits",
        7,
        "awm",
        "constraint",
    )
    gone = describe("gone", str(tmp_path / "nowhere"), "digits")  # unreadable: nulls, not a failure
    assert (gone.step, gone.method) == (None, None)
    cards = model_cards(
        ServeConfig(model=ModelConfig(kind="digits"), checkpoints={"trained": str(run / "checkpoints" / "step_000007")})
    )
    assert [c["id"] for c in cards] == ["base", "trained"]
    assert str(tmp_path) not in json.dumps(cards)


class _Handle:
    """A stand-in DeploymentHandle whose first ``deaths`` calls lose their replica."""

    def __init__(self, deaths: int):
        self.deaths, self.calls, self.routed_to = deaths, 0, None
        self.generate_item = self

    def options(self, *, multiplexed_model_id):
        self.routed_to = multiplexed_model_id
        return self

    async def _reply(self, item):
        self.calls += 1
        if self.calls <= self.deaths:
            raise ActorDiedError()
        return {"images": [item.seed], "batch_requests": 1, "queue_ms": 0.0, "compute_ms": 1.0}

    def remote(self, item):
        return self._reply(item)


def _item():
    return GenerationItem(prompts=("a handwritten digit 1",), num_steps=2, guidance_scale=1.0, seed=3, checkpoint="x")


def test_failover_retries_a_lost_request_with_the_same_seed():
    handle = _Handle(deaths=1)
    out = asyncio.run(forward_with_failover(handle, _item(), retries=1, retry_after_s=15))
    assert out["attempts"] == 2 and out["images"] == [3] and handle.calls == 2 and handle.routed_to == "x"


@pytest.mark.parametrize(("deaths", "retries"), [(1, 0), (2, 1)])
def test_failover_answers_503_with_retry_after_when_no_replica_is_left(deaths, retries):
    handle = _Handle(deaths=deaths)
    with pytest.raises(HTTPException) as err:
        asyncio.run(forward_with_failover(handle, _item(), retries=retries, retry_after_s=15))
    assert err.value.status_code == 503 and err.value.headers == {"Retry-After": "15"}
    assert handle.calls == retries + 1


class _HungResponse:
    """A stand-in DeploymentResponse that never answers, and records its cancellation."""

    cancelled = False

    def __await__(self):
        return asyncio.sleep(3600).__await__()

    def cancel(self):
        self.cancelled = True


def test_failover_bounds_a_hung_replica_with_504_and_cancels_the_call():
    response = _HungResponse()
    handle = _Handle(deaths=0)
    handle.remote = lambda item: response
    with pytest.raises(HTTPException) as err:
        asyncio.run(forward_with_failover(handle, _item(), retries=1, retry_after_s=15, timeout_s=0.05))
    assert err.value.status_code == 504 and response.cancelled
