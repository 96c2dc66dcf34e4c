"""A reward server on Ray Serve: any registered scorer as its own deployment.

Each replica builds one scorer (``build_scorer``, so a registered name, or a user's ``impl``) on its own
resources (``num_cpus`` / ``num_gpus`` / custom ``resources``), with ``num_replicas`` or an autoscaling
range. Requests that arrive together are merged into one scorer call (``serve.batch``: up to
``max_batch_size`` requests, waiting at most ``batch_wait_timeout_s`` for company), the way a GPU model
wants its batches.

Two entrances, one scorer:

* **by handle** (inside the Ray cluster): ``handle.score.remote({"images": uint8 (B, 3, H, W), "prompts":
  [...]})``; Ray's own serialisation, in the cluster's trust domain. Training's ``RemoteScorer`` with
  ``server: {app: <name>}``.
* **over HTTP** (from outside): ``POST <route_prefix>/score`` with the JSON of ``services.rewards.wire``
  and ``Authorization: Bearer <key>``, the key read by the replica from ``$api_key_env``. Refused, each
  with a 4xx that says why: no or a wrong token (401, before the body is read), a pickle or other
  non-JSON body (415), a body over ``max_request_bytes`` (413), a body that is not the wire format (400 /
  422). ``GET <route_prefix>/health`` says which scorer answers.

Run one from a YAML of :class:`RewardServerConfig`::

    NORMGUARD_REWARD_KEY=... python -m services.rewards.server server.yaml [--host 0.0.0.0 --port 8000]
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field, model_validator
from ray import serve

from services.config.base import Section
from services.rewards.base import build_scorer, is_groupwise
from services.rewards.wire import WireError, decode_image, parse_body

if TYPE_CHECKING:
    from starlette.requests import Request

__all__ = ["AutoscalingSpec", "RewardReplica", "RewardServerConfig", "deploy", "reward_app"]

log = logging.getLogger(__name__)
_PICKLE_TYPES = ("application/octet-stream", "application/python-pickle", "application/x-pickle")


class AutoscalingSpec(Section):
    """Serve's autoscaling range for the replicas (``autoscaling_config``)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0, description="requests in flight per replica to aim for")
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _range(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class RewardServerConfig(Section):
    """One scorer as one Serve application."""

    scorer: str = Field(description="registered scorer name, or a label when impl is set")
    impl: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    path: str | None = Field(default=None, description="checkpoint dir / hub id for the scorer")
    options: dict[str, Any] = Field(default_factory=dict, description="scorer-specific keyword arguments")
    app: str | None = Field(default=None, description="Serve application name (default: the scorer's)")
    deployment: str = Field(default="RewardScorer", min_length=1)
    route_prefix: str | None = Field(default=None, pattern=r"^/", description="HTTP prefix (default: /<app>)")
    num_replicas: int = Field(default=1, ge=1, description="fixed replicas (ignored with autoscaling)")
    autoscaling: AutoscalingSpec | None = None
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray runtime_env of each replica (env_vars, pip, working_dir), merged over the job's",
    )
    torch_threads: int = Field(default=1, ge=1)
    max_batch_size: int = Field(default=8, ge=1, description="requests merged into one scorer call")
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, description="longest wait for a batch to fill")
    max_ongoing_requests: int = Field(default=16, ge=1, description="per replica; more queue in Serve's router")
    api_key_env: str = Field(
        default="NORMGUARD_REWARD_KEY", description="variable holding the bearer token, per replica"
    )
    allow_unauthenticated: bool = Field(default=False, description="serve HTTP without a token (a loopback test only)")
    max_request_bytes: int = Field(default=64 << 20, ge=1024)
    max_images: int = Field(default=512, ge=1, description="images per request")
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)

    @property
    def app_name(self) -> str:
        return self.app or self.scorer

    @property
    def prefix(self) -> str:
        return self.route_prefix or f"/{self.app_name}"


@dataclass(frozen=True)
class _Job:
    """One request's part of a batch."""

    images: torch.Tensor  # (B, 3, H, W) uint8
    prompts: list[str]
    group_ids: torch.Tensor | None
    metadata: list | None


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class RewardReplica:
    """One replica: the scorer, the batch queue and both entrances."""

    def __init__(self, config: dict) -> None:
        cfg = RewardServerConfig.model_validate(config)
        torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        device = "cuda" if cfg.num_gpus and torch.cuda.is_available() else "cpu"
        self.scorer = build_scorer(cfg.scorer, path=cfg.path, device=device, options=cfg.options, impl=cfg.impl)
        self.groupwise = is_groupwise(self.scorer)
        self.takes_metadata = "metadata" in _parameters(self.scorer.score)
        self.key = os.environ.get(cfg.api_key_env, "")
        if not self.key and not cfg.allow_unauthenticated:
            raise RuntimeError(
                f"reward server {cfg.scorer}: ${cfg.api_key_env} is not set in the replica's environment; set it "
                "(the cluster's environment or runtime_env) or allow_unauthenticated: true for a loopback test"
            )
        # ray types serve.batch's result as a plain callable; the batched method has these setters (Serve docs)
        b = self._batched
        b.set_max_batch_size(cfg.max_batch_size)  # pyright: ignore[reportAttributeAccessIssue] - ray stub
        b.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)  # pyright: ignore[reportAttributeAccessIssue] - ray stub

    # ---- by handle ---------------------------------------------------------------------------
    async def score(self, payload: dict) -> dict:
        """``{"images": uint8 (B, 3, H, W), "prompts": [...], "group_ids"?, "metadata"?}`` -> ``{"scores": (B,)}``."""
        images = payload["images"]
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"{self.cfg.scorer}: images must be a uint8 (B, 3, H, W) tensor")
        prompts = list(payload.get("prompts") or [""] * len(images))
        groups = payload.get("group_ids")
        job = _Job(images, prompts, torch.as_tensor(groups) if groups is not None else None, payload.get("metadata"))
        return {"scorer": self.cfg.scorer, "scores": await self._batched(job)}

    # ---- over HTTP ---------------------------------------------------------------------------
    async def __call__(self, request: Request) -> Any:
        from starlette.responses import JSONResponse

        try:
            return JSONResponse(await self._http(request))
        except _Refused as err:
            return JSONResponse({"error": str(err)}, status_code=err.status, headers=err.headers)
        except Exception as err:  # noqa: BLE001 - the scorer failed: a 500 that names it
            log.exception("%s: scoring failed", self.cfg.scorer)
            return JSONResponse({"error": f"{self.cfg.scorer}: {type(err).__name__}: {err}"}, status_code=500)

    async def _http(self, request: Request) -> dict:
        path = request.url.path.rstrip("/")  # Serve passes the full path; the prefix routed it here
        if request.method == "GET" and path.endswith("/health"):
            return {"scorer": self.cfg.scorer, "groupwise": self.groupwise}
        if request.method != "POST" or not path.endswith("/score"):
            raise _Refused(404, f"POST {self.cfg.prefix}/score or GET {self.cfg.prefix}/health")
        self._check_token(request.headers.get("authorization", ""))
        body = await self._read_body(request)
        job = self._job(body)
        return {"scorer": self.cfg.scorer, "scores": [float(s) for s in await self._batched(job)]}

    def _check_token(self, header: str) -> None:
        if not self.key:  # allow_unauthenticated
            return
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key.encode()):
            raise _Refused(
                401, "a valid 'Authorization: Bearer <token>' header is required", {"WWW-Authenticate": "Bearer"}
            )

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cfg.max_request_bytes:
            raise _Refused(413, f"the body is {declared} bytes; this server takes at most {self.cfg.max_request_bytes}")
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind in _PICKLE_TYPES:
            raise _Refused(415, f"{kind} bodies are refused (pickle runs code); send application/json")
        if kind != "application/json":
            raise _Refused(415, f"Content-Type {kind or 'none'} is refused; send application/json")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > self.cfg.max_request_bytes:
                raise _Refused(413, f"the body passed {self.cfg.max_request_bytes} bytes")
        if buf[:1] == b"\x80":  # every pickle of protocol 2+ starts with PROTO
            raise _Refused(415, "this body is a pickle; pickle bodies are refused (they run code): send JSON")
        return bytes(buf)

    def _job(self, raw: bytes) -> _Job:
        try:
            body = parse_body(raw)
            if len(body.images) > self.cfg.max_images:
                raise WireError(f"{len(body.images)} images; this server takes at most {self.cfg.max_images}")
            images = [decode_image(s, max_pixels=self.cfg.max_image_pixels) for s in body.images]
            if len({tuple(im.shape) for im in images}) != 1:
                raise WireError("the images of one request must share their size")
        except WireError as err:
            raise _Refused(422 if raw[:1] == b"{" else 400, str(err)) from err
        prompts = body.prompts or [""] * len(images)
        groups = torch.tensor(body.group_ids) if body.group_ids is not None else None
        return _Job(torch.stack(images), prompts, groups, body.metadata)

    # ---- the batch: requests that arrived together, one scorer call ----------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[_Job]) -> list[torch.Tensor]:
        sizes = {tuple(j.images.shape[1:]) for j in jobs}
        if len(sizes) > 1:  # a batch of mixed sizes cannot be stacked: score each request alone
            return [await asyncio.to_thread(self._score, [j]) for j in jobs]
        scores = await asyncio.to_thread(self._score, jobs)
        return list(torch.split(scores, [len(j.prompts) for j in jobs]))

    def _score(self, jobs: list[_Job]) -> torch.Tensor:
        """One scorer call over the jobs; a group-wise scorer's group ids are offset per job so two
        requests' groups never merge."""
        images = torch.cat([j.images for j in jobs]).float() / 255.0
        prompts = [p for j in jobs for p in j.prompts]
        kw = {}
        if self.takes_metadata and any(j.metadata is not None for j in jobs):
            kw["metadata"] = [m for j in jobs for m in (j.metadata or [None] * len(j.prompts))]
        scorer = self.scorer
        with torch.no_grad():
            if is_groupwise(scorer):  # self.groupwise: the same flag
                groups, offset = [], 0
                for j in jobs:
                    g = j.group_ids if j.group_ids is not None else torch.zeros(len(j.prompts), dtype=torch.long)
                    groups.append(g.long() - g.min() + offset)
                    offset = int(groups[-1].max()) + 1
                out = scorer.score(images, prompts, torch.cat(groups), **kw)
            else:
                out = scorer.score(images, prompts, **kw)
        out = out.detach().float().cpu().flatten()
        if out.shape != (len(prompts),) or not torch.isfinite(out).all():
            raise ValueError(f"{self.cfg.scorer} returned {tuple(out.shape)} / non-finite scores for {len(prompts)}")
        return out

    def check_health(self) -> None:
        """Serve's health check: a replica that built its scorer is healthy."""


def _parameters(fn: Callable[..., object]) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def reward_app(cfg: RewardServerConfig):
    """The Serve application of ``cfg`` (bind it with :func:`deploy` or ``serve.run``)."""
    options: dict[str, Any] = {
        "name": cfg.deployment,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "resources": dict(cfg.resources)},
        "max_ongoing_requests": cfg.max_ongoing_requests,
    }
    if cfg.runtime_env:
        options["ray_actor_options"]["runtime_env"] = dict(cfg.runtime_env)
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        options["num_replicas"] = cfg.num_replicas
    # ray annotates serve.deployment as returning the decorator even when it is handed the class
    dep = serve.deployment(RewardReplica).options(**options)  # pyright: ignore[reportFunctionMemberAccess] - ray stub
    return dep.bind(cfg.model_dump())


def deploy(cfg: RewardServerConfig, *, blocking: bool = False):
    """Run ``cfg``'s application on the connected Ray cluster's Serve; its deployment handle."""
    return serve.run(reward_app(cfg), name=cfg.app_name, route_prefix=cfg.prefix, blocking=blocking)


def main(argv: list[str] | None = None) -> None:
    import argparse

    import yaml

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("config", help="YAML of RewardServerConfig")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    with open(args.config) as f:
        cfg = RewardServerConfig.model_validate(yaml.safe_load(f))
    from services.cluster.connect import ensure_ray

    ensure_ray()
    serve.start(http_options={"host": args.host, "port": args.port})
    print(json.dumps({"app": cfg.app_name, "url": f"http://{args.host}:{args.port}{cfg.prefix}"}), flush=True)
    deploy(cfg, blocking=True)


if __name__ == "__main__":
    main()
