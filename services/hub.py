"""The checked ``from_pretrained`` that every loader of a transformers / diffusers checkpoint calls, and the
typed device move of their models.

Generators (``services.models.pipelines``) and scorers (``services.rewards``) both read checkpoints,
so the check lives below both of them (layer 0 of ``tests/core/test_import_graph.py``'s ``LAYERS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["load_pretrained_checked", "to_device"]

M = TypeVar("M", bound=nn.Module)


def load_pretrained_checked(loader: Any, path: str | None, *, what: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path)`` with a clear error for a missing local path."""
    # Any: loader is any transformers / diffusers class, and the Auto* ones build another class than
    # themselves (AutoProcessor -> a model's processor), so no type variable can name the result.
    if not path:
        raise ValueError(f"{what}: needs path= (a local directory or hub id)")
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    if looks_local and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{what}: checkpoint path does not exist: {path}")
    return loader.from_pretrained(str(Path(path).expanduser()) if looks_local else path, **kwargs)


def to_device(module: M, device: torch.device | str) -> M:
    """``module.to(device)``, typed: the module itself, moved in place (``nn.Module.to`` returns ``self``).

    transformers' ``PreTrainedModel.to`` and diffusers' ``ModelMixin.to`` are wrapped in
    ``functools.wraps(nn.Module.to)``, which typeshed types as a plain callable, not a method, so a checker
    binds the device to ``self`` (an error) and loses the model's type. The call still dispatches to the
    model's own ``to``.
    """
    moved: nn.Module = module
    moved.to(device)
    return module
