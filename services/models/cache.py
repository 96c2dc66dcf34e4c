"""The embedded tasks' model cache: one directory per setting, written once and published atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["BUILD_THREADS", "build_once", "default_cache_dir", "pinned_threads"]

# The colour task's assets are built on one torch thread: a CPU reduction splits over the threads, so 2 000
# pretraining steps on two threads end in another base model than on one (docs/tasks/colour.md, the sweep's run
# log: FD 86.5 against 78.8 at step 0). One thread gives the same model on any core count of one machine, not on
# another CPU (its instruction set picks other kernels: 4.99 / 5.61 / 6.20 colour_pref at step 0 on three): a testbed
# that must be the same everywhere is committed as its weights (services.assets).
BUILD_THREADS = 1


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block, the previous count restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
