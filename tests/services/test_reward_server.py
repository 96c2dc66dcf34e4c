"""The reward server on Ray Serve, on the session's 2-CPU local Ray: scores by handle and over HTTP equal the
scorer's in-process scores, requests are batched, unauthenticated and pickle bodies are refused with 4xx,
and a replica SIGKILLed during a call costs no score (the call is resent to the live replica).
About 25 s on 2 cores (Ray and Serve start once for the module)."""

import os
import pickle
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import free_port

from services.rewards.remote import RemoteScorer
from services.rewards.wire import request_body, to_uint8

pytestmark = [pytest.mark.service, pytest.mark.slow]
KEY = "test-token-38"
WAIT_S = 60


@pytest.fixture(scope="module")
def served(ray_local):
    """The three test applications on the session's local Ray (a second ``ray.init`` in one process fails);
    each replica gets the test scorers' path and the token through its own runtime_env."""
    from ray import serve

    from services.rewards.server import RewardServerConfig, deploy

    root = Path(__file__).parents[2]
    os.environ["NORMGUARD_REWARD_KEY"] = KEY
    env = {"env_vars": {"PYTHONPATH": f"{root}:{root / 'tests'}", "NORMGUARD_REWARD_KEY": KEY}}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"num_cpus": 0.25, "runtime_env": env}
    apps = (
        RewardServerConfig(scorer="mean", impl="served_scorers:MeanScorer", num_replicas=2, **common),
        RewardServerConfig(scorer="batch", impl="served_scorers:BatchSizeScorer", batch_wait_timeout_s=0.3, **common),
        RewardServerConfig(
            scorer="slow",
            impl="served_scorers:MeanScorer",
            options={"delay_s": 1.0},
            num_replicas=2,
            max_batch_size=1,
            **common,
        ),
    )
    for cfg in apps:
        deploy(cfg)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _expected(images):
    return to_uint8(images).float().mean(dim=(1, 2, 3)) / 255


def test_handle_and_http_give_the_in_process_scores(served):
    images = torch.rand(5, 3, 12, 12)
    by_handle = RemoteScorer(scorer="mean", app="mean", timeout_s=WAIT_S, images_per_request=2)
    over_http = RemoteScorer(scorer="mean", url=f"{served}/mean", timeout_s=WAIT_S, images_per_request=3)
    assert torch.allclose(by_handle.score(images, list("abcde")), _expected(images), atol=1e-6)
    assert torch.allclose(over_http.score(images, list("abcde")), _expected(images), atol=1e-6)


def test_requests_that_arrive_together_are_scored_in_one_call(served):
    client = RemoteScorer(scorer="batch", app="batch", timeout_s=WAIT_S, images_per_request=1, concurrency=4)
    sizes = client.score(torch.rand(4, 3, 4, 4), list("abcd"))
    assert sizes.max() > 1, f"every request was scored alone: {sizes.tolist()}"


def test_unauthenticated_pickle_oversized_and_malformed_bodies_get_a_clear_4xx(served):
    url = f"{served}/mean/score"
    body = request_body(to_uint8(torch.rand(1, 3, 4, 4)), ["a"])
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(url, json=body, timeout=WAIT_S).status_code == 401
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=WAIT_S)
    assert wrong.status_code == 401 and "Bearer" in wrong.json()["error"]
    for kind in ("application/octet-stream", "application/json"):  # labelled as what it is, or as JSON
        r = httpx.post(url, content=pickle.dumps(body), headers={**auth, "Content-Type": kind}, timeout=WAIT_S)
        assert r.status_code == 415 and "pickle" in r.json()["error"], r.text
    big = httpx.post(url, json={"images": ["A" * (70 << 20)]}, headers=auth, timeout=WAIT_S)
    assert big.status_code == 413
    extra = httpx.post(url, json={**body, "only_strict": True}, headers=auth, timeout=WAIT_S)
    assert extra.status_code == 422 and "only_strict" in extra.json()["error"]
    ok = httpx.post(url, json=body, headers=auth, timeout=WAIT_S)
    assert ok.status_code == 200 and ok.json()["scorer"] == "mean"


def _replica_pids(app: str) -> list[int]:
    prefix = f"ray::ServeReplica:{app}:RewardScorer".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(prefix):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_replica_killed_during_a_call_costs_no_score(served, caplog):
    """Six 1 s requests on two replicas; one replica is SIGKILLed while both are busy: the lost requests
    are resent (bounded, logged) to the live replica and every image gets its score."""
    pids = _replica_pids("slow")
    assert len(pids) == 2, pids
    images = torch.rand(6, 3, 4, 4)
    client = RemoteScorer(
        scorer="slow", app="slow", timeout_s=WAIT_S, images_per_request=1, concurrency=6, backoff_s=0.2
    )
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.score, images, list("abcdef"))
        time.sleep(0.5)  # both replicas are inside their first 1 s call
        os.kill(pids[0], signal.SIGKILL)
        got = pending.result(timeout=WAIT_S)
    assert torch.allclose(got, _expected(images), atol=1e-6)
    assert any("no replica" in r.message and "died" in r.message for r in caplog.records), [
        r.message for r in caplog.records
    ]
