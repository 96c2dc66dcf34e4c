"""The install locks (issue: "installs that still work next month"), read offline.

``requirements-dev.lock`` (CI, the README's install) and ``requirements.lock`` (both images) are written by
``deploy/refresh_lock.py`` from pyproject.toml's ranges. Each test is a way a lock and its inputs drift
apart: pyproject edited without a refresh, a pin outside its range, a dependency the lock lacks, the two
locks disagreeing, a CUDA wheel's requirements locked for CPU machines, an installer that does not use the
lock, a range with no upper bound. The checks run on planted drifts too, so each one is seen failing.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEV_LOCK, RUNTIME_LOCK = ROOT / "requirements-dev.lock", ROOT / "requirements.lock"
SELF = "normguard"
NOT_LOCKED = {"torch"}  # pinned by constraints.txt, installed first (deploy/refresh_lock.py says why)


def _refresh_module():
    spec = importlib.util.spec_from_file_location("refresh_lock", ROOT / "deploy" / "refresh_lock.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_lock(text: str) -> dict[str, list[tuple[Version, str]]]:
    """``name -> [(version, marker text)]``: one entry per line ``name==version [; marker]`` (hash lines,
    comments and ``# via`` annotations skipped); a name has several entries where markers split it."""
    pins: dict[str, list[tuple[Version, str]]] = {}
    for line in text.splitlines():
        if not line or line[0] in " #-":
            continue
        req = Requirement(line.rstrip(" \\"))
        (spec,) = req.specifier
        assert spec.operator == "==", f"not an exact pin: {line}"
        pins.setdefault(canonicalize_name(req.name), []).append((Version(spec.version), str(req.marker or "")))
    return pins


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extras: list[str]) -> list[Requirement]:
    """pyproject's core requirements and those of ``extras`` (self-references expanded), torch left out."""
    proj, out, seen = project(), [], set()
    todo = [Requirement(r) for r in proj["dependencies"]]
    todo += [Requirement(r) for e in extras for r in proj["optional-dependencies"][e]]
    while todo:
        req = todo.pop()
        if canonicalize_name(req.name) == SELF:
            todo += [Requirement(r) for e in req.extras for r in proj["optional-dependencies"][e]]
        elif str(req) not in seen:
            seen.add(str(req))
            out.append(req)
    return [r for r in out if canonicalize_name(r.name) not in NOT_LOCKED]


def disagreements(pins: dict, reqs: list[Requirement]) -> list[str]:
    """Each requirement the lock lacks, or pins outside its range (every marker branch of it)."""
    bad = []
    for req in reqs:
        entries = pins.get(canonicalize_name(req.name))
        if not entries:
            bad.append(f"{req.name}: not in the lock")
            continue
        bad += [
            f"{req.name}=={v} ({m or 'all'}) is outside {req.specifier}"
            for v, m in entries
            if not req.specifier.contains(v, prereleases=True)
        ]
    return bad


def test_the_locks_were_made_from_this_pyproject():
    """Any edit to pyproject's requirements, requires-python or the torch pin fails here until
    ``python deploy/refresh_lock.py`` is rerun (the digest of those inputs is in each lock's header)."""
    digest = _refresh_module().inputs_digest()
    for lock in (DEV_LOCK, RUNTIME_LOCK):
        recorded = re.search(r"^# inputs sha256: ([0-9a-f]{64})$", lock.read_text(), re.M)
        assert recorded, f"{lock.name} records no inputs digest: refresh it"
        assert recorded.group(1) == digest, f"{lock.name} is stale: python deploy/refresh_lock.py, then commit it"


def test_every_requirement_is_pinned_inside_its_range():
    dev = parse_lock(DEV_LOCK.read_text())
    assert disagreements(dev, requirements(["cluster", "trackers", "dev"])) == []
    runtime = parse_lock(RUNTIME_LOCK.read_text())
    assert disagreements(runtime, requirements(["cluster"])) == []


def test_the_images_install_only_versions_ci_ran():
    """requirements.lock is resolved with the dev lock as its constraints: every pin is the dev lock's."""
    dev, runtime = parse_lock(DEV_LOCK.read_text()), parse_lock(RUNTIME_LOCK.read_text())
    assert runtime and set(runtime) <= set(dev), sorted(set(runtime) - set(dev))
    for name, entries in runtime.items():
        assert {v for v, _ in entries} <= {v for v, _ in dev[name]}, (name, entries, dev[name])


def test_no_lock_carries_torch_or_a_cuda_wheel():
    """torch's CUDA wheel's cuda-toolkit / nvidia-* / triton would be pulled onto every CPU machine."""
    for lock in (DEV_LOCK, RUNTIME_LOCK):
        names = set(parse_lock(lock.read_text()))
        assert "torch" not in names and not [n for n in names if re.match(r"(cuda-|nvidia-|triton)", n)], lock.name
        assert {"sympy", "jinja2", "filelock", "networkx", "fsspec"} <= names, f"{lock.name}: torch's own deps"


def test_every_pin_carries_its_hashes():
    text = DEV_LOCK.read_text()
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 3)[3])
    assert blocks and all("--hash=sha256:" in b for b in blocks if "==" in b)


def test_every_range_has_an_upper_bound():
    """Lower bounds only resolve to whatever is newest next month: each range stops at the next major."""
    loose = []
    for req in requirements(["cluster", "trackers", "dev"]) + [Requirement(r) for r in project()["dependencies"]]:
        if not any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier):
            loose.append(str(req))
    assert loose == [], loose


def test_the_torch_pin_is_inside_pyprojects_range():
    pin = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    (torch,) = [Requirement(r) for r in project()["dependencies"] if Requirement(r).name == "torch"]
    assert Version(pin) in torch.specifier


def test_ci_the_readme_and_both_images_install_from_the_lock():
    """The same three steps everywhere: torch (the pin), the lock with constraints.txt, the project --no-deps."""
    uses = {
        ".ci/run": (ROOT / ".ci" / "run").read_text(),
        "README.md": (ROOT / "README.md").read_text(),
        "deploy/Dockerfile": (ROOT / "deploy" / "Dockerfile").read_text(),
        "deploy/Dockerfile.cpu": (ROOT / "deploy" / "Dockerfile.cpu").read_text(),
    }
    for where, text in uses.items():
        lock = "requirements-dev.lock" if where in (".ci/run", "README.md") else "requirements.lock"
        assert re.search(rf"pip install[^\n]*-c constraints\.txt[^\n]*-r {re.escape(lock)}", text), where
        assert re.search(r"pip install[^\n]*--no-deps[^\n]*-e", text), f"{where}: the project without --no-deps"
        unlocked = re.findall(r"pip install[^\n]*-e \"?\.(?:\[[\w,]+\])?\"?(?![\w-])", text)
        assert [u for u in unlocked if "--no-deps" not in u] == [], f"{where} resolves the project's ranges: {unlocked}"


def test_the_checks_fail_on_planted_drift():
    """Each drift the tests above guard against, planted in a copy of the lock, is caught."""
    text = DEV_LOCK.read_text()
    reqs = requirements(["cluster", "trackers", "dev"])
    ray = next(r for r in reqs if r.name.startswith("ray"))
    moved = re.sub(r"^ray==[\d.]+", "ray==3.0.0", text, flags=re.M)
    assert any("ray==3.0.0" in d for d in disagreements(parse_lock(moved), reqs)), ray
    dropped = re.sub(r"^diffusers==.*$", "", text, flags=re.M)
    assert "diffusers: not in the lock" in disagreements(parse_lock(dropped), reqs)
    with pytest.raises(AssertionError, match="exact pin"):
        parse_lock("ray>=2.60\n")


def test_the_locked_ray_is_every_manifests_ray_version():
    """KubeRay starts the image's Ray with the manifest's rayVersion: they must be the same release."""
    (ray,) = {v for lock in (DEV_LOCK, RUNTIME_LOCK) for v, _ in parse_lock(lock.read_text())["ray"]}
    versions = {
        m.group(1) for p in (ROOT / "k8s").glob("*.yaml") for m in re.finditer(r'rayVersion: "?([\d.]+)', p.read_text())
    }
    assert versions == {str(ray)}, (versions, ray)
