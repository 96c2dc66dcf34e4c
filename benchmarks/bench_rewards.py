"""Reward throughput, side by side in one run: a scorer in-process against through its Serve deployment
(by handle and over HTTP), and the HTTP judge one request at a time against concurrent.

* scorer: PickScore's code (``services.rewards.clip``) on a tiny random CLIP (``tests/tiny_models``: the
  layout, not the weights), ``--images`` images of ``--size`` px; in-process, then through
  ``services.rewards.server`` with ``--replicas`` replicas on a local Ray.
* judge: ``HTTPJudge`` against a fake OpenAI-compatible judge started here on loopback, which answers
  each request after ``--judge-latency-ms`` (a served VLM's round trip), with ``concurrency=1`` and
  ``--concurrency``.

Prints images/s for each and the ratios; no figure is asserted anywhere.

    RAY_AUTH_MODE=disabled python benchmarks/bench_rewards.py [--images 192] [--replicas 2]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
KEY = "bench-rewards"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rate(fn, n: int, repeats: int) -> float:
    fn()  # warm-up: first calls build caches / connections
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return n * repeats / (time.perf_counter() - t0)


def scorer_rates(args, images, prompts) -> dict[str, float]:
    import ray

    from services.rewards import build_scorer
    from services.rewards.remote import RemoteScorer
    from services.rewards.server import RewardServerConfig, deploy

    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models

    clip = tiny_models.save_tiny_clip(Path(tempfile.mkdtemp()) / "clip")
    torch.set_num_threads(1)
    local = build_scorer("pickscore", path=str(clip))
    rates = {"in-process": _rate(lambda: local.score(images, prompts), len(prompts), args.repeats)}
    os.environ["NORMGUARD_REWARD_KEY"] = KEY
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "NORMGUARD_REWARD_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = RewardServerConfig(scorer="pickscore", path=str(clip), num_replicas=args.replicas, num_cpus=0.5)
    deploy(cfg)
    common = dict(scorer="pickscore", timeout_s=120, images_per_request=args.per_request, concurrency=4)
    handle = RemoteScorer(app="pickscore", **common)
    http = RemoteScorer(url=f"http://127.0.0.1:{port}/pickscore", **common)
    rates["serve handle"] = _rate(lambda: handle.score(images, prompts), len(prompts), args.repeats)
    rates["serve HTTP"] = _rate(lambda: http.score(images, prompts), len(prompts), args.repeats)
    serve.shutdown()
    ray.shutdown()
    return rates


def _fake_judge(latency_s: float, port: int):
    """An OpenAI-style judge on loopback: P(yes) = 0.7 for every image, after ``latency_s``."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def chat(request):
        await request.body()
        await asyncio.sleep(latency_s)
        top = [{"token": "Yes", "logprob": math.log(0.7)}, {"token": "No", "logprob": math.log(0.3)}]
        return JSONResponse({"choices": [{"logprobs": {"content": [{"top_logprobs": top}]}}]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def judge_rates(args, images, prompts) -> dict[str, float]:
    from services.rewards.judges import HTTPJudge

    port = _free_port()
    server = _fake_judge(args.judge_latency_ms / 1000, port)
    url = f"http://127.0.0.1:{port}/v1"
    n = min(len(prompts), args.judge_images)
    rates = {}
    for label, conc in (("one at a time", 1), (f"concurrent ({args.concurrency})", args.concurrency)):
        judge = HTTPJudge("http_judge", url, concurrency=conc)
        rates[label] = _rate(lambda j=judge: j.score(images[:n], prompts[:n]), n, 1)
    server.should_exit = True
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--per-request", type=int, default=32, help="images per request to the server")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--judge-images", type=int, default=64)
    p.add_argument("--judge-latency-ms", type=float, default=50.0)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    torch.manual_seed(0)
    images = torch.rand(args.images, 3, args.size, args.size)
    prompts = [f"a handwritten digit {i % 10}" for i in range(args.images)]
    scorer = scorer_rates(args, images, prompts)
    judge = judge_rates(args, images, prompts)
    print(f"\nscorer pickscore (tiny CLIP), {args.images} images of {args.size} px, {args.replicas} replicas")
    for k, v in scorer.items():
        print(f"  {k:<24} {v:10.1f} images/s   x{v / scorer['in-process']:.2f} of in-process")
    first = next(iter(judge.values()))
    print(f"http judge, {args.judge_images} images, fake judge latency {args.judge_latency_ms:g} ms")
    for k, v in judge.items():
        print(f"  {k:<24} {v:10.1f} images/s   x{v / first:.2f} of one at a time")


if __name__ == "__main__":
    main()
