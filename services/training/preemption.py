"""Preemption as the controller sees it: SIGTERM / SIGINT become a request to stop, not a stack dump.

Kubernetes (and a spot instance's reclaim, and ``ray job stop``) send SIGTERM, then SIGKILL after a grace
period (``terminationGracePeriodSeconds``, 30 s by default; ``RAY_JOB_STOP_WAIT_TIME_S`` for a Ray job);
a terminal sends SIGINT. Ray's driver otherwise answers SIGTERM with ``sys.exit`` from ``ray.init``'s handler
(or the core worker's failure-signal handler, which prints the stack), so the run ends between two
checkpoints and a rerun redoes the steps since. :class:`StopSignals` takes both signals instead (installed
after the backend has connected, so after Ray's own handlers) and the controller
(``services.training.controller``) carries the request out at its next state boundary: the step in
flight finishes, a checkpoint of it is written, the run says where it stopped and that the same command
resumes, and ``normguard train`` exits 128 + the signal (143 for SIGTERM, 130 for SIGINT).

The wait is bounded: if the step in flight has not finished ``train.stop_wait_s`` after the signal (or a
second signal comes), the step is abandoned (:class:`StepAbandoned` is raised in the main thread, the way
Ctrl-C interrupts it) and the run ends at its newest checkpoint; nothing half-updated is saved. Python runs
a signal handler in the main thread only, so elsewhere (a Tune trial's thread) nothing is installed and
the host's own handling stays in force.
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
import time

from services.signals import SIGNALS, StopRequest, exit_code

__all__ = ["StepAbandoned", "StopRequest", "StopSignals", "exit_code"]

log = logging.getLogger(__name__)


class StepAbandoned(BaseException):  # noqa: N818 - raised like KeyboardInterrupt, so no `except Exception` retries it
    """The step in flight did not finish within ``train.stop_wait_s`` of a stop signal, or a second signal came."""

    def __init__(self, request: StopRequest, why: str) -> None:
        super().__init__(f"{request.name}: the step in flight was abandoned ({why})")
        self.request, self.why = request, why


class StopSignals:
    """SIGTERM / SIGINT handlers for one run. The first signal records a :class:`StopRequest` (read by the
    controller between states) and starts the ``wait_s`` clock; when it runs out, or at a second signal, the
    main thread gets :class:`StepAbandoned`. ``install`` / ``restore`` put the previous handlers back."""

    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s
        self.request: StopRequest | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None
        self._abandon_why: str | None = None
        self._saving = False  # a checkpoint is being written: the deadline does not cut it

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> StopSignals:
        """Take SIGTERM / SIGINT (again: a later ``ray.init`` puts Ray's SIGTERM handler back); the handlers
        found the first time are the ones :meth:`restore` puts back."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("stop signals: not the main thread, the host's handlers stay")
            return self
        for sig in SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()

    def saving(self, on: bool) -> None:
        """While the stop's own checkpoint is written the deadline does not interrupt it (a checkpoint cut in
        the middle would be one more to skip over); a second signal still abandons it."""
        self._saving = on

    def disarm(self) -> None:
        """The run reached its end: the deadline no longer interrupts (a request stays recorded, so a next run
        given the same handlers, e.g. ``train.compare_baseline``'s, stops before it starts)."""
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum: int, _frame) -> None:
        if self.request is None:
            self.request = StopRequest(signum, time.monotonic())
            log.warning(
                "%s received: stopping after the step in flight and writing its checkpoint; the step may take "
                "%.0f s more (train.stop_wait_s), a second signal abandons it",
                self.request.name,
                self.wait_s,
            )
            self._timer = threading.Timer(self.wait_s, self._deadline)
            self._timer.daemon = True
            self._timer.start()
            return
        # the deadline's own interrupt (interrupt_main delivers SIGINT to this handler), or a second signal
        self._raise(self._abandon_why or f"a second signal, {signal.Signals(signum).name}")

    def _deadline(self) -> None:
        """Timer thread: ``wait_s`` passed; interrupt the main thread (unless a checkpoint is being written)."""
        if self._saving:
            return
        self._abandon_why = f"not finished {self.wait_s:.0f} s after the signal (train.stop_wait_s)"
        _thread.interrupt_main(signal.SIGINT)

    def _raise(self, why: str) -> None:
        raise StepAbandoned(self.request, why)
