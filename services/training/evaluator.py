"""The evaluation of a training run's policy: ``services.evaluation.evaluate`` on sampler 0 and scorer 0.

Built with the worker group (``services.training.build``) and handed to the controller, so the run's
reporting never reaches into the coordinator's samplers or scorers: after a restart or a rollback the new
build brings its own evaluator, calling its own workers through their pools. Its scorer calls (the scores,
the judge's features) follow ``reward.retries`` with backoff as a step's reward calls do
(``services.training.remote.call_with_retries``), counted in the run's fault counters; the sampling call is
not retried (a restarted sampler would hold its initial weights, not the policy under evaluation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.training.remote import CallStats, call_with_retries
from services.training.workers import Pool

if TYPE_CHECKING:
    from services.config import ExperimentConfig

__all__ = ["RunEvaluator"]


class RunEvaluator:
    """Fixed-noise evaluation samples of ``data.eval_prompts`` (or the training prompts in file order),
    scored by the training scorers and the evaluation-only ones (``eval_names``)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        samplers: Pool,
        scorers: Pool,
        eval_set,
        eval_names: list[str],
        stats: CallStats | None = None,
    ) -> None:
        self.cfg, self.eval_set, self.eval_names = cfg, eval_set, list(eval_names)
        self.samplers, self.scorers = samplers, scorers
        self.stats = stats if stats is not None else CallStats()  # the coordinator's, from the build
        self.train_scorers = {s.name: s.weight for s in cfg.reward.scorers}

    def __call__(self, *, renormalize: bool = False) -> tuple[dict, dict, dict]:
        """``(metrics, ratio per step, images)``; the set-level metrics in the digit judge's features for
        the embedded default. ``renormalize``: the inference-time baseline (v rescaled to ||v_ref||)."""
        from services.evaluation import EvalPlan, Evaluator, evaluate

        cfg, ev, eval_set = self.cfg, self.cfg.eval, self.eval_set
        k = min(ev.num_prompts, len(eval_set))
        plan = EvalPlan(
            prompts=eval_set.prompts[:k],
            samples_per_prompt=ev.samples_per_prompt,
            steps=(ev.few_steps, ev.full_steps),
            scorers=(*self.train_scorers, *self.eval_names),
            guidance_scale=ev.guidance_scale,
            shift=cfg.rollout.shift,
            metadata=eval_set.metadata[:k] if eval_set.metadata else None,
        )
        features, real = self._features()
        res = evaluate(plan, Evaluator(self._sample, self._score, features, real), renormalize=renormalize)
        return res.metrics, res.ratio_per_step, res.images

    def _sample(self, prompts, n, guidance, shift, seed, renorm):
        kw = dict(num_steps=n, guidance_scale=guidance, shift=shift, seed=seed, renormalize=renorm)
        sampler, timeout = self.samplers.members[0], self.cfg.train.rollout_timeout_s
        return self.samplers.call(sampler, "eval_samples", prompts, timeout_s=timeout, **kw)

    def _score(self, images, prompts, groups, meta):
        kw = dict(group_ids=groups, metadata=meta)
        return self._scorer_call("score", images, prompts, timeout_s=self.cfg.reward.timeout_s, **kw)

    def _scorer_call(self, method: str, *args, timeout_s: float, **kwargs):
        """Scorer 0's ``method`` with ``reward.retries`` retries, as a step's reward calls (``experience``)."""
        scorer = self.scorers.members[0]
        return call_with_retries(
            scorer,
            method,
            *args,
            timeout_s=timeout_s,
            retries=self.cfg.reward.retries,
            stats=self.stats,
            name="eval_reward",
            caller=self.scorers.call,
            **kwargs,
        )

    def _features(self):
        """The embedded task's judge features and its held-out real images (digits: ``digits_judge`` against
        the held-out digits; colour: ``colour_judge`` against 1024 held-out scenes); else ``(None, None)``."""
        from services.config.families import spec
        from services.prepare import embedded_task

        judge = spec(self.cfg.model.kind).judge
        if judge is None or judge not in self.eval_names:
            return None, None
        real = embedded_task(self.cfg.model.kind).real_images(self.cfg.model.resolution)
        timeout = self.cfg.train.rollout_timeout_s

        def features(images):
            return self._scorer_call("features", judge, images, timeout_s=timeout)

        return features, real
