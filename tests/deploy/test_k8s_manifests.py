"""KubeRay manifests validate offline: CRD schemas and their CEL rules, core pod templates, Serve's schema.

The CRDs (the official KubeRay v1 CRDs, not copied into the project) are read from the folder that
``$NORMGUARD_KUBERAY_CRDS`` names, else from ``.cache/kuberay-crds/`` (git-ignored) or
``../shared/kuberay-crds/`` (``manifests.find_crd_dir``); without them the CRD tests skip, naming
where they looked, and fail under ``NORMGUARD_REQUIRE_ALL=1``. Pod templates and plain Kubernetes
objects are checked against the core schemas that ``kubernetes-validate`` ships; the RayService's
serveConfigV2 against ``ServeDeploySchema``; the CRDs' ``x-kubernetes-validations`` rules are
evaluated with cel-python, as the API server would on create. Each check is shown to catch a planted
error of its kind.
"""

import copy
import shutil
import subprocess

import jsonschema
import pytest
import yaml
from conftest import skip_unless
from manifests import (
    CACHE_CRD_DIR,
    CRD_COMMIT,
    CRD_ENV,
    CRD_FILES,
    K8S,
    MANIFESTS,
    SHARED_CRD_DIR,
    all_docs,
    docs,
    find_crd_dir,
    one,
    pod_templates,
)

pytestmark = pytest.mark.unit

K8S_VERSION = "1.33"


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    folder, reason = find_crd_dir()
    skip_unless(folder is not None, reason)
    out = {}
    for name in CRD_FILES:
        crd = yaml.safe_load((folder / name).read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[crd["spec"]["names"]["kind"]] = v1["schema"]["openAPIV3Schema"]
    assert set(out) == {"RayCluster", "RayJob", "RayService"}, f"{folder}: {sorted(out)}"
    return out


def test_the_crds_are_found_where_the_variable_points_and_a_miss_says_how_to_provide_them(tmp_path, monkeypatch):
    """``$NORMGUARD_KUBERAY_CRDS`` decides when set; the reason for a miss names the place and the files."""
    crds = tmp_path / "crds"
    monkeypatch.setenv(CRD_ENV, str(crds))
    folder, reason = find_crd_dir()
    assert folder is None and f"{crds} (${CRD_ENV}" in reason and "no such folder" in reason, reason
    for text in (*CRD_FILES, CRD_COMMIT, "ray-operator/config/crd/bases", str(CACHE_CRD_DIR), str(SHARED_CRD_DIR)):
        assert text in reason, (text, reason)
    crds.mkdir()
    for name in CRD_FILES[:-1]:
        (crds / name).write_text("{}")
    folder, reason = find_crd_dir()
    assert folder is None and f"lacks {CRD_FILES[-1]}" in reason, reason
    (crds / CRD_FILES[-1]).write_text("{}")
    assert find_crd_dir() == (crds.resolve(), "")
    monkeypatch.delenv(CRD_ENV)
    folder, reason = find_crd_dir()
    if folder is None:  # neither default place holds them: the reason names both
        assert f"{CACHE_CRD_DIR} (" in reason and f"{SHARED_CRD_DIR} (" in reason, reason
    else:
        assert folder in (CACHE_CRD_DIR, SHARED_CRD_DIR) and all((folder / f).is_file() for f in CRD_FILES)


def validate_crd(doc: dict, schemas: dict[str, dict]) -> None:
    jsonschema.Draft7Validator(schemas[doc["kind"]]).validate(doc)


# ---- CEL: the CRDs' x-kubernetes-validations ---------------------------------------------------
def _cel_rules(schema: dict, value, path: str = ""):
    """Yield ``(path, rule, message, value)`` for every CEL rule whose field is present in ``value``."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule["rule"], rule.get("message", rule["rule"]), value
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                yield from _cel_rules(sub, value[key], f"{path}.{key}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, v in value.items():
                if key not in schema.get("properties", {}):
                    yield from _cel_rules(extra, v, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _cel_rules(schema["items"], item, f"{path}[{i}]")


def validate_cel(doc: dict, schemas: dict[str, dict]) -> int:
    """Evaluate every applicable rule on create (transition rules, which read ``oldSelf``, do not run
    on create); raise naming the first broken one. Returns the number of rules evaluated."""
    import celpy

    env, n = celpy.Environment(), 0
    for path, rule, message, value in _cel_rules(schemas[doc["kind"]], doc):
        if "oldSelf" in rule:
            continue
        result = env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(value)})
        n += 1
        if isinstance(result, Exception) or not bool(result):
            raise ValueError(f"{doc['kind']} {path}: {message} (rule: {rule})")
    return n


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

    for doc in docs(name):
        if doc["apiVersion"].startswith("ray.io/"):
            validate_crd(doc, crd_schemas)
            validate_cel(doc, crd_schemas)
            for _, template in pod_templates(doc):
                validate_pod_template(template)
            if doc["kind"] == "RayService":
                validate_serve_config(doc["spec"]["serveConfigV2"])
        else:
            utils.validate(doc, K8S_VERSION, strict=True)


def test_planted_crd_error_is_caught(crd_schemas):
    job = one("RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="two"):
        validate_crd(bad, crd_schemas)
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "password"
    with pytest.raises(jsonschema.ValidationError, match="password"):
        validate_crd(bad, crd_schemas)


def test_planted_cel_errors_are_caught(crd_schemas):
    """The structural schema accepts these; only the CRDs' CEL rules reject them."""
    job = one("RayJob")
    bad = copy.deepcopy(job)
    bad["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}}  # onFailure missing
    validate_crd(bad, crd_schemas)
    with pytest.raises(ValueError, match="BOTH onSuccess and onFailure"):
        validate_cel(bad, crd_schemas)
    bad = copy.deepcopy(job)
    rule = {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}
    bad["spec"]["deletionStrategy"] = {"deletionRules": [rule]}
    validate_crd(bad, crd_schemas)
    with pytest.raises(ValueError, match="cannot be used together"):
        validate_cel(bad, crd_schemas)
    bad = copy.deepcopy(one("RayCluster"))
    bad["spec"]["managedBy"] = "someone-else"
    validate_crd(bad, crd_schemas)
    with pytest.raises(ValueError, match="managedBy"):
        validate_cel(bad, crd_schemas)
    ok = copy.deepcopy(job)
    ok["spec"]["deletionStrategy"] = {
        "deletionRules": [{"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED"}}]
    }
    assert validate_cel(ok, crd_schemas) >= 2  # the list rule and the condition's two rules ran


def test_planted_pod_template_error_is_caught():
    from kubernetes_validate.utils import ValidationError

    template = copy.deepcopy(one("RayCluster")["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(ValidationError, match="volumeMount"):
        validate_pod_template(template)
    template = copy.deepcopy(one("RayCluster")["spec"]["headGroupSpec"]["template"])
    template["spec"]["containers"][0]["ports"][0]["containerPort"] = "gcs"
    with pytest.raises(ValidationError):
        validate_pod_template(template)


def test_planted_serve_config_error_is_caught():
    svc = one("RayService")
    cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    cfg["applications"][0]["deployments"][0]["max_ongoing_requests"] = -1
    with pytest.raises(Exception, match="max_ongoing_requests"):
        validate_serve_config(yaml.safe_dump(cfg))
    cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    del cfg["applications"][0]["import_path"]
    with pytest.raises(Exception, match="import_path"):
        validate_serve_config(yaml.safe_dump(cfg))


def _normalise(doc: dict, namespace: str, image: str) -> dict:
    """``doc`` as kustomize renders it: the namespace set, the image name ``normguard`` replaced."""
    out = copy.deepcopy(doc)
    if out["kind"] != "Namespace":
        out["metadata"]["namespace"] = namespace

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                if k == "image" and v == "normguard":
                    o[k] = image
                else:
                    walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    walk(out)
    return out


def test_kustomize_renders_the_objects_the_tests_check(crd_schemas):
    skip_unless(shutil.which("kubectl") is not None, "kubectl not installed")
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (img,) = kust["images"]
    image = f"{img['newName']}:{img['newTag']}"
    expected = [_normalise(d, kust["namespace"], image) for d in all_docs()]
    for d in expected:  # the storage patch
        if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "normguard-checkpoints":
            for op in kust["patches"][0]["patch"] and yaml.safe_load(kust["patches"][0]["patch"]):
                keys = op["path"].strip("/").split("/")
                tgt = d
                for k in keys[:-1]:
                    tgt = tgt[k]
                tgt[keys[-1]] = op["value"]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(expected, key=key)
    images = {c["image"] for d in rendered for _, t in pod_templates(d) for c in t["spec"]["containers"]}
    assert image in images and not any(i == "normguard" or i.endswith(":latest") for i in images), images
    for d in rendered:
        if d["apiVersion"].startswith("ray.io/"):
            validate_crd(d, crd_schemas)
