"""Checkpoint integrity: a manifest of sizes and checksums, written last, verified on load.

A checkpoint directory (``checkpoints/step_N``) is complete only once ``manifest.json`` lists every
file in it with its size and SHA-256; it is written after the learner state and the coordinator
state, and ``checkpoints/latest`` is switched to the directory only after that. On resume the
checkpoint ``latest`` names is verified; a partial or corrupt one (a truncated ``weights.safetensors``, a lost
file) is reported by path and the run falls back to the newest intact checkpoint, or stops with the
same message when ``train.on_corrupt_checkpoint: stop``.

:class:`CheckpointStore` is the one writer and reader of a run's ``checkpoints/`` (the role of Ray Train v2's
``CheckpointManager``, ``python/ray/train/v2/_internal/execution/checkpoint/checkpoint_manager.py``: one
object registers each checkpoint and knows the latest): it writes a checkpoint (the learner's files, then
``coordinator.json``, the manifest last, then the ``latest`` pointer, switched atomically), moves the
pointer (a rollback), and finds the checkpoint to resume from and a rollback's target.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "MANIFEST",
    "WEIGHTS",
    "latest_intact",
    "load_weights",
    "resolve_checkpoint",
    "verify_checkpoint",
    "write_manifest",
]

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
STATE = "coordinator.json"  # the run's state at the checkpoint (its step first): what a resume starts from
WEIGHTS = "weights.safetensors"  # the trainable weights: the only file serving and export read


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected (the message names the path and the problem)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> Path:
    """List every file of ``ckpt`` with its size and SHA-256, atomically, as the last write."""
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(ckpt.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    tmp = ckpt / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(ckpt / MANIFEST)
    return ckpt / MANIFEST


def verify_checkpoint(ckpt: Path) -> str | None:
    """``None`` when ``ckpt`` matches its manifest, else what is wrong (missing, size or checksum)."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the checkpoint was not finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as err:
        return f"unreadable manifest.json ({err})"
    for name, meta in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_intact(run_dir: Path, *, on_corrupt: str = "fallback") -> Path | None:
    """The checkpoint ``checkpoints/latest`` names if intact; else the newest intact one (``fallback``)
    or a :class:`CheckpointError` (``stop``). ``None`` when the run has no checkpoint yet."""
    root = run_dir / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        return None
    named = root / latest.read_text().strip()
    problem = verify_checkpoint(named) if named.is_dir() else "the directory is missing"
    if problem is None:
        return named
    message = f"checkpoint {named} is corrupt or partial: {problem}"
    if on_corrupt == "stop":
        raise CheckpointError(message + " (train.on_corrupt_checkpoint=stop)")
    for cand in sorted((p for p in root.glob("step_*") if p.is_dir() and p != named), reverse=True):
        if verify_checkpoint(cand) is None:
            log.warning("%s; resuming from the newest intact one, %s", message, cand)
            return cand
    raise CheckpointError(message + "; no intact checkpoint to fall back to")


def resolve_checkpoint(path: str | Path, step: int | None = None) -> Path:
    """A checkpoint directory from a run directory (its newest intact checkpoint, or ``step``) or
    from a checkpoint directory itself. The one place that turns what a user names into a checkpoint."""
    p = Path(path)
    root = p / "checkpoints"
    if step is not None:
        cand = root / f"step_{step:06d}"
        if not cand.is_dir():
            steps = sorted(int(c.name.split("_")[1]) for c in root.glob("step_*")) if root.is_dir() else []
            raise CheckpointError(f"{path} has no checkpoint at step {step} (it has {steps or 'none'})")
        problem = verify_checkpoint(cand)
        if problem:
            raise CheckpointError(f"checkpoint {cand} is corrupt or partial: {problem}")
        return cand
    if (root / "latest").is_file():
        found = latest_intact(p)
        assert found is not None, "latest_intact finds a checkpoint (or raises) once checkpoints/latest exists"
        return found
    if (p / WEIGHTS).is_file() or (p / "learner.pt").is_file():
        return p
    raise CheckpointError(f"no checkpoint at {path} (expected a run directory or a checkpoint with {WEIGHTS})")


def load_weights(path: str | Path, step: int | None = None) -> dict:
    """The trainable weights of a checkpoint (``weights.safetensors``); never unpickles anything.

    A directory with only a pickle (``learner.pt``, this project's format before 0.2, or a file from
    elsewhere) is refused: unpickling runs whatever code the file names.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(path, step)
    weights = ckpt / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(
            f"{ckpt} holds no {WEIGHTS}; a pickled checkpoint (learner.pt) is refused, since loading it could run "
            "arbitrary code. Re-export it from a trusted environment, or retrain with this version."
        )
    try:
        return load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is not a valid safetensors file: {err}") from None


class CheckpointStore:
    """A run directory's ``checkpoints/``: every write of a checkpoint and of the ``latest`` pointer goes
    through it. ``on_corrupt``: ``train.on_corrupt_checkpoint`` (see :func:`latest_intact`)."""

    def __init__(self, run_dir: Path, *, on_corrupt: str = "fallback") -> None:
        self.run_dir, self.root, self.on_corrupt = Path(run_dir), Path(run_dir) / "checkpoints", on_corrupt

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def save(self, step: int, state: dict, write: Callable[[str, dict], object]) -> Path:
        """``write(path, state)`` (the learner's files), then ``state`` as ``coordinator.json``, the manifest
        last (a checkpoint without a matching manifest is not complete), then ``latest`` points at it."""
        path = self.path(step)
        write(str(path), state)
        (path / STATE).write_text(json.dumps(state))
        write_manifest(path)
        self.point_latest(path)
        return path

    def point_latest(self, ckpt: Path) -> None:
        """``checkpoints/latest`` names ``ckpt``, switched atomically (a reader sees the old name or the new)."""
        latest = self.root / "latest"
        tmp = latest.with_suffix(".tmp")
        tmp.write_text(ckpt.name)
        tmp.replace(latest)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, read, not verified (a stop's short grace period; a rerun verifies)."""
        latest = self.root / "latest"
        return self.root / latest.read_text().strip() if latest.is_file() else None

    def latest_intact(self) -> Path | None:
        """The checkpoint to resume from (:func:`latest_intact`: verified, every byte read)."""
        return latest_intact(self.run_dir, on_corrupt=self.on_corrupt)

    @staticmethod
    def state(ckpt: Path) -> dict:
        """The run's state a checkpoint keeps (``coordinator.json``)."""
        return json.loads((ckpt / STATE).read_text())

    def rollback_target(self, max_step: int) -> Path | None:
        """The newest intact checkpoint of a step at or before ``max_step``; ``None`` when there is none."""
        for cand in sorted((p for p in self.root.glob("step_*") if p.is_dir()), reverse=True):
            if verify_checkpoint(cand) is not None:
                continue
            if self.state(cand)["step"] <= max_step:
                return cand
        return None
