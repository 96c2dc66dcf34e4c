"""Serving config: which model, which checkpoints, request bounds, batching, auth."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from services.config import ModelConfig

__all__ = ["ServeConfig", "load_serve_config"]


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelConfig = ModelConfig()
    checkpoints: dict[str, str] = Field(
        default_factory=dict, description="checkpoint id -> learner checkpoint dir (checkpoints/step_N) or run dir"
    )
    default_steps: int = Field(default=4, ge=1, le=200, description="few-step default")
    max_steps: int = Field(default=50, ge=1, le=500)
    max_images: int = Field(default=16, ge=1, description="images per request")
    allowed_sizes: tuple[int, ...] | None = Field(
        default=None, description="image sides accepted (default: the model's)"
    )
    default_guidance: float = Field(default=1.0, ge=1.0)
    max_guidance: float = Field(default=15.0, ge=1.0)
    shift: float | None = Field(
        default=None,
        gt=0,
        description="static shift of the sampling grid; None: the model family's (its scheduler config)",
    )
    max_batch_size: int = Field(default=16, ge=1, description="requests merged into one sampler batch")
    batch_wait_timeout_s: float = Field(
        default=0.0,
        ge=0,
        description="how long a batch waits to fill after its first request. Requests queue while a batch "
        "computes, so under load batches fill anyway; a wait only delays requests at low load",
    )
    num_replicas: int = Field(default=1, ge=1, description="model replicas")
    failover: bool = Field(
        default=True,
        description="a gateway deployment (the HTTP ingress, no model) in front of the model replicas, which "
        "retries a request whose replica died on a live one, or answers 503 + Retry-After when none is left; "
        "false: one deployment that is ingress and model in one (one hop less; a lost replica's requests get 500)",
    )
    replica_loss_retries: int = Field(
        default=1,
        ge=0,
        le=3,
        description="with failover and num_replicas >= 2: resends of a request whose replica died",
    )
    # alike in shape to the batching fields above (``duplicates`` pairs them): other fields, not shared logic
    retry_after_s: int = Field(default=15, ge=1, description="Retry-After of a 503 (about a replica's restart time)")
    drain_timeout_s: float = Field(
        default=20.0,
        ge=0,
        description="normguard serve on SIGTERM / SIGINT: the longest wait for the requests in flight "
        "(under Kubernetes' 30 s terminationGracePeriodSeconds, with time left to shut down)",
    )
    request_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="with failover: the gateway's bound on one model call; past it the client gets 504",
    )
    gateway_replicas: int = Field(default=1, ge=1, description="with failover: gateway replicas")
    gateway_cpus: float = Field(
        default=0.0, ge=0, description="with failover: CPUs of a gateway replica (it holds no model)"
    )
    replica_cpus: float = Field(default=1.0, ge=0)
    replica_gpus: float = Field(default=0.0, ge=0)
    auth_token: str | None = Field(
        default=None, description="require 'Authorization: Bearer <token>' on every route but /healthz when set"
    )
    public_page: bool = Field(
        default=False,
        description="with auth_token: serve the web page at / without a token (it asks for one for the API)",
    )
    max_body_bytes: int = Field(default=65_536, ge=1024, description="request bodies above this get 413")
    max_prompt_chars: int = Field(default=1000, ge=1, description="characters per prompt")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.allowed_sizes or (self.model.resolution,)


def load_serve_config(path: str | Path | None = None, **overrides: Any) -> ServeConfig:
    """The YAML at ``path`` plus ``overrides``; ``NORMGUARD_SERVE_TOKEN`` (e.g. from a Kubernetes
    Secret in the pod's environment) sets ``auth_token`` when neither gives one, so the token need
    not be written into a config file."""
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data.update(overrides)
    if not data.get("auth_token") and os.environ.get("NORMGUARD_SERVE_TOKEN"):
        data["auth_token"] = os.environ["NORMGUARD_SERVE_TOKEN"]
    return ServeConfig.model_validate(data)
