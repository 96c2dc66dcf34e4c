"""AdamW with a second gradient that acts in its own step only: a constraint force without momentum.

Why (measured, issue #18): with NormGuard's hinge inside the loss, Adam's first moment keeps
pushing the velocity norm down for many optimiser steps after the hinge has gone quiet. On AWM
(one optimiser step per RL step) the hinge was active at one RL step, with a fraction of a
percent of the loss; the norm ratio then kept falling from 0.99 to 0.955 over the next ten RL
steps with the hinge exactly zero, and a multiplier 100x smaller gave the same curve (Adam
normalises a lone force to a full-size step). A constraint whose multiplier is adapted on the
measured ratio cannot correct a force it no longer applies.

``SplitAdamW.step(force=...)`` therefore takes the gradient of the loss without the force (the
base method's, through Adam unchanged) and the force's gradient separately::

    m  <- b1 m + (1 - b1) g                       (first moment: the base gradient only)
    v  <- b2 v + (1 - b2) (g + f)^2               (second moment: everything that moves theta)
    theta <- theta (1 - lr wd) - lr (m / (1 - b1^t) + f) / (sqrt(v / (1 - b2^t)) + eps)

With ``f = 0`` this is ``torch.optim.AdamW`` (same arithmetic, same state names, so checkpoints of
either load into the other). The force moves theta in the step it is computed, at Adam's scale
(its preconditioner sees it), and stops when the force does. With ``b1 = 0`` it is Adam on the
sum ``g + f``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import overload

import torch
from torch import Tensor

__all__ = ["SplitAdamW"]


class SplitAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) plus a momentum-free second gradient."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @overload
    def step(self, closure: None = None, force: Sequence[Tensor | None] | None = None) -> None: ...

    @overload  # torch's closure form, kept for the Optimizer signature: it raises
    def step(self, closure: Callable[[], float], force: Sequence[Tensor | None] | None = None) -> float: ...

    @torch.no_grad()
    def step(  # noqa: D417
        self, closure: Callable[[], float] | None = None, force: Sequence[Tensor | None] | None = None
    ) -> float | None:
        """One step; ``force`` is one tensor (or ``None``) per parameter, in ``param_groups`` order.

        Args:
            closure: unsupported (kept for the ``Optimizer`` signature); must be ``None``.
            force: the force's gradient per parameter (``None``: no force on this step).
        """
        if closure is not None:
            raise ValueError("SplitAdamW does not take a closure")
        params = [p for group in self.param_groups for p in group["params"]]
        if force is not None and len(force) != len(params):
            raise ValueError(f"force has {len(force)} tensors for {len(params)} parameters")
        i = 0
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                f = force[i] if force is not None else None
                i += 1
                if p.grad is None and f is None:
                    continue
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                moved = g if f is None else g + f
                v.mul_(b2).addcmul_(moved, moved, value=1 - b2)
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bc1)
                if f is not None:
                    p.add_((f / denom).clamp_(-1.0, 1.0), alpha=-lr)  # at most one full Adam step per element
        return None
