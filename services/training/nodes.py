"""Nodes of the Ray cluster a run lives on: which were lost during an attempt, and whether the nodes still
alive can hold the run again (the failure policy's view of a lost node, ``services.training.failure``).

A run is a fixed set of actors, each asking for CPUs, GPUs and the custom resources of
``resources.{learner,sampler,scorer}_resources`` (a node pool). After a node is lost, Ray restarts what
it can only where those resources are: a sampler or scorer actor stays pending, and a Ray Train worker
group cannot be placed, until a node that declares them joins (an autoscaler's or KubeRay's replacement).
:func:`wait_for_placement` waits for that, bounded, and stops the run with :class:`NodeLost` naming the
lost nodes and what found no node, instead of a run that waits for resources that will never come.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.checkpoints import CheckpointStore

if TYPE_CHECKING:
    from services.config import ExperimentConfig

__all__ = [
    "NodeInfo",
    "NodeLost",
    "NodeWatch",
    "alive_nodes",
    "lost_since",
    "run_demands",
    "unplaced",
    "wait_for_placement",
]

log = logging.getLogger(__name__)
POLL_S = 1.0


class NodeLost(RuntimeError):
    """A node of the run was lost and the run cannot go on: the nodes alive cannot hold it again (within
    ``train.node_wait_s``), or ``train.max_failures`` restarts are spent. The message names the lost nodes;
    a rerun with the same run name resumes from the newest intact checkpoint once the cluster can hold it."""


@dataclass(frozen=True)
class NodeInfo:
    """One Ray node: id, address, its raylet's port and total resources."""

    node_id: str
    address: str
    port: int
    resources: dict[str, float]

    def __str__(self) -> str:
        return f"{self.node_id} ({self.address})"

    def answers(self, timeout_s: float = 2.0) -> bool:
        """The node's raylet accepts a connection. Ray marks a node dead only after missed health checks
        (seconds to a minute), while Ray Train fails its worker group on the first unreachable worker:
        asked right after a loss, the cluster still lists a vanished node as alive."""
        try:
            with socket.create_connection((self.address, self.port), timeout=timeout_s):
                return True
        except OSError:
            return False


def alive_nodes(*, probe: bool = False) -> dict[str, NodeInfo]:
    """The connected cluster's alive nodes by id (none when Ray is not initialised: a local run); with
    ``probe`` only those whose raylet answers (where the driver's own raylet answers it at all)."""
    import ray

    if not ray.is_initialized():
        return {}
    nodes = (
        NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"), n.get("NodeManagerPort", 0), n.get("Resources", {}))
        for n in ray.nodes()
        if n.get("Alive")
    )
    alive = {n.node_id: n for n in nodes}
    own = alive.get(ray.get_runtime_context().get_node_id())
    if not probe or own is None or not own.answers():  # no raylet answers the driver here: Ray's view only
        return alive
    return {nid: n for nid, n in alive.items() if n is own or n.answers()}


def lost_since(before: dict[str, NodeInfo]) -> list[NodeInfo]:
    """The nodes of ``before`` that are not alive now (or do not answer)."""
    if not before:
        return []
    now = alive_nodes(probe=True)
    return [n for nid, n in before.items() if nid not in now]


class NodeWatch:
    """The nodes a run has lived on (alive when any of its attempts started) and which of them are lost.

    A lost node is reported once: the attempt that failed after it went is the node's (restarted by the
    failure policy); a later error, with no new node lost, is judged on its own."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled, self.known, self._reported = enabled, {}, set()

    def attempt_started(self) -> None:
        if self.enabled:
            self.known.update(alive_nodes())

    def newly_lost(self) -> list[NodeInfo]:
        lost = [n for n in lost_since(self.known) if n.node_id not in self._reported]
        self._reported.update(n.node_id for n in lost)
        return lost


def run_demands(cfg: ExperimentConfig) -> list[tuple[str, dict[str, float]]]:
    """``(role #i, resources)`` of every actor the run starts (``services.training.build``)."""
    res = cfg.resources

    def ask(cpus: float, gpus: float, custom: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in {"CPU": cpus, "GPU": gpus, **custom}.items() if v > 0}

    out = [
        (f"learner #{i}", ask(res.learner_cpus, res.learner_gpus, res.learner_resources))
        for i in range(res.num_learners)
    ]
    if res.placement != "hybrid":
        sampler = ask(res.sampler_cpus, res.sampler_gpus, res.sampler_resources)
        out += [(f"sampler #{i}", sampler) for i in range(cfg.rollout.num_samplers)]
    scorer = ask(res.scorer_cpus, res.scorer_gpus, res.scorer_resources)
    return out + [(f"scorer #{i}", scorer) for i in range(cfg.reward.num_actors)]


def unplaced(demands: list[tuple[str, dict[str, float]]], nodes: list[NodeInfo]) -> list[str]:
    """The actors that find no node, placing the largest first on the nodes' total resources (first fit)."""
    free = [dict(n.resources) for n in nodes]
    missing = []
    for role, ask in sorted(demands, key=lambda d: (-d[1].get("GPU", 0), -sum(d[1].values()))):
        node = next((f for f in free if all(f.get(k, 0.0) >= v - 1e-9 for k, v in ask.items())), None)
        if node is None:
            missing.append(f"{role} {ask}")
            continue
        for k, v in ask.items():
            node[k] -= v
    return missing


def wait_for_placement(cfg: ExperimentConfig, nodes: NodeWatch, *, timeout_s: float) -> None:
    """Wait (bounded) until the alive nodes can hold every actor of the run; else :class:`NodeLost`, naming
    the run's nodes that are gone."""
    demands, deadline, waited = run_demands(cfg), time.monotonic() + timeout_s, False
    while missing := unplaced(demands, list(alive_nodes(probe=True).values())):
        if time.monotonic() >= deadline:
            lost = ", ".join(map(str, lost_since(nodes.known))) or "none seen"
            raise NodeLost(
                f"lost node(s) {lost}; after {timeout_s:.0f} s (train.node_wait_s) the alive nodes still cannot "
                f"hold {', '.join(missing)}. Add a node with these resources and rerun: the run resumes from "
                f"{_latest(cfg.run_dir)}"
            )
        if not waited:
            log.warning("waiting up to %.0f s for a node that can hold %s", timeout_s, ", ".join(missing))
            waited = True
        time.sleep(POLL_S)


def _latest(run_dir: Path) -> str:
    latest = CheckpointStore(run_dir).latest()
    return f"checkpoint {latest.name}" if latest is not None else "the start (no checkpoint yet)"
