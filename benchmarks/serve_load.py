"""Serve throughput and latency over HTTP on loopback, against the in-process call, in one run.

Starts the Serve app of the embedded base model on 127.0.0.1 (or targets ``--url``), then for each
``--steps`` setting: a sequential in-process baseline (``GeneratorCore.run``, batch of one, the
replica's torch threads), and HTTP load at each ``--concurrency`` (``--requests`` requests).
For each it prints:
- throughput, p50 and p99 latency, errors, the mean merged batch;
- where the milliseconds of a request go: client latency = HTTP proxy and transport + time in the
  replica; time in the replica = batch queue + model compute (the replica reports both).
``--layouts gateway one-hop`` serves both layouts side by side (the default failover layout, a Gateway
deployment in front of the model replicas, and ``failover: false``, ingress and model in one replica),
so the gateway's extra hop is measured against the one-hop layout in the same run.

    RAY_AUTH_MODE=disabled python benchmarks/serve_load.py [--concurrency 1 8 32] [--steps 4 20] [--layouts ...]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from urllib.parse import urlparse

import httpx


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _median(replies: list[dict], key: str) -> float:
    vals = [r[key] for r in replies if key in r]  # a server of another version may not report it
    return statistics.median(vals) if vals else float("nan")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local(args):
    """A local Ray + Serve app of the embedded base model; returns its URL and config."""
    import ray
    from ray import serve

    from services.config import ModelConfig
    from services.serving.app import build_app, resolve_for_serving
    from services.serving.config import ServeConfig

    cfg = ServeConfig(
        model=ModelConfig(),
        replica_cpus=args.replica_cpus,
        max_batch_size=args.max_batch,
        batch_wait_timeout_s=args.batch_wait,
        num_replicas=args.replicas,
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for layout in args.layouts:  # one app per layout, each at /<layout>
        app_cfg = cfg.model_copy(update={"failover": layout == "gateway"})
        serve.run(build_app(app_cfg, resolve_for_serving(cfg)), name=layout, route_prefix=f"/{layout}")
    return f"http://127.0.0.1:{port}", cfg


def in_process(cfg, steps: int, n: int) -> list[float]:
    """Sequential ``GeneratorCore.run`` calls, batch of one, with the replica's threads."""
    import torch

    from services.serving.app import GeneratorCore, resolve_for_serving
    from services.serving.generator import GenerationItem

    torch.set_num_threads(max(1, int(cfg.replica_cpus)))
    core = GeneratorCore(cfg, resolve_for_serving(cfg))
    gen = core.load("base")
    item = GenerationItem(prompts=("a handwritten digit 3",), num_steps=steps, guidance_scale=1.0, seed=0)
    core.run(gen, [item])
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        core.run(gen, [replace(item, seed=i)])
        out.append(time.perf_counter() - t0)
    return out


def load(url: str, steps: int, requests: int, concurrency: int) -> dict:
    payload = {"prompt": "a handwritten digit 3", "num_steps": steps}
    client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency + 2))

    def one(i):
        t0 = time.perf_counter()
        r = client.post(f"{url}/v1/generate", json={**payload, "seed": i})
        dt = time.perf_counter() - t0
        if r.status_code != 200:
            return dt, None
        return dt, r.json()

    for i in range(min(concurrency, 4)):  # warm connections and the replica
        one(i)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        res = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    client.close()
    ok = [b for _, b in res if b is not None]
    lat = [dt for dt, _ in res]
    return {
        "rps": requests / wall,
        "p50": statistics.median(lat),
        "p99": _pct(lat, 0.99),
        "errors": requests - len(ok),
        "batch": statistics.mean(b["batch_requests"] for b in ok) if ok else float("nan"),
        **{k: _median(ok, k) for k in ("server_ms", "queue_ms", "compute_ms")},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None, help="a running `normguard serve` (default: start one here)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 20])
    ap.add_argument("--replica-cpus", type=float, default=1.0)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait", type=float, default=0.0)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument(
        "--layouts",
        nargs="+",
        default=["gateway"],
        choices=["gateway", "one-hop"],
        help="gateway: Gateway -> model replicas (failover, the default); one-hop: ingress and model in one",
    )
    args = ap.parse_args()
    args.requests = min(args.requests, 1000)  # bounded
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("serve_load only targets loopback addresses")
        from services.config import ModelConfig
        from services.serving.config import ServeConfig

        url, cfg = args.url, ServeConfig(model=ModelConfig(), replica_cpus=args.replica_cpus)
        args.layouts = [None]
    else:
        url, cfg = start_local(args)
    print(
        f"replicas {args.replicas} x {args.replica_cpus} CPU, max_batch {args.max_batch}, batch wait "
        f"{args.batch_wait * 1000:.0f} ms, {args.requests} requests per row"
    )
    hdr = "steps  mode          conc   req/s  x in-proc  p50 ms  p99 ms  err  batch  server ms  queue ms  compute ms"
    print(hdr)
    for steps in args.steps:
        base = in_process(cfg, steps, min(args.requests, 64))
        rate = 1 / statistics.mean(base)
        p50 = statistics.median(base) * 1000
        print(f"{steps:>5}  in-process       1  {rate:>6.1f}      1.00  {p50:>6.1f}  {_pct(base, 0.99) * 1000:>6.1f}")
        for layout in args.layouts:
            _rows(f"{url}/{layout}" if layout else url, layout or "HTTP", steps, rate, p50, args)


def _rows(url: str, mode: str, steps: int, rate: float, p50: float, args) -> None:
    c1 = None
    for c in args.concurrency:
        r = load(url, steps, args.requests, c)
        c1 = r["p50"] * 1000 if c == 1 else c1
        print(
            f"{steps:>5}  {mode:<12}{c:>4}  {r['rps']:>6.1f}  {r['rps'] / rate:>8.2f}  {r['p50'] * 1000:>6.1f}  "
            f"{r['p99'] * 1000:>6.1f}  {r['errors']:>3}  {r['batch']:>5.1f}  {r['server_ms']:>9.1f}  "
            f"{r['queue_ms']:>8.1f}  {r['compute_ms']:>10.1f}"
        )
    if c1 is not None:
        print(f"       {mode}: p50 at concurrency 1 - in-process p50 = {c1 - p50:.1f} ms")


if __name__ == "__main__":
    main()
