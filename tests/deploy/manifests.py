"""Shared readers of the project's KubeRay manifests, configs and Dockerfiles (tests/deploy)."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
K8S = ROOT / "k8s"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


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
