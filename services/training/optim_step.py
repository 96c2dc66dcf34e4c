"""One optimiser step of the data-parallel learner: all-reduce, clip, AdamW (or SplitAdamW).

Gradients are averaged over all workers with one all-reduce of the flattened gradient over the
Ray Train process group (gloo on CPU, NCCL on GPU): DDP's arithmetic, done explicitly so that
shards of unequal size cannot deadlock (each shard's loss was pre-scaled by 1 / the global point
count). A non-finite value on any worker skips the step on every worker. Every tensor a collective
reduces lives on the model's device: NCCL reduces CUDA tensors only (gloo reduces CPU ones), so the
step's finite flag and the learner's CPU-side statistics (:func:`all_reduce_via`) go through it.

With a split force (constraint mode, ``normguard_core.optim.SplitAdamW``) NormGuard's gradient is
back-propagated on its own into a separate buffer, rides in the same all-reduce, is clipped on its
own to ``grad_clip`` and reaches the optimiser as ``force`` (outside Adam's first moment); the
base gradient is clipped as the sources clip it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from normguard_core.optim import SplitAdamW

__all__ = ["OptimStep", "all_reduce_via"]


def all_reduce_via(device: torch.device | str) -> Callable[[Tensor], None]:
    """``dist.all_reduce`` (sum, in place) of a tensor kept on the CPU, reduced on ``device``: NCCL reduces
    CUDA tensors only. On a CPU device the tensor itself is reduced (``Tensor.to`` returns it: no copy)."""

    def reduce(t: Tensor) -> None:
        moved = t.to(device)
        dist.all_reduce(moved)
        if moved is not t:
            t.copy_(moved)

    return reduce


class OptimStep:
    """The optimiser of ``params`` and its step across ranks."""

    def __init__(
        self,
        params: list[Tensor],
        *,
        lr: float,
        weight_decay: float,
        grad_clip: float,
        split_force: bool,
        distributed: bool,
    ) -> None:
        self.params, self.grad_clip, self.distributed = params, grad_clip, distributed
        opt_cls = SplitAdamW if split_force else torch.optim.AdamW
        self.opt = opt_cls(params, lr=lr, weight_decay=weight_decay)
        self.force = [torch.zeros_like(p) for p in params] if split_force else None
        self.count = 0  # optimiser steps taken (the sources' global_step: drives the lag schedules)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        for f in self.force or []:
            f.zero_()

    def backward_force(self, force: Tensor) -> None:
        """Back-propagate the NormGuard term alone into the force buffer (``.grad`` is left as it was)."""
        grads = torch.autograd.grad(force, self.params, retain_graph=True, allow_unused=True)
        for acc, g in zip(self.force, grads):
            if g is not None:
                acc.add_(g)

    def apply(self) -> float | None:
        """All-reduce, clip and step; the gradient norm, or ``None`` (and no step) when any worker saw a
        non-finite value."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.flatten() for g in grads + (self.force or [])])
        finite = torch.tensor([float(torch.isfinite(flat).all())], device=flat.device)  # NCCL: a CUDA tensor
        if self.distributed:
            dist.all_reduce(flat)  # the per-shard gradients were pre-scaled by 1 / global points
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            self.zero_grad()
            return None
        parts = list(torch.split(flat, [t.numel() for t in grads + (self.force or [])]))
        for p, g, part in zip(self.params, grads, parts):
            p.grad = part.view_as(g).clone()
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        if self.force is None:
            self.opt.step()
        else:
            force = [part.view_as(f).clone() for f, part in zip(self.force, parts[len(grads) :])]
            force_norm = float(torch.linalg.vector_norm(torch.stack([f.norm() for f in force])))
            if force_norm > self.grad_clip:
                for f in force:
                    f.mul_(self.grad_clip / force_norm)
            self.opt.step(force=force)
        self.count += 1
        return norm
