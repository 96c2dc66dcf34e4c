"""Checkpoint integrity: a manifest of sizes and checksums, written last, verified on load.

A checkpoint directory (``checkpoints/step_N``) is complete only once ``manifest.json`` lists every
file in it with its size and SHA-256; it is written after the learner state and the coordinator
state, and ``checkpoints/latest`` is switched to the directory only after that. On resume the
checkpoint ``latest`` names is verified; a partial or corrupt one (a truncated ``learner.pt``, a lost
file) is reported by path and the run falls back to the newest intact checkpoint, or stops with the
same message when ``train.on_corrupt_checkpoint: stop``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

__all__ = ["CheckpointError", "MANIFEST", "latest_intact", "verify_checkpoint", "write_manifest"]

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


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
