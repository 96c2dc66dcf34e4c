"""The drain's parts without Ray: the board's bookkeeping (stale replicas drop out), the gate (admits and
counts before the drain, refuses with 503 + Retry-After once the board says so, lets the admitted finish),
and the signal latch (the first signal wakes the driver, a second cuts the drain)."""

import asyncio
import os
import signal
import time

import pytest
from fastapi import HTTPException

from services.serving import drain
from services.serving.drain import Board, DrainCut, DrainGate, StopLatch

pytestmark = pytest.mark.service


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(self.fn(*args))
        return fut


class _BoardHandle:
    """A :class:`Board` behind an awaitable ``.beat.remote``, as an actor handle's is."""

    def __init__(self, board: Board) -> None:
        self.beat = _Remote(board.beat)


def test_the_board_counts_live_replicas_and_forgets_silent_ones(monkeypatch):
    board = Board()
    assert board.beat("a", 2, False) is False  # no drain yet
    board.begin()
    assert board.beat("b", 0, False) is True
    assert board.state() == (2, 2)
    board.beat("a", 0, True), board.beat("b", 0, True)
    assert board.state() == (0, 0)
    board.beat("c", 3, True)
    monkeypatch.setattr(drain.time, "time", lambda real=time.time: real() + drain.STALE_S + 1)
    assert board.state() == (0, 0)  # every report is stale: the replicas are gone, nothing waits on them


def test_the_gate_admits_and_counts_then_refuses_once_the_board_says_drain(monkeypatch):
    monkeypatch.setattr(drain, "POLL_S", 0.01)
    board = Board()

    async def scenario():
        gate = DrainGate.__new__(DrainGate)
        gate.inflight, gate.draining, gate.retry_after_s, gate.id, gate._task = 0, False, 7, "r1", None
        gate.board = _BoardHandle(board)
        release = asyncio.Event()

        async def request():
            async with gate.admit():
                await release.wait()
                return "answered"

        admitted = asyncio.create_task(request())
        await asyncio.sleep(0.05)
        assert gate.inflight == 1 and board.reports["r1"].inflight == 1
        board.begin()
        await asyncio.sleep(0.05)
        assert gate.draining and board.state() == (1, 0)  # it knows, and one request is still in flight
        with pytest.raises(HTTPException) as refused:
            async with gate.admit():
                pass
        assert refused.value.status_code == 503 and refused.value.headers["Retry-After"] == "7"
        release.set()
        assert await admitted == "answered"
        await asyncio.sleep(0.05)
        assert board.state() == (0, 0)
        gate._task.cancel()

    asyncio.run(scenario())


def test_the_latch_wakes_on_the_first_signal_and_a_second_cuts():
    latch = StopLatch().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert latch.wait().name == "SIGTERM"
        with pytest.raises(DrainCut):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs in the main thread at the next bytecode
        latch.cut_on_second = False
        os.kill(os.getpid(), signal.SIGTERM)  # during serve.shutdown: recorded, nothing raised
        time.sleep(0.05)
    finally:
        latch.restore()
    assert signal.getsignal(signal.SIGTERM) is not latch._handle
