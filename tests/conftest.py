"""Shared fixtures and environment for the test tiers (unit / service / e2e / gpu)."""

from __future__ import annotations

import os

import pytest
import torch

# Offline, quiet, token auth off for the local clusters that tests start (ENVIRONMENT.md s2).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE") or "disabled"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


REQUIRE_ALL_ENV = "NORMGUARD_REQUIRE_ALL"


def skip_unless(available: bool, reason: str) -> None:
    """Skip when a tool or data set is missing, except where ``NORMGUARD_REQUIRE_ALL=1`` (CI sets it):
    there a missing prerequisite fails the test, so CI never silently skips anything but ``gpu``."""
    if available:
        return
    if os.environ.get(REQUIRE_ALL_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ALL_ENV}=1: CI must be able to run this test)")
    pytest.skip(reason)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


TINY_PRETRAIN_STEPS = 5


@pytest.fixture(scope="session")
def digits_assets(tmp_path_factory):
    """A tiny cached digits generator + scorers (5 pretrain steps; shapes, not quality)."""
    cache = tmp_path_factory.mktemp("ngcache")
    os.environ["NORMGUARD_CACHE"] = str(cache)
    from services.prepare import prepare_embedded

    assets = prepare_embedded(pretrain_steps=TINY_PRETRAIN_STEPS, num_fake=200, log=lambda s: None)
    return assets


def tiny_overrides(run_dir, name: str, **extra) -> list[str]:
    """Overrides for a fast 2-step run of the embedded default."""
    base = {
        "model.pretrain_steps": TINY_PRETRAIN_STEPS,
        "train.steps": 2,
        "train.eval_every": 0,
        "train.checkpoint_every": 0,
        "train.output_dir": str(run_dir),
        "train.run_name": name,
        "rollout.prompts_per_step": 2,
        "rollout.group_size": 4,
        "rollout.num_samplers": 2,
        "rollout.num_steps": 4,
        "learner.micro_batch": 16,
        "eval.num_prompts": 2,
        "eval.samples_per_prompt": 2,
        "eval.full_steps": 6,
        "eval.few_steps": 2,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def ray_local(digits_assets):
    """One local Ray cluster for the service tests (2 CPUs; shut down at the end)."""
    import ray

    ray.init(
        address="local",  # a new cluster, never one found on this machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "NORMGUARD_CACHE": os.environ.get("NORMGUARD_CACHE", "")}},
    )
    yield ray
    ray.shutdown()


def train_worker_pids() -> list[int]:
    """PIDs of the live Ray Train worker processes (Ray titles each actor process
    ``ray::<Class>.<method>``; the Train workers are ``RayTrainWorker``)."""
    from pathlib import Path

    def cmdline(proc: Path) -> str:
        try:
            return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            return ""

    procs = (p for p in Path("/proc").iterdir() if p.name.isdigit())
    return [int(p.name) for p in procs if cmdline(p).startswith("ray::RayTrainWorker")]


def free_port() -> int:
    """A TCP port free on the loopback now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict:
    """The environment of a ``normguard`` console-script subprocess: this virtualenv's ``bin`` first on
    PATH, Ray's token auth off, the hub offline, unbuffered output and no inherited ``RAY_ADDRESS``."""
    import sys
    from pathlib import Path

    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    return env
