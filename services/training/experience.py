"""Experience of one RL step: prompts -> rollout on the samplers -> rewards on the scorers.

:class:`ExperienceSource` produces it now (:meth:`~ExperienceSource.produce`, the synchronous loop)
or ahead of the learner (:meth:`~ExperienceSource.submit`, the asynchronous pipeline): the rollout
calls are *submitted* in the caller's thread, so each sampler runs them in a fixed order with the
weight syncs the coordinator submits afterwards (Ray executes one caller's calls to an actor in
submission order), and a background thread waits for them, redoes a failed share and scores the
result. Which policy version made a sample is therefore decided by the order of the calls, not by
timing: a pipelined run is as deterministic as a synchronous one.

A redone share (a sampler died or was restarted) is first re-synced to the policy that was current
when the share was submitted (``pinned``), so the redo reproduces the samples exactly: same seeds,
same weights, same version tag.

The samplers and scorers come as pools (``services.training.workers``): on plain objects
(:class:`~services.training.workers.LocalPool`) a call is made at once and :meth:`submit` computes at
once; the samples are the same as on actors because they are made with the same weights.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from normguard_core.seeding import sample_noise_seed
from services.rewards.base import combine_scores
from services.training.remote import CallStats, actor_gone, call_with_retries, until_answered
from services.types import RolloutBatch, RolloutRequest, ScoreRequest, ScoreResult

if TYPE_CHECKING:
    from services.config import ExperimentConfig
    from services.training.workers import Pool

__all__ = ["Experience", "ExperienceSource", "ExperienceSpec", "PolicyRef", "concat_rollouts", "split_request"]

log = logging.getLogger(__name__)
SYNC_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class PolicyRef:
    """A policy the samplers can be set to: its weights (a dict, or a Ray object ref of one) and version."""

    weights: Any
    version: int


@dataclass(frozen=True)
class ExperienceSpec:
    """What producing experience needs from the config (built once, at the service edge)."""

    prompts_per_step: int
    group_size: int
    seed: int
    num_steps: int
    guidance_scale: float
    shift: float | None  # None: the generator family's grid
    sde_noise_level: float
    rollout_timeout_s: float
    reward_timeout_s: float
    sampler_retries: int
    reward_retries: int
    train_weights: tuple[tuple[str, float], ...]  # (scorer, weight) of the training reward
    required: frozenset[str]

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> ExperienceSpec:
        ro, rw = cfg.rollout, cfg.reward
        return cls(
            prompts_per_step=ro.prompts_per_step,
            group_size=ro.group_size,
            seed=cfg.train.seed,
            num_steps=ro.num_steps,
            guidance_scale=ro.guidance_scale,
            shift=ro.shift,
            sde_noise_level=ro.sde_noise_level,
            rollout_timeout_s=cfg.train.rollout_timeout_s,
            reward_timeout_s=rw.timeout_s,
            sampler_retries=cfg.train.sampler_retries,
            reward_retries=rw.retries,
            train_weights=tuple((s.name, s.weight) for s in rw.scorers),
            required=frozenset(s.name for s in rw.scorers if s.required),
        )


@dataclass(frozen=True)
class Experience:
    """One RL step's scored samples.

    Attributes:
        step: the RL step (0-based) whose prompts these are.
        rollout: the samples, each tagged with the policy version that made it.
        rewards: ``(B,)`` the combined training reward.
        metrics: ``reward/*`` and the producer's timings (``perf/rollout_s``, ``perf/reward_s``, ...).
    """

    step: int
    rollout: RolloutBatch
    rewards: Tensor
    metrics: dict[str, float]


@dataclass(frozen=True)
class _Share:
    """One member's part of a fan-out: the payload and the submitted call's handle (its pool's)."""

    actor: Any
    payload: Any
    handle: Any = None


class ExperienceSource:
    """Turns RL step numbers into :class:`Experience` on a pool of samplers and scorers."""

    def __init__(
        self, spec: ExperienceSpec, *, samplers: Pool, scorers: Pool, prompt_set, stats: CallStats, learner_check=None
    ) -> None:
        """``learner_check``: raises when the learner group is lost (``LearnerGroup.check``); polled while a
        restarting sampler is waited for, so a node that took a sampler and a learner worker with it ends
        the wait at once, for the run's failure policy, instead of after ``SYNC_TIMEOUT_S``."""
        self.spec, self.samplers, self.scorers, self.prompt_set, self.stats = (
            spec,
            samplers,
            scorers,
            prompt_set,
            stats,
        )
        self.learner_check = learner_check
        self._pool: Executor | None = None  # the samplers' (a background thread on actors, inline on objects)

    # ---- 1. prompts -----------------------------------------------------------------------
    def prompts(self, step: int) -> tuple[list[str], list[int], list[int], list | None]:
        """``(prompts, group ids, seeds, metadata rows)`` of RL step ``step``: group ``g = step * P + j`` is
        the prompt set's row ``g`` (``services.training.prompts``), with ``group_size`` seeded samples each."""
        sp = self.spec
        prompts, groups, seeds, meta = [], [], [], []
        for j in range(sp.prompts_per_step):
            g = step * sp.prompts_per_step + j
            prompt, row = self.prompt_set.row(g)
            for i in range(sp.group_size):
                prompts.append(prompt)
                meta.append(row)
                groups.append(g)
                seeds.append(sample_noise_seed(sp.seed, step, j * sp.group_size + i))
        return prompts, groups, seeds, (meta if self.prompt_set.metadata is not None else None)

    # ---- now, or ahead ----------------------------------------------------------------------
    def produce(self, step: int, policy: PolicyRef, *, min_version: int) -> Experience:
        """Rollout and rewards of ``step``, waited for here."""
        return self._finish(step, *self._submit_rollout(step, min_version), policy)

    def submit(self, step: int, policy: PolicyRef, *, min_version: int) -> Future:
        """Submit ``step``'s rollout now; a background thread collects and scores it (a ``Future`` of
        :class:`Experience`). ``policy`` is what the samplers hold once every call submitted before
        this one has run."""
        submitted = self._submit_rollout(step, min_version)
        if self._pool is None:
            self._pool = self.samplers.ahead()
        return self._pool.submit(self._finish, step, *submitted, policy)

    def close(self, *, wait: bool = True) -> None:
        """Stop the background thread (after the work it holds, unless ``wait`` is false)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=not wait)
            self._pool = None

    # ---- 2. rollout -------------------------------------------------------------------------
    def _submit_rollout(self, step: int, min_version: int) -> tuple[list[_Share], list[int], list | None, float]:
        sp = self.spec
        prompts, groups, seeds, meta = self.prompts(step)
        # a RolloutRequest by keyword (``duplicates`` pairs it with serving's GenerationItem: other messages)
        whole = RolloutRequest(
            prompts=prompts,
            group_ids=groups,
            seeds=seeds,
            num_steps=sp.num_steps,
            guidance_scale=sp.guidance_scale,
            shift=sp.shift,
            sde_noise_level=sp.sde_noise_level,
            min_version=min_version,
        )
        reqs = split_request(whole, len(self.samplers.members))
        t0 = time.perf_counter()  # before the fan-out: on plain objects the rollout is made inside it
        shares = self._fan_out("generate", self.samplers, reqs, name="rollout", timeout_s=sp.rollout_timeout_s)
        return shares, seeds, meta, t0

    def _finish(
        self, step: int, shares: list[_Share], seeds: list[int], meta: list | None, t0: float, policy: PolicyRef
    ) -> Experience:
        sp = self.spec
        parts = self._gather(
            "generate", self.samplers, shares, name="rollout", timeout_s=sp.rollout_timeout_s, policy=policy
        )
        rollout = concat_rollouts(parts)
        if rollout.seeds != seeds:  # no sample lost or counted twice, also after restarts
            raise RuntimeError("rollout bookkeeping error: returned samples do not match the request")
        t1 = time.perf_counter()
        rewards, metrics = self._score(rollout, meta)
        t2 = time.perf_counter()
        metrics.update({"perf/rollout_s": t1 - t0, "perf/reward_s": t2 - t1})
        return Experience(step=step, rollout=rollout, rewards=rewards, metrics=metrics)

    # ---- 3. rewards -------------------------------------------------------------------------
    def _score(self, rollout: RolloutBatch, meta: list | None) -> tuple[Tensor, dict[str, float]]:
        """Whole prompt groups per scorer actor (a group-wise scorer must see every sample of a group)."""
        gid = rollout.group_ids
        starts = [0] + [i for i in range(1, len(gid)) if gid[i] != gid[i - 1]]
        bounds, n = [*starts, len(gid)], len(self.scorers.members)
        cuts = [bounds[i * (len(bounds) - 1) // n] for i in range(n)] + [len(gid)]
        reqs = [
            ScoreRequest(
                images=rollout.images[a:b],
                prompts=rollout.prompts[a:b],
                group_ids=gid[a:b],
                metadata=meta[a:b] if meta is not None else None,
            )
            for a, b in zip(cuts[:-1], cuts[1:])
        ]
        shares = self._fan_out("score_batch", self.scorers, reqs, name="reward", timeout_s=self.spec.reward_timeout_s)
        parts: list[ScoreResult] = self._gather(
            "score_batch", self.scorers, shares, name="reward", timeout_s=self.spec.reward_timeout_s
        )
        weights = dict(self.spec.train_weights)
        scores = {k: torch.cat([p.scores[k] for p in parts]) for k in weights if all(k in p.scores for p in parts)}
        skipped = self._skipped(weights, scores, parts)
        reward = combine_scores(scores, {k: w for k, w in weights.items() if k in scores})
        metrics = {"reward/mean": float(reward.mean()), "reward/std": float(reward.std())}
        metrics["reward/skipped_scorers"] = float(len(skipped))
        metrics.update({f"reward/{k}": float(v.mean()) for k, v in scores.items()})
        metrics["perf/reward_busy_s"] = float(sum(p.seconds for p in parts))
        return reward, metrics

    def _skipped(self, weights: dict, scores: dict, parts: list[ScoreResult]) -> list[str]:
        """The training scorers without scores for the whole batch: a required one fails the step, an
        optional one (``required: false``, which failed every try in its worker) is left out of this step's
        reward, its weight with it, logged and counted (``reward/skipped_scorers``)."""
        skipped = sorted(set(weights) - set(scores))
        why = {k: v for p in parts for k, v in p.failed.items()}
        missing = sorted(self.spec.required & set(skipped))
        if missing or not scores:
            detail = "; ".join(f"{k}: {why[k]}" for k in (missing or skipped) if k in why)
            raise RuntimeError(
                f"required scorers {missing or skipped} returned nothing: refusing to train on made-up rewards"
                + (f" ({detail})" if detail else "")
            )
        for k in skipped:
            log.warning("reward: optional scorer %s left out of this step's reward (%s)", k, why.get(k, "no scores"))
        return skipped

    # ---- fan-out with the retry policy --------------------------------------------------------
    def _fan_out(self, method: str, pool: Pool, payloads: list, *, name: str, timeout_s: float) -> list[_Share]:
        """One call per member, submitted now; a pool that cannot submit (plain objects) makes the calls
        now, with the retry policy, so a sampler's weights cannot change between the request and its samples."""
        redo = partial(self._redo, method, pool, name=name, timeout_s=timeout_s)
        return [
            _Share(a, p, handle=pool.submit(a, method, p, now=partial(redo, _Share(a, p))))
            for a, p in zip(pool.members, payloads)
        ]

    def _gather(
        self, method: str, pool: Pool, shares: list[_Share], *, name: str, timeout_s: float, policy=None
    ) -> list:
        """The shares' results; a failed share is redone on its own actor with the retry policy (a
        restarted sampler first re-synced to ``policy``, the one it was asked to sample with)."""
        out = []
        for share in shares:
            try:
                out.append(pool.result(share.handle, timeout_s=timeout_s))
            except Exception as err:  # noqa: BLE001 - redone with the retry policy
                gone = actor_gone(err)
                log.warning("%s: %s failed (%s); redoing its share", name, method, type(err).__name__)
                self.stats.add(retries=1, restarts=int(gone))
                if gone and policy is not None:  # a restarted sampler holds its initial weights
                    self._resync(share.actor, policy)
                out.append(self._redo(method, pool, share, name=name, timeout_s=timeout_s, policy=policy))
        return out

    def _redo(
        self, method: str, pool: Pool, share: _Share, *, name: str, timeout_s: float, policy: PolicyRef | None = None
    ):
        hook = (lambda: self._set(share.actor, policy)) if policy is not None else None  # waited for by the policy
        return call_with_retries(
            share.actor,
            method,
            share.payload,
            timeout_s=timeout_s,
            retries=self.spec.sampler_retries if method == "generate" else self.spec.reward_retries,
            stats=self.stats,
            name=name,
            on_actor_restart=hook,
            caller=pool.call,
        )

    def _resync(self, sampler, policy: PolicyRef) -> None:
        """Set one sampler to ``policy``, waiting (bounded) for a restarting actor."""
        until_answered(lambda: self._set(sampler, policy), SYNC_TIMEOUT_S)

    def _set(self, sampler, policy: PolicyRef) -> None:
        if self.learner_check is not None:
            self.learner_check()  # LearnerLost: no retry (Unrecoverable)
        self.samplers.call(sampler, "set_weights", policy.weights, policy.version, timeout_s=SYNC_TIMEOUT_S)


def split_request(req: RolloutRequest, parts: int) -> list[RolloutRequest]:
    """``parts`` contiguous shares of a request, one per sampler (sample ``i`` keeps its prompt, group and
    seed); :func:`concat_rollouts` joins their batches back in order."""
    n = len(req.prompts)
    cuts = [slice(i * n // parts, (i + 1) * n // parts) for i in range(parts)]
    return [
        replace(req, prompts=list(req.prompts[c]), group_ids=list(req.group_ids[c]), seeds=list(req.seeds[c]))
        for c in cuts
    ]


def concat_rollouts(parts: list[RolloutBatch]) -> RolloutBatch:
    """One batch from the samplers' parts, in order."""

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
