"""Ray Serve: few-step generation over HTTP for trained generators.

Two deployments by default (``failover: true``):

* ``Gateway``: the FastAPI ingress (``POST /v1/generate``, ``GET /v1/models``, ``GET /healthz``, the web
  page at ``/`` and the OpenAPI schema). It validates and authenticates, fixes each request's seed, and
  forwards it to the model replicas through a ``DeploymentHandle``, routed by checkpoint
  (``multiplexed_model_id``). A request whose replica dies is sent once more to a live replica, or
  answered 503 with ``Retry-After`` when there is none (``services/serving/failover.py``).
* ``NormGuard``: the model replicas (:class:`Replica`), which batch and sample.

``failover: false`` runs one deployment that is ingress and model in one, so a request makes one hop
(HTTP proxy -> replica) instead of two; a replica lost mid-request then costs its in-flight requests,
which Serve's proxy answers with 500. The hop's cost is measured in README "Serving".

* Checkpoints / LoRAs are served from the one model deployment with model multiplexing
  (``@serve.multiplexed``: an LRU of loaded checkpoints per replica).
* Concurrent requests for the same checkpoint and settings are merged into one sampler batch. The
  model runs in a worker thread, so the replica's event loop keeps accepting and queueing requests
  while a batch computes; the next batch is what queued meanwhile (:class:`Replica`), and
  ``batch_wait_timeout_s`` (default 0) adds no wait at low load.
* Every reply carries ``server_ms`` (time in the service), ``queue_ms`` (waiting for a batch in the
  replica) and ``compute_ms`` (the model), so a client can see where a request's milliseconds went, and
  ``attempts`` (replicas it took: 2 when its first replica died).
* The optional ``renormalize`` flag applies the paper's inference-time renormalisation baseline,
  for comparison.
"""

import asyncio
import base64
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from fastapi import HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from services.serving.catalog import model_cards
from services.serving.config import ServeConfig, load_serve_config
from services.serving.drain import DrainCut, DrainGate, DrainResult, StopLatch, drain
from services.serving.failover import forward_with_failover
from services.serving.generator import BASE_ID, GenerationItem, GeneratorCore, clip
from services.serving.http import GenerateRequest, build_fastapi, validate
from services.signals import exit_code

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.actor import ActorHandle

__all__ = ["GenerateRequest", "build_app", "app_from_env"]

PAGE = Path(__file__).parent / "static" / "index.html"
APP = "normguard"  # the application name `normguard serve` runs


class Replica:
    """A ``NormGuard`` model replica: loads checkpoints by id, batches requests, samples.

    Batching: requests queue in the replica and one consumer forms each batch when the model is
    free, from everything queued by then (up to ``max_batch_size``; ``batch_wait_timeout_s`` more
    seconds to fill, default 0). ``@serve.batch`` forms a batch as soon as requests arrive and then
    queues the batch for the model, so under load it ran many small batches back to back (1.9
    requests per batch at concurrency 8, measured); forming the batch when the model frees up gives
    batches as large as the load and no wait at low load.
    """

    def __init__(self, cfg: ServeConfig, model_path: str) -> None:
        torch.set_num_threads(max(1, int(cfg.replica_cpus) or 1))
        self.cfg, self.model_path = cfg, model_path
        self.core = GeneratorCore(cfg, model_path)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")  # one batch at a time
        self.queue: asyncio.Queue | None = None  # created in the replica's event loop, with the consumer
        self._consumer: asyncio.Task | None = None

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, checkpoint_id: str):
        return self.core.load(checkpoint_id)

    async def generate_item(self, item: GenerationItem) -> dict:
        """Queue one validated request; its result once a batch has run it."""
        if self._consumer is None or self._consumer.done():
            self.queue = self.queue or asyncio.Queue()
            self._consumer = asyncio.get_running_loop().create_task(self._batches())
        queue = self.queue
        assert queue is not None, "the queue is created with its consumer"
        fut = asyncio.get_running_loop().create_future()
        # its queue time starts here (the gateway's clock is another process's)
        queue.put_nowait((replace(item, received=time.perf_counter()), fut))
        return await fut

    async def _batches(self) -> None:
        """The consumer: take everything queued, run it, answer; forever."""
        queue = self.queue
        assert queue is not None, "generate_item creates the queue before it starts the consumer"
        while True:
            batch = [await queue.get()]
            if self.cfg.batch_wait_timeout_s:
                await asyncio.sleep(self.cfg.batch_wait_timeout_s)
            while len(batch) < self.cfg.max_batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[GenerationItem, asyncio.Future]]) -> None:
        """Requests sharing (checkpoint, steps, guidance, renormalize) run as one sampler batch in the
        compute thread (the event loop keeps queueing requests meanwhile)."""
        start = time.perf_counter()
        groups: dict[tuple, list[tuple[GenerationItem, asyncio.Future]]] = defaultdict(list)
        for it, fut in batch:
            groups[it.batch_key].append((it, fut))
        loop = asyncio.get_running_loop()
        for key, members in groups.items():
            items = [it for it, _ in members]
            try:
                # ray types serve.multiplexed's result as the coroutine, not the method that returns it
                gen = await self.get_model(key[0])  # pyright: ignore[reportCallIssue] - ray stub: serve.multiplexed
                results = await loop.run_in_executor(self.compute, GeneratorCore.run_isolated, gen, items)
            except Exception as err:  # noqa: BLE001 - e.g. a checkpoint that fails to load: these requests only
                results = [{"error": f"{type(err).__name__}: {clip(str(err))}"}] * len(items)
            for (it, fut), res in zip(members, results):
                if not fut.done():  # the client may have gone
                    fut.set_result({**res, "queue_ms": (start - it.received) * 1000})


class Frontend:
    """What the HTTP routes do: checkpoint ids, validation, the reply. :meth:`forward` is the model
    call: through the gateway's handle with failover, or in the same replica (``failover: false``)."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg, self.known = cfg, [BASE_ID, *cfg.checkpoints]
        self.cards = model_cards(cfg)  # read once: the served checkpoints do not change under a replica
        self.gate = DrainGate(serve.get_replica_context().app_name, cfg.retry_after_s)  # `normguard serve`'s drain

    async def forward(self, item: GenerationItem) -> dict:
        raise NotImplementedError

    def model_list(self) -> dict:
        return {
            "models": self.cards,
            "default_steps": self.cfg.default_steps,
            "max_steps": self.cfg.max_steps,
            "sizes": list(self.cfg.sizes),
        }

    async def handle(self, req: GenerateRequest) -> Any:
        """``POST /v1/generate``: validate, send to a batch, answer JSON (or one PNG)."""
        if req.checkpoint not in self.known:
            raise HTTPException(
                status_code=404, detail=f"unknown checkpoint {clip(req.checkpoint, 80)!r}; known: {self.known}"
            )
        item = validate(self.cfg, req)
        t0 = time.perf_counter()
        out = await self.forward(item)
        if "error" in out:
            raise HTTPException(status_code=500, detail=f"generation failed: {out['error']}")
        if req.format == "png":
            return Response(content=base64.b64decode(out["images"][0]), media_type="image/png")
        return {
            "images": out["images"],
            "checkpoint": req.checkpoint,
            "num_steps": item.num_steps,
            "seed": item.seed,
            "renormalize": item.renormalize,
            "batch_requests": out["batch_requests"],
            "server_ms": (time.perf_counter() - t0) * 1000,
            "queue_ms": out["queue_ms"],
            "compute_ms": out["compute_ms"],
            "attempts": out["attempts"],
        }


class _Gateway(Frontend):
    """The ingress of the failover layout: no model, a handle to the ``NormGuard`` replicas."""

    def __init__(self, cfg: ServeConfig, model: Any) -> None:
        super().__init__(cfg)
        self.model = model
        self.retries = cfg.replica_loss_retries if cfg.num_replicas >= 2 else 0  # one replica: nowhere to retry

    async def forward(self, item: GenerationItem) -> dict:
        return await forward_with_failover(
            self.model,
            item,
            retries=self.retries,
            retry_after_s=self.cfg.retry_after_s,
            timeout_s=self.cfg.request_timeout_s,
        )


class _OneHop(Frontend, Replica):
    """Ingress and model in one replica (``failover: false``)."""

    def __init__(self, cfg: ServeConfig, model_path: str) -> None:
        Replica.__init__(self, cfg, model_path)
        Frontend.__init__(self, cfg)

    async def forward(self, item: GenerationItem) -> dict:
        return {**(await self.generate_item(item)), "attempts": 1}


GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong bearer token (when auth_token is set)"},
    404: {"description": "unknown checkpoint"},
    413: {"description": "request body too large"},
    500: {"description": "generation failed for this request (other requests are unaffected)"},
    503: {
        "description": "the request's model replica was lost and no live one could take it, or the server is "
        "shutting down (`normguard serve` after SIGTERM); see Retry-After"
    },
    504: {"description": "the model did not answer within request_timeout_s (the gateway layout)"},
}


def _ingress(api: "FastAPI", base: type, name: str):
    """``base`` as the FastAPI ingress deployment ``name``, with the service's routes."""

    @serve.deployment(name=name)
    @serve.ingress(api)
    class Ingress(base):
        @api.get("/healthz")
        async def healthz(self) -> Any:
            self.gate.watch()
            if self.gate.draining:  # a readiness probe / load balancer stops sending
                return JSONResponse({"status": "draining"}, status_code=503, headers={"Connection": "close"})
            return {"status": "ok"}

        @api.get("/v1/models")
        async def models(self) -> dict:
            return self.model_list()

        @api.get("/", response_class=HTMLResponse)
        async def page(self) -> str:
            return PAGE.read_text()

        @api.post("/v1/generate", responses=GENERATE_RESPONSES)
        async def generate(self, req: GenerateRequest) -> Any:
            async with self.gate.admit():  # 503 once the drain began; counted while in flight
                return await self.handle(req)

    return Ingress


def build_app(cfg: ServeConfig, model_path: str):
    """The Serve application (``serve.run(build_app(...))``): ``Gateway`` -> ``NormGuard`` replicas, or
    one ``NormGuard`` deployment with ``failover: false``."""
    api = build_fastapi(cfg)
    model_opts = {
        "num_replicas": cfg.num_replicas,
        "ray_actor_options": {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        "max_ongoing_requests": max(cfg.max_batch_size * 2, 8),
    }
    if not cfg.failover:
        return _ingress(api, _OneHop, "NormGuard").options(**model_opts).bind(cfg, model_path)
    model = serve.deployment(name="NormGuard")(Replica).options(**model_opts).bind(cfg, model_path)
    gateway = _ingress(api, _Gateway, "Gateway").options(
        num_replicas=cfg.gateway_replicas,
        ray_actor_options={"num_cpus": cfg.gateway_cpus},
        max_ongoing_requests=max(cfg.max_batch_size * 2 * cfg.num_replicas, 8),
    )
    return gateway.bind(cfg, model)


def resolve_for_serving(cfg: ServeConfig) -> str:
    from services.prepare import resolve_model

    return resolve_model(cfg.model).path


def app_from_env(args: dict | None = None):
    """Import path for ``serve run`` / RayService: config from ``NORMGUARD_SERVE_CONFIG``."""
    import os

    cfg = load_serve_config(os.environ.get("NORMGUARD_SERVE_CONFIG") or (args or {}).get("config"))
    return build_app(cfg, resolve_for_serving(cfg))


def serve_config_for(target: str | None, *, host: str | None = None, port: int | None = None) -> ServeConfig:
    """The serve config of ``normguard serve TARGET``: a serve YAML as it is; a run or checkpoint
    directory as checkpoint ``trained`` (a run directory also gives its model and grid shift);
    nothing: the base model. ``host`` / ``port`` override the YAML only when given (the command
    line's flags default to ``None``, so a YAML's ``port: 8012`` is kept)."""
    import json

    path = Path(target) if target else None
    over: dict = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if path is not None and path.suffix in (".yaml", ".yml"):
        return load_serve_config(path, **over)
    checkpoints = {"trained": str(path)} if path is not None else {}
    model = {}
    if path is not None and (path / "config.json").is_file():  # a run dir knows its model
        run_cfg = json.loads((path / "config.json").read_text())
        model = run_cfg["model"]
        over.setdefault("shift", run_cfg.get("rollout", {}).get("shift"))  # the grid it was trained on (None: family's)
    return load_serve_config(None, checkpoints=checkpoints, model=model, **over)


def serve_forever(
    target: str | None, *, host: str | None = None, port: int | None = None, num_cpus: int | None = None
) -> int:
    """``normguard serve``: start Ray and the app on ``host:port`` and serve until SIGTERM / SIGINT; then stop
    taking requests, finish those in flight (at most ``drain_timeout_s``) and shut down
    (``services.serving.drain``). The exit code: 0 when every admitted request was answered, else 128 + the
    signal (the bound ran out, or a second signal came)."""
    import ray

    from services.serving.drain import NAMESPACE, DrainBoard, board_name

    cfg = serve_config_for(target, host=host, port=port)
    model_path = resolve_for_serving(cfg)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    # before the app, so its replicas find it; the handle keeps it alive (an unreferenced actor is collected)
    board = DrainBoard.options(name=board_name(APP), namespace=NAMESPACE).remote()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, model_path), name=APP, route_prefix="/")
    latch = StopLatch().install()  # after ray.init and serve.start: their SIGTERM handlers dump a stack
    print(f"serving {['base', *cfg.checkpoints]} on http://{cfg.host}:{cfg.port}  (Ctrl-C to stop)", flush=True)
    try:
        return _stop(latch, cfg, board)
    finally:
        latch.restore()
        ray.shutdown()


def _stop(latch: StopLatch, cfg: ServeConfig, board: "ActorHandle") -> int:
    request = latch.wait()
    print(
        f"normguard serve: {request.name}: taking no new requests; finishing those in flight "
        f"(at most {cfg.drain_timeout_s:g} s, serve.drain_timeout_s; a second signal stops now)",
        flush=True,
    )
    try:
        result = drain(board, cfg.drain_timeout_s)
    except DrainCut as second:
        result = DrainResult(time.monotonic() - request.at, -1, f"a second signal, {second}")
    latch.cut_on_second = False  # serve.shutdown is not to be cut half-way
    serve.shutdown()
    if result.why:
        print(f"normguard serve: stopped after {result.seconds:.1f} s: {result.why}; requests were cut", flush=True)
        return exit_code(request)
    print(f"normguard serve: stopped; every admitted request was answered ({result.seconds:.1f} s)", flush=True)
    return 0
