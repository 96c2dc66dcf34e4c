"""The checked ``from_pretrained`` that every loader of a transformers / diffusers checkpoint calls.

Generators (``services.models.pipelines``) and scorers (``services.rewards``) both read checkpoints,
so the check lives below both of them (layer 0 of ``tests/core/test_import_graph.py``'s ``LAYERS``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["load_pretrained_checked"]


def load_pretrained_checked(loader, path: str | None, *, what: str, **kwargs):
    """``loader.from_pretrained(path)`` with a clear error for a missing local path."""
    if not path:
        raise ValueError(f"{what}: needs path= (a local directory or hub id)")
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists()
    if looks_local and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{what}: checkpoint path does not exist: {path}")
    return loader.from_pretrained(str(Path(path).expanduser()) if looks_local else path, **kwargs)
