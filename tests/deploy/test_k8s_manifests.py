"""KubeRay manifests validate offline: CRD schemas, core pod templates, Ray Serve's schema.

The CRDs are read from ../shared/kuberay-crds/ (the official KubeRay v1 CRDs, not copied into
the project); pod templates are checked against the core Kubernetes schemas that
``kubernetes-validate`` ships; the RayService's serveConfigV2 against ``ServeDeploySchema``.
Each check is shown to catch a planted error of its kind.
"""

import copy
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import skip_unless

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
K8S = ROOT / "k8s"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
K8S_VERSION = "1.33"
MANIFESTS = ["rayjob-train.yaml", "rayservice-serve.yaml", "raycluster-sweeps.yaml", "storage.yaml"]


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    skip_unless(CRD_DIR.is_dir(), f"KubeRay CRDs not found at {CRD_DIR}")
    out = {}
    for f in CRD_DIR.glob("ray.io_*.yaml"):
        crd = yaml.safe_load(f.read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[crd["spec"]["names"]["kind"]] = v1["schema"]["openAPIV3Schema"]
    return out


def validate_crd(doc: dict, schemas: dict[str, dict]) -> None:
    jsonschema.Draft7Validator(schemas[doc["kind"]]).validate(doc)


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    out = [("head", cluster["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        out.append(("submitter", spec["submitterPodTemplate"]))
    return out


def validate_pod_template(template: dict) -> None:
    """Strict core-schema validation of a PodTemplateSpec (unknown fields are errors)."""
    from kubernetes_validate import utils

    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    utils.validate(wrapped, K8S_VERSION, strict=True)


def validate_serve_config(text: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(yaml.safe_load(text))


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates(name, crd_schemas):
    from kubernetes_validate import utils

    for doc in _docs(name):
        if doc["apiVersion"].startswith("ray.io/"):
            validate_crd(doc, crd_schemas)
            for _, template in _pod_templates(doc):
                validate_pod_template(template)
            if doc["kind"] == "RayService":
                validate_serve_config(doc["spec"]["serveConfigV2"])
        else:
            utils.validate(doc, K8S_VERSION, strict=True)


def test_required_settings_present():
    (job,) = _docs("rayjob-train.yaml")
    assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
    assert job["spec"]["entrypoint"].startswith("normguard train ")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" in workers["containers"][0]["resources"]["limits"]
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in workers["volumes"])  # /dev/shm
    assert any(v.get("persistentVolumeClaim") for v in workers["volumes"])  # shared checkpoints
    (cluster,) = _docs("raycluster-sweeps.yaml")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


def test_planted_crd_error_is_caught(crd_schemas):
    (job,) = _docs("rayjob-train.yaml")
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="two"):
        validate_crd(bad, crd_schemas)
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(bad, crd_schemas)


def test_planted_pod_template_error_is_caught():
    from kubernetes_validate.utils import ValidationError

    (cluster,) = _docs("raycluster-sweeps.yaml")
    template = copy.deepcopy(cluster["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(ValidationError, match="volumeMount"):
        validate_pod_template(template)
    template = copy.deepcopy(cluster["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["ports"][0]["containerPort"] = "gcs"
    with pytest.raises(ValidationError):
        validate_pod_template(template)


def test_planted_serve_config_error_is_caught():
    (svc,) = _docs("rayservice-serve.yaml")
    cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    cfg["applications"][0]["deployments"][0]["max_ongoing_requests"] = -1
    with pytest.raises(Exception, match="max_ongoing_requests"):
        validate_serve_config(yaml.safe_dump(cfg))
    cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    cfg["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] = "one"
    with pytest.raises(Exception, match="num_gpus"):
        validate_serve_config(yaml.safe_dump(cfg))
    cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    del cfg["applications"][0]["import_path"]
    with pytest.raises(Exception, match="import_path"):
        validate_serve_config(yaml.safe_dump(cfg))


def test_kustomization_renders_with_image_and_storage(crd_schemas):
    skip_unless(shutil.which("kubectl") is not None, "kubectl not installed")
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert {d["kind"] for d in docs} == {"PersistentVolumeClaim", "RayJob", "RayService", "RayCluster"}
    assert all(d["metadata"]["namespace"] == "normguard" for d in docs)
    images = {
        c["image"]
        for d in docs
        if d["apiVersion"].startswith("ray.io/")
        for _, t in _pod_templates(d)
        for c in t["spec"]["containers"]
    }
    assert images == {"CHANGE-ME.registry.example/normguard:0.1.0-cuda"}
    for d in docs:
        if d["apiVersion"].startswith("ray.io/"):
            validate_crd(d, crd_schemas)
