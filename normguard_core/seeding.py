"""Every seed derived from a run's seed, in one place.

A run has one seed (``train.seed``, or a request's seed when serving). Every other random
stream is drawn from a seed derived from it by one of the functions below, and the constants name
the streams, so two streams never meet by accident and a new one is added here, next to the others.

* :func:`derive_seed` / :func:`rng` - the default: ``hash((seed, *parts)) % 2**63``. Python salts the
  hash of ``str`` and ``bytes`` only (``PYTHONHASHSEED``); that of a tuple of ints is the same in every
  process and on every machine, so a learner in another process draws the same points.
  Streams: the training points of ``(step, rank, epoch)``; the mini-batch order, whose epoch part is
  ``MINIBATCH_STREAM + epoch``; the constraint probes, whose last part is ``PROBE_STREAM``.
* :func:`offset_seed` - ``seed + offset``: the streams whose seeds are the seed shifted by a constant:
  each sample's SDE noise of step ``k`` (:func:`sde_noise_offset`), the digits judge and realism
  detector (``JUDGE_STREAM``, ``REALISM_STREAM``), the base-model samples the realism detector is
  trained against (``FAKE_SAMPLES_STREAM + chunk``).
* :func:`prompt_order_seed` and :func:`sample_noise_seed` - two linear mixers for the prompt order of
  an epoch and the noise seed of each rollout sample.

The derivations differ for history only: the published figures were drawn with them, and changing one
changes every number of a run. Keep each stream on its derivation; add new streams with
:func:`derive_seed` and a named constant.
"""

from __future__ import annotations

import torch

__all__ = [
    "FAKE_SAMPLES_STREAM",
    "JUDGE_STREAM",
    "MINIBATCH_STREAM",
    "PROBE_STREAM",
    "REALISM_STREAM",
    "SDE_NOISE_STREAM",
    "derive_seed",
    "offset_seed",
    "prompt_order_seed",
    "rng",
    "sample_noise_seed",
    "sde_noise_offset",
]

MINIBATCH_STREAM = 1_000
"""Added to the epoch part of the training points' seed for the mini-batch order of that epoch."""
PROBE_STREAM = 7
"""Last part of the seed of the constraint probes (after the mini-batch's first row)."""
SDE_NOISE_STREAM = 1_000
"""Per-sample SDE noise of step ``k``: the sample's seed plus ``SDE_NOISE_STREAM * (k + 1)``."""
JUDGE_STREAM, REALISM_STREAM = 1, 2
"""The digits judge and realism detector train from the scorers' seed plus these (the proxy: plus 0)."""
FAKE_SAMPLES_STREAM = 100
"""The base-model samples of the realism detector, chunk ``i``: the seed plus ``FAKE_SAMPLES_STREAM + i``."""

_SEED_MODULUS = 2**63  # torch.Generator.manual_seed takes any int64 >= 0
_PRIME_SEED, _PRIME_STEP = 1_000_003, 10_007  # the linear mixers' multipliers
_SAMPLE_SEED_MODULUS = 2**31 - 1  # a rollout sample's seed is a positive int32


def derive_seed(seed: int, *parts: int) -> int:
    """``hash((seed, *parts)) % 2**63``: the seed of the stream ``parts`` of run seed ``seed``.

    Args:
        seed: the run's seed.
        parts: ints naming the stream (e.g. ``step, rank, epoch``); a named constant marks a stream.

    Returns:
        An int in ``[0, 2**63)``, the same in every process.
    """
    return hash((seed, *parts)) % _SEED_MODULUS


def rng(seed: int, *parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` ``(seed, *parts)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def offset_seed(seed: int, *offsets: int) -> int:
    """``seed + sum(offsets)``: a stream that is the seed shifted by a constant (see the module docstring)."""
    return seed + sum(offsets)


def sde_noise_offset(step: int) -> int:
    """The offset of a sample's SDE noise at sampler step ``step`` (0-based): ``SDE_NOISE_STREAM * (step + 1)``."""
    return SDE_NOISE_STREAM * (step + 1)


def prompt_order_seed(seed: int, epoch: int) -> int:
    """``(seed * 1_000_003 + epoch) % 2**63``: the seed of a prompt set's order in ``epoch``.

    A linear mixer kept because the published figures were drawn with it (see the module docstring).
    """
    return (seed * _PRIME_SEED + epoch) % _SEED_MODULUS


def sample_noise_seed(seed: int, step: int, index: int) -> int:
    """``(seed * 1_000_003 + step * 10_007 + index) % (2**31 - 1)``: the noise seed of rollout sample
    ``index`` of RL step ``step``.

    A linear mixer kept because the published figures were drawn with it (see the module docstring).
    """
    return (seed * _PRIME_SEED + step * _PRIME_STEP + index) % _SAMPLE_SEED_MODULUS
