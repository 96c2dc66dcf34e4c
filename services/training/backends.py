"""Where a run's workers live: Ray actors and a Ray Train learner group (:class:`RayBackend`), or their
plain-object twins in this process (:class:`LocalBackend`, ``run_training(local=True)``: the benchmark's
baseline and the fast tests).

The entry points (``run_training``, ``build_coordinator``, ``normguard train --local``) pick one with
:func:`backend_for`; from there on the backend is the only thing that knows: it joins the cluster, starts
the :class:`~services.training.workers.WorkerGroup` (the shape of Ray Train v2's ``worker_group_cls``
injection), encodes the prompt table, and watches the cluster's nodes for the failure policy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from services.training.nodes import NodeWatch
from services.training.workers import ActorPool, LocalPool, WorkerGroup

if TYPE_CHECKING:
    from services.config import ExperimentConfig

__all__ = ["Backend", "LocalBackend", "RayBackend", "backend_for"]

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What differs between a run on Ray and one in this process."""

    def connect(self) -> None:
        """Join (or start) the cluster."""

    def check_cluster(self, cfg: ExperimentConfig) -> None:
        """Fail before any worker starts when the cluster can never hold the run."""

    def node_watch(self) -> NodeWatch:
        """The nodes seen per attempt (a lost node is the failure policy's to survive)."""

    def await_placement(self, cfg: ExperimentConfig, nodes: NodeWatch) -> None:
        """Before a restart: wait, bounded, until the alive nodes can hold the run again."""

    def encode_prompts(self, cfg: ExperimentConfig, model_path: str, prompts: list[str], out) -> str:
        """The prompt-embedding table of ``prompts`` written to ``out`` (its path)."""

    def start_workers(
        self, cfg: ExperimentConfig, model_path: str, scorer_specs: dict, resume: str | None, *, embeddings
    ) -> WorkerGroup:
        """Samplers, scorers and the learner (resumed from ``resume``), all given the prompt table."""


class LocalBackend:
    """Plain objects in this process: one scorer, one learner, one sampler (the learner itself, hybrid)."""

    def connect(self) -> None:
        """Nothing to join."""

    def check_cluster(self, cfg: ExperimentConfig) -> None:
        """No cluster to check."""

    def node_watch(self) -> NodeWatch:
        return NodeWatch(enabled=False)

    def await_placement(self, cfg: ExperimentConfig, nodes: NodeWatch) -> None:
        """Nothing to place."""

    def encode_prompts(self, cfg: ExperimentConfig, model_path: str, prompts: list[str], out) -> str:
        from services.models.pipelines import encode_prompt_file

        return encode_prompt_file(cfg.model, model_path, prompts, out, threads=cfg.resources.torch_threads)

    def start_workers(
        self, cfg: ExperimentConfig, model_path: str, scorer_specs: dict, resume: str | None, *, embeddings
    ) -> WorkerGroup:
        from services.training.learner_group import LocalLearner
        from services.training.rollout import RolloutSampler, rollout_chunks
        from services.training.scoring import ScorerWorker

        res = cfg.resources
        kw = {"torch_threads": res.torch_threads, "score_batch": cfg.reward.score_batch, "retries": cfg.reward.retries}
        scorers = [ScorerWorker(scorer_specs, **kw)]
        learner = LocalLearner(cfg, model_path, resume_from=resume, prompt_embeddings=embeddings)
        if res.placement == "hybrid":
            samplers = _colocated(cfg, learner)
        else:
            sampler_kw = dict(rollout_chunks(cfg), prompt_embeddings=embeddings)
            samplers = [RolloutSampler(cfg.model, model_path, torch_threads=res.torch_threads, **sampler_kw)]
        return WorkerGroup(LocalPool(samplers), LocalPool(scorers), learner)


class RayBackend:
    """Ray actors (``max_restarts=3``) for the samplers and scorers, a Ray Train group for the learner."""

    def connect(self) -> None:
        from services.cluster.connect import ensure_ray

        ensure_ray()

    def check_cluster(self, cfg: ExperimentConfig) -> None:
        """``resources.check_cluster``: ``error`` raises, ``warn`` logs, ``off`` skips."""
        if cfg.resources.check_cluster == "off":
            return
        from services.cluster.plan import ClusterTooSmall, check_plan, nodes_from_ray, plan_run, run_demand

        try:
            check_plan(plan_run(run_demand(cfg), nodes_from_ray()), where="the Ray cluster")
        except ClusterTooSmall as err:
            if cfg.resources.check_cluster == "error":
                raise
            log.warning("%s", err)

    def node_watch(self) -> NodeWatch:
        return NodeWatch(enabled=True)

    def await_placement(self, cfg: ExperimentConfig, nodes: NodeWatch) -> None:
        """A fixed cluster (``check_cluster: error``) must hold the run again; an autoscaled one is asked by
        the pending actors themselves."""
        if cfg.resources.check_cluster == "error":
            from services.training.nodes import wait_for_placement

            wait_for_placement(cfg, nodes, timeout_s=cfg.train.node_wait_s)

    def encode_prompts(self, cfg: ExperimentConfig, model_path: str, prompts: list[str], out) -> str:
        """One Ray task on a sampler's resources (a learner's with ``placement: hybrid``), waited for up to
        ``train.learner_timeout_s``."""
        import ray

        from services.models.pipelines import encode_prompt_file

        res = cfg.resources
        hybrid = res.placement == "hybrid"
        gpus = res.learner_gpus if hybrid else res.sampler_gpus
        task = ray.remote(encode_prompt_file).options(
            num_cpus=res.learner_cpus if hybrid else res.sampler_cpus,
            num_gpus=gpus,
            resources=dict(res.learner_resources if hybrid else res.sampler_resources),
            scheduling_strategy="DEFAULT",  # outside a Tune trial's placement group, as the actors
        )
        ref = task.remote(
            cfg.model, model_path, prompts, str(out), device="cuda" if gpus else "cpu", threads=res.torch_threads
        )
        return ray.get(ref, timeout=cfg.train.learner_timeout_s)

    def start_workers(
        self, cfg: ExperimentConfig, model_path: str, scorer_specs: dict, resume: str | None, *, embeddings
    ) -> WorkerGroup:
        """Scorer and sampler actors, then the learner group (the samplers are its workers, hybrid)."""
        from services.training.learner_group import LearnerGroup

        res = cfg.resources
        hybrid = res.placement == "hybrid"
        scorers = ActorPool(_scorer_actors(cfg, scorer_specs))
        samplers = ActorPool([] if hybrid else _sampler_actors(cfg, model_path, embeddings))
        storage = str(cfg.run_dir / "ray_train")
        try:
            timeout, kw = cfg.train.learner_timeout_s, dict(resume_from=resume, prompt_embeddings=embeddings)
            learner = LearnerGroup(cfg, model_path, storage_path=storage, timeout_s=timeout, **kw)
        except BaseException:  # e.g. its worker group could not be placed: the actors above must not linger
            samplers.kill()
            scorers.kill()
            raise
        return WorkerGroup(LocalPool(_colocated(cfg, learner)) if hybrid else samplers, scorers, learner)


# "DEFAULT" keeps the actors out of a Tune trial's placement group (they ask for their own resources)
_ACTOR_OPTIONS = dict(max_restarts=3, scheduling_strategy="DEFAULT")


def _scorer_actors(cfg: ExperimentConfig, scorer_specs: dict) -> list:
    import ray

    from services.training.scoring import ScorerWorker

    res = cfg.resources
    scorer_cls = ray.remote(ScorerWorker).options(
        num_cpus=res.scorer_cpus, num_gpus=res.scorer_gpus, resources=dict(res.scorer_resources), **_ACTOR_OPTIONS
    )
    kw = {"torch_threads": res.torch_threads, "score_batch": cfg.reward.score_batch, "retries": cfg.reward.retries}
    device = "cuda" if res.scorer_gpus else "cpu"
    return [scorer_cls.remote(scorer_specs, device=device, **kw) for _ in range(cfg.reward.num_actors)]


def _sampler_actors(cfg: ExperimentConfig, model_path: str, embeddings: str | None) -> list:
    import ray

    from services.training.rollout import RolloutSampler, rollout_chunks

    res = cfg.resources
    sampler_cls = ray.remote(RolloutSampler).options(
        num_cpus=res.sampler_cpus, num_gpus=res.sampler_gpus, resources=dict(res.sampler_resources), **_ACTOR_OPTIONS
    )
    kw = dict(rollout_chunks(cfg), prompt_embeddings=embeddings, torch_threads=res.torch_threads)
    device = "cuda" if res.sampler_gpus else "cpu"
    return [sampler_cls.remote(cfg.model, model_path, device=device, **kw) for _ in range(cfg.rollout.num_samplers)]


def _colocated(cfg: ExperimentConfig, learner) -> list:
    """``placement: hybrid``: the one sampler object whose calls run on the learner workers."""
    from services.training.colocated import ColocatedRollouts

    return [ColocatedRollouts(learner, timeout_s=cfg.train.rollout_timeout_s)]


def backend_for(local: bool) -> Backend:
    """The entry points' ``local`` flag, the one place it is read."""
    return LocalBackend() if local else RayBackend()
