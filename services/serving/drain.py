"""``normguard serve`` on SIGTERM / SIGINT: stop taking requests, finish the ones in flight (bounded), exit.

``serve.shutdown()`` alone kills Serve's HTTP proxies at once (``proxy_state.py``: ``shutdown`` kills the
proxy actor), so every request in flight is cut, and Ray's driver answers SIGTERM with a stack dump. Serve's
replicas drain themselves (``graceful_shutdown_timeout_s``) but the proxy in front of them does not wait for
them, and Serve's own proxy draining is driven by node draining only (it changes ``/-/healthz``). So the
drain is the service's own, in three parts:

* :class:`DrainBoard`, a named zero-CPU actor the ``normguard serve`` driver creates before the app: the
  drain flag and, per ingress replica, its last report (requests in flight, whether it knows of the drain).
* :class:`DrainGate`, in every ingress replica (``services.serving.app.Frontend``): counts the requests in
  flight and reports to the board every ``POLL_S``. Once the drain began, a new ``POST /v1/generate`` gets
  ``503`` with ``Retry-After`` and ``Connection: close`` and ``GET /healthz`` gets ``503`` (so a load
  balancer or a readiness probe stops sending); the requests already admitted run to their end. Without a
  board (``serve run`` / RayService: Serve's own lifecycle) the gate admits everything and reports nothing.
* :func:`drain`, in the driver: raises the flag and waits until every live ingress replica has reported,
  knowing of the drain, nothing in flight, or until ``serve.drain_timeout_s`` passed.

Kubernetes sends SIGKILL ``terminationGracePeriodSeconds`` (30 s by default) after SIGTERM, so the default
bound (20 s) leaves time for ``serve.shutdown`` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeAlias

import ray
from fastapi import HTTPException

from services.signals import SIGNALS, StopRequest

if TYPE_CHECKING:
    from ray.actor import ActorHandle

_Handler: TypeAlias = "Callable[[int, FrameType | None], Any] | int | None"  # what signal.signal returns

__all__ = ["Board", "DrainBoard", "DrainCut", "DrainGate", "DrainResult", "StopLatch", "board_name", "drain"]

log = logging.getLogger(__name__)
NAMESPACE = "normguard"
POLL_S = 0.2  # how often an ingress replica reports; the driver waits 2 polls before it trusts the reports
STALE_S = 5.0  # a replica silent this long is gone (killed, or its node lost): its report no longer counts


def board_name(app: str) -> str:
    return f"serve-drain:{app}"


@dataclass(frozen=True)
class Report:
    at: float  # the board's clock
    inflight: int
    knows: bool  # the replica had refused new requests when it counted


class Board:
    """The drain flag and the ingress replicas' reports (one clock: the board's); :data:`DrainBoard` is
    it as a Ray actor."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.reports: dict[str, Report] = {}

    def begin(self) -> None:
        self.since = self.since or time.time()

    def beat(self, replica: str, inflight: int, knows: bool) -> bool:
        self.reports[replica] = Report(time.time(), inflight, knows)
        return self.since is not None

    def state(self) -> tuple[int, int]:
        """(requests in flight, live replicas that do not yet know of the drain)."""
        live = [r for r in self.reports.values() if time.time() - r.at < STALE_S]
        return sum(r.inflight for r in live), sum(not r.knows for r in live)


# ray's overloads of remote() leave out the actor options (max_concurrency); the call is Ray's documented one
DrainBoard = ray.remote(num_cpus=0, max_concurrency=64)(Board)  # pyright: ignore[reportCallIssue] - ray stub


class DrainGate:
    """An ingress replica's side: admit or refuse, count, report. Inert without a board."""

    def __init__(self, app: str, retry_after_s: int) -> None:
        self.inflight, self.draining, self.retry_after_s = 0, False, retry_after_s
        self.id = uuid.uuid4().hex[:12]
        self._task: asyncio.Task | None = None
        try:
            self.board = ray.get_actor(board_name(app), namespace=NAMESPACE)
        except ValueError:  # no board: not started by `normguard serve`
            self.board = None

    def watch(self) -> None:
        """Start reporting (from the replica's event loop: the first request or health check)."""
        if self.board is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        board = self.board
        assert board is not None, "watch starts the reports only with a board"
        while True:
            with contextlib.suppress(Exception):  # a missed beat is the next one's to make
                knows = self.draining
                # ray types an actor method's .remote() on a get_actor handle as Never; it is an awaitable ObjectRef
                beat = board.beat.remote(self.id, self.inflight, knows)
                if await beat:  # pyright: ignore[reportGeneralTypeIssues] - ray stub
                    self.draining = True
            await asyncio.sleep(POLL_S)

    @contextlib.asynccontextmanager
    async def admit(self):
        self.watch()
        if self.draining:
            raise HTTPException(
                status_code=503,
                detail="this server is shutting down and takes no new requests; retry",
                headers={"Retry-After": str(self.retry_after_s), "Connection": "close"},
            )
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1


@dataclass(frozen=True)
class DrainResult:
    seconds: float
    cut: int  # requests still in flight when the bound ran out (0: drained)
    why: str = ""


class DrainCut(BaseException):  # noqa: N818 - raised like KeyboardInterrupt, out of any wait
    """A second signal during the drain: stop now."""


class StopLatch:
    """SIGTERM / SIGINT for the serving driver: the first records a :class:`StopRequest` and wakes
    :meth:`wait`; a second, while :attr:`cut_on_second` is set, raises :class:`DrainCut` in the main thread."""

    def __init__(self) -> None:
        self.request: StopRequest | None = None
        self.cut_on_second = True
        self._event = threading.Event()
        self._previous: dict[int, _Handler] = {}

    def install(self) -> StopLatch:
        for sig in SIGNALS:
            self._previous.setdefault(sig, signal.signal(sig, self._handle))
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def wait(self) -> StopRequest:
        while not self._event.wait(0.5):  # a short wait keeps the main thread responsive to signals
            pass
        assert self.request is not None, "_handle sets the request before the event"
        return self.request

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.request is None:
            self.request = StopRequest(signum, time.monotonic())
            self._event.set()
        elif self.cut_on_second:
            raise DrainCut(signal.Signals(signum).name)


def drain(board: ActorHandle, timeout_s: float) -> DrainResult:
    """Raise the drain flag of ``board`` (a :data:`DrainBoard` handle) and wait, at most ``timeout_s``, until
    the app's ingress replicas are idle."""
    t0 = time.monotonic()
    ray.get(board.begin.remote(), timeout=10)
    time.sleep(min(2 * POLL_S, timeout_s))  # every replica has beaten once since the flag went up
    while True:
        inflight, unaware = ray.get(board.state.remote(), timeout=10)
        elapsed = time.monotonic() - t0
        if inflight == 0 and unaware == 0:
            return DrainResult(elapsed, 0)
        if elapsed >= timeout_s:
            return DrainResult(elapsed, inflight, f"{inflight} still in flight after {timeout_s:.0f} s")
        time.sleep(POLL_S)
