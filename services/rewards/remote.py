"""A scorer that scores on a reward server (``services.rewards.server``): by Serve handle or over HTTP.

Built in the scorer actor in place of the scorer itself when a ``reward.scorers`` entry has ``server:``
(``services.config.RewardServerRef``); to the scorer worker it is one more scorer of the protocol, so
``reward.retries`` and the required / optional scorers decide what a failure costs, as for a local one.

Two kinds of failure are told apart:

* **no replica answers** (a refused or dropped connection, 502 / 503 / 504, a replica that died during
  the call): the server is restarting or rescheduling, so the same request is sent again after a
  backoff, up to ``connect_retries`` times, each wait logged. With two replicas a killed one costs a
  retry on the live one; with one the step waits, bounded, and says so.
* **an answer that is wrong** (not JSON, wrong count, non-finite, longer than ``max_reply_bytes``, later
  than ``timeout_s``, a 4xx such as a refused token, a scorer error on the server): a
  :class:`RewardServerError` naming the scorer and the server, at once, for ``reward.retries``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from services.rewards.base import validate_images
from services.rewards.wire import WireError, parse_scores, request_body, to_uint8

if TYPE_CHECKING:
    import httpx

__all__ = ["RemoteScorer", "RewardServerError"]

log = logging.getLogger(__name__)
_UNAVAILABLE = (502, 503, 504)


class RewardServerError(RuntimeError):
    """A reward server's answer that no resend of the same request mends (its message names the scorer)."""


class _Unavailable(Exception):
    """No replica answered this try (resent after a backoff)."""


class RemoteScorer:
    """``score(images, prompts)`` on a reward server; the options are ``RewardServerRef``'s fields."""

    def __init__(
        self,
        path: str | None = None,
        device: str | torch.device = "cpu",
        *,
        scorer: str,
        url: str | None = None,
        app: str | None = None,
        deployment: str = "RewardScorer",
        api_key_env: str | None = "NORMGUARD_REWARD_KEY",
        timeout_s: float = 60.0,
        connect_retries: int = 3,
        backoff_s: float = 0.5,
        max_reply_bytes: int = 1 << 20,
        images_per_request: int = 32,
        concurrency: int = 4,
        groupwise: bool = False,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if (url is None) == (app is None):
            raise ValueError(f"{scorer}: give exactly one of url (over HTTP) or app (a Serve handle)")
        self.name, self.groupwise = scorer, groupwise
        self.url, self.app, self.deployment = url, app, deployment
        self.timeout_s, self.connect_retries, self.backoff_s = timeout_s, connect_retries, backoff_s
        self.max_reply_bytes, self.images_per_request = max_reply_bytes, images_per_request
        self.where = url or f"Serve app {app!r} / {deployment}"
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"reward-{scorer}")
        self._handle = None
        self.client: httpx.Client | None = None
        if url is not None:
            import httpx

            key = os.environ.get(api_key_env) if api_key_env else None
            if api_key_env and not key:
                log.warning("%s: $%s is not set: requests to %s go without a bearer token", scorer, api_key_env, url)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
            self.client = httpx.Client(
                base_url=url.rstrip("/"), timeout=timeout_s, headers=headers, limits=limits, transport=transport
            )

    # ---- the protocol ----------------------------------------------------------------------
    def score(
        self,
        images: Tensor,
        prompts: Sequence[str],
        group_ids: Tensor | None = None,
        metadata: Sequence[dict | None] | None = None,
    ) -> Tensor:
        """``(B,)`` scores; the batch goes as ``images_per_request``-image requests, ``concurrency`` at a
        time (a group-wise scorer's batch as one request: a group is never split)."""
        validate_images(images, prompts, scorer=self.name)
        u8, n = to_uint8(images), len(prompts)
        step = n if self.groupwise else self.images_per_request
        parts = [(a, min(a + step, n)) for a in range(0, n, step)]
        send = self._send_http if self.client is not None else self._send_handle

        def one(bounds: tuple[int, int]) -> list[float]:
            a, b = bounds
            groups = group_ids[a:b] if group_ids is not None else None
            meta = list(metadata[a:b]) if metadata is not None else None
            return self._with_backoff(lambda: send(u8[a:b], list(prompts[a:b]), groups, meta))

        out = [s for chunk in self._pool.map(one, parts) for s in chunk]
        return torch.tensor(out, dtype=torch.float32)

    # ---- bounded waiting for a live replica ------------------------------------------------------
    def _with_backoff(self, attempt: Callable[[], list[float]]) -> list[float]:
        for i in range(self.connect_retries + 1):
            try:
                return attempt()
            except _Unavailable as err:
                if i == self.connect_retries:
                    raise RewardServerError(
                        f"{self.name}: no replica of {self.where} answered in {i + 1} tries: {err}"
                    ) from err
                wait = self.backoff_s * 2**i
                log.warning(
                    "%s: no replica of %s answered (%s); waiting %.1f s for one (try %d/%d)",
                    self.name,
                    self.where,
                    err,
                    wait,
                    i + 1,
                    self.connect_retries,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")

    # ---- over HTTP -------------------------------------------------------------------------------
    def _send_http(
        self, u8: Tensor, prompts: list[str], groups: Tensor | None, meta: Sequence[dict | None] | None
    ) -> list[float]:
        import httpx

        assert self.client is not None, "score sends over HTTP only with a client (url given)"

        body = json.dumps(request_body(u8, prompts, group_ids=groups, metadata=meta)).encode()
        headers = {"Content-Type": "application/json"}
        try:
            with self.client.stream("POST", "/score", content=body, headers=headers) as resp:
                if resp.status_code in _UNAVAILABLE:
                    raise _Unavailable(f"HTTP {resp.status_code}")
                raw = self._read_capped(resp)
        except httpx.TimeoutException as err:
            raise RewardServerError(
                f"{self.name}: {self.url} did not answer within {self.timeout_s:g} s ({type(err).__name__})"
            ) from err
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as err:
            raise _Unavailable(f"{type(err).__name__}: {err}") from err
        if resp.status_code != 200:
            raise RewardServerError(
                f"{self.name}: {self.url} answered HTTP {resp.status_code}: {raw[:300].decode(errors='replace')}"
            )
        try:
            return parse_scores(json.loads(raw), len(prompts))
        except (ValueError, WireError) as err:  # json's errors are ValueErrors
            raise RewardServerError(f"{self.name}: malformed reply from {self.url}: {err}") from err

    def _read_capped(self, resp: httpx.Response) -> bytes:
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_reply_bytes:
            raise RewardServerError(
                f"{self.name}: {self.url} sent a {declared}-byte reply, over max_reply_bytes={self.max_reply_bytes}"
            )
        buf = bytearray()
        for chunk in resp.iter_bytes():
            buf += chunk
            if len(buf) > self.max_reply_bytes:
                raise RewardServerError(
                    f"{self.name}: {self.url}'s reply passed max_reply_bytes={self.max_reply_bytes}; refused"
                )
        return bytes(buf)

    # ---- by Serve handle -------------------------------------------------------------------------
    def _send_handle(
        self, u8: Tensor, prompts: list[str], groups: Tensor | None, meta: Sequence[dict | None] | None
    ) -> list[float]:
        from ray.exceptions import RayActorError

        handle = self._serve_handle()
        payload: dict[str, Any] = {"images": u8, "prompts": prompts, "group_ids": groups, "metadata": meta}
        response = handle.score.remote(payload)
        try:
            reply = response.result(timeout_s=self.timeout_s)
        except TimeoutError as err:
            response.cancel()
            raise RewardServerError(f"{self.name}: {self.where} did not answer within {self.timeout_s:g} s") from err
        except RayActorError as err:  # the replica died in the call: Serve routes the resend to a live one
            raise _Unavailable(f"the replica died ({type(err).__name__})") from err
        except Exception as err:  # noqa: BLE001 - the server's own error (its scorer raised), named
            if type(err).__name__ in ("DeploymentUnavailableError", "BackPressureError"):
                raise _Unavailable(type(err).__name__) from err
            raise RewardServerError(f"{self.name}: {self.where} failed: {type(err).__name__}: {err}") from err
        try:
            return parse_scores({"scores": [float(s) for s in reply["scores"]]}, len(prompts))
        except (KeyError, TypeError, ValueError, WireError) as err:
            raise RewardServerError(f"{self.name}: malformed reply from {self.where}: {err}") from err

    def _serve_handle(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self.deployment, app_name=self.app)
        return self._handle

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self.client is not None:
            self.client.close()
