"""End to end: ``normguard serve`` under load gets SIGTERM (what Kubernetes sends a pod it stops). The requests
already admitted are answered, a new request gets 503 with Retry-After and /healthz 503 while it drains, the
process says so in one line, prints no stack dump and exits 0. The requests wait in the replica's batch
(``batch_wait_timeout_s: 3``), so they are in flight when the signal comes, whatever the machine's speed."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import TINY_PRETRAIN_STEPS, cli_env, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
BIN = Path(sys.executable).parent
IN_FLIGHT = 6


def _up(proc: subprocess.Popen, url: str, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"normguard serve did not come up in {timeout_s:.0f} s")


def test_sigterm_under_load_answers_the_requests_in_flight_refuses_new_ones_and_exits_0(digits_assets, tmp_path):
    port = free_port()
    cfg = {
        "model": {"kind": "digits", "pretrain_steps": TINY_PRETRAIN_STEPS},  # the session's tiny cached model
        "port": port,
        "batch_wait_timeout_s": 3.0,
        "max_batch_size": 64,
        "replica_cpus": 0.5,
        "drain_timeout_s": 20,
    }
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [str(BIN / "normguard"), "serve", str(tmp_path / "serve.yaml"), "--num-cpus", "2"]
    proc = subprocess.Popen(
        cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _up(proc, url)
        body = {"prompt": "a handwritten digit 3", "num_steps": 4, "seed": 1}
        assert httpx.post(f"{url}/v1/generate", json=body, timeout=60).status_code == 200  # the model is loaded
        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            calls = [pool.submit(httpx.post, f"{url}/v1/generate", json={**body, "seed": i}, timeout=60) for i in
                     range(IN_FLIGHT)]  # fmt: skip
            time.sleep(1.0)  # admitted, waiting for their batch
            t_signal = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.8)  # the gateway has heard of the drain (it polls every 0.2 s)
            late = httpx.post(f"{url}/v1/generate", json=body, timeout=30)
            health = httpx.get(f"{url}/healthz", timeout=10)
            answered = [c.result() for c in calls]
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert [r.status_code for r in answered] == [200] * IN_FLIGHT, [r.text[:200] for r in answered]
    assert all(len(r.json()["images"]) == 1 for r in answered)
    assert late.status_code == 503 and int(late.headers["Retry-After"]) > 0, late.text
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "SIGTERM received at" not in out, out[-3000:]  # no stack dump
    said = [line for line in out.splitlines() if line.startswith("normguard serve:")]
    assert len(said) == 2 and "SIGTERM" in said[0] and "every admitted request was answered" in said[1], said
    print(f"SIGTERM to exit: {time.monotonic() - t_signal:.1f} s")
