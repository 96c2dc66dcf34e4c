"""The worker group of a run: the sampler pool, the scorer pool and the learner, injected by the
composition root (``services.training.backends``) so nothing downstream asks where it runs.

The shape of Ray Train v2's ``worker_group_cls`` injection (``python/ray/train/v2/_internal/execution/
controller/controller.py``): the controller and the coordinator are written against one interface, and
the backend decides what stands behind it. A pool is how one role's members are called:

* :class:`LocalPool`: plain objects in this process (``local=True``, and the hybrid placement's one
  ``ColocatedRollouts``, whose calls run on the learner group); a submitted call is made at once, with the
  retry policy, so a sampler's weights cannot change between the request and its samples, and work
  "made ahead" is made now (:class:`InlineExecutor`).
* :class:`ActorPool`: Ray actor handles; a submitted call is an ``ObjectRef`` waited for with a timeout,
  weights are put in the object store once for every sampler, work made ahead runs on a background thread.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from services.training.protocols import Learner
from services.training.remote import call_actor

__all__ = ["ActorPool", "InlineExecutor", "LocalPool", "Pool", "WorkerGroup"]


class Pool(Protocol):
    """The members of one role (samplers or scorers) and how they are called."""

    members: list

    def call(self, member: Any, method: str, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
        """``member.method(*args, **kwargs)``, waited for up to ``timeout_s``."""

    def submit(self, member: Any, method: str, *args: Any, now: Callable[[], Any]) -> Any:
        """Start ``member.method(*args)``; a handle for :meth:`result`. ``now`` makes the call at once with
        the caller's retry policy (what a pool that cannot submit does instead)."""

    def result(self, handle: Any, *, timeout_s: float) -> Any:
        """What a submitted call returned (it raises what the call raised)."""

    def put(self, obj: Any) -> Any:
        """``obj`` as every member can fetch it (one shared copy)."""

    def ahead(self) -> Executor:
        """Where work made ahead of the caller (the next step's experience) runs."""

    def kill(self) -> None:
        """Release the members now."""


class InlineExecutor(Executor):
    """Runs a submitted function at once, in the caller's thread (an error is raised there, not stored)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        done: Future = Future()
        done.set_result(fn(*args, **kwargs))
        return done


@dataclass
class _Made:
    value: Any


class LocalPool:
    """Plain objects in this process."""

    def __init__(self, members: list) -> None:
        self.members = list(members)

    def call(self, member: Any, method: str, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
        return getattr(member, method)(*args, **kwargs)

    def submit(self, member: Any, method: str, *args: Any, now: Callable[[], Any]) -> _Made:
        return _Made(now())

    def result(self, handle: _Made, *, timeout_s: float) -> Any:
        return handle.value

    def put(self, obj: Any) -> Any:
        return obj

    def ahead(self) -> Executor:
        return InlineExecutor()

    def kill(self) -> None:
        """Plain objects are released with their last reference."""


class ActorPool:
    """Ray actor handles."""

    def __init__(self, members: list) -> None:
        self.members = list(members)

    def call(self, member: Any, method: str, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
        return call_actor(member, method, *args, timeout_s=timeout_s, **kwargs)

    def submit(self, member: Any, method: str, *args: Any, now: Callable[[], Any]) -> Any:
        return getattr(member, method).remote(*args)

    def result(self, handle: Any, *, timeout_s: float) -> Any:
        import ray

        return ray.get(handle, timeout=timeout_s)

    def put(self, obj: Any) -> Any:
        import ray

        return obj if isinstance(obj, ray.ObjectRef) else ray.put(obj)

    def ahead(self) -> Executor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="experience")

    def kill(self) -> None:
        """Killed now, not whenever the garbage collector gets to their handles: a driver that runs
        several trainings, a sweep or a rollback, needs their CPUs / GPUs back at once."""
        if self.members:
            import ray

            for a in self.members:
                ray.kill(a)


@dataclass
class WorkerGroup:
    """What one build started: the sampler and scorer pools and the learner."""

    samplers: Pool
    scorers: Pool
    learner: Learner

    @classmethod
    def of_actors(cls, samplers: list, scorers: list, learner: Learner) -> WorkerGroup:
        """Sampler and scorer actors (e.g. ``benchmarks/bench_scaling.py``'s simulated ones)."""
        return cls(ActorPool(samplers), ActorPool(scorers), learner)

    def shutdown(self) -> None:
        """Release everything: the learner's workers, then the sampler and scorer actors."""
        self.learner.stop()
        self.samplers.kill()
        self.scorers.kill()
