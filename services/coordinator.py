"""The coordinator: one RL step reads top to bottom as a recipe (P11).

    prompts -> rollout (RolloutSampler actors) -> rewards (RewardScorer actors)
            -> advantages / pairs (pure core) -> learner update (Ray Train, base loss + NormGuard)
            -> versioned weight sync -> eval and report

It runs in the driver. The actors are thin wrappers of plain classes; with ``local=True`` the
same recipe runs on the plain objects in one process (the benchmark's baseline).
"""

from __future__ import annotations

import enum
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.checkpoints import write_manifest
from services.methods import get_method
from services.remote import CallStats, actor_gone, call, call_with_retries
from services.rewards.base import combine_scores
from services.types import RolloutBatch, RolloutRequest, TrainBatch

__all__ = ["Coordinator", "RunState", "StepReport"]

log = logging.getLogger(__name__)
SYNC_TIMEOUT_S = 120.0


class RunState(enum.Enum):
    """Lifecycle of a run; transitions happen only in ``Coordinator._transition``."""

    INITIALIZING = "initializing"
    RUNNING = "running"
    EVALUATING = "evaluating"
    CHECKPOINTING = "checkpointing"
    FINISHED = "finished"
    ERRORED = "errored"


_ALLOWED = {
    RunState.INITIALIZING: {RunState.RUNNING, RunState.EVALUATING, RunState.ERRORED},
    RunState.RUNNING: {RunState.EVALUATING, RunState.CHECKPOINTING, RunState.FINISHED, RunState.ERRORED},
    RunState.EVALUATING: {RunState.RUNNING, RunState.CHECKPOINTING, RunState.FINISHED, RunState.ERRORED},
    RunState.CHECKPOINTING: {RunState.RUNNING, RunState.EVALUATING, RunState.FINISHED, RunState.ERRORED},
    RunState.FINISHED: set(),
    RunState.ERRORED: set(),
}


@dataclass
class StepReport:
    """What one RL step produced (the caller logs it)."""

    step: int
    version: int
    metrics: dict[str, float] = field(default_factory=dict)


def _sample_seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + index) % (2**31 - 1)


class Coordinator:
    """Drives samplers, scorers and the learner through RL steps. Build with ``services.train``."""

    def __init__(self, cfg, *, samplers: list, scorers: list, learner, start_step: int = 0, prompts=None) -> None:
        """``prompts``: the ``(train, eval)`` prompt sets (``services.prompts.prompt_sets(cfg)`` when None),
        loaded once for the run."""
        from services.prompts import prompt_sets

        self.cfg = cfg
        self.prompt_set, self.eval_prompt_set = prompts if prompts is not None else prompt_sets(cfg)
        self._step_metadata: list | None = None
        self.samplers, self.scorers, self.learner = samplers, scorers, learner
        self.method = get_method(cfg.loss.name)
        self.step_idx = start_step
        self.version = learner.version
        self.stats = CallStats()
        self._fault_base: dict[str, int] = {}  # counters at the previous step (faults/* are per step)
        self.nonfinite_in_row = 0
        self.state = RunState.INITIALIZING
        self.weights_ref = learner.weights()
        self.train_scorers = {s.name: s.weight for s in cfg.reward.scorers}
        self.required = {s.name for s in cfg.reward.scorers if s.required}

    def _transition(self, new: RunState) -> None:
        if new not in _ALLOWED[self.state] and new != self.state:
            raise RuntimeError(f"illegal run-state transition {self.state.value} -> {new.value}")
        self.state = new

    # ---- the run loop's view of the lifecycle (every change of state goes through _transition) ---
    def begin_evaluation(self) -> None:
        """An evaluation starts (before training, along it, or after it)."""
        self._transition(RunState.EVALUATING)

    def end_evaluation(self) -> None:
        """Training resumes after an evaluation."""
        self._transition(RunState.RUNNING)

    def finish(self) -> None:
        """The run ended normally."""
        self._transition(RunState.FINISHED)

    def fail(self) -> None:
        """The run ended with an error (from any state: an error can happen anywhere)."""
        self.state = RunState.ERRORED

    def sync_samplers(self) -> None:
        """Push the learner's current weights to every sampler (after a build, a resume or a rollback)."""
        self._sync()

    # ---- the recipe -----------------------------------------------------------------------
    def step(self) -> StepReport:
        """One RL step; returns its metrics."""
        self._transition(RunState.RUNNING)
        t = {"start": time.perf_counter()}
        prompts, groups, seeds = self._next_prompts()  # 1. prompts
        rollout = self._rollout(prompts, groups, seeds)  # 2. sample on rollout actors
        t["rollout"] = time.perf_counter()
        rewards, reward_metrics = self._score(rollout)  # 3. score (pool, timeouts)
        t["reward"] = time.perf_counter()
        shards, batch_metrics = self._build_shards(rollout, rewards)  # 4. advantages / pairs
        learn_metrics = self._update(shards)  # 5. base loss + NormGuard
        t["learner"] = time.perf_counter()
        self._sync()  # 6. versioned weight sync
        t["sync"] = time.perf_counter()
        self.step_idx += 1
        metrics = {**reward_metrics, **batch_metrics, **learn_metrics, **self._perf(t, len(prompts))}
        metrics["rollout/norm_ratio_mean"] = float(rollout.norm_ratio.mean())
        metrics["rollout/version_lag"] = float(self.version - 1 - rollout.versions.min()) if learn_metrics else 0.0
        return StepReport(step=self.step_idx, version=self.version, metrics=metrics)  # 7. caller logs

    # ---- 1. prompts -----------------------------------------------------------------------
    def _next_prompts(self) -> tuple[list[str], list[int], list[int]]:
        """Deterministic prompt cursor: step s uses prompt groups ``s * P .. s * P + P - 1``, group ``g``
        the prompt ``order(epoch)[g mod N]`` of the prompt set (``services.prompts``)."""
        ro = self.cfg.rollout
        prompts, groups, seeds, meta = [], [], [], []
        for j in range(ro.prompts_per_step):
            g = self.step_idx * ro.prompts_per_step + j
            prompt, row = self.prompt_set.row(g)
            for i in range(ro.group_size):
                prompts.append(prompt)
                meta.append(row)
                groups.append(g)
                seeds.append(_sample_seed(self.cfg.train.seed, self.step_idx, j * ro.group_size + i))
        self._step_metadata = meta if self.prompt_set.metadata is not None else None
        return prompts, groups, seeds

    # ---- 2. rollout -----------------------------------------------------------------------
    def _rollout(self, prompts: list[str], groups: list[int], seeds: list[int]) -> RolloutBatch:
        ro = self.cfg.rollout
        n = len(self.samplers)
        chunks = [slice(i * len(prompts) // n, (i + 1) * len(prompts) // n) for i in range(n)]
        reqs = [
            RolloutRequest(
                prompts=prompts[c],
                group_ids=groups[c],
                seeds=seeds[c],
                num_steps=ro.num_steps,
                guidance_scale=ro.guidance_scale,
                shift=ro.shift,
                sde_noise_level=ro.sde_noise_level,
                min_version=max(0, self.version - ro.max_staleness),
            )
            for c in chunks
        ]
        parts = self._parallel(
            "generate", self.samplers, reqs, name="rollout", timeout_s=self.cfg.train.rollout_timeout_s
        )
        batch = _concat_rollouts(parts)
        if batch.seeds != seeds:  # no sample lost or counted twice, also after restarts
            raise RuntimeError("rollout bookkeeping error: returned samples do not match the request")
        return batch

    def _parallel(self, method: str, actors: list, payloads: list, *, name: str, timeout_s: float) -> list:
        """Fan out one payload per actor; a failed one is retried on its own (after re-sync)."""
        from services.remote import is_actor

        if actors and is_actor(actors[0]):
            import ray

            refs = [getattr(a, method).remote(p) for a, p in zip(actors, payloads)]
            out = []
            for a, p, ref in zip(actors, payloads, refs):
                try:
                    out.append(ray.get(ref, timeout=timeout_s))
                except Exception as err:  # noqa: BLE001 - redone with the retry policy
                    log.warning("%s: %s failed (%s); redoing its share", name, method, type(err).__name__)
                    self.stats.retries += 1  # the redo below is a retry; the policy counts its own after it
                    self.stats.restarts += int(actor_gone(err))
                    out.append(self._retry(a, method, p, name=name, timeout_s=timeout_s))
            return out
        return [self._retry(a, method, p, name=name, timeout_s=timeout_s) for a, p in zip(actors, payloads)]

    def _retry(self, actor, method: str, payload, *, name: str, timeout_s: float):
        def resync() -> None:  # retried by the hook until the restarted actor answers (bounded)
            call(actor, "set_weights", self.weights_ref, self.version, timeout_s=SYNC_TIMEOUT_S)

        hook = resync if method == "generate" else None
        return call_with_retries(
            actor,
            method,
            payload,
            timeout_s=timeout_s,
            retries=self.cfg.reward.retries,
            stats=self.stats,
            name=name,
            on_actor_restart=hook,
        )

    # ---- 3. rewards -----------------------------------------------------------------------
    def _score(self, rollout: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        # whole prompt groups per scorer actor: a group-wise scorer must see every sample of a group
        starts = [0] + [i for i in range(1, len(rollout.group_ids)) if rollout.group_ids[i] != rollout.group_ids[i - 1]]
        bounds, n = [*starts, len(rollout.group_ids)], len(self.scorers)
        cuts = [bounds[i * (len(bounds) - 1) // n] for i in range(n)] + [len(rollout.group_ids)]
        chunks = [slice(cuts[i], cuts[i + 1]) for i in range(n)]
        meta = self._step_metadata
        payloads = [
            (rollout.images[c], rollout.prompts[c], rollout.group_ids[c], *([meta[c]] if meta is not None else []))
            for c in chunks
        ]
        parts = self._parallel(
            "score_batch", self.scorers, payloads, name="reward", timeout_s=self.cfg.reward.timeout_s
        )
        scores = {k: torch.cat([p[k] for p in parts]) for k in self.train_scorers}
        missing = self.required - set(scores)
        if missing:
            raise RuntimeError(
                f"required scorers {sorted(missing)} returned nothing: refusing to train on made-up rewards"
            )
        reward = combine_scores(scores, self.train_scorers)
        metrics = {"reward/mean": float(reward.mean()), "reward/std": float(reward.std())}
        metrics.update({f"reward/{k}": float(v.mean()) for k, v in scores.items()})
        metrics["perf/reward_busy_s"] = float(sum(float(p["_seconds"]) for p in parts))
        return reward, metrics

    # ---- 4. advantages / pairs ------------------------------------------------------------
    def _build_shards(self, rollout: RolloutBatch, reward: torch.Tensor) -> tuple[list[TrainBatch], dict[str, float]]:
        """The method's targets (``services.methods``), split over the learner ranks by training unit."""
        world = self.learner.world_size
        targets = self.method.targets(reward, rollout.group_ids, self.cfg)
        adv, prob = targets.advantages.float(), targets.reward_prob
        sde = rollout.states is not None

        def shard(idx: torch.Tensor, rank: int, units: tuple[int, ...], num_pairs: int = 0) -> TrainBatch:
            return TrainBatch(
                latents=rollout.latents[idx],
                prompts=[rollout.prompts[i] for i in idx],
                advantages=adv[idx],
                reward_prob=prob[idx],
                step=self.step_idx,
                rank=rank,
                shard_units=units,
                num_pairs=num_pairs,
                states=rollout.states[:, idx] if sde else None,
                log_probs=rollout.log_probs[:, idx] if sde else None,
                sigmas=rollout.sigmas if sde else None,
            )

        if targets.winners is not None:  # pair methods: a unit is a (winner, loser) pair
            parts = torch.tensor_split(torch.arange(len(targets.winners)), world)
            units = tuple(len(p) for p in parts)
            if not sum(units):
                return [], targets.metrics
            return [
                shard(torch.cat([targets.winners[p], targets.losers[p]]), r, units, num_pairs=len(p))
                for r, p in enumerate(parts)
            ], targets.metrics
        parts = torch.tensor_split(targets.train_idx, world)
        units = tuple(len(p) for p in parts)
        if not sum(units):  # e.g. Flow-GRPO with every group's rewards equal
            return [], targets.metrics
        return [shard(idx, rank, units) for rank, idx in enumerate(parts)], targets.metrics

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
        from services.remote import is_actor

        if self.samplers and is_actor(self.samplers[0]):
            import ray

            ref = self.weights_ref if isinstance(self.weights_ref, ray.ObjectRef) else ray.put(self.weights_ref)
            self.weights_ref = ref
        for s in self.samplers:
            got = call_with_retries(
                s,
                "set_weights",
                self.weights_ref,
                self.version,
                timeout_s=SYNC_TIMEOUT_S,
                retries=self.cfg.reward.retries,
                stats=self.stats,
                name="sync",
            )
            if got != self.version:
                raise RuntimeError(f"sampler reports policy v{got} after syncing v{self.version}")

    def count_learner_restarts(self, total: int) -> None:
        """This coordinator was rebuilt after ``total`` learner restarts in this run: its first step reports the
        latest one (``faults/learner_restarts`` 1), the totals all of them."""
        self.stats.learner_restarts = total
        self._fault_base["learner_restarts"] = max(total - 1, 0)

    def _perf(self, t: dict[str, float], num_samples: int) -> dict[str, float]:
        """Timings, and the fault counters: ``faults/*`` this step, ``faults_total/*`` since the run began."""
        totals = {
            "retries": self.stats.retries,
            "restarts": self.stats.restarts,
            "failures": self.stats.failures,
            "learner_restarts": self.stats.learner_restarts,
        }
        step = {k: v - self._fault_base.get(k, 0) for k, v in totals.items()}
        self._fault_base = totals
        return {
            "perf/rollout_s": t["rollout"] - t["start"],
            "perf/reward_s": t["reward"] - t["rollout"],
            "perf/learner_s": t["learner"] - t["reward"],
            "perf/sync_s": t["sync"] - t["learner"],
            "perf/samples_per_s": num_samples / max(t["sync"] - t["start"], 1e-9),
            **{f"faults/{k}": float(v) for k, v in step.items()},
            **{f"faults_total/{k}": float(v) for k, v in totals.items()},
        }

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint(self, run_dir: Path, extra: dict | None = None) -> Path:
        """Atomic learner checkpoint + coordinator state; ``checkpoints/latest`` points at it."""
        prev = self.state
        self._transition(RunState.CHECKPOINTING)
        path = run_dir / "checkpoints" / f"step_{self.step_idx:06d}"
        state = {
            "step": self.step_idx,
            "version": self.version,
            "prompt_cursor": self.step_idx * self.cfg.rollout.prompts_per_step,
            "prompt_fingerprint": self.prompt_set.fingerprint,
            "nonfinite_in_row": self.nonfinite_in_row,
            **(extra or {}),
        }
        self.learner.save(str(path), state)
        (path / "coordinator.json").write_text(json.dumps(state))
        write_manifest(path)  # last: a checkpoint without a matching manifest is not complete
        latest = run_dir / "checkpoints" / "latest"
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(path.name)
        tmp.replace(latest)
        self._transition(prev if prev != RunState.INITIALIZING else RunState.RUNNING)
        return path


def _concat_rollouts(parts: list[RolloutBatch]) -> RolloutBatch:
    def cat(name: str, dim: int = 0):
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else torch.cat(vals, dim=dim)

    return RolloutBatch(
        latents=cat("latents"),
        images=cat("images"),
        prompts=[x for p in parts for x in p.prompts],
        group_ids=cat("group_ids"),
        seeds=[s for p in parts for s in p.seeds],
        versions=cat("versions"),
        norm_ratio=cat("norm_ratio", 1),
        sigmas=parts[0].sigmas,
        states=cat("states", 1),
        log_probs=cat("log_probs", 1),
    )
