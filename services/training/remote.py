"""Remote-call policy shared by the coordinator: timeouts, retries with backoff, counting.

The same coordinator runs on Ray actors, or on plain objects in one process (the benchmark's
baseline and fast tests, P12): each pool of ``services.training.workers`` makes its members' calls
(:func:`call_actor` for actors), and :func:`call_with_retries` wraps any of them. Every remote wait is bounded by a timeout in seconds. Errors are classified by type:
Ray re-raises an actor's exception as a subclass of its class, so ``isinstance`` sees a
``StaleSamplerError`` raised inside a sampler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CallStats",
    "LearnerLost",
    "Unrecoverable",
    "actor_gone",
    "call",
    "call_actor",
    "call_with_retries",
    "is_actor",
    "until_answered",
]

log = logging.getLogger(__name__)


class Unrecoverable(Exception):
    """An error no retry of the same call can mend (the learner group failed or was lost; with
    ``placement: hybrid`` the samplers are that group): :func:`call_with_retries` raises it at once,
    for the run's failure policy to decide."""


class LearnerLost(Unrecoverable, RuntimeError):
    """The Ray Train worker group died (a worker process lost: preempted, OOM-killed, node gone).

    Distinct from an exception inside the learner's code (reported by the rank, ``LearnerFailed``), which
    would fail again on a retry: a lost worker is recovered by ``run_training`` restarting the learner
    group from the newest intact checkpoint (``train.max_failures``). Also raised when an object a learner
    worker put (the policy weights rank 0 ships to the samplers) died with its owner: only a learner
    worker owns objects the driver reads, so its process or node is gone."""


@dataclass
class CallStats:
    """Counters of remote-call faults (logged per step as ``faults/*``, totals as ``faults_total/*``, P14).

    Attributes:
        retries: calls redone after an error or timeout.
        failures: calls given up after every retry (the step then fails).
        restarts: errors that found the actor dead or restarting (Ray restarts it).
        learner_restarts: learner groups restarted from a checkpoint after a lost worker.
    """

    retries: int = 0
    failures: int = 0
    restarts: int = 0
    learner_restarts: int = 0
    by_name: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, retries: int = 0, failures: int = 0, restarts: int = 0, name: str | None = None) -> None:
        """Count faults (the pipelined loop's producer thread counts beside the main thread)."""
        with self._lock:
            self.retries += retries
            self.failures += failures
            self.restarts += restarts
            if name is not None:
                self.by_name[name] = self.by_name.get(name, 0) + failures


def actor_gone(err: BaseException) -> bool:
    """The error says the actor died or is restarting (``RayActorError`` and its subclasses
    ``ActorDiedError`` / ``ActorUnavailableError``)."""
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # no Ray: plain objects do not die
        return False
    return isinstance(err, RayActorError)


def is_actor(obj: Any) -> bool:
    """True for a Ray actor handle."""
    try:
        from ray.actor import ActorHandle
    except ImportError:
        return False
    return isinstance(obj, ActorHandle)


def call(obj: Any, method: str, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
    """``obj.method(*args)`` locally, or ``ray.get(actor.method.remote(*args), timeout)``: for scripts and
    tests that hold either (e.g. ``benchmarks/gpu_check.py``'s probes). A run's own calls go through the
    pool its members sit in (``services.training.workers``), which knows which they are."""
    if not is_actor(obj):
        return getattr(obj, method)(*args, **kwargs)
    return call_actor(obj, method, *args, timeout_s=timeout_s, **kwargs)


def call_actor(actor: Any, method: str, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
    """``ray.get(actor.method.remote(*args), timeout)``; a lost object owned by a learner worker is
    :class:`LearnerLost`."""
    import ray
    from ray.exceptions import OwnerDiedError

    try:
        return ray.get(getattr(actor, method).remote(*args, **kwargs), timeout=timeout_s)
    except OwnerDiedError as err:  # e.g. set_weights of weights whose owner, learner rank 0, died
        raise LearnerLost(f"{method}: an object owned by a learner worker was lost with it: {err}") from err


def call_with_retries(
    obj: Any,
    method: str,
    *args: Any,
    timeout_s: float,
    retries: int,
    stats: CallStats,
    name: str,
    on_actor_restart: Callable[[], None] | None = None,
    backoff_s: float = 0.5,
    caller: Callable[..., Any] = call,
    **kwargs: Any,
) -> Any:
    """Call with a timeout; retry with exponential backoff; raise after ``retries`` retries.

    A dead / restarting actor (``RayActorError``) or a stale one (``StaleSamplerError``) runs
    ``on_actor_restart`` (e.g. to push the current weights) before the retry, and the same
    request is redone, so no sample is lost or counted twice. ``caller`` makes each try (a pool's ``call``).
    """
    from services.types import StaleSamplerError  # a message type, not the actor module

    for attempt in range(retries + 1):
        try:
            return caller(obj, method, *args, timeout_s=timeout_s, **kwargs)
        except Unrecoverable:
            stats.add(failures=1, name=name)
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised when out of retries
            kind = type(err).__name__
            stale = isinstance(err, StaleSamplerError)
            gone = actor_gone(err)
            if attempt == retries:
                stats.add(failures=1, name=name)
                raise RuntimeError(f"{name}.{method} failed after {attempt + 1} tries: {kind}: {err}") from err
            stats.add(retries=1)
            log.warning(
                "%s.%s failed (%s); retry %d/%d%s",
                name,
                method,
                kind,
                attempt + 1,
                retries,
                " after re-syncing weights" if (stale or gone) else "",
                exc_info=False,
            )
            time.sleep(backoff_s * 2**attempt)
            stats.add(restarts=int(gone))
            if (stale or gone) and on_actor_restart is not None:
                until_answered(on_actor_restart, timeout_s)
    raise AssertionError("unreachable")


def until_answered(hook: Callable[[], None], timeout_s: float) -> None:
    """Run a recovery hook, retrying it (bounded by ``timeout_s``) while a restarting actor does not yet
    accept calls."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            hook()
            return
        except Unrecoverable:
            raise
        except Exception:  # noqa: BLE001 - the actor may still be restarting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
