"""The HTTP side of a replica: the request schema, validation against the serve config (422 in
FastAPI's published shape, inputs never echoed), bearer-token auth and the body-size limit."""

from __future__ import annotations

import hmac
import time
from collections.abc import Awaitable, Callable

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from services.models.families import family
from services.serving.config import ServeConfig
from services.serving.generator import BASE_ID, GenerationItem, clip

__all__ = ["GenerateRequest", "bearer_token", "build_fastapi", "clip", "validate"]

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes any int64 >= 0


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str | list[str] = Field(description="one prompt or a list (one image each)")
    num_steps: int | None = Field(
        default=None, ge=1, le=10_000, description="sampler steps (default: the few-step default)"
    )
    guidance_scale: float | None = Field(default=None, ge=1.0, le=1e6, description="CFG scale, finite")
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX, description="noise seed (random when omitted)")
    size: int | None = Field(default=None, ge=8, le=4096, description="image side in pixels")
    checkpoint: str = Field(default=BASE_ID, description="checkpoint id from GET /v1/models")
    renormalize: bool = Field(default=False, description="rescale v to ||v_ref|| each step (inference baseline)")
    format: str = Field(default="json", pattern="^(json|png)$", description="'png' returns image/png for one image")


def _unprocessable(messages: list[str]) -> HTTPException:
    """A 422 whose body has FastAPI's published shape: ``{"detail": [{"loc", "msg", "type"}]}``."""
    return HTTPException(
        status_code=422, detail=[{"loc": ["body"], "msg": clip(m), "type": "value_error"} for m in messages]
    )


def validate(cfg: ServeConfig, req: GenerateRequest) -> GenerationItem:
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
    try:
        family(cfg.model.kind).check_prompts(prompts)  # digits: a prompt names a digit
    except ValueError as err:
        raise _unprocessable([clip(str(err))]) from None
    seed = req.seed if req.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
    return GenerationItem(
        prompts=tuple(prompts),
        num_steps=steps,
        guidance_scale=guidance,
        seed=seed,
        shift=cfg.shift,
        checkpoint=req.checkpoint,
        renormalize=req.renormalize,
        received=time.perf_counter(),
    )


def bearer_token(header: str) -> bytes:
    """The credentials of an ``Authorization: Bearer <token>`` header; the scheme is matched without
    regard to case (RFC 7235 section 2.1, RFC 6750 section 2.1), the token exactly (compared in
    constant time by the caller). Anything else gives ``b""``, which matches no token."""
    scheme, _, token = header.strip().partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


def build_fastapi(cfg: ServeConfig) -> FastAPI:
    api = FastAPI(
        title="NormGuard generation",
        version="0.1.0",
        description="Few-step generation with RL post-trained flow-matching generators.",
    )

    open_paths = {"/healthz"} | ({"/"} if cfg.public_page else set())
    expected = cfg.auth_token.encode() if cfg.auth_token else None

    @api.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path  # relative to the app's route prefix (Serve sets root_path)
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if expected is not None and path not in open_paths:
            if not hmac.compare_digest(bearer_token(request.headers.get("authorization", "")), expected):
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
            {"loc": list(e.get("loc", ())), "msg": clip(str(e.get("msg", ""))), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    return api
