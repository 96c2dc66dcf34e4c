"""Joining the Ray cluster a command runs on (``RAY_ADDRESS``, a Ray job's driver, or a local one)."""

from __future__ import annotations

import os

__all__ = ["ensure_ray"]


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join ``RAY_ADDRESS`` if set, else start a local cluster (token auth stays as configured)."""
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}}
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        # Driver of a Ray job (``normguard submit``): the job's runtime env already applies to every
        # actor, and Ray refuses a driver runtime env that sets the same keys.
        ray.init(log_to_driver=False)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=env, log_to_driver=False)
    else:
        # address="local": start one, never join a cluster found on this machine (``ray start``, another test)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False)
