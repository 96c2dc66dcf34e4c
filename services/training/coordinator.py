"""The coordinator: one RL step reads top to bottom as a recipe (P11).

    prompts -> rollout (RolloutSampler actors) -> rewards (RewardScorer actors)
            -> advantages / pairs (pure core) -> learner update (Ray Train, base loss + NormGuard)
            -> versioned weight sync -> eval and report

It runs in the driver, over the worker group the composition root injected
(``services.training.workers``: Ray actors, or the plain objects they wrap, in one process for the
benchmark's baseline); the same recipe runs on either. Where a run is in its life (evaluating,
checkpointing, restarting, ...) is the controller's (``services.training.controller``): the coordinator
makes steps, syncs and checkpoints when told. It starts from the build's frozen
:class:`~services.training.resume.ResumeState`, drains where the controller's cadence says
(``drains_after``, ``services.training.cadence``) and writes its checkpoints through the run's
:class:`~services.checkpoints.CheckpointStore`.

``train.pipeline: async`` overlaps the two halves of the recipe: before step k's update the next
step's rollout is submitted to the samplers (``services.training.experience``), so sampling and scoring of
step k + 1 run while the learner trains on step k, and the weight sync after the update queues
behind that rollout on each sampler. Step k + 1 then trains on samples one policy version behind
(bounded by ``rollout.max_staleness``, which must be >= 1 for any overlap); each method's own
off-policy correction applies: Flow-GRPO's and AWM-clip's PPO ratio against the stored sampling
log-probs / the sampling policy, DiffusionNFT's old policy = the policy that sampled (the learner
keeps the last versions of its old copy, ``Learner.old_policy``). With ``max_staleness: 0`` the async
loop is the sync loop. The pipeline drains before every evaluation, checkpoint and the last step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from services.checkpoints import CheckpointStore
from services.methods import get_method
from services.training.cadence import Cadence
from services.training.experience import SYNC_TIMEOUT_S, Experience, ExperienceSource, ExperienceSpec, PolicyRef
from services.training.remote import CallStats, call_with_retries
from services.training.resume import ResumeState
from services.training.shards import build_shards
from services.training.workers import WorkerGroup
from services.types import TrainBatch

if TYPE_CHECKING:
    from services.config import ExperimentConfig

__all__ = ["Coordinator", "StepReport"]

log = logging.getLogger(__name__)


@dataclass
class StepReport:
    """What one RL step produced (the caller logs it)."""

    step: int
    version: int
    metrics: dict[str, float] = field(default_factory=dict)


class Coordinator:
    """Drives samplers, scorers and the learner through RL steps. Build with ``services.training.build``."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        workers: WorkerGroup,
        resume: ResumeState | None = None,
        drains_after: Callable[[int], bool] | None = None,
        prompts=None,
    ) -> None:
        """``resume``: where it starts (a fresh run when None); ``drains_after(step)``: whether no experience
        may be made ahead past ``step`` (the controller's cadence; ``Cadence(cfg.train)`` when None);
        ``prompts``: the ``(train, eval)`` prompt sets (``services.training.prompts.prompt_sets(cfg)`` when
        None), loaded once for the run."""
        from services.training.prompts import prompt_sets

        resume = resume or ResumeState()
        self.drains_after = drains_after or Cadence(cfg.train).drains_after

        self.cfg = cfg
        self.prompt_set, self.eval_prompt_set = prompts if prompts is not None else prompt_sets(cfg)
        self.workers, learner = workers, workers.learner
        # the members themselves (actor handles or objects), for callers that reach one (tests, probes)
        self.samplers, self.scorers, self.learner = workers.samplers.members, workers.scorers.members, learner
        self.method = get_method(cfg.loss)
        self.step_idx = resume.step
        self.version = learner.version
        self.stats = CallStats()
        self._fault_base: dict[str, int] = {}  # counters at the previous step (faults/* are per step)
        self._count_learner_restarts(resume.learner_restarts)
        self.nonfinite_in_row = resume.nonfinite_in_row
        self.weights_ref = learner.weights()
        self.train_scorers = {s.name: s.weight for s in cfg.reward.scorers}
        self.source = ExperienceSource(
            ExperienceSpec.from_config(cfg),
            samplers=workers.samplers,
            scorers=workers.scorers,
            prompt_set=self.prompt_set,
            stats=self.stats,
            learner_check=getattr(learner, "check", None),
        )
        self._pending = None  # a Future of the next step's Experience (pipelined mode)
        self._acks: list = []  # (sampler, ref) of the last weight sync, until confirmed (_confirm_sync)

    # ---- the end of a run -----------------------------------------------------------------
    def finish(self) -> None:
        """The run ended normally."""
        self.drain()
        self.source.close()

    def fail(self) -> None:
        """The run ended with an error: experience made ahead is dropped, not waited for."""
        self._pending = None
        self.source.close(wait=False)

    def shutdown(self) -> None:
        """Release everything this coordinator started: the learner group, and the sampler and scorer
        actors (``WorkerGroup.shutdown``)."""
        self._pending = None
        self.source.close(wait=False)
        self.workers.shutdown()

    def sync_samplers(self) -> None:
        """Push the learner's current weights to every sampler (after a build, a resume or a rollback)."""
        self._sync()

    # ---- the recipe -----------------------------------------------------------------------
    def step(self) -> StepReport:
        """One RL step; returns its metrics."""
        t = {"start": time.perf_counter()}
        exp = self._experience()  # 1-3. prompts, rollout, rewards (made during the last update when pipelined)
        t["experience"] = time.perf_counter()
        shards, batch_metrics = self._build_shards(exp)  # 4. advantages / pairs
        self._prefetch()  # pipelined: the next step's rollout runs on the samplers during this update
        learn_metrics = self._update(shards)  # 5. base loss + NormGuard
        t["learner"] = time.perf_counter()
        self._sync()  # 6. versioned weight sync (queued behind that rollout when there is one)
        t["sync"] = time.perf_counter()
        self.step_idx += 1
        metrics = {**exp.metrics, **batch_metrics, **learn_metrics, **self._perf(t, len(exp.rollout.seeds))}
        metrics["rollout/norm_ratio_mean"] = float(exp.rollout.norm_ratio.mean())
        lag = self.version - 1 - int(exp.rollout.versions.min())
        metrics["rollout/version_lag"] = float(lag) if learn_metrics.get("learner/updates") else 0.0
        return StepReport(step=self.step_idx, version=self.version, metrics=metrics)  # 7. caller logs

    # ---- 1-3. experience: now, or made ahead during the previous update -------------------------
    def _experience(self) -> Experience:
        pending, self._pending = self._pending, None
        if pending is None:
            policy = PolicyRef(self.weights_ref, self.version)
            return self.source.produce(self.step_idx, policy, min_version=self._min_version(self.step_idx))
        exp = pending.result(timeout=self._experience_timeout_s)
        self._confirm_sync()  # the sync queued behind that rollout has landed (or is redone now)
        return exp

    @property
    def _experience_timeout_s(self) -> float:
        """The longest a step's experience may take: its rollout, then its scoring."""
        return self.cfg.train.rollout_timeout_s + self.cfg.reward.timeout_s

    def _min_version(self, step: int) -> int:
        """The oldest policy that may sample ``step``: the learner trains on it at version
        ``version + (step - step_idx)``, and ``rollout.max_staleness`` bounds the lag."""
        return max(0, self.version + (step - self.step_idx) - self.cfg.rollout.max_staleness)

    def _prefetch(self) -> None:
        """Pipelined mode: submit the next step's rollout before this step's update.

        The samplers hold this step's policy, so the next step trains on samples one version
        behind (``rollout/version_lag`` 1), the lag ``rollout.max_staleness`` must allow. Nothing is
        made ahead across a drain point (an evaluation, a checkpoint, the last step): a checkpoint
        is taken with no rollout in flight, so a resumed run samples exactly what the uninterrupted
        one did.
        """
        if self.cfg.train.pipeline != "async" or self.cfg.rollout.max_staleness < 1:
            return
        nxt = self.step_idx + 1
        if self.drains_after(nxt):
            return
        policy = PolicyRef(self.weights_ref, self.version)
        self._pending = self.source.submit(nxt, policy, min_version=self._min_version(nxt))

    def drain(self) -> None:
        """Wait for (and drop) experience made ahead that will not be trained on (the run ended early)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result(timeout=self._experience_timeout_s)
            except Exception as err:  # noqa: BLE001 - nothing will train on it
                log.warning("dropped experience made ahead failed: %s", err)
            self._confirm_sync()

    # ---- 4. advantages / pairs ------------------------------------------------------------
    def _build_shards(self, exp: Experience) -> tuple[list[TrainBatch], dict[str, float]]:
        return build_shards(self.method, exp, step=self.step_idx, world=self.learner.world_size, cfg=self.cfg)

    # ---- 5. update ------------------------------------------------------------------------
    def _update(self, shards: list[TrainBatch]) -> dict[str, float]:
        if not shards:
            return {"learner/skipped_no_data": 1.0}
        metrics, weights = self.learner.update(shards)
        if metrics.get("learner/updates", 0.0) == 0 and metrics.get("learner/skipped_nonfinite", 0.0) > 0:
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.cfg.learner.max_nonfinite_in_row:
                raise FloatingPointError(
                    f"{self.nonfinite_in_row} non-finite updates in a row (step {self.step_idx}); "
                    "lower the learning rate or check the rewards"
                )
        else:
            self.nonfinite_in_row = 0
            self.version = self.learner.version
            self.weights_ref = weights
        return metrics

    # ---- 6. sync --------------------------------------------------------------------------
    def _sync(self) -> None:
        """Every sampler gets the learner's policy: one object-store copy, fetched by all samplers at
        once. With a rollout in flight the calls queue behind it and are confirmed when its
        experience is taken; otherwise at once (:meth:`_confirm_sync`)."""
        pool = self.workers.samplers
        if not pool.members:
            return
        self.weights_ref = ref = pool.put(self.weights_ref)  # plain objects: the weights themselves
        self._acks = [
            (s, pool.submit(s, "set_weights", ref, self.version, now=partial(self._set_weights, s)))
            for s in pool.members
        ]
        if self._pending is None:
            self._confirm_sync()

    def _set_weights(self, sampler) -> int:
        """Sync one sampler with the retry policy; returns the version it holds (the current one)."""
        pool = self.workers.samplers
        got = call_with_retries(
            sampler,
            "set_weights",
            self.weights_ref,
            self.version,
            timeout_s=SYNC_TIMEOUT_S,
            retries=self.cfg.train.sampler_retries,
            stats=self.stats,
            name="sync",
            on_actor_restart=lambda: pool.call(sampler, "get_version", timeout_s=SYNC_TIMEOUT_S),  # till it is back
            caller=pool.call,
        )
        if got != self.version:
            raise RuntimeError(f"sampler reports policy v{got} after syncing v{self.version}")
        return got

    def _confirm_sync(self) -> None:
        """The submitted syncs answered with the current version; a sampler whose sync failed (e.g. it
        died while sampling) is synced again now, with the retry policy."""
        acks, self._acks = self._acks, []
        for sampler, ack in acks:
            try:
                if self.workers.samplers.result(ack, timeout_s=SYNC_TIMEOUT_S) == self.version:
                    continue
            except Exception as err:  # noqa: BLE001 - redone below
                log.warning("sync: a queued set_weights failed (%s); syncing again", type(err).__name__)
                self.stats.add(retries=1)
            self._set_weights(sampler)

    def _count_learner_restarts(self, total: int) -> None:
        """This coordinator was built after ``total`` learner restarts in this run: its first step reports the
        latest one (``faults/learner_restarts`` 1), the totals all of them."""
        self.stats.learner_restarts = total
        self._fault_base["learner_restarts"] = max(total - 1, 0)

    def _perf(self, t: dict[str, float], num_samples: int) -> dict[str, float]:
        """Timings, and the fault counters: ``faults/*`` this step, ``faults_total/*`` since the run began.

        ``perf/rollout_s`` / ``perf/reward_s`` come with the experience (measured where it was made, in
        the background when pipelined); ``perf/wait_experience_s`` is what this step waited for it."""
        totals = {
            "retries": self.stats.retries,
            "restarts": self.stats.restarts,
            "failures": self.stats.failures,
            "learner_restarts": self.stats.learner_restarts,
        }
        step = {k: v - self._fault_base.get(k, 0) for k, v in totals.items()}
        self._fault_base = totals
        return {
            "perf/wait_experience_s": t["experience"] - t["start"],  # = rollout + reward when not pipelined
            "perf/learner_s": t["learner"] - t["experience"],
            "perf/sync_s": t["sync"] - t["learner"],
            "perf/samples_per_s": num_samples / max(t["sync"] - t["start"], 1e-9),
            **{f"faults/{k}": float(v) for k, v in step.items()},
            **{f"faults_total/{k}": float(v) for k, v in totals.items()},
        }

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint(self, store: CheckpointStore, extra: dict | None = None) -> Path:
        """Learner checkpoint + coordinator state, written by ``store`` (atomic; ``latest`` then points at it)."""
        state = {
            "step": self.step_idx,
            "version": self.version,
            "prompt_cursor": self.step_idx * self.cfg.rollout.prompts_per_step,
            "prompt_fingerprint": self.prompt_set.fingerprint,
            "nonfinite_in_row": self.nonfinite_in_row,
            **(extra or {}),
        }
        return store.save(self.step_idx, state, self.learner.save)
