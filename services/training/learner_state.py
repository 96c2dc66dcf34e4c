"""A learner's checkpoint, with no pickle a reader has to trust.

* ``weights.safetensors``: the trainable weights (all that serving and export read);
* ``learner_state.safetensors``: the old / EMA copies, torch's RNG state and the constraint's
  multipliers;
* ``optimizer.pt``: the optimiser's state dict, tensors and numbers only (read back with
  ``weights_only=True``);
* ``learner.json``: step, version, numpy's and Python's RNG states and ``extra``.

The directory is written under a temporary name and renamed into place (atomic).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from services.checkpoints import WEIGHTS, load_weights

__all__ = ["load_learner", "save_learner"]


def save_learner(learner, path: str | Path, extra: dict | None = None) -> Path:
    """Write the learner's state atomically to ``path``, with no pickle a reader has to trust.

    * ``weights.safetensors``: the trainable weights (all that serving and export read);
    * ``learner_state.safetensors``: the old / EMA copies, torch's RNG state and the constraint's
      multipliers;
    * ``optimizer.pt``: the optimiser's state dict, tensors and numbers only (read back with
      ``weights_only=True``);
    * ``learner.json``: step, version, numpy's and Python's RNG states and ``extra``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    save_file(learner.gen.trainable_state_dict(), tmp / WEIGHTS)
    state = {f"old.{i}": t.detach().cpu().contiguous() for i, t in enumerate(learner.copies.old)}
    state.update({f"ema.{i}": t.detach().cpu().contiguous() for i, t in enumerate(learner.copies.ema or [])})
    state["rng.torch"] = torch.get_rng_state()
    state.update(learner.bins.state_dict())
    save_file(state, tmp / "learner_state.safetensors")
    torch.save(learner.optim.opt.state_dict(), tmp / "optimizer.pt")
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    meta = {
        "step": learner.optim.count,
        "version": learner.version,
        "rng": {
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [py_version, list(py_state), py_gauss],
        },
        "extra": extra or {},
    }
    (tmp / "learner.json").write_text(json.dumps(meta))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_learner(learner, path: str | Path) -> dict:
    """Restore from :meth:`save` (nothing is unpickled); returns its ``extra``."""
    from safetensors.torch import load_file

    path = Path(path)
    learner.gen.load_trainable_state_dict(load_weights(path))
    state = load_file(path / "learner_state.safetensors")
    learner.optim.opt.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    dev = learner.params[0].device if learner.params else "cpu"
    learner.copies.old = [state[f"old.{i}"].to(dev) for i in range(len(learner.copies.old))]
    if learner.copies.ema is not None and "ema.0" in state:
        learner.copies.ema = [state[f"ema.{i}"].to(dev) for i in range(len(learner.copies.ema))]
    meta = json.loads((path / "learner.json").read_text())
    torch.set_rng_state(state["rng.torch"])
    kind, keys, pos, has_gauss, gauss = meta["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    py_version, py_state, py_gauss = meta["rng"]["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    learner.optim.count, learner.version = meta["step"], meta["version"]
    learner.bins.load_state_dict(state)
    return meta["extra"]
