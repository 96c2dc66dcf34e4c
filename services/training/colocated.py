"""The samplers of ``resources.placement: hybrid``: the learner workers themselves.

:class:`ColocatedRollouts` stands where the list of RolloutSampler actors stands in separate placement
(the coordinator's ``samplers``, the experience source's fan-out, the evaluation's sampler 0), as one
plain object. A rollout request is split into one share per learner rank and sampled on every rank at
once (``LearnerGroup.generate``), each on its own device with the sampling policy swapped into its own
model (``Learner.sampling``); evaluation samples are made on rank 0. The learner already holds the
policy, so a weight sync only confirms the version: nothing is shipped after an update.

What the samples are does not depend on the placement: each sample's noise comes from its own seed and
the policy is the same old copy separate samplers are sent, so a hybrid run trains on the samples a
separate one would (``tests/services/test_colocated.py``).

Errors of the learner group are :class:`~services.training.remote.Unrecoverable`: a rank that failed
while sampling has taken its worker group down, so the share is not retried; a lost worker is
restarted from a checkpoint by the run's failure policy, samplers included.
"""

from __future__ import annotations

from services.training.experience import concat_rollouts, split_request
from services.types import RolloutBatch, RolloutRequest

__all__ = ["ColocatedRollouts"]


class ColocatedRollouts:
    """The sampler interface (``generate``, ``eval_samples``, ``set_weights``, ``get_version``) over a
    learner group whose workers sample (a ``LearnerGroup`` started hybrid, or a ``LocalLearner``)."""

    def __init__(self, learner, *, timeout_s: float) -> None:
        self.learner, self.timeout_s = learner, timeout_s

    def generate(self, req: RolloutRequest) -> RolloutBatch:
        """One share per learner rank, sampled on all ranks at once; the parts in request order."""
        shares = split_request(req, self.learner.world_size)
        return concat_rollouts(self.learner.generate(shares, timeout_s=self.timeout_s))

    def eval_samples(self, prompts: list[str], **kwargs) -> dict:
        """Fixed-noise evaluation samples (``RolloutSampler.eval_samples``) on learner rank 0."""
        return self.learner.eval_samples(prompts, timeout_s=self.timeout_s, **kwargs)

    def set_weights(self, state, version: int) -> int:
        """Nothing to load: the learner holds the policy. Returns the version it holds."""
        return self.learner.version

    def get_version(self) -> int:
        return self.learner.version
