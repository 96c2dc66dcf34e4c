"""What an actor reports about its own process: peak memory, and the dtype and device of its weights.

:func:`probe_process` runs inside the actor (a rollout sampler, a scorer, a learner rank: their ``probe``
methods and the learner's ``probe`` command), so the figures are that process's own:

* ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of the process's current CUDA device (PyTorch's
  memory-management notes, https://pytorch.org/docs/stable/notes/cuda.html#memory-management). Under Ray an
  actor given a (fractional) GPU sees it as ``cuda:0`` (Ray sets ``CUDA_VISIBLE_DEVICES``); a Ray Train worker's
  current device is set by Ray Train (``ray.train.torch.get_device``).
* the peak resident set size of the process, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux,
  getrusage(2)): the figure a CPU run shows.

Reading changes nothing a run computes: no allocation, no random draw, and no CUDA initialisation in a process
that has not initialised CUDA (then the CUDA figures are 0 and ``device`` is ``"cpu"``); the peaks are not reset.

Limits: the CUDA peaks are the caching allocator's (PyTorch tensors; the CUDA context, NCCL's buffers and
library workspaces allocated outside it are not counted; ``reserved`` includes the allocator's cache). Actors
sharing one GPU each report their own share. The RSS peak is the process's since it started, libraries included,
and ``ru_maxrss`` is in KiB on Linux only (bytes on macOS).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ActorProbe", "probe_process"]

MIB = 2**20


@dataclass(frozen=True)
class ActorProbe:
    """One actor process's report.

    Attributes:
        device: the CUDA device the CUDA figures are for (``"cuda:0"``), or ``"cpu"`` where the process has not
            initialised CUDA.
        peak_allocated_mb: ``torch.cuda.max_memory_allocated`` in MiB (0 on CPU).
        peak_reserved_mb: ``torch.cuda.max_memory_reserved`` in MiB (0 on CPU).
        peak_rss_mb: the process's peak resident set in MiB.
        trainable: the distinct ``"dtype@device"`` of the model's trainable parameters, sorted (empty without one).
        frozen: the same for its frozen parameters.
    """

    device: str
    peak_allocated_mb: float
    peak_reserved_mb: float
    peak_rss_mb: float
    trainable: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def peak_mb(self) -> float:
        """The peak a table shows: CUDA memory allocated on a GPU, the resident set on CPU."""
        return self.peak_allocated_mb if self.on_cuda else self.peak_rss_mb


def _placement(module: nn.Module | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(trainable, frozen)``: the distinct ``dtype@device`` of ``module``'s parameters."""
    if module is None:
        return (), ()
    groups: dict[bool, set[str]] = {True: set(), False: set()}
    for p in module.parameters():
        groups[p.requires_grad].add(f"{str(p.dtype).removeprefix('torch.')}@{p.device}")
    return tuple(sorted(groups[True])), tuple(sorted(groups[False]))


def probe_process(module: nn.Module | None = None) -> ActorProbe:
    """This process's peak memory, and where ``module``'s parameters live (``module``: e.g. the transformer)."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    device, allocated, reserved = "cpu", 0.0, 0.0
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # never initialise CUDA just to read it
        index = torch.cuda.current_device()
        device = f"cuda:{index}"
        allocated = torch.cuda.max_memory_allocated(index) / MIB
        reserved = torch.cuda.max_memory_reserved(index) / MIB
    trainable, frozen = _placement(module)
    return ActorProbe(device, allocated, reserved, rss_mb, trainable, frozen)
