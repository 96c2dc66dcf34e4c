"""A model replica SIGKILLed inside a bounded burst of requests on loopback (the burst and the kill are
``benchmarks/serve_faults.py``'s): with two replicas no request fails (the gateway resends the lost
ones to the live replica, with the same seed); with one replica the lost
requests get 503 with Retry-After, never 500, and the service recovers."""

import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

from services.config import ModelConfig
from services.serving.config import ServeConfig

pytestmark = [pytest.mark.service, pytest.mark.slow]

sys.path.insert(0, str(Path(__file__).parents[1]))
from benchmark_modules import load_benchmark  # noqa: E402


def _bench():
    return load_benchmark("serve_faults")


@pytest.fixture(scope="module")
def apps(ray_local, digits_assets):
    from ray import serve

    from services.serving.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, replicas in (("two", 2), ("one", 1)):
        cfg = ServeConfig(
            model=ModelConfig(kind="digits", pretrain_steps=5), replica_cpus=0.5, num_replicas=replicas, retry_after_s=7
        )
        serve.run(build_app(cfg, str(digits_assets.model_path)), name=name, route_prefix=f"/{name}")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


BURSTS = 3


def _wait_for_replicas(bench, app: str, n: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(bench.replica_pids(app)) < n:
        if time.monotonic() > deadline:
            pytest.fail(f"{app}: {n} model replicas not back within {timeout_s:.0f} s")
        time.sleep(0.5)
    time.sleep(2.0)  # a restarted replica's process exists before Serve routes to it


def test_a_killed_replica_costs_no_request_with_two_replicas(apps):
    bench = _bench()
    url = f"{apps}/two"
    assert len(bench.replica_pids("two")) == 2
    reference = httpx.post(f"{url}/v1/generate", json={"prompt": "a handwritten digit 3", "seed": 3}, timeout=120)
    # Serve's router may have no request of this burst on the replica killed at that moment: then the
    # burst still must lose nothing, and it is sent again (bounded) once both replicas are back.
    for _ in range(BURSTS):
        _wait_for_replicas(bench, "two", 2)
        killed = []
        outcomes, killed_at = bench.burst(
            url, requests=48, concurrency=4, kill_after=8, kill=lambda k=killed: k.append(bench.kill_one_replica("two"))
        )
        report = bench.summarise(outcomes, killed_at)
        assert killed and killed_at is not None
        assert report["requests"] == 48 and report["failed"] == 0, report
        if report["retried"] >= 1:
            break
    else:
        pytest.fail(f"in {BURSTS} bursts the kill never hit a request in flight: {report}")
    # a resent request is the same request: its seed gives the image the lost one would have had
    again = httpx.post(f"{url}/v1/generate", json={"prompt": "a handwritten digit 3", "seed": 3}, timeout=120)
    assert again.json()["images"] == reference.json()["images"]


def test_a_killed_single_replica_answers_503_with_retry_after_then_recovers(apps):
    bench = _bench()
    url = f"{apps}/one"
    outcomes, killed_at = bench.burst(
        url, requests=32, concurrency=4, kill_after=6, kill=lambda: bench.kill_one_replica("one")
    )
    report = bench.summarise(outcomes, killed_at)
    failed = [o for o in outcomes if o.status != 200]
    assert failed, f"the kill hit no request in flight: {report}"
    assert {o.status for o in failed} == {503} and all(o.retry_after == "7" for o in failed), report
    assert report["recover_s"] == report["recover_s"] and report["ok"] == 32 - len(failed)  # recovered (not NaN)
    r = httpx.post(f"{url}/v1/generate", json={"prompt": "a handwritten digit 1", "seed": 1}, timeout=120)
    assert r.status_code == 200 and r.json()["attempts"] == 1
