"""What ``GET /v1/models`` says about each served checkpoint: ids and what a client needs to choose
between them (the base model's family, the checkpoint's RL step, the method that trained it), never
the server's file-system paths."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from services.checkpoints import CheckpointError, resolve_checkpoint
from services.serving.config import ServeConfig
from services.serving.generator import BASE_ID

__all__ = ["ModelCard", "describe", "model_cards"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelCard:
    """One entry of ``GET /v1/models``.

    Attributes:
        id: what a request names in ``checkpoint``.
        base_model: the generator family (``digits``, ``sd3``, ``flux``).
        step: the RL step the checkpoint was taken at (``None`` for the base model or when unknown).
        method: the RL method that trained it (``loss.name`` of its run, e.g. ``diffusion_nft``).
        normguard: how NormGuard was used (``off``, ``penalty``, ``constraint``), when known.
    """

    id: str
    base_model: str
    step: int | None = None
    method: str | None = None
    normguard: str | None = None


def _normguard_mode(run_cfg: dict) -> str | None:
    ng = run_cfg.get("normguard")
    if not isinstance(ng, dict):
        return None
    if ng.get("mode") == "constraint":
        return "constraint"
    return "penalty" if float(ng.get("weight") or 0.0) > 0 else "off"


def describe(checkpoint_id: str, path: str, base_model: str) -> ModelCard:
    """A checkpoint's card from its own files: ``learner.json`` (the step) and its run's
    ``config.json`` (the method), when the checkpoint sits in a run directory
    (``<run>/checkpoints/step_N``). Whatever cannot be read is ``None``: the card never fails serving."""
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as err:
        log.warning("checkpoint %r: %s", checkpoint_id, err)
        return ModelCard(checkpoint_id, base_model)
    try:
        return _card_from_files(checkpoint_id, path, base_model, ckpt)
    except (OSError, ValueError) as err:  # an unreadable or malformed file: a card without those fields
        log.warning("checkpoint %r: %s", checkpoint_id, err)
        return ModelCard(checkpoint_id, base_model)


def _card_from_files(checkpoint_id: str, path: str, base_model: str, ckpt: Path) -> ModelCard:
    step = method = mode = None
    meta = ckpt / "learner.json"
    if meta.is_file():
        step = json.loads(meta.read_text()).get("step")
    run_cfg_path = (
        ckpt.parent.parent / "config.json" if ckpt.parent.name == "checkpoints" else Path(path) / "config.json"
    )
    if run_cfg_path.is_file():
        run_cfg = json.loads(run_cfg_path.read_text())
        method = (run_cfg.get("loss") or {}).get("name")
        mode = _normguard_mode(run_cfg)
    return ModelCard(checkpoint_id, base_model, step=step, method=method, normguard=mode)


def model_cards(cfg: ServeConfig) -> list[dict]:
    """Every served id's card, the base model first."""
    cards = [ModelCard(BASE_ID, cfg.model.kind)]
    cards += [describe(cid, path, cfg.model.kind) for cid, path in cfg.checkpoints.items()]
    return [asdict(c) for c in cards]
