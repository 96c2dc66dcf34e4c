"""Bounded load test of a running `normguard serve` on loopback: throughput and p50/p99 latency,
as ratios to calling the same pipeline in-process (same prompts, steps, batch of one).

    normguard serve RUN_DIR --port 8000 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 64 --concurrency 8
"""

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("serve_load only targets loopback addresses")
    args.requests = min(args.requests, 1000)  # bounded
    payload = {"prompt": "a handwritten digit 3", "num_steps": args.steps}

    def one(i):
        t0 = time.perf_counter()
        r = httpx.post(f"{args.url}/v1/generate", json={**payload, "seed": i}, timeout=60)
        r.raise_for_status()
        return time.perf_counter() - t0

    one(0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        lat = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - t0

    from services.config import ModelConfig
    from services.prepare import prepare_embedded
    from services.serve import GeneratorCore
    from services.serve_config import ServeConfig

    core = GeneratorCore(ServeConfig(model=ModelConfig()), str(prepare_embedded().model_path))
    gen = core.load("base")
    item = {
        "prompts": [payload["prompt"]],
        "num_steps": args.steps,
        "guidance_scale": 1.0,
        "shift": 1.0,
        "renormalize": False,
    }
    core.run(gen, [{**item, "seed": 0}])
    local = []
    for i in range(min(args.requests, 64)):
        t1 = time.perf_counter()
        core.run(gen, [{**item, "seed": i}])
        local.append(time.perf_counter() - t1)
    print(
        f"HTTP:       {args.requests / wall:7.1f} req/s   p50 {1000 * statistics.median(lat):7.1f} ms   "
        f"p99 {1000 * _pct(lat, 0.99):7.1f} ms   (concurrency {args.concurrency})"
    )
    print(
        f"in-process: {1 / statistics.mean(local):7.1f} req/s   p50 {1000 * statistics.median(local):7.1f} ms   "
        f"p99 {1000 * _pct(local, 0.99):7.1f} ms   (sequential, batch 1)"
    )
    print(
        f"ratios HTTP / in-process: throughput {args.requests / wall * statistics.mean(local):.2f}x, "
        f"p50 latency {statistics.median(lat) / statistics.median(local):.2f}x"
    )


if __name__ == "__main__":
    main()
