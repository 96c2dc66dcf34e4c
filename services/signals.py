"""The stop signals a service process takes (SIGTERM from Kubernetes, a spot reclaim or ``ray job stop``;
SIGINT from a terminal) and the exit code that reports them. Shared by ``normguard train``
(``services.training.preemption``) and ``normguard serve`` (``services.serving.drain``)."""

from __future__ import annotations

import signal
from dataclasses import dataclass

__all__ = ["SIGNALS", "StopRequest", "exit_code"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class StopRequest:
    """A signal asked the process to stop: which one, and when (``time.monotonic``)."""

    signum: int
    at: float

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def exit_code(request: StopRequest) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGTERM 143, SIGINT 130)."""
    return 128 + request.signum
