"""Typed value objects exchanged by the core (P5): frozen dataclasses, shapes documented.

Shape glossary used throughout ``normguard_core``:
    B  batch (samples), T  sampling steps, P  preference pairs, *D  per-sample data dims
    (``(C, H, W)`` for images / latents, ``(L, C)`` for packed FLUX tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["LossOutput", "PairResult", "StepResult", "Trajectory"]


@dataclass(frozen=True)
class LossOutput:
    """A scalar objective and its detached, namespaced metrics.

    Attributes:
        loss: ``()`` differentiable scalar.
        metrics: name -> ``()`` detached tensor; names are namespaced (``loss/...``,
            ``normguard/...``). Services log them, the core never does (P19).
        terms: name -> ``()`` differentiable scalar: named parts already included in ``loss``
            that a caller may back-propagate on their own (``"normguard"``: the weighted
            NormGuard term, for an optimiser that keeps it out of Adam's momentum).
        norm_ratio: ``(B,)`` detached per-sample ``||v_theta|| / ||v_ref||`` that NormGuard measured
            (``metrics.norm_ratio``), for callers that bin or log it without recomputing it; ``None``
            when the objective had no reference velocity.
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    terms: dict[str, Tensor] = field(default_factory=dict)
    norm_ratio: Tensor | None = None


@dataclass(frozen=True)
class StepResult:
    """One sampler step.

    Attributes:
        x_next: ``(B, *D)`` state at ``sigma_next``.
        mean: ``(B, *D)`` mean of the transition (equals ``x_next`` for the ODE step).
        std: ``(B,)`` per-sample std of the transition (zero for the ODE step).
        log_prob: ``(B,)`` Gaussian log-density of ``x_next`` averaged over ``*D``
            (Flow-GRPO's per-dimension mean convention), or ``None`` for the ODE step.
    """

    x_next: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor | None = None


@dataclass(frozen=True)
class Trajectory:
    """A full sampling trajectory from sigma = 1 down to the last grid value.

    Attributes:
        x0: ``(B, *D)`` final sample.
        sigmas: ``(T + 1,)`` the grid that was integrated, decreasing.
        states: ``(T + 1, B, *D)`` states x at each grid value (``states[0]`` is the noise)
            or ``None`` when not recorded.
        velocities: ``(T, B, *D)`` velocities used at each step, or ``None``.
        norms: ``(T, B)`` per-sample L2 norm of the velocity used at each step.
        log_probs: ``(T, B)`` SDE step log-probs, or ``None`` for ODE sampling.
        noises: ``(T, B, *D)`` the SDE noise drawn at each step, or ``None``.
    """

    x0: Tensor
    sigmas: Tensor
    norms: Tensor
    states: Tensor | None = None
    velocities: Tensor | None = None
    log_probs: Tensor | None = None
    noises: Tensor | None = None


@dataclass(frozen=True)
class PairResult:
    """Winner / loser pairs for preference losses, with ties counted, never hidden (P14).

    Attributes:
        winners: ``(P,)`` long indices into the batch.
        losers: ``(P,)`` long indices into the batch.
        num_groups: number of prompt groups seen.
        num_ties: groups skipped because their best and worst rewards were within ``min_gap``.
    """

    winners: Tensor
    losers: Tensor
    num_groups: int
    num_ties: int

    @property
    def num_pairs(self) -> int:
        """Number of pairs formed."""
        return int(self.winners.numel())
