"""Ray Serve: few-step generation over HTTP for trained generators.

One deployment, ``NormGuard``, is both the FastAPI ingress (``POST /v1/generate``, ``GET /v1/models``,
``GET /healthz``, the web page at ``/`` and the OpenAPI schema) and the model replica, so a request
makes one hop: HTTP proxy -> replica. (An ingress deployment in front of the model replicas added
a second actor call with the base64 images in its reply; measured in README "Serving".)

* Checkpoints / LoRAs are served from the one deployment with model multiplexing
  (``@serve.multiplexed``: an LRU of loaded checkpoints per replica). A client that sends the
  ``serve_multiplexed_model_id`` header gets routed to a replica holding its checkpoint; the
  body's ``checkpoint`` field is what is generated either way.
* Concurrent requests for the same checkpoint and settings are merged into one sampler batch. The
  model runs in a worker thread, so the replica's event loop keeps accepting and queueing requests
  while a batch computes; the next batch is what queued meanwhile (:class:`Replica`), and
  ``batch_wait_timeout_s`` (default 0) adds no wait at low load.
* Every reply carries ``server_ms`` (time in the replica), ``queue_ms`` (waiting for a batch) and
  ``compute_ms`` (the model), so a client can see where a request's milliseconds went.
* The optional ``renormalize`` flag applies the paper's inference-time renormalisation baseline,
  for comparison.
"""

import asyncio
import base64
import hmac
import io
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from services.checkpoints import load_weights
from services.models.sampling import sample
from services.serve_config import ServeConfig, load_serve_config

__all__ = ["GenerateRequest", "build_app", "app_from_env"]

BASE_ID = "base"
PAGE = Path(__file__).parent / "static" / "index.html"


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes any int64 >= 0


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str | list[str] = Field(description="one prompt or a list (one image each)")
    num_steps: int | None = Field(None, ge=1, le=10_000, description="sampler steps (default: the few-step default)")
    guidance_scale: float | None = Field(None, ge=1.0, le=1e6, description="CFG scale, finite")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="noise seed (random when omitted)")
    size: int | None = Field(None, ge=8, le=4096, description="image side in pixels")
    checkpoint: str = Field(BASE_ID, description="checkpoint id from GET /v1/models")
    renormalize: bool = Field(False, description="rescale v to ||v_ref|| each step (inference baseline)")
    format: str = Field("json", pattern="^(json|png)$", description="'png' returns image/png for one image")


def _png_b64(image: torch.Tensor) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


class GeneratorCore:
    """Plain class behind the Generator deployment (tested in-process)."""

    def __init__(self, cfg: ServeConfig, model_path: str) -> None:
        from services.models import build_generator

        self.cfg, self.model_path = cfg, model_path
        self.build = lambda: build_generator(cfg.model, path=model_path, device="cuda" if cfg.replica_gpus else "cpu")

    def load(self, checkpoint_id: str):
        if checkpoint_id != BASE_ID and checkpoint_id not in self.cfg.checkpoints:
            raise KeyError(checkpoint_id)
        gen = self.build()
        if checkpoint_id != BASE_ID:
            gen.load_trainable_state_dict(load_weights(self.cfg.checkpoints[checkpoint_id]))
        return gen

    @staticmethod
    def run(gen, items: list[dict]) -> list[list[str]]:
        """One sampler batch for requests sharing (steps, guidance, renormalize); each request's noise
        comes from its own seed, so its images do not depend on its batch neighbours."""
        first = items[0]
        prompts = [p for it in items for p in it["prompts"]]
        noise = torch.cat(
            [
                torch.randn(len(it["prompts"]), *gen.latent_shape, generator=torch.Generator().manual_seed(it["seed"]))
                for it in items
            ]
        )
        out = sample(
            gen,
            prompts,
            noise=noise,
            num_steps=first["num_steps"],
            guidance_scale=first["guidance_scale"],
            shift=first["shift"],
            measure_ratio=False,
            renormalize=first["renormalize"],
        )
        images = [_png_b64(im) for im in out.images]
        grouped, i = [], 0
        for it in items:
            grouped.append(images[i : i + len(it["prompts"])])
            i += len(it["prompts"])
        return grouped

    @staticmethod
    def run_isolated(gen, items: list[dict]) -> list[dict]:
        """:meth:`run` on the whole batch; if it fails, each request alone, so a bad one fails by itself
        (``{"error": ...}``) and its neighbours still get their images."""
        t0 = time.perf_counter()
        try:
            images = GeneratorCore.run(gen, items)
        except Exception:  # noqa: BLE001 - isolate: redo one by one
            return [GeneratorCore._alone(gen, it) for it in items]
        ms = (time.perf_counter() - t0) * 1000
        return [{"images": im, "batch_requests": len(items), "compute_ms": ms} for im in images]

    @staticmethod
    def _alone(gen, item: dict) -> dict:
        t0 = time.perf_counter()
        try:
            (images,) = GeneratorCore.run(gen, [item])
        except Exception as err:  # noqa: BLE001 - reported to this request only
            return {"error": f"{type(err).__name__}: {_clip(str(err))}"}
        return {"images": images, "batch_requests": 1, "compute_ms": (time.perf_counter() - t0) * 1000}


def _clip(text: str, limit: int = 200) -> str:
    """Error messages never echo large inputs back."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _unprocessable(messages: list[str]) -> HTTPException:
    """A 422 whose body has FastAPI's published shape: ``{"detail": [{"loc", "msg", "type"}]}``."""
    return HTTPException(
        status_code=422, detail=[{"loc": ["body"], "msg": _clip(m), "type": "value_error"} for m in messages]
    )


def _validate(cfg: ServeConfig, req: GenerateRequest) -> dict:
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    steps = req.num_steps or cfg.default_steps
    guidance = req.guidance_scale if req.guidance_scale is not None else cfg.default_guidance
    problems = []
    if not prompts or any(not isinstance(p, str) for p in prompts):
        problems.append("prompt must be a string or a non-empty list of strings")
    if len(prompts) > cfg.max_images:
        problems.append(f"at most {cfg.max_images} images per request, got {len(prompts)}")
    if steps > cfg.max_steps:
        problems.append(f"num_steps must be in [1, {cfg.max_steps}], got {steps}")
    if guidance > cfg.max_guidance:
        problems.append(f"guidance_scale must be in [1, {cfg.max_guidance}], got {guidance}")
    if req.size is not None and req.size not in cfg.sizes:
        problems.append(f"size must be one of {list(cfg.sizes)}, got {req.size}")
    if req.format == "png" and len(prompts) != 1:
        problems.append("format 'png' returns one image: send one prompt")
    if any(len(p) > cfg.max_prompt_chars for p in prompts if isinstance(p, str)):
        problems.append(f"each prompt must have at most {cfg.max_prompt_chars} characters")
    if problems:
        raise _unprocessable(problems)
    if cfg.model.kind == "digits":
        from services.models.digits import parse_digit_prompt

        try:
            [parse_digit_prompt(p) for p in prompts]
        except ValueError as err:
            raise _unprocessable([_clip(str(err))]) from None
    seed = req.seed if req.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    return {
        "prompts": prompts,
        "num_steps": steps,
        "guidance_scale": guidance,
        "seed": seed,
        "shift": cfg.shift,
        "checkpoint": req.checkpoint,
        "renormalize": req.renormalize,
    }


def build_fastapi(cfg: ServeConfig) -> FastAPI:
    api = FastAPI(
        title="NormGuard generation",
        version="0.1.0",
        description="Few-step generation with RL post-trained flow-matching generators.",
    )

    open_paths = {"/healthz"} | ({"/"} if cfg.public_page else set())
    expected = f"Bearer {cfg.auth_token}".encode() if cfg.auth_token else None

    @api.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path  # relative to the app's route prefix (Serve sets root_path)
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if expected is not None and path not in open_paths:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time
                return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > cfg.max_body_bytes):
            return JSONResponse({"detail": f"request body over {cfg.max_body_bytes} bytes"}, status_code=413)
        if size is None and request.method in ("POST", "PUT", "PATCH"):
            body = b""
            async for chunk in request.stream():
                body += chunk
                if len(body) > cfg.max_body_bytes:
                    return JSONResponse({"detail": f"request body over {cfg.max_body_bytes} bytes"}, status_code=413)
            request._body = body  # read once; the route parses it from here
        return await call_next(request)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # the published 422 shape, without the offending input (it may be huge, or NaN that JSON cannot carry)
        detail = [
            {"loc": list(e.get("loc", ())), "msg": _clip(str(e.get("msg", ""))), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    return api


class Replica:
    """What a ``NormGuard`` replica does, apart from its routes (``build_app`` adds them).

    Batching: requests queue in the replica and one consumer forms each batch when the model is
    free, from everything queued by then (up to ``max_batch_size``; ``batch_wait_timeout_s`` more
    seconds to fill, default 0). ``@serve.batch`` forms a batch as soon as requests arrive and then
    queues the batch for the model, so under load it ran many small batches back to back (1.9
    requests per batch at concurrency 8, measured); forming the batch when the model frees up gives
    batches as large as the load and no wait at low load.
    """

    def __init__(self, cfg: ServeConfig, model_path: str) -> None:
        torch.set_num_threads(max(1, int(cfg.replica_cpus) or 1))
        self.cfg, self.model_path, self.known = cfg, model_path, [BASE_ID, *cfg.checkpoints]
        self.core = GeneratorCore(cfg, model_path)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")  # one batch at a time
        self.queue: asyncio.Queue | None = None  # created in the replica's event loop, with the consumer
        self._consumer: asyncio.Task | None = None

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, checkpoint_id: str):
        return self.core.load(checkpoint_id)

    async def generate_item(self, item: dict) -> dict:
        """Queue one validated request; its result once a batch has run it."""
        if self._consumer is None or self._consumer.done():
            self.queue = self.queue or asyncio.Queue()
            self._consumer = asyncio.get_running_loop().create_task(self._batches())
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, fut))
        return await fut

    async def _batches(self) -> None:
        """The consumer: take everything queued, run it, answer; forever."""
        while True:
            batch = [await self.queue.get()]
            if self.cfg.batch_wait_timeout_s:
                await asyncio.sleep(self.cfg.batch_wait_timeout_s)
            while len(batch) < self.cfg.max_batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[tuple[dict, asyncio.Future]]) -> None:
        """Requests sharing (checkpoint, steps, guidance, renormalize) run as one sampler batch in the
        compute thread (the event loop keeps queueing requests meanwhile)."""
        start = time.perf_counter()
        groups: dict[tuple, list[tuple[dict, asyncio.Future]]] = defaultdict(list)
        for it, fut in batch:
            groups[(it["checkpoint"], it["num_steps"], it["guidance_scale"], it["renormalize"])].append((it, fut))
        loop = asyncio.get_running_loop()
        for key, members in groups.items():
            items = [it for it, _ in members]
            try:
                gen = await self.get_model(key[0])
                results = await loop.run_in_executor(self.compute, GeneratorCore.run_isolated, gen, items)
            except Exception as err:  # noqa: BLE001 - e.g. a checkpoint that fails to load: these requests only
                results = [{"error": f"{type(err).__name__}: {_clip(str(err))}"}] * len(items)
            for (it, fut), res in zip(members, results):
                if not fut.done():  # the client may have gone
                    fut.set_result({**res, "queue_ms": (start - it["received"]) * 1000})

    def model_list(self) -> dict:
        return {
            "models": [{"id": k, "path": self.cfg.checkpoints.get(k, self.model_path)} for k in self.known],
            "default_steps": self.cfg.default_steps,
            "max_steps": self.cfg.max_steps,
            "sizes": list(self.cfg.sizes),
        }

    async def handle(self, req: GenerateRequest) -> Any:
        """``POST /v1/generate``: validate, queue for a batch, answer JSON (or one PNG)."""
        if req.checkpoint not in self.known:
            raise HTTPException(
                status_code=404, detail=f"unknown checkpoint {_clip(req.checkpoint, 80)!r}; known: {self.known}"
            )
        t0 = time.perf_counter()
        item = {**_validate(self.cfg, req), "received": t0}
        out = await self.generate_item(item)
        if "error" in out:
            raise HTTPException(status_code=500, detail=f"generation failed: {out['error']}")
        if req.format == "png":
            return Response(content=base64.b64decode(out["images"][0]), media_type="image/png")
        server_ms = (time.perf_counter() - t0) * 1000
        return {
            "images": out["images"],
            "checkpoint": req.checkpoint,
            "num_steps": item["num_steps"],
            "seed": item["seed"],
            "batch_requests": out["batch_requests"],
            "server_ms": server_ms,
            "queue_ms": out["queue_ms"],
            "compute_ms": out["compute_ms"],
        }


GENERATE_RESPONSES = {
    401: {"description": "missing or wrong bearer token (when auth_token is set)"},
    404: {"description": "unknown checkpoint"},
    413: {"description": "request body too large"},
    500: {"description": "generation failed for this request (other requests are unaffected)"},
}


def build_app(cfg: ServeConfig, model_path: str):
    """The Serve application (``serve.run(build_app(...))``): one ``NormGuard`` deployment."""
    api = build_fastapi(cfg)

    @serve.deployment(name="NormGuard")
    @serve.ingress(api)
    class NormGuardServer(Replica):
        @api.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

        @api.get("/v1/models")
        async def models(self) -> dict:
            return self.model_list()

        @api.get("/", response_class=HTMLResponse)
        async def page(self) -> str:
            return PAGE.read_text()

        @api.post("/v1/generate", responses=GENERATE_RESPONSES)
        async def generate(self, req: GenerateRequest) -> Any:
            return await self.handle(req)

    opts = {"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus}
    return NormGuardServer.options(
        num_replicas=cfg.num_replicas, ray_actor_options=opts, max_ongoing_requests=max(cfg.max_batch_size * 2, 8)
    ).bind(cfg, model_path)


def resolve_for_serving(cfg: ServeConfig) -> str:
    from services.models import resolve_model_path

    if cfg.model.kind == "digits" and not cfg.model.path:
        from services.prepare import prepare_embedded

        return str(
            prepare_embedded(
                resolution=cfg.model.resolution, pretrain_steps=cfg.model.pretrain_steps, cache_dir=cfg.model.cache_dir
            ).model_path
        )
    return resolve_model_path(cfg.model)


def app_from_env(args: dict | None = None):
    """Import path for ``serve run`` / RayService: config from ``NORMGUARD_SERVE_CONFIG``."""
    import os

    cfg = load_serve_config(os.environ.get("NORMGUARD_SERVE_CONFIG") or (args or {}).get("config"))
    return build_app(cfg, resolve_for_serving(cfg))
