"""A model replica SIGKILLed inside a bounded burst of requests on loopback: what clients see.

Starts two Serve apps of the embedded base model on 127.0.0.1 (unless given ``--url``), one with two
model replicas and one with a single replica, both in the default failover layout (a ``Gateway``
deployment in front of the ``NormGuard`` replicas), and, for comparison, the one-hop layout
(``failover: false``). For each: ``--concurrency`` clients send ``--requests`` seeded requests in
all; once ``--kill-after`` have been answered, one model replica process is SIGKILLed. It prints,
side by side:

- requests answered 200, failed (any other status) and of those 503 (with ``Retry-After``);
- requests retried on a live replica (the reply's ``attempts`` = 2);
- p50 / p99 latency before the kill and during the fault (requests in flight at or sent after the kill,
  until the first request sent after the kill is answered 200);
- time to recover: from the kill to that first 200.

Each arm first sends ``--warmup`` uncounted requests, so "before" is the warm latency, not the
replicas' first calls.

    RAY_AUTH_MODE=disabled python benchmarks/serve_faults.py [--requests 80] [--concurrency 4]

The test ``tests/services/test_serve_faults.py`` drives the same burst (:func:`burst`) and asserts the
counts: 0 failed with two replicas, only 503s with one.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

REQUEST_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    """One request of a burst: its HTTP status, when it was sent and answered (``time.monotonic``),
    the replicas it took (``attempts``, from a 200's body) and a 503's ``Retry-After``."""

    status: int
    sent: float
    answered: float
    attempts: int | None = None
    retry_after: str | None = None


def replica_pids(app: str, deployment: str = "NormGuard") -> list[int]:
    """PIDs of an app's live model replicas: Ray titles each actor process ``ray::<actor class>...``,
    and a Serve replica's class is ``ServeReplica:<app>:<deployment>``."""
    prefix = f"ray::ServeReplica:{app}:{deployment}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "cmdline").read_bytes().startswith(prefix):
                pids.append(int(proc.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def kill_one_replica(app: str) -> int:
    """SIGKILL one of ``app``'s model replicas; its PID."""
    pids = replica_pids(app)
    if not pids:
        raise RuntimeError(f"no live model replica of app {app!r} to kill")
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


def _send(client: httpx.Client, url: str, payload: dict) -> Outcome:
    sent = time.monotonic()
    try:
        r = client.post(f"{url}/v1/generate", json=payload, timeout=REQUEST_TIMEOUT_S)
    except httpx.HTTPError:  # a dropped connection counts as a failed request
        return Outcome(0, sent, time.monotonic())
    attempts = r.json().get("attempts") if r.status_code == 200 else None
    return Outcome(r.status_code, sent, time.monotonic(), attempts, r.headers.get("retry-after"))


def burst(url: str, *, requests: int, concurrency: int, kill_after: int, kill, num_steps: int = 8):
    """``requests`` seeded requests from ``concurrency`` clients; ``kill()`` once ``kill_after`` are
    answered. Bounded in count (and each request in time). Returns (outcomes, kill time)."""
    lock, state = threading.Lock(), {"next": 0, "answered": 0, "killed_at": None}

    def client_loop() -> list[Outcome]:
        mine = []
        with httpx.Client() as client:
            while True:
                with lock:
                    i, state["next"] = state["next"], state["next"] + 1
                if i >= requests:
                    return mine
                payload = {"prompt": f"a handwritten digit {i % 10}", "seed": i, "num_steps": num_steps}
                mine.append(_send(client, url, payload))
                with lock:
                    state["answered"] += 1
                    due = state["answered"] >= kill_after and state["killed_at"] is None
                    if due:
                        state["killed_at"] = time.monotonic()
                if due:
                    kill()

    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = [o for part in pool.map(lambda _: client_loop(), range(concurrency)) for o in part]
    return sorted(outcomes, key=lambda o: o.sent), state["killed_at"]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarise(outcomes: list[Outcome], killed_at: float | None) -> dict:
    """The counts and latencies printed per arm (see the module docstring)."""
    ok = [o for o in outcomes if o.status == 200]
    after = [o for o in ok if killed_at is not None and o.sent >= killed_at]
    recovered = min((o.answered for o in after), default=None)
    before = [o for o in outcomes if killed_at is None or o.answered < killed_at]
    fault = [o for o in outcomes if killed_at is not None and o.answered >= killed_at]
    fault = [o for o in fault if recovered is None or o.sent <= recovered]
    ms = lambda group: [(o.answered - o.sent) * 1000 for o in group]  # noqa: E731
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "failed": len(outcomes) - len(ok),
        "503": sum(o.status == 503 for o in outcomes),
        "503_with_retry_after": sum(o.status == 503 and o.retry_after is not None for o in outcomes),
        "retried": sum((o.attempts or 1) > 1 for o in ok),
        "p50_before_ms": statistics.median(ms(before)) if before else float("nan"),
        "p99_before_ms": _pct(ms(before), 0.99),
        "p99_fault_ms": _pct(ms(fault), 0.99),
        "recover_s": (recovered - killed_at) if recovered is not None and killed_at is not None else float("nan"),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ARMS = {"two replicas": ("two", 2, True), "one replica": ("one", 1, True), "one replica, one hop": ("hop", 1, False)}


def start_local(arms: dict, pretrain_steps: int = 600) -> str:
    """A local Ray + Serve with one app per arm (route ``/<app>``); the base URL."""
    import ray
    from ray import serve

    from services.config import ModelConfig
    from services.serving.app import build_app, resolve_for_serving
    from services.serving.config import ServeConfig

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for app, replicas, failover in arms.values():
        model = ModelConfig(pretrain_steps=pretrain_steps)
        cfg = ServeConfig(model=model, replica_cpus=0.5, num_replicas=replicas, failover=failover)
        serve.run(build_app(cfg, resolve_for_serving(cfg)), name=app, route_prefix=f"/{app}")
    return f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=80)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--kill-after", type=int, default=12, help="answered requests before the kill")
    ap.add_argument("--steps", type=int, default=8, help="sampling steps per request")
    ap.add_argument(
        "--warmup", type=int, default=16, help="uncounted requests per arm first (every replica's first call)"
    )
    ap.add_argument(
        "--pretrain-steps",
        type=int,
        default=600,
        help="the embedded model's pretraining (the counts do not depend on it)",
    )
    args = ap.parse_args()
    url = start_local(ARMS, args.pretrain_steps)
    cols = ["requests", "ok", "failed", "503", "503_with_retry_after", "retried"]
    cols += ["p50_before_ms", "p99_before_ms", "p99_fault_ms", "recover_s"]
    print("| arm | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for arm, (app, _, _) in ARMS.items():
        burst(
            f"{url}/{app}",
            requests=args.warmup,
            concurrency=args.concurrency,
            kill_after=args.warmup + 1,
            kill=lambda: None,
            num_steps=args.steps,
        )  # never reaches kill_after: no kill
        outcomes, killed_at = burst(
            f"{url}/{app}",
            requests=args.requests,
            concurrency=args.concurrency,
            kill_after=args.kill_after,
            kill=lambda app=app: kill_one_replica(app),
            num_steps=args.steps,
        )
        row = summarise(outcomes, killed_at)
        cells = [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        print(f"| {arm} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
