"""A cached asset directory as a committed archive: the testbed is its weights, not its build command.

The colour task's base model is built by 2 000 CPU training steps, and their float rounding depends on the
machine: the thread count and the instruction set pick other kernels, and four builds of the same code and seeds
gave base models whose ``colour_pref`` reads 4.37 to 6.20 at step 0 (docs/tasks/colour.md, the sweep's run log).
A sweep that runs over several sessions on several machines therefore loads one set of weights instead of
rebuilding them: ``pack`` writes a cache directory (``$NORMGUARD_CACHE/colour-<key>``) as a deterministic
``.tar.gz`` plus a ``.sha256`` manifest of its *content* (every file's bytes and relative path, so the digest does
not depend on tar or gzip versions), and ``unpack`` puts it back into the cache only when the content matches
the manifest, and refuses to overwrite a cached directory that holds other weights.

    python -m services.assets pack ~/.cache/normguard/colour-47f5e4c6e841 --out docs/tasks/colour_sweep/assets/
    python -m services.assets unpack docs/tasks/colour_sweep/assets/colour-47f5e4c6e841.tar.gz
    python -m services.assets digest ~/.cache/normguard/colour-47f5e4c6e841
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from services.models.cache import default_cache_dir

__all__ = ["COMMITTED", "AssetMismatch", "digest", "pack", "restore_committed", "unpack"]

# The committed testbeds (docs/tasks/colour.md, testbed v3); absent where the package is installed without docs/
COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "tasks" / "colour_sweep" / "assets"


class AssetMismatch(RuntimeError):
    """The content differs from its manifest, or a cached directory of that name holds other weights."""


def digest(root: str | Path) -> str:
    """SHA-256 over ``relative/path NUL sha256(file) LF`` of every regular file under ``root``, sorted."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{root}: no files to digest")
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root).as_posix()}\0{hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def _manifest(archive: Path) -> Path:
    return archive.with_name(archive.name.removesuffix(".tar.gz") + ".sha256")


def pack(src: str | Path, out_dir: str | Path) -> Path:
    """``out_dir/<name>.tar.gz`` of directory ``src`` (sorted, mtime 0, owner 0: the same bytes on every run)
    and ``out_dir/<name>.sha256`` holding ``digest(src)``; returns the archive."""
    src, out_dir = Path(src), Path(out_dir)
    if not (src / "meta.json").is_file():
        raise FileNotFoundError(f"{src}: not a built cache directory (no meta.json)")
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{src.name}.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in [src, *sorted(src.rglob("*"))]:
            info = tar.gettarinfo(p, arcname=(Path(src.name) / p.relative_to(src)).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if p.is_dir() else 0o644
            if p.is_file():
                with p.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    archive.write_bytes(gzip.compress(buf.getvalue(), compresslevel=6, mtime=0))
    _manifest(archive).write_text(f"{digest(src)}  {src.name}\n")
    return archive


def unpack(archive: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Extract ``archive`` into ``cache_dir`` (default ``$NORMGUARD_CACHE``) after checking its content against
    the manifest beside it; a directory already there is kept when its content is the same and refused
    (:class:`AssetMismatch`) when it is not. Returns the cached directory."""
    archive = Path(archive)
    want, name = _manifest(archive).read_text().split()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / name
    if target.exists():
        return _same_as(target, want)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".unpack-{name}-"))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(tmp, filter="data")  # no absolute paths, links out of tmp or device files
        got = digest(tmp / name)
        if got != want:
            raise AssetMismatch(f"{archive}: content sha256 {got[:12]} is not the manifest's {want[:12]}")
        try:
            os.replace(tmp / name, target)
        except OSError:  # another process published it first (as build_once): keep theirs if it is the same
            return _same_as(target, want)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _same_as(target: Path, want: str) -> Path:
    """``target`` when its content digest is ``want``; :class:`AssetMismatch` naming both when it is not."""
    have = digest(target)
    if have != want:
        raise AssetMismatch(
            f"{target} holds other weights (sha256 {have[:12]}, the archive's {want[:12]}): a local build of "
            "the same settings on another machine; move it aside, or set NORMGUARD_CACHE to another directory"
        )
    return target


def restore_committed(target: Path, log: Callable[[str], None] = print) -> bool:
    """Unpack the committed archive of cache directory ``target`` (same name) if there is one and ``target`` is
    not built yet; a local build with other weights is kept and named in a warning (its runs are not the
    committed testbed's). Returns whether ``target`` now holds the committed content."""
    archive = COMMITTED / f"{target.name}.tar.gz"
    if not archive.is_file():
        return False
    try:
        unpack(archive, target.parent)
    except AssetMismatch as err:
        warnings.warn(f"{err}; its runs are not on the committed testbed ({archive})", stacklevel=2)
        return False
    want = _manifest(archive).read_text().split()[0]  # unpack checked the content against it
    log(f"{target}: the committed testbed ({archive.name}, content sha256 {want[:12]})")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.assets", description=(__doc__ or "").partition("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="a cache directory -> DIR/<name>.tar.gz + .sha256")
    pk.add_argument("src")
    pk.add_argument("--out", required=True)
    up = sub.add_parser("unpack", help="an archive -> $NORMGUARD_CACHE/<name>, checked against its manifest")
    up.add_argument("archive")
    up.add_argument("--cache-dir", default=None)
    dg = sub.add_parser("digest", help="the content SHA-256 of a directory")
    dg.add_argument("src")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        print(pack(args.src, args.out))
    elif args.cmd == "unpack":
        print(unpack(args.archive, args.cache_dir))
    else:
        print(digest(args.src))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
