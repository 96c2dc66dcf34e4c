"""Refresh deploy/torch-wheel.lock.json: what the GPU image's torch wheel needs from CUDA.

    python deploy/refresh_torch_lock.py           # rewrite the lock
    python deploy/refresh_torch_lock.py --check   # exit 1 if the lock differs from what pip resolves now

Asks pip which wheel ``pip install torch==<constraints.txt's pin>`` would take for the GPU image
(deploy/Dockerfile's python3.N, linux x86_64) with ``pip install --dry-run --report``, through
whatever package index and find-links pip is configured with here (no ``--isolated``, no
``--index-url``), and records the wheel's name, hash and CUDA requirements from its metadata. It
needs pip to reach an index that has torch's CUDA wheel; tests/deploy only read the lock (offline)
and fail when it is stale (its torch differs from the pin) or when deploy/Dockerfile's CUDA base
image does not match it. Run it after changing the torch pin, then commit the lock.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "deploy" / "torch-wheel.lock.json"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
PLATFORM = "manylinux_2_28_x86_64"
CUDA_REQ = re.compile(r"^(cuda-|nvidia-)[\w.-]*", re.I)


def torch_pin() -> str:
    """The version constraints.txt pins torch to (``torch==X``)."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    (version,) = [m.group(1) for line in lines if (m := re.match(r"torch==(\S+)", line.strip()))]
    return version


def image_python() -> str:
    """The Python the GPU image installs (``python3.N`` in deploy/Dockerfile), as ``3.N``."""
    m = re.search(r"python3\.(\d+)", DOCKERFILE.read_text())
    if not m:
        sys.exit(f"{DOCKERFILE} names no python3.N")
    return f"3.{m.group(1)}"


def cuda_of(requirements: list[str]) -> str | None:
    """CUDA ``major.minor`` from a ``cuda-toolkit==M.m.p`` pin, else ``major`` from ``nvidia-*-cuNN``."""
    for r in requirements:
        if m := re.match(r"cuda-toolkit\S*==(\d+)\.(\d+)", r):
            return f"{m.group(1)}.{m.group(2)}"
    for r in requirements:
        if m := re.match(r"nvidia-[\w-]+-cu(\d+)\b", r):
            return m.group(1)
    return None


def resolve(version: str, python: str, platform: str) -> dict:
    """The lock's contents, from pip's dry-run report for ``torch==version`` on ``python`` / ``platform``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
            "--report", str(report), "--only-binary=:all:", "--platform", platform, "--python-version", python,
            f"torch=={version}",
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"pip could not resolve torch=={version} for {python} / {platform}:\n{done.stderr}")
        (item,) = json.loads(report.read_text())["install"]
    meta, info = item["metadata"], item["download_info"]
    wheel = info["url"].rsplit("/", 1)[-1]
    reqs = [r for r in meta.get("requires_dist", []) if CUDA_REQ.match(r)]
    cuda = cuda_of(reqs)
    if cuda is None:
        sys.exit(
            f"pip's configured index gives {wheel} (torch {meta['version']}), which requires no CUDA package: "
            "a CPU build, not the GPU image's wheel. Point pip at an index with torch's CUDA wheel and rerun."
        )
    hashes = info.get("archive_info", {}).get("hashes") or {}
    return {
        "about": "torch's linux wheel for deploy/Dockerfile, from its metadata; refresh: python deploy/refresh_torch_lock.py",
        "torch": version,
        "wheel_version": meta["version"],
        "python": python,
        "python_tag": f"cp{python.replace('.', '')}",
        "platform": platform,
        "wheel": wheel,
        "sha256": hashes.get("sha256"),
        "cuda": cuda,
        "cuda_requirements": reqs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the lock instead of writing it")
    ap.add_argument("--platform", default=PLATFORM, help=f"wheel platform tag (default {PLATFORM})")
    args = ap.parse_args(argv)
    lock = resolve(torch_pin(), image_python(), args.platform)
    text = json.dumps(lock, indent=2) + "\n"
    if args.check:
        if LOCK.is_file() and LOCK.read_text() == text:
            print(f"{LOCK.relative_to(ROOT)} is current: {lock['wheel']} needs CUDA {lock['cuda']}")
            return 0
        print(f"{LOCK.relative_to(ROOT)} differs from what pip resolves now:\n{text}", file=sys.stderr)
        return 1
    LOCK.write_text(text)
    print(f"wrote {LOCK.relative_to(ROOT)}: {lock['wheel']} needs CUDA {lock['cuda']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
