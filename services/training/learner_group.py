"""The learner on Ray Train: persistent TorchTrainer workers driven through command queues.

``TorchTrainer.fit()`` runs one ``train_loop_per_worker`` per worker for the whole run (Train V2
starts workers once; restarting a trainer per RL step would cost ~15 s each). The loop waits
on a per-rank command queue: ``update`` (a TrainBatch shard) -> metrics and, from rank 0, an
object ref of the new policy weights; ``save`` -> an atomic checkpoint, reported through
``ray.train.report`` with a ``Checkpoint``; ``stop``. The process group is set up by Ray Train
(gloo on CPU, NCCL on GPU) and used by ``Learner`` to all-reduce gradients.

With ``resources.placement: hybrid`` the workers are the samplers too (``generate`` / ``eval_samples``):
each samples its share of the rollout with the sampling policy swapped into its own model
(``Learner.sampling``), on its own device, between updates, so no weights are shipped after an update.
This is the shape of verl's ``ActorRolloutRefWorker`` (``verl/workers/fsdp_workers.py``), which fuses
training, rollout and reference into one worker on one GPU; here the rollout engine is the learner's
own model, so the colocation costs no second copy of the weights.

``LocalLearner`` is the same interface in-process (single-process baseline, fast tests).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from services.training.learner import Learner, LearnerSpec
from services.training.probe import ActorProbe, probe_process
from services.training.remote import LearnerLost, Unrecoverable
from services.training.rollout import RolloutSampler, rollout_chunks
from services.types import RolloutBatch, RolloutRequest, TrainBatch

if TYPE_CHECKING:
    from services.config import ExperimentConfig

__all__ = ["LearnerFailed", "LearnerGroup", "LearnerLost", "LocalLearner"]

log = logging.getLogger(__name__)
QUEUE_POLL_S = 1.0
START_FAILED_JOIN_S = 30.0  # how long a group that failed to start waits for its fit thread to end


class LearnerFailed(Unrecoverable, RuntimeError):
    """A learner rank raised (the worker group is going down with it), did not answer in time, or broke
    the command protocol. Retrying the call cannot help: the run fails, or restarts from a checkpoint."""


# What gloo / NCCL / torch.distributed say on a surviving rank when a peer process dies mid-collective
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing", "NCCL communicator")


def _peer_lost(err: BaseException) -> bool:
    """A collective failed because another rank's process died (torch's distributed errors; gloo also
    raises a plain RuntimeError whose message says so)."""
    import torch.distributed as dist

    return isinstance(err, (dist.DistNetworkError, dist.DistBackendError)) or any(s in str(err) for s in _PEER_LOST)


@dataclass(frozen=True)
class LearnerCommand:
    """Driver -> one rank's command queue.

    Attributes:
        kind: ``update`` (train on ``shard``), ``save`` (checkpoint to ``path`` with ``extra``), ``stop``, ``probe``
            (the rank's :class:`~services.training.probe.ActorProbe`), and with ``placement: hybrid`` ``generate``
            (sample ``request``) or ``eval_samples``.
        shard: a Ray object ref of this rank's :class:`~services.types.TrainBatch`.
        request: a :class:`~services.types.RolloutRequest`, or ``(prompts, kwargs)`` of ``eval_samples``.
        path: the checkpoint directory.
        extra: the coordinator's state stored with the checkpoint.
    """

    kind: Literal["update", "save", "stop", "generate", "eval_samples", "probe"]
    shard: Any = None
    request: Any = None
    path: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class LearnerReply:
    """One rank -> the driver's reply queue.

    Attributes:
        kind: ``ready`` (built, maybe resumed), ``updated``, ``saved``, ``generated``, ``probed`` or ``error``.
        rank: the replying rank.
        version: the policy version the rank holds.
        metrics: the step's float metrics (``updated``).
        weights: rank 0 only: a Ray object ref of the policy weights for the samplers (none when hybrid).
        result: a Ray object ref of the samples (``generated``); the rank's ActorProbe (``probed``).
        extra: the checkpoint's extra state (``ready`` after a resume).
        error: ``"Type: message"`` of the exception (``error``).
        peer_lost: the error is a collective that lost another rank's process (``error``).
    """

    kind: Literal["ready", "updated", "saved", "generated", "probed", "error"]
    rank: int
    version: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    weights: Any = None
    result: Any = None
    extra: dict = field(default_factory=dict)
    error: str | None = None
    peer_lost: bool = False


def sample_with_policy(learner: Learner, sampler: RolloutSampler, kind: str, request: Any) -> Any:
    """``placement: hybrid``: a rollout share (``generate``) or evaluation samples made on the learner's
    own model with the sampling policy swapped in, tagged with the learner's version."""
    sampler.version = learner.version
    with learner.sampling():
        if kind == "generate":
            return sampler.generate(request)
        prompts, kwargs = request
        return sampler.eval_samples(prompts, **kwargs)


class LocalLearner:
    """One in-process Learner behind the LearnerGroup interface."""

    world_size = 1

    def __init__(
        self,
        cfg: ExperimentConfig,
        model_path: str,
        *,
        resume_from: str | None = None,
        prompt_embeddings: str | None = None,
    ) -> None:
        self.learner = Learner.from_config(cfg, model_path, prompt_embeddings=prompt_embeddings)
        self.extra = self.learner.load(resume_from) if resume_from else {}
        self._sampler = RolloutSampler.over(self.learner.gen, **rollout_chunks(cfg))

    @property
    def version(self) -> int:
        return self.learner.version

    def weights(self) -> dict:
        return self.learner.policy_weights()

    def update(self, shards: list[TrainBatch]) -> tuple[dict[str, float], Any]:
        (shard,) = shards
        return self.learner.update(shard), self.learner.policy_weights()

    def generate(self, requests: list[RolloutRequest], *, timeout_s: float | None = None) -> list[RolloutBatch]:
        (req,) = requests
        return [sample_with_policy(self.learner, self._sampler, "generate", req)]

    def eval_samples(self, prompts: list[str], *, timeout_s: float | None = None, **kwargs) -> dict:
        return sample_with_policy(self.learner, self._sampler, "eval_samples", (prompts, kwargs))

    def save(self, path: str, extra: dict) -> str:
        return str(self.learner.save(path, extra))

    def probe(self) -> list[ActorProbe]:
        """This process's peak memory and the learner transformer's dtypes / devices (one "rank")."""
        return [probe_process(self.learner.gen.transformer)]

    def check(self) -> None:
        """In one process the learner cannot be lost."""

    def stop(self) -> None:
        pass


def _learner_loop(config: dict) -> None:
    """``train_loop_per_worker``: serve commands until ``stop``."""
    import ray
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cmd_q, out_q = config["cmd_queues"][rank], config["out_queue"]
    device = "cuda" if torch.cuda.is_available() and config["use_gpu"] else "cpu"
    spec: LearnerSpec = config["spec"]
    learner = Learner(spec, config["model_path"], device=device, distributed=ctx.get_world_size() > 1)
    extra = learner.load(config["resume_from"]) if config["resume_from"] else {}
    ships = rank == 0 and not config["hybrid"]  # rank 0 ships the policy to separate samplers
    sampler = RolloutSampler.over(learner.gen, **config["chunks"]) if config["hybrid"] else None
    weights = ray.put(learner.policy_weights()) if ships else None
    out_q.put(LearnerReply("ready", rank, version=learner.version, weights=weights, extra=extra))
    while True:
        cmd: LearnerCommand = cmd_q.get(block=True)
        if cmd.kind == "stop":
            return
        try:
            out_q.put(_serve(cmd, learner, sampler, rank=rank, ships=ships))
        except Exception as err:  # report, do not hang the driver
            out_q.put(LearnerReply("error", rank, error=f"{type(err).__name__}: {err}", peer_lost=_peer_lost(err)))
            raise


def _serve(cmd: LearnerCommand, learner: Learner, sampler: RolloutSampler | None, *, rank: int, ships: bool):
    """One command on one rank -> its reply."""
    import ray
    import ray.train

    if cmd.kind == "update":
        metrics = learner.update(ray.get(cmd.shard))
        ref = ray.put(learner.policy_weights()) if ships else None
        return LearnerReply("updated", rank, version=learner.version, metrics=metrics, weights=ref)
    if cmd.kind in ("generate", "eval_samples"):
        if sampler is None:
            raise RuntimeError(f"{cmd.kind!r} needs resources.placement hybrid")
        out = sample_with_policy(learner, sampler, cmd.kind, cmd.request)
        return LearnerReply("generated", rank, version=learner.version, result=ray.put(out))
    if cmd.kind == "probe":  # reads only: the rank's peaks and where its weights live
        return LearnerReply("probed", rank, version=learner.version, result=probe_process(learner.gen.transformer))
    if cmd.kind == "save":
        if rank == 0:
            learner.save(cmd.path, cmd.extra)
        ckpt = ray.train.Checkpoint.from_directory(cmd.path) if rank == 0 else None
        ray.train.report({"step": learner.step_count, "version": learner.version}, checkpoint=ckpt)
        return LearnerReply("saved", rank, version=learner.version)
    raise RuntimeError(f"learner protocol error: unknown command {cmd.kind!r}")


def _no_restarts_by_ray_train():
    """Ray Train restarts no running worker group: not a failed one (``max_failures``), not one on a preempted
    node (``max_preemption_failures``, unbounded by default in Train V2). A group Ray Train rebuilt would rerun
    ``_learner_loop`` from the first checkpoint and answer ``ready`` to a driver waiting for an update; the
    run's failure policy restarts everything from the newest checkpoint instead (``services.training.failure``).
    A group that has not started yet may be retried (Ray Train's controller waits for an autoscaled node
    that way): its workers answer the ``ready`` the driver waits for. Only the fields Ray has are set."""
    import dataclasses

    from ray.train import FailureConfig

    names = {f.name for f in dataclasses.fields(FailureConfig)}
    return FailureConfig(**{k: 0 for k in ("max_failures", "max_preemption_failures") if k in names})


def _queue_options() -> dict:
    """The command and reply queues live on the driver's node, as Ray Train V2 places its controller: they
    belong to the driver, so a lost worker node takes learner workers with it, never the queues the driver
    reads (a queue placed on the lost node turned a recoverable lost worker into an ``ActorUnavailableError``
    that ended the run). An explicit strategy also keeps them out of a Tune trial's placement group."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(here, soft=False)}


class LearnerGroup:
    """Ray Train TorchTrainer workers running :class:`Learner`, driven step by step."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        model_path: str,
        *,
        storage_path: str,
        resume_from: str | None = None,
        timeout_s: float = 900.0,
        prompt_embeddings: str | None = None,
    ) -> None:
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Queue

        res = cfg.resources
        self.world_size, self.timeout_s = res.num_learners, timeout_s
        self.hybrid, opts = res.placement == "hybrid", _queue_options()
        self.cmd_queues = [Queue(actor_options=opts) for _ in range(self.world_size)]
        self.out_queue, gpu = Queue(actor_options=opts), {"GPU": res.learner_gpus} if res.learner_gpus else {}
        per_worker = {"CPU": res.learner_cpus, **res.learner_resources, **gpu}  # custom resources: a node pool
        self.trainer = TorchTrainer(
            _learner_loop,
            train_loop_config=dict(
                spec=LearnerSpec.from_config(cfg, prompt_embeddings=prompt_embeddings),
                model_path=model_path,
                cmd_queues=self.cmd_queues,
                out_queue=self.out_queue,
                resume_from=resume_from,
                use_gpu=res.learner_gpus > 0,
                hybrid=self.hybrid,
                chunks=rollout_chunks(cfg),
            ),
            scaling_config=ScalingConfig(
                num_workers=self.world_size, use_gpu=res.learner_gpus > 0, resources_per_worker=per_worker
            ),
            torch_config=TorchConfig(backend="nccl" if res.learner_gpus > 0 else "gloo"),
            run_config=RunConfig(
                name=f"{cfg.train.run_name}-learner",
                storage_path=str(Path(storage_path).resolve()),
                failure_config=_no_restarts_by_ray_train(),
            ),
        )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fit, daemon=True, name="ray-train-fit")
        self._thread.start()
        self._ray = ray
        self._start()

    def _start(self) -> None:
        """Every rank's ``ready`` and rank 0's weights (bounded). A group that fails to start is told to
        stop, so a worker placed late exits at once instead of serving a group nobody drives."""
        from ray.exceptions import OwnerDiedError

        try:
            ready = self._collect("ready")
            self.version, self.extra = ready[0].version, ready[0].extra
            ref = ready[0].weights
            self._weights = self._ray.get(ref, timeout=self.timeout_s) if ref is not None else None
        except OwnerDiedError as err:
            self.stop(timeout_s=START_FAILED_JOIN_S)
            raise LearnerLost(f"learner rank 0 was lost with the weights it shipped: {err}") from err
        except BaseException:
            self.stop(timeout_s=START_FAILED_JOIN_S)
            raise

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as err:  # surfaced by _collect
            self._error = err

    def _collect(self, kind: str, *, ranks: int | None = None, timeout_s: float | None = None) -> list[LearnerReply]:
        """The reply of ``kind`` of every rank (or of the first ``ranks``), in rank order (bounded by
        ``timeout_s``, the learner's timeout by default)."""
        from ray.util.queue import Empty

        results: dict[int, LearnerReply] = {}
        wait_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait_s
        while len(results) < (ranks or self.world_size):
            self.check()
            if time.monotonic() > deadline:
                raise LearnerFailed(f"learner did not answer {kind!r} within {wait_s} s")
            try:
                msg: LearnerReply = self.out_queue.get(block=True, timeout=QUEUE_POLL_S)
            except Empty:
                continue
            if msg.kind == "error":
                if msg.peer_lost:  # a surviving rank's collective failed because another worker died
                    raise LearnerLost(f"learner rank {msg.rank} lost its peers: {msg.error}")
                raise LearnerFailed(f"learner rank {msg.rank} failed: {msg.error}")
            if msg.kind != kind:
                raise LearnerFailed(f"learner protocol error: expected {kind!r}, got {msg.kind!r}")
            results[msg.rank] = msg
        return [results[r] for r in range(ranks or self.world_size)]

    def check(self) -> None:
        """Raise :class:`LearnerLost` once the worker group has died (``fit()`` returned with an error)."""
        if self._error is not None:
            raise LearnerLost(f"the Ray Train learner failed: {self._error}") from self._error

    def weights(self) -> dict:
        return self._weights

    def update(self, shards: list[TrainBatch]) -> tuple[dict[str, float], Any]:
        """Send one shard per rank; returns rank-0 metrics (averaged over ranks) and a weights ref."""
        for rank, shard in enumerate(shards):
            self.cmd_queues[rank].put(LearnerCommand("update", shard=self._ray.put(shard)))
        results = self._collect("updated")
        keys = results[0].metrics.keys()
        metrics = {k: sum(r.metrics.get(k, 0.0) for r in results) / len(results) for k in keys}
        self.version, self._weights = results[0].version, results[0].weights
        return metrics, results[0].weights

    def generate(self, requests: list[RolloutRequest], *, timeout_s: float) -> list[RolloutBatch]:
        """``placement: hybrid``: request ``r`` is sampled on rank ``r``, every rank at once."""
        for rank, req in enumerate(requests):
            self.cmd_queues[rank].put(LearnerCommand("generate", request=req))
        replies = self._collect("generated", timeout_s=timeout_s)
        return self._ray.get([r.result for r in replies], timeout=timeout_s)

    def eval_samples(self, prompts: list[str], *, timeout_s: float, **kwargs) -> dict:
        """``placement: hybrid``: evaluation samples on rank 0 (the others wait for their next command)."""
        self.cmd_queues[0].put(LearnerCommand("eval_samples", request=(prompts, kwargs)))
        (reply,) = self._collect("generated", ranks=1, timeout_s=timeout_s)
        return self._ray.get(reply.result, timeout=timeout_s)

    def probe(self) -> list[ActorProbe]:
        """Every rank's :class:`~services.training.probe.ActorProbe`, in rank order (read inside each worker)."""
        for q in self.cmd_queues:
            q.put(LearnerCommand("probe"))
        return [r.result for r in self._collect("probed")]

    def save(self, path: str, extra: dict) -> str:
        for q in self.cmd_queues:
            q.put(LearnerCommand("save", path=path, extra=extra))
        self._collect("saved")
        return path

    def stop(self, *, timeout_s: float | None = None) -> None:
        """Stop the workers (waiting up to ``timeout_s``, the learner's timeout by default); after a lost
        worker the group is already down and nothing waits for a command."""
        if self._thread.is_alive():
            for q in self.cmd_queues:
                q.put(LearnerCommand("stop"))
        self._thread.join(timeout=self.timeout_s if timeout_s is None else timeout_s)
