"""Shared readers of the project's KubeRay manifests, configs and Dockerfiles (tests/deploy)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
K8S = ROOT / "k8s"
CRD_ENV = "NORMGUARD_KUBERAY_CRDS"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml")
CRD_COMMIT = "feeaf72facab4881ba2b179248bb67315634e229"  # ray-project/kuberay, 2026-08-19 (v1.7.0-rc.0 + 5)
CACHE_CRD_DIR = ROOT / ".cache" / "kuberay-crds"
SHARED_CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def find_crd_dir() -> tuple[Path | None, str]:
    """Where the KubeRay CRDs are: the folder ``$NORMGUARD_KUBERAY_CRDS`` names when it is set (then
    only there), else the first of ``.cache/kuberay-crds`` in this checkout (git-ignored) and
    ``../shared/kuberay-crds`` (CI's copy) that holds all of ``CRD_FILES``. Returns ``(folder, "")``,
    or ``(None, reason)``: every place looked, what it lacks, and how to provide the files."""
    env = os.environ.get(CRD_ENV)
    if env:
        places = [
            (Path(env).expanduser().resolve(), f"${CRD_ENV}; unset it to look in {CACHE_CRD_DIR} and {SHARED_CRD_DIR}")
        ]
    else:
        places = [(CACHE_CRD_DIR, "in this checkout, git-ignored"), (SHARED_CRD_DIR, "beside the checkout, as in CI")]
    looked = []
    for folder, label in places:
        missing = [f for f in CRD_FILES if not (folder / f).is_file()]
        if not missing:
            return folder, ""
        lacks = "no such folder" if not folder.is_dir() else "lacks " + ", ".join(missing)
        looked.append(f"{folder} ({label}): {lacks}")
    return None, (
        f"KubeRay CRDs not found. Looked in: {'; '.join(looked)}. Provide {', '.join(CRD_FILES)} from "
        f"ray-project/kuberay's ray-operator/config/crd/bases/ at commit {CRD_COMMIT}, in {CACHE_CRD_DIR} "
        f"or in a folder named by ${CRD_ENV} (README.md, 'Run the tests')"
    )


def docs(name: str, root: Path = K8S) -> list[dict]:
    return [d for d in yaml.safe_load_all((root / name).read_text()) if d]


def all_docs(root: Path = K8S) -> list[dict]:
    return [
        d
        for name in sorted(p.name for p in root.glob("*.yaml") if p.name != "kustomization.yaml")
        for d in docs(name, root)
    ]


def ray_docs(root: Path = K8S) -> list[dict]:
    return [d for d in all_docs(root) if d["apiVersion"].startswith("ray.io/")]


def one(kind: str, root: Path = K8S) -> dict:
    (doc,) = [d for d in ray_docs(root) if d["kind"] == kind]
    return doc


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def groups(doc: dict) -> list[tuple[str, dict]]:
    """``(name, group)`` for the head and every worker group of a Ray resource."""
    c = cluster_spec(doc)
    return [("head", c["headGroupSpec"])] + [(g["groupName"], g) for g in c.get("workerGroupSpecs", [])]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template of any manifest (Ray groups, a Job's, a Deployment's)."""
    if doc["apiVersion"].startswith("ray.io/"):
        out = [(name, g["template"]) for name, g in groups(doc)]
        if "submitterPodTemplate" in doc["spec"]:
            out.append(("submitter", doc["spec"]["submitterPodTemplate"]))
        return out
    if doc["kind"] in ("Job", "Deployment", "StatefulSet"):
        return [(doc["metadata"]["name"], doc["spec"]["template"])]
    return []


def mounts(template: dict) -> list[str]:
    return [m["mountPath"] for c in template["spec"]["containers"] for m in c.get("volumeMounts", [])]


def entrypoint_config(job: dict):
    """The ExperimentConfig a RayJob's ``normguard train CONFIG key=value ...`` entrypoint runs."""
    from services.config import load_config

    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["normguard", "train"], argv
    path, overrides = argv[2], argv[3:]
    return load_config(image_path(path), overrides)


def image_path(path: str) -> Path:
    """A path inside the image (``/app/...``, where the Dockerfile copies the project) in this checkout."""
    assert path.startswith("/app/"), f"{path} is not in the image's /app"
    return ROOT / path.removeprefix("/app/")
