"""Where an attempt starts: the state a checkpoint keeps, read once and frozen.

Every build takes one :class:`ResumeState` (``services.training.build``): the controller makes it from the
checkpoint it verified (``services.training.controller``: the newest intact one, or a rollback's target),
a standalone build (``build_coordinator``) from the run directory's newest intact checkpoint. The coordinator
starts at its step, the run's record cuts ``metrics.jsonl`` back to it, the before-training evaluation is
taken from it; nobody patches a built coordinator afterwards. (Ray Train v2 restores a run the same way,
from the one state its ``CheckpointManager`` keeps: ``_internal/execution/checkpoint/checkpoint_manager.py``,
``_maybe_load_state_from_storage``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from services.checkpoints import CheckpointStore

__all__ = ["ResumeState"]


@dataclass(frozen=True)
class ResumeState:
    """What a build resumes: ``checkpoint`` (None: a fresh start at step 0), its ``step``, the non-finite
    updates in a row, the training prompts' fingerprint and the before-training metrics it keeps; ``state``:
    all of it as the checkpoint wrote it; ``learner_restarts``: the restarts of the run so far (counted in
    the first step of a restarted attempt, ``faults/learner_restarts``)."""

    checkpoint: Path | None = None
    step: int = 0
    nonfinite_in_row: int = 0
    prompt_fingerprint: str | None = None
    before: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    state: Mapping = field(default_factory=lambda: MappingProxyType({}))
    learner_restarts: int = 0

    @classmethod
    def of(cls, checkpoint: Path | None, *, learner_restarts: int = 0) -> ResumeState:
        """Read from ``checkpoint``'s ``coordinator.json`` (the state the learner keeps beside its weights)."""
        if checkpoint is None:
            return cls(learner_restarts=learner_restarts)
        state = CheckpointStore.state(checkpoint)
        return cls(
            checkpoint=checkpoint,
            step=state.get("step", 0),
            nonfinite_in_row=state.get("nonfinite_in_row", 0),
            prompt_fingerprint=state.get("prompt_fingerprint"),
            before=MappingProxyType(dict(state.get("before", {}))),
            state=MappingProxyType(state),
            learner_restarts=learner_restarts,
        )
