"""The embedded tasks' model cache: one directory per setting, written once and published atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["build_once", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$NORMGUARD_CACHE`` or ``~/.cache/normguard``."""
    return Path(os.environ.get("NORMGUARD_CACHE") or Path.home() / ".cache" / "normguard").expanduser().resolve()


def build_once(target: Path, build: Callable[[Path], dict]) -> Path:
    """``target``, built first if it holds no ``meta.json``: ``build(tmp)`` writes the files into a temporary
    directory beside it and returns the metadata, written last; the directory is then renamed into place
    (another process that finished first keeps its copy)."""
    if (target / "meta.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name.split('-')[0]}-"))
    meta = build(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
