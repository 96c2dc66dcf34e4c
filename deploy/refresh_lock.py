"""Refresh the install locks: requirements-dev.lock (CI, the README's install) and requirements.lock (both images).

    python deploy/refresh_lock.py           # rewrite both locks from pyproject.toml
    python deploy/refresh_lock.py --check   # exit 1 if a lock differs from what uv resolves now

pyproject.toml keeps ranges (an upper bound on each major the suite passes on); the locks pin one exact
version of everything installed besides torch, with the sha256 of every file of that version, so a
fresh clone next month installs what CI tested. Both come from one resolution with uv (``uv pip compile
--universal``, the way pip-tools' ``pip-compile`` writes a requirements file, for every platform and
Python >= 3.11 at once, with markers where they differ):

- ``requirements-dev.lock``: the project with its ``cluster``, ``trackers`` and ``dev`` extras;
- ``requirements.lock``: the project with ``cluster`` (``ray[default]``), resolved with the dev lock as
  its constraints, so every version the images install is one CI ran.

torch is not in either lock. Its wheel differs by machine while its version does not: the CPU wheel here
and in the CPU image, PyPI's CUDA 13 wheel in the GPU image (``deploy/torch-wheel.lock.json``, refreshed by
``deploy/refresh_torch_lock.py``), each pinned by ``constraints.txt``. Resolving the project as is would
write the CUDA wheel's ``cuda-toolkit`` / ``nvidia-*`` requirements into the lock and pull them onto CPU
machines, so torch is overridden away (``torch ; sys_platform == "never"``) and its own portable
requirements (filelock, sympy, jinja2, ...; read from the installed torch's metadata, whose version must
be the pin) are locked in its place. Install order, as ``.ci/run`` and the Dockerfiles do it::

    pip install torch==2.13.0                       # the pin, from wherever this machine gets torch
    pip install -c constraints.txt -r requirements-dev.lock
    pip install -c constraints.txt --no-deps -e .

uv reads its index from its own settings (``UV_DEFAULT_INDEX`` / ``UV_INDEX_URL``, ``uv.toml``), not from
pip's: set them where only a mirror is reachable. tests/deploy/test_lock.py reads the locks offline and
fails when one disagrees with pyproject.toml, with the other, or with constraints.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEV_LOCK = ROOT / "requirements-dev.lock"
RUNTIME_LOCK = ROOT / "requirements.lock"
PYTHON_FLOOR = "3.11"  # the lock's lowest Python (pyproject's requires-python)
NOT_PORTABLE = re.compile(r"^(cuda-|nvidia-|triton)", re.I)  # a torch requirement that only its CUDA wheel has


def torch_pin() -> str:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    (version,) = [m.group(1) for line in lines if (m := re.match(r"torch==(\S+)", line.strip()))]
    return version


def torch_requirements() -> list[str]:
    """The installed torch's own requirements that every wheel of it shares (no extras, no CUDA)."""
    pin, have = torch_pin(), md.version("torch").split("+")[0]
    if have != pin:
        sys.exit(f"installed torch is {have}, constraints.txt pins {pin}: install the pin first")
    reqs = [r for r in md.requires("torch") or [] if "extra ==" not in r]
    return sorted(r for r in reqs if not NOT_PORTABLE.match(r))


def inputs_digest() -> str:
    """sha256 of what a lock is resolved from: pyproject's requirements (core and every extra), requires-python
    and the torch pin. A lock records it; tests/deploy/test_lock.py recomputes it, so any edit to these fails
    until the locks are refreshed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    what = {
        "dependencies": project["dependencies"],
        "optional-dependencies": project.get("optional-dependencies", {}),
        "requires-python": project.get("requires-python"),
        "torch": torch_pin(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def uv() -> str:
    exe = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(exe).exists():
        sys.exit("uv is not installed (it is in the dev extra: pip install -c constraints.txt uv)")
    return exe


def compile_lock(out: Path, extras: list[str], *, tmp: Path, constraints: Path | None = None) -> None:
    """``uv pip compile`` the project with ``extras`` (and torch's portable requirements) into ``out``."""
    (tmp / "torch-requirements.in").write_text("\n".join(torch_requirements()) + "\n")
    (tmp / "overrides.txt").write_text('torch ; sys_platform == "never"\n')
    cmd = [uv(), "pip", "compile", "pyproject.toml", str(tmp / "torch-requirements.in"), "--universal"]
    cmd += ["--python-version", PYTHON_FLOOR, "--override", str(tmp / "overrides.txt"), "--no-emit-package", "torch"]
    cmd += ["--generate-hashes", "--no-header", "--quiet", "--output-file", str(out)]
    for extra in extras:
        cmd += ["--extra", extra]
    if constraints is not None:
        cmd += ["--constraint", str(constraints)]
    subprocess.run(cmd, cwd=ROOT, check=True)
    header = (
        f"# {out.name}: generated by `python deploy/refresh_lock.py` from pyproject.toml (extras: "
        f"{', '.join(extras)}); do not edit.\n# torch is installed first, pinned by constraints.txt "
        f"(torch=={torch_pin()}); its portable requirements are locked here.\n"
        f"# inputs sha256: {inputs_digest()}\n"
    )
    body = out.read_text().replace(str(tmp / "torch-requirements.in"), "torch's requirements")
    if constraints is not None:  # the same text wherever the dev lock was written (--check writes it to a temporary)
        body = body.replace(str(constraints), constraints.name)
    out.write_text(header + body)


def refresh(dev: Path, runtime: Path) -> None:
    with tempfile.TemporaryDirectory() as t:
        compile_lock(dev, ["cluster", "trackers", "dev"], tmp=Path(t))
        compile_lock(runtime, ["cluster"], tmp=Path(t), constraints=dev)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a lock is not what uv resolves now")
    args = ap.parse_args()
    if not args.check:
        refresh(DEV_LOCK, RUNTIME_LOCK)
        print(f"wrote {DEV_LOCK.name} and {RUNTIME_LOCK.name}")
        return 0
    with tempfile.TemporaryDirectory() as t:
        dev, runtime = Path(t) / DEV_LOCK.name, Path(t) / RUNTIME_LOCK.name
        refresh(dev, runtime)
        stale = [p.name for p, new in ((DEV_LOCK, dev), (RUNTIME_LOCK, runtime)) if p.read_text() != new.read_text()]
    if stale:
        print(f"stale: {', '.join(stale)} (run python deploy/refresh_lock.py and commit)")
        return 1
    print("the locks are what uv resolves now")
    return 0


if __name__ == "__main__":
    sys.exit(main())
