"""Checks that a GPU cluster could run the manifests the first time (issue: "Kubernetes that works").

Each test is a fact a platform engineer would otherwise learn from a stuck or failed job:
the GPUs a config asks for against the nodes its resource has (the computation of ``normguard
plan``), token auth on every Ray resource, every path a config reads mounted in every pod that reads
it, the offline flags in every actor's environment, deadlines and a short TTL, serving that can
scale and survive its head, non-root pods on GPU nodes, a GPU image whose CUDA matches its torch
wheel (the CUDA pins of the wheel's metadata, recorded in deploy/torch-wheel.lock.json by
deploy/refresh_torch_lock.py; the test reads only the lock), and a deploy README that names every
Secret, volume and image the manifests use. Each check fails on the manifests before this issue.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from manifests import ROOT, all_docs, cluster_spec, entrypoint_config, groups, image_path, mounts, one, pod_templates

from services.cluster.plan import nodes_from_manifest, plan_run, run_demand, serve_demand
from services.config import load_config
from services.sweeps.config import load_sweep

pytestmark = pytest.mark.unit

GPU_CONFIGS = sorted(  # the embedded tasks (digits, colour) run on CPU from packaged data, not on the cluster's GPUs
    p for p in (ROOT / "deploy" / "configs").glob("*.yaml") if not p.name.startswith(("digits", "colour"))
)
SD35 = ROOT / "deploy" / "configs" / "sd35_medium_nft.yaml"


def _serve_config(svc: dict) -> tuple[dict, dict]:
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    path = app["runtime_env"]["env_vars"]["NORMGUARD_SERVE_CONFIG"]
    return serve, yaml.safe_load(image_path(path).read_text())


# ---- 1. demand against capacity --------------------------------------------------------------
def test_the_rayjob_holds_its_entrypoint_config_and_every_gpu_config():
    job = one("RayJob")
    nodes = nodes_from_manifest(job)
    entry = entrypoint_config(job)
    configs = [entry] + [load_config(p, []) for p in GPU_CONFIGS]
    for cfg in configs:
        plan = plan_run(run_demand(cfg), nodes)
        assert plan.ok, f"{cfg.train.run_name}: {plan.unplaced}"


def test_the_sweep_cluster_holds_its_concurrent_trials():
    cluster = one("RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True  # max replicas are reachable
    sweep = load_sweep(ROOT / "deploy" / "sweeps" / "sd35_medium.yaml")
    trial = load_config(None, [f"{k}={json.dumps(v)}" for k, v in sweep.base.items()])
    demand = run_demand(trial) * sweep.max_concurrent_trials
    plan = plan_run(demand, nodes_from_manifest(cluster))
    assert plan.ok, plan.unplaced


def test_the_rayservice_can_grow_to_its_serve_replicas():
    svc = one("RayService")
    serve, _ = _serve_config(svc)
    spec = cluster_spec(svc)
    assert spec.get("enableInTreeAutoscaling") is True, "Serve autoscales replicas, but no autoscaler adds pods"
    plan = plan_run(serve_demand(serve), nodes_from_manifest(svc))
    assert plan.ok, plan.unplaced
    gpus_at_max = sum(d.gpus * d.count for d in serve_demand(serve))
    group_gpus = sum(n.gpus * n.count for n in nodes_from_manifest(svc))
    assert group_gpus >= gpus_at_max


def test_gpu_configs_train_from_prompt_files_and_fit_the_cluster_description():
    from services.cluster.plan import nodes_from_file
    from services.training.prompts import load_prompt_file

    nodes = nodes_from_file(ROOT / "deploy" / "clusters" / "two_8gpu_nodes.yaml")
    for p in GPU_CONFIGS:
        cfg = load_config(p, [])
        assert cfg.data.train_prompts and cfg.data.eval_prompts, f"{p.name} trains on an inline list"
        train = load_prompt_file(image_path(cfg.data.train_prompts))
        held_out = load_prompt_file(image_path(cfg.data.eval_prompts))
        assert len(train) >= cfg.rollout.prompts_per_step and not set(train.prompts) & set(held_out.prompts)
        plan = plan_run(run_demand(cfg), nodes)
        assert plan.ok and not plan.warnings, (p.name, plan.unplaced, plan.warnings)


def test_the_hybrid_placement_fits_the_sd35_recipe_on_one_node_where_separate_samplers_do_not():
    """``resources.placement: hybrid``: the learners sample, so the samplers' GPUs are not asked for."""
    from services.cluster.plan import nodes_from_file

    one_node = nodes_from_file(ROOT / "deploy" / "clusters" / "one_8gpu_node.yaml")
    separate, hybrid = (
        load_config(SD35, []),
        load_config(ROOT / "deploy" / "configs" / "sd35_medium_nft_hybrid.yaml", []),
    )
    assert hybrid.resources.placement == "hybrid" and hybrid.train.pipeline == "sync"
    assert hybrid.samples_per_step == separate.samples_per_step and hybrid.model == separate.model
    assert not plan_run(run_demand(separate), one_node).ok
    plan = plan_run(run_demand(hybrid), one_node)
    assert plan.ok and not plan.warnings, (plan.unplaced, plan.warnings)
    demand = {a.role: a for a in run_demand(hybrid)}
    assert demand["sampler"].count == 0 and plan.totals() == (32, 8)
    assert demand["learner"].memory_gb == {a.role: a for a in run_demand(separate)}["learner"].memory_gb


def test_a_cluster_too_small_is_reported_not_waited_for():
    """The check itself: the old RayJob (16 GPUs) against the old SD3.5 config (18 GPUs)."""
    job = one("RayJob")
    cfg = load_config(SD35, ["rollout.num_samplers=8"])
    plan = plan_run(run_demand(cfg), nodes_from_manifest(job))
    assert not plan.ok and all(u.startswith("scorer") for u in plan.unplaced), plan.unplaced


# ---- 2. authentication -----------------------------------------------------------------------
def test_every_ray_resource_has_token_auth():
    for doc in all_docs():
        if doc["apiVersion"].startswith("ray.io/"):
            auth = cluster_spec(doc).get("authOptions") or {}
            assert auth.get("mode") == "token", doc["metadata"]["name"]
            assert auth.get("secretName"), "a fixed Secret name, so the README can tell users where the token is"


# ---- 3. paths and offline flags --------------------------------------------------------------
def _abs_paths(cfg) -> set[str]:
    paths = {str(cfg.train.output_dir), *(p for p in (cfg.data.train_prompts, cfg.data.eval_prompts) if p)}
    if cfg.model.path:
        paths.add(cfg.model.path)
    for s in (*cfg.reward.scorers, *cfg.reward.eval_scorers):
        paths |= {s.path} if s.path else set()
        paths |= {v for v in s.options.values() if isinstance(v, str)}  # processor_path, base
    return {p for p in paths if p.startswith("/")}


def _mounted(path: str, template: dict) -> bool:
    if path.startswith("/app/"):  # baked into the image by the Dockerfile's COPY of deploy/
        return image_path(path).exists()
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts(template))


def test_every_path_a_config_reads_is_mounted_where_it_is_read():
    job = one("RayJob")
    cfg = entrypoint_config(job)
    paths = _abs_paths(cfg)
    assert paths, "the config names no path"
    for name, template in pod_templates(job):
        for p in paths:
            assert _mounted(p, template), f"{p} is not mounted in the RayJob's {name} pods"
    svc = one("RayService")
    _, scfg = _serve_config(svc)
    serve_paths = {scfg["model"]["path"], *scfg["checkpoints"].values()}
    for name, template in pod_templates(svc):
        for p in serve_paths:
            assert _mounted(p, template), f"{p} is not mounted in the RayService's {name} pods"
    # the run directory the serve config reads is the one the training config writes
    assert str(cfg.run_dir) in set(scfg["checkpoints"].values())


def test_the_models_the_configs_read_are_staged_on_the_volume():
    (stage,) = [d for d in all_docs() if d["kind"] == "Job"]
    (script,) = stage["spec"]["template"]["spec"]["containers"][0]["args"]
    root = re.search(r"^M=(\S+)$", script, re.M).group(1)
    staged = {f"{root}/{d}" for d in re.findall(r"^fetch \S+ (\S+)", script, re.M)}
    for p in GPU_CONFIGS:
        cfg = load_config(p, [])
        scorers = (*cfg.reward.scorers, *cfg.reward.eval_scorers)
        reads = {cfg.model.path} | {s.path for s in scorers if s.path}
        reads |= {v for s in scorers for v in s.options.values() if isinstance(v, str) and v.startswith("/")}
        missing = {r for r in reads if r.startswith(root)} - staged
        assert not missing, f"{p.name} reads {missing}, which k8s/stage-models.yaml does not stage"
        assert all(r.startswith(root) for r in reads), f"{p.name} reads from outside the staged models: {reads}"
    assert "HF_TOKEN" in json.dumps(stage)  # gated models need the token Secret


def test_offline_flags_reach_every_actor():
    job = one("RayJob")
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]  # a Ray job's runtime env reaches every actor
    assert env.get("HF_HUB_OFFLINE") == "1"
    serve, _ = _serve_config(one("RayService"))
    assert serve["applications"][0]["runtime_env"]["env_vars"].get("HF_HUB_OFFLINE") == "1"
    for doc in all_docs():
        if doc["apiVersion"].startswith("ray.io/"):
            for name, t in pod_templates(doc):
                env = {e["name"]: e.get("value") for c in t["spec"]["containers"] for e in c.get("env", [])}
                assert env.get("HF_HUB_OFFLINE") == "1", f"{doc['metadata']['name']} {name}"


# ---- 4. lifecycle ----------------------------------------------------------------------------
def test_the_rayjob_has_deadlines_a_short_ttl_and_resumable_retries():
    spec = one("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 300
    assert spec.get("activeDeadlineSeconds", 0) > 0 and spec.get("preRunningDeadlineSeconds", 0) > 0
    assert spec.get("backoffLimit", 0) >= 1  # a retry resumes from the newest checkpoint on the volume
    assert spec.get("submissionMode") == "SidecarMode"  # no second multi-GB image pull for the submitter
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("restartPolicy") == "Never"


def test_serving_survives_its_head_and_uses_no_deprecated_fields():
    svc = one("RayService")
    spec = svc["spec"]
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & spec.keys()
    ft = cluster_spec(svc).get("gcsFaultToleranceOptions") or {}
    host = ft.get("redisAddress", "").split(":")[0]
    services = {d["metadata"]["name"] for d in all_docs() if d["kind"] == "Service"}
    assert host in services, f"GCS fault tolerance needs a Redis the manifests deploy, got {host!r}"
    head = cluster_spec(svc)["headGroupSpec"]["template"]
    assert "/dev/shm" in mounts(head)
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in head["spec"]["volumes"])


def test_sweep_cluster_uses_autoscaler_v2_and_keeps_work_off_the_head():
    spec = one("RayCluster")["spec"]
    assert spec["autoscalerOptions"].get("version") == "v2"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"


# ---- 5. pods ---------------------------------------------------------------------------------
def test_pods_run_as_non_root_on_gpu_nodes_with_spill_space():
    for doc in all_docs():
        for name, t in pod_templates(doc):
            pod = t["spec"]
            assert pod.get("securityContext", {}).get("runAsNonRoot") is True, f"{doc['metadata']['name']} {name}"
            for c in pod["containers"]:
                sc = c.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False and "ALL" in sc.get("capabilities", {}).get(
                    "drop", []
                )
                limits = c.get("resources", {}).get("limits", {})
                if "nvidia.com/gpu" in limits:
                    assert pod.get("nodeSelector"), (
                        f"{doc['metadata']['name']} {name}: GPU pods need a GPU node selector"
                    )
                if doc["apiVersion"].startswith("ray.io/"):
                    assert "ephemeral-storage" in c["resources"].get("requests", {}), "object spilling needs disk"


# ---- 6. images -------------------------------------------------------------------------------
def _dockerfile(name: str) -> str:
    return (ROOT / "deploy" / name).read_text()


LOCK = ROOT / "deploy" / "torch-wheel.lock.json"


def _pin(text: str) -> str:
    """The torch version a pip line or constraints file pins (``torch==X``)."""
    (version,) = set(re.findall(r"\btorch==([\w.+]+)", text))
    return version


def _cuda_of(requirements: list[str]) -> tuple[int, int] | None:
    """CUDA (major, minor) of a ``cuda-toolkit==M.m.p`` pin, else (major, -1) of ``nvidia-*-cuNN``."""
    m = next(
        (re.match(r"cuda-toolkit\S*==(\d+)\.(\d+)", r) for r in requirements if r.startswith("cuda-toolkit")), None
    )
    if m:
        return int(m.group(1)), int(m.group(2))
    m = next(
        (re.match(r"nvidia-[\w-]+-cu(\d+)\b", r) for r in requirements if re.match(r"nvidia-[\w-]+-cu\d", r)), None
    )
    return (int(m.group(1)), -1) if m else None


def test_the_torch_lock_is_the_pinned_torch_for_the_gpu_images_python():
    """deploy/torch-wheel.lock.json (deploy/refresh_torch_lock.py) describes the wheel the image installs:
    a stale lock (another torch than constraints.txt's or the Dockerfile's) or another Python fails."""
    lock = json.loads(LOCK.read_text())
    text = _dockerfile("Dockerfile")
    pin = _pin((ROOT / "constraints.txt").read_text())
    assert _pin(text) == pin, f"deploy/Dockerfile installs torch {_pin(text)}, constraints.txt pins {pin}"
    assert lock["torch"] == pin, f"the lock is for torch {lock['torch']}, the pin is {pin}: refresh it"
    assert lock["wheel_version"].split("+")[0] == pin and lock["wheel"].startswith(f"torch-{lock['wheel_version']}-")
    python = re.search(r"python3\.(\d+)", text)
    assert python and lock["python"] == f"3.{python.group(1)}", f"the image's python3.N against {lock['python']}"
    tags = lock["wheel"].removesuffix(".whl").split("-")[-3:]
    assert tags[:2] == [lock["python_tag"]] * 2 and tags[2] == lock["platform"], lock["wheel"]
    assert lock["platform"].endswith("_x86_64") and re.fullmatch(r"[0-9a-f]{64}", lock["sha256"] or "")


def test_gpu_image_cuda_matches_its_torch_wheel():
    """The base image's CUDA against the CUDA pins in the wheel's metadata, as the lock records them."""
    text = _dockerfile("Dockerfile")
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    tag = re.search(r"(?:cuda:|-cu)(\d+)\.?(\d)?", base)
    assert tag, f"the GPU base image {base} names no CUDA version"
    lock = json.loads(LOCK.read_text())
    wheel = _cuda_of(lock["cuda_requirements"])
    assert wheel is not None, "the torch wheel declares no CUDA dependency: a CPU wheel in the GPU image"
    assert lock["cuda"] == ".".join(str(v) for v in wheel if v >= 0), (lock["cuda"], lock["cuda_requirements"])
    assert int(tag.group(1)) == wheel[0], f"base {base} is CUDA {tag.group(1)}, torch's wheel needs CUDA {wheel[0]}"
    if tag.group(2) is not None and wheel[1] >= 0:
        assert int(tag.group(2)) == wheel[1], f"base {base}: CUDA minor {tag.group(2)}, wheel {wheel}"


def test_the_cuda_check_reads_the_pins_it_is_given():
    """The parser the image check relies on, on the two spellings torch's wheels have used."""
    assert _cuda_of(['cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"']) == (13, 0)
    assert _cuda_of(['nvidia-cudnn-cu12==9.1.0.70; platform_system == "Linux"', "filelock"]) == (12, -1)
    assert _cuda_of(["filelock", "sympy>=1.13.3"]) is None


def _assert_cpu_torch(text: str) -> None:
    """The CPU image takes torch from the index its build ARG names (set by default; a mirror is one
    ``--build-arg`` away) and refuses a CUDA build in the same RUN step as the install."""
    lines = text.splitlines()
    install = next(i for i, line in enumerate(lines) if "torch==" in line and "pip install" in line)
    arg = re.search(r"--(?:index-url|extra-index-url)[ =]\"?\$\{?(\w+)\}?\"?", lines[install])
    assert arg, f"the CPU image's torch install names its index directly or not at all: {lines[install]}"
    assert re.search(rf"^ARG {arg.group(1)}=\S+", text, re.M), f"ARG {arg.group(1)} has no default"
    step = lines[install]
    for line in lines[install + 1 :]:
        if not step.rstrip().endswith("\\"):
            break
        step += "\n" + line
    assert re.search(r"torch\.version\.cuda is None", step), "the CPU image does not check that torch is a CPU build"


def test_the_cpu_torch_check_catches_a_fixed_index_a_missing_default_and_no_cuda_check():
    text = _dockerfile("Dockerfile.cpu")
    _assert_cpu_torch(text)
    arg = re.search(r"^ARG (\w+)=", text, re.M).group(1)
    planted = {
        "names its index directly": re.sub(rf'"?\$\{{?{arg}\}}?"?', "some-index", text),
        "has no default": re.sub(rf"^ARG {arg}=\S+", f"ARG {arg}", text, flags=re.M),
        "CPU build": text.replace("torch.version.cuda is None", "True"),
    }
    for message, bad in planted.items():
        assert bad != text, message
        with pytest.raises(AssertionError, match=message):
            _assert_cpu_torch(bad)


def test_images_install_dependencies_before_code_and_run_as_a_user():
    for name in ("Dockerfile", "Dockerfile.cpu"):
        text = _dockerfile(name)
        lines = text.splitlines()
        torch_at = next(i for i, line in enumerate(lines) if "torch==" in line and "pip install" in line)
        code_at = next(i for i, line in enumerate(lines) if re.match(r"COPY (services|normguard_core)", line))
        assert torch_at < code_at, f"{name}: a code edit would reinstall torch"
        assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), f"{name} runs as root"
        assert "wget" in text, f"{name}: KubeRay's probes call wget"
        assert "RAY_AUTH_MODE=disabled" not in text, f"{name} bakes Ray's auth off"
    _assert_cpu_torch(_dockerfile("Dockerfile.cpu"))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


# ---- 7. the deploy README --------------------------------------------------------------------
def _secrets() -> set[str]:
    names = set()

    def walk(o):
        if isinstance(o, dict):
            if "secretKeyRef" in o:
                names.add(o["secretKeyRef"]["name"])
            if "secretName" in o and isinstance(o["secretName"], str):
                names.add(o["secretName"])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for d in all_docs():
        walk(d)
    return names


def test_the_deploy_readme_names_every_secret_volume_and_image():
    readme = (ROOT / "deploy" / "README.md").read_text()
    secrets = _secrets()
    assert {"normguard-ray-token", "normguard-hf-token", "normguard-redis", "normguard-serve-token"} <= secrets
    for s in secrets:
        assert re.search(rf"kubectl\b[^\n]*create secret generic {s}\b", readme), f"README never creates {s}"
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for d in all_docs()
        for _, t in pod_templates(d)
        for v in t["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    for c in claims:
        assert c in readme, f"README never mentions the volume {c}"
    images = {c["image"] for d in all_docs() for _, t in pod_templates(d) for c in t["spec"]["containers"]}
    for i in images - {"normguard"}:
        assert i in readme, f"README never mentions the image {i}"
    assert "deploy/Dockerfile" in readme and "kustomization.yaml" in readme


def test_plan_command_reports_a_short_cluster(tmp_path: Path):
    """``normguard plan`` (the same computation) exits 1 and names the actors that find no node."""
    small = tmp_path / "cluster.yaml"
    small.write_text(yaml.safe_dump({"nodes": [{"name": "box", "cpus": 16, "gpus": 8}]}))
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "plan", str(SD35), "--cluster", str(small)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "DOES NOT FIT" in out.stdout and "sampler #" in out.stdout
    ok = subprocess.run(
        [sys.executable, "-m", "services.cli", "plan", str(SD35), "--manifest", "k8s/rayjob-train.yaml"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0 and ok.stdout.rstrip().endswith("fits"), ok.stdout + ok.stderr
    assert [g for g, _ in groups(one("RayJob"))] == ["head", "gpu-workers"]
