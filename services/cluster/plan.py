"""What a run asks of a Ray cluster, and whether a cluster can hold it (``normguard plan``).

A training run is a fixed set of Ray actors (``services.training.run.build_coordinator``):

* ``learner``: ``resources.num_learners`` Ray Train workers, each ``learner_cpus`` / ``learner_gpus``;
* ``sampler``: ``rollout.num_samplers`` actors, each ``sampler_cpus`` / ``sampler_gpus``; none with
  ``resources.placement: hybrid``, where each learner worker samples on its own device with the weights
  it holds (the sampler row is printed with count 0 and the learners' memory has the rollout's phases);
* ``scorer``: ``reward.num_actors`` actors, each ``scorer_cpus`` / ``scorer_gpus``, each holding every
  training and evaluation scorer;
* the driver (the coordinator, on the head or the job's submitter) and the learners' queues, which
  reserve nothing.

A cluster is a list of nodes (CPUs, GPUs, memory) read from the connected Ray cluster, from a KubeRay
manifest (head plus each worker group at ``maxReplicas``, resources from ``rayStartParams`` or the
container's limits, as KubeRay's ``pod.go`` derives them) or from a small YAML description. The check
places every actor the way Ray's scheduler must: an actor lives on one node, a fractional GPU on one
physical GPU, whole GPUs on one node. It fails with the actors that found no node, instead of a run
that waits for resources that will never come (Ray only logs "resources cannot be satisfied").

Memory is each actor's peak, term by term (``services.cluster.memory``): the weights (from the files a
diffusers pipeline loads when the model path is a local directory, from the published parameter counts
otherwise), the learners' float32 trainables, gradients, Adam moments and lagged copies, and the
activations and transients measured on the meta device at the configured micro-batches, resolution and
text length (``services.cluster.activations``). Where a node declares ``gpu_memory_gb``, an actor whose
peak exceeds its share of a card fails the plan with the term that does not fit and the knob to turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from services.cluster.memory import Term, model_terms, peak_gb, pipeline_bytes
from services.config.families import spec

if TYPE_CHECKING:
    from services.config import ExperimentConfig, ScorerSpec

__all__ = [
    "ActorDemand",
    "ClusterTooSmall",
    "Node",
    "Plan",
    "check_plan",
    "format_plan",
    "nodes_from_file",
    "nodes_from_manifest",
    "nodes_from_ray",
    "plan_run",
    "run_demand",
    "serve_demand",
]

_SCORER_B = {"pickscore": 0.99, "hpsv2": 0.99, "clip_group_rank": 0.43, "realism_detector": 0.1, "http_judge": 0.0}


class ClusterTooSmall(RuntimeError):
    """The cluster cannot hold the run's actors; the message names what is missing."""


@dataclass(frozen=True)
class ActorDemand:
    """``count`` identical actors of one role."""

    role: str
    count: int
    cpus: float
    gpus: float
    memory_gb: float  # the peak per actor, decimal GB (memory.peak_gb of terms when there are terms)
    holds: str = ""  # what the memory is, in words
    terms: tuple[Term, ...] = ()  # the breakdown (services.cluster.memory)


@dataclass
class Node:
    """One Ray node (or ``count`` identical ones) as the scheduler sees it."""

    name: str
    cpus: float
    gpus: int = 0
    memory_gb: float | None = None
    gpu_memory_gb: float | None = None
    count: int = 1


@dataclass
class Plan:
    actors: list[ActorDemand]
    nodes: list[Node]
    placed: dict[str, list[str]] = field(default_factory=dict)  # node name -> actor roles placed there
    unplaced: list[str] = field(default_factory=list)  # "role #i (2 CPU, 1 GPU)" that found no node
    warnings: list[str] = field(default_factory=list)
    memory: list[str] = field(default_factory=list)  # actors whose peak does not fit their GPU, and why

    @property
    def ok(self) -> bool:
        return not self.unplaced and not self.memory

    def totals(self) -> tuple[float, float]:
        return (
            sum(a.cpus * a.count for a in self.actors),
            sum(a.gpus * a.count for a in self.actors),
        )


# ---- demand ---------------------------------------------------------------------------------
def _local_bytes(path: Path) -> float | None:
    comps = pipeline_bytes(path)
    if comps is not None:
        return sum(comps.values())
    files = [f for f in path.rglob("*") if f.suffix in (".safetensors", ".bin", ".pt", ".pth") and f.is_file()]
    return float(sum(f.stat().st_size for f in files)) if files else None


def _scorer_gb(spec: ScorerSpec) -> float:
    if spec.name.startswith("digits_"):
        return 0.01
    if spec.path and Path(spec.path).exists():
        size = _local_bytes(Path(spec.path)) if Path(spec.path).is_dir() else Path(spec.path).stat().st_size
        if size:
            return size / 1e9
    if spec.name == "vlm_judge":
        m = re.search(r"(\d+(?:\.\d+)?)B", spec.path or "")
        return (float(m.group(1)) if m else 8.3) * 2  # bf16
    return _SCORER_B.get(spec.name, 1.0) * 2


def run_demand(cfg: ExperimentConfig) -> list[ActorDemand]:
    """The actors of one training run (``services.training.run.build_coordinator``) with their resources."""
    res = cfg.resources
    if spec(cfg.model.kind).embedded:  # the embedded tasks' generators: a few MB
        learner_terms = sampler_terms = [Term(f"{cfg.model.kind} generator", 0.01)]
    else:
        learner_terms, sampler_terms = model_terms(cfg)
    learner_holds = "pipeline, trainables' optimiser state, activations"
    scorers = [*cfg.reward.scorers, *cfg.reward.eval_scorers]
    scorer_gb = sum(_scorer_gb(s) for s in scorers)
    if res.placement == "hybrid":  # the learners sample with the weights they hold
        learner_holds += "; samples its rollout share (hybrid)"
        sampler = ActorDemand("sampler", 0, 0.0, 0.0, 0.0, "none: the learners sample (placement hybrid)")
    else:
        sampler = ActorDemand("sampler", cfg.rollout.num_samplers, res.sampler_cpus, res.sampler_gpus,
                              peak_gb(sampler_terms), "pipeline (inference), rollout", tuple(sampler_terms))  # fmt: skip
    learner = ActorDemand("learner", res.num_learners, res.learner_cpus, res.learner_gpus, peak_gb(learner_terms),
                          learner_holds, tuple(learner_terms))  # fmt: skip
    names = ", ".join(s.name for s in scorers)
    scorer = ActorDemand("scorer", cfg.reward.num_actors, res.scorer_cpus, res.scorer_gpus, scorer_gb, names)
    return [learner, sampler, scorer]


def serve_demand(serve_config_v2: dict) -> list[ActorDemand]:
    """Ray Serve's replicas at their maximum (autoscaling ``max_replicas``) from a RayService's config."""
    out = []
    for app in serve_config_v2.get("applications", []):
        for dep in app.get("deployments", []):
            auto = dep.get("autoscaling_config") or {}
            n = int(auto.get("max_replicas", dep.get("num_replicas", 1)))
            opts = dep.get("ray_actor_options") or {}
            out.append(
                ActorDemand(
                    f"serve:{dep['name']}", n, float(opts.get("num_cpus", 1)), float(opts.get("num_gpus", 0)), 0.0
                )
            )
    return out


# ---- capacity -------------------------------------------------------------------------------
_MEM = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def _quantity(q: Any) -> float:
    """A Kubernetes quantity (``"8"``, ``"500m"``, ``64Gi``) as a float (bytes for memory)."""
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    for suffix, mult in _MEM.items():
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * mult
    return float(s)


def _group_node(name: str, group: dict) -> Node:
    """A node of a KubeRay group: rayStartParams override the container's limits (as KubeRay does)."""
    container = group["template"]["spec"]["containers"][0]
    res = container.get("resources", {})
    lim = {**res.get("requests", {}), **res.get("limits", {})}
    params = group.get("rayStartParams") or {}
    cpus = float(params["num-cpus"]) if "num-cpus" in params else _quantity(lim.get("cpu", 0))
    gpus = int(params["num-gpus"]) if "num-gpus" in params else int(_quantity(lim.get("nvidia.com/gpu", 0)))
    mem = _quantity(lim["memory"]) / 2**30 if "memory" in lim else None
    return Node(name, cpus, gpus, mem)


def nodes_from_manifest(doc: dict) -> list[Node]:
    """The nodes a RayJob / RayService / RayCluster can have at most (worker groups at ``maxReplicas``)."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    nodes = [_group_node("head", cluster["headGroupSpec"])]
    for g in cluster.get("workerGroupSpecs", []):
        n = int(
            g.get("maxReplicas", g.get("replicas", 1))
            if cluster.get("enableInTreeAutoscaling")
            else g.get("replicas", 1)
        )
        nodes.append(replace(_group_node(g["groupName"], g), count=n * int(g.get("numOfHosts", 1))))
    return [n for n in nodes if n.count > 0]


def nodes_from_file(path: str | Path) -> list[Node]:
    """``nodes: [{name, cpus, gpus, memory_gb, gpu_memory_gb, count}]`` from a YAML file."""
    data = yaml.safe_load(Path(path).read_text())
    return [Node(**n) for n in data["nodes"]]


def nodes_from_ray() -> list[Node]:
    """The connected Ray cluster's alive nodes (their total resources, not what is free now)."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        r = n.get("Resources", {})
        out.append(
            Node(
                n.get("NodeManagerAddress", "node"), r.get("CPU", 0.0), int(r.get("GPU", 0)), r.get("memory", 0) / 2**30
            )
        )
    return out


# ---- placement ------------------------------------------------------------------------------
def plan_run(actors: list[ActorDemand], nodes: list[Node]) -> Plan:
    """Place every actor on a node (largest GPU demand first, then CPU); record what found none."""
    free = []
    for node in nodes:
        for i in range(node.count):
            name = node.name if node.count == 1 else f"{node.name}-{i}"
            free.append(
                {"name": name, "cpus": node.cpus, "gpus": [1.0] * node.gpus, "mem": node.memory_gb, "node": node}
            )
    plan = Plan(actors=actors, nodes=nodes, placed={f["name"]: [] for f in free})
    order = sorted(
        ((a, i) for a in actors for i in range(a.count)), key=lambda ai: (-ai[0].gpus, -ai[0].cpus, ai[0].role)
    )
    for actor, i in order:
        host = next((f for f in free if _take(f, actor)), None)
        if host is None:
            plan.unplaced.append(f"{actor.role} #{i} ({actor.cpus:g} CPU, {actor.gpus:g} GPU)")
        else:
            plan.placed[host["name"]].append(actor.role)
        if actor.gpus and i == 0:
            plan.memory += [m for node in nodes if (m := _memory_misfit(actor, node))]
    return plan


def _memory_misfit(actor: ActorDemand, node: Node) -> str | None:
    """Why ``actor``'s peak does not fit its share of one of ``node``'s cards, or None."""
    card = node.gpu_memory_gb
    if not card or actor.memory_gb <= card * min(actor.gpus, 1.0):
        return None
    where = f"~{actor.memory_gb:.0f} GB on {actor.gpus:g} GPU of a {card:g} GB card ({node.name})"
    if not actor.terms:
        return f"{actor.role}: {where}"
    worst = max(actor.terms, key=lambda t: t.gb)
    return f"{actor.role}: {where}: {worst.name} needs ~{worst.gb:.0f} GB" + (f"; {worst.hint}" if worst.hint else "")


def _take(slot: dict, actor: ActorDemand) -> bool:
    """Reserve ``actor`` on ``slot`` if it fits (whole GPUs need free cards; a fraction fits on one card)."""
    if slot["cpus"] + 1e-9 < actor.cpus:
        return False
    gpus = slot["gpus"]
    if actor.gpus >= 1:
        need = int(round(actor.gpus))
        idle = [k for k, f in enumerate(gpus) if f >= 1.0 - 1e-9]
        if len(idle) < need:
            return False
        for k in idle[:need]:
            gpus[k] = 0.0
    elif actor.gpus > 0:
        fits = [k for k, f in enumerate(gpus) if f + 1e-9 >= actor.gpus]
        if not fits:
            return False
        k = min(fits, key=lambda j: gpus[j])  # best fit: fill a shared card before opening a new one
        gpus[k] -= actor.gpus
    slot["cpus"] -= actor.cpus
    return True


def check_plan(plan: Plan, *, where: str = "the cluster") -> None:
    """Raise :class:`ClusterTooSmall` naming the actors that found no node and the totals."""
    if plan.ok:
        return
    if not plan.unplaced:
        raise ClusterTooSmall(f"{where} cannot hold this run: " + "; ".join(plan.memory))
    cpus, gpus = plan.totals()
    have_c = sum(n.cpus * n.count for n in plan.nodes)
    have_g = sum(n.gpus * n.count for n in plan.nodes)
    raise ClusterTooSmall(
        f"{where} cannot hold this run: {len(plan.unplaced)} actor(s) find no node: "
        f"{', '.join(plan.unplaced[:6])}{' ...' if len(plan.unplaced) > 6 else ''}. "
        f"The run asks for {cpus:g} CPU / {gpus:g} GPU, {where} has {have_c:g} CPU / {have_g:g} GPU. "
        "Lower resources.* or rollout.num_samplers / reward.num_actors, or add nodes; "
        "resources.check_cluster=warn starts anyway (e.g. on an autoscaling cluster)."
    )


def format_plan(plan: Plan) -> str:
    """The actor table, the totals and where each actor lands."""
    lines = [f"{'actor':<10} {'count':>5} {'CPU':>6} {'GPU':>5} {'memory/actor':>13}  holds"]
    for a in plan.actors:
        lines.append(f"{a.role:<10} {a.count:>5} {a.cpus:>6g} {a.gpus:>5g} {a.memory_gb:>10.1f} GB  {a.holds}")
        for t in a.terms if a.count else ():
            lines.append(f"{'':<30} {t.gb:>7.2f} GB  {t.phase + ': ' if t.phase else ''}{t.name}")
    cpus, gpus = plan.totals()
    lines.append(f"{'total':<10} {sum(a.count for a in plan.actors):>5} {cpus:>6g} {gpus:>5g}")
    lines.append("")
    have_c = sum(n.cpus * n.count for n in plan.nodes)
    have_g = sum(n.gpus * n.count for n in plan.nodes)
    lines.append(f"cluster: {sum(n.count for n in plan.nodes)} node(s), {have_c:g} CPU, {have_g:g} GPU")
    for name, roles in plan.placed.items():
        if roles:
            counts = {r: roles.count(r) for r in dict.fromkeys(roles)}
            lines.append(f"  {name}: " + ", ".join(f"{n} x {r}" for r, n in counts.items()))
    lines += [f"warning: {w}" for w in plan.warnings]
    lines.append("fits" if plan.ok else "DOES NOT FIT: " + ", ".join(plan.unplaced + plan.memory))
    return "\n".join(lines)


def plan_for(cfg: ExperimentConfig, *, manifest: str | None = None, cluster: str | None = None) -> tuple[str, bool]:
    """``normguard plan``: the run's placement on a KubeRay manifest's nodes, a cluster description, or
    the connected Ray cluster; returns the printed plan and whether it fits."""
    if manifest:
        with open(manifest) as f:
            docs = [d for d in yaml.safe_load_all(f) if d and d.get("apiVersion", "").startswith("ray.io/")]
        if len(docs) != 1:
            raise ValueError(f"{manifest}: expected one RayJob / RayCluster / RayService, found {len(docs)}")
        nodes, where = nodes_from_manifest(docs[0]), manifest
    elif cluster:
        nodes, where = nodes_from_file(cluster), cluster
    else:
        from services.cluster.connect import ensure_ray

        ensure_ray()
        nodes, where = nodes_from_ray(), "the connected Ray cluster"
    plan = plan_run(run_demand(cfg), nodes)
    return f"plan for {cfg.train.run_name} on {where}\n\n{format_plan(plan)}", plan.ok
