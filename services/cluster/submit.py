"""``normguard submit``: run ``normguard train`` on a Ray cluster through the Jobs SDK.

The working directory is the project root without ``.git``, virtualenvs, caches and runs; the
runtime environment carries ``HF_HUB_OFFLINE`` / ``NORMGUARD_CACHE`` and, when the cluster's
image lacks the project, installs it from the uploaded working dir (``pip: ["-e ."]``: off by
default, the images in deploy/ already contain it). Token auth (Ray >= 2.5x, on by default):
the SDK sends ``RAY_AUTH_TOKEN`` / ``~/.ray/auth_token`` when ``RAY_AUTH_MODE=token``; an
explicit ``--token`` or ``NORMGUARD_RAY_TOKEN`` is sent as a bearer header.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

__all__ = ["build_entrypoint", "submit"]

EXCLUDES = [".git", ".venv", "venv", "runs", "**/__pycache__", ".pytest_cache", ".ruff_cache", ".whl", ".gl"]
POLL_S = 2.0
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def build_entrypoint(config: str | None, overrides: list[str]) -> str:
    """The shell command the job runs."""
    parts = ["normguard", "train"] + ([config] if config else []) + list(overrides)
    return " ".join(shlex.quote(p) for p in parts)


def submit(
    config: str | None,
    overrides: list[str],
    *,
    address: str | None = None,
    wait: bool = True,
    token: str | None = None,
    install: bool = False,
    timeout_s: float = 24 * 3600.0,
) -> int:
    """Submit and (optionally) follow the job's logs; returns 0 on success."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from services.config import load_config

    load_config(config, overrides)  # fail here, not on the cluster
    root = Path(__file__).resolve().parents[2]  # the repository root (services/cluster/submit.py)
    if config and Path(config).resolve().is_relative_to(root):
        config = str(Path(config).resolve().relative_to(root))
    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    token = token or os.environ.get("NORMGUARD_RAY_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = JobSubmissionClient(address, headers=headers)
    env_vars = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("NORMGUARD_CACHE"):
        env_vars["NORMGUARD_CACHE"] = os.environ["NORMGUARD_CACHE"]
    runtime_env = {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars}
    if install:
        runtime_env["pip"] = ["-e ."]
    job_id = client.submit_job(entrypoint=build_entrypoint(config, overrides), runtime_env=runtime_env)
    print(f"submitted {job_id} to {address}")
    if not wait:
        return 0
    deadline = time.monotonic() + timeout_s
    streamed = _follow_logs(client, job_id, timeout_s)
    status = client.get_job_status(job_id)
    while status not in {JobStatus(s) for s in TERMINAL} and time.monotonic() < deadline:
        time.sleep(POLL_S)
        status = client.get_job_status(job_id)
    if not streamed:  # the log stream was unavailable (e.g. a proxy without websockets)
        print(client.get_job_logs(job_id)[-20000:])
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


class _LogTail(Protocol):
    """What :func:`_follow_logs` uses of Ray's ``JobSubmissionClient`` (a Protocol: Ray is imported only inside
    :func:`submit`, ``tests/core/test_import_graph.py``)."""

    def tail_job_logs(self, job_id: str) -> AsyncIterator[str]: ...


def _follow_logs(client: _LogTail, job_id: str, timeout_s: float) -> bool:
    """Print the job's logs as they arrive until it ends (``tail_job_logs``); False if unavailable."""

    async def follow():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(asyncio.wait_for(follow(), timeout_s))
    except TimeoutError:
        print(f"stopped following {job_id} after {timeout_s:.0f} s; it keeps running on the cluster")
    except Exception as e:  # noqa: BLE001 - fall back to fetching the logs at the end
        print(f"log streaming unavailable ({type(e).__name__}: {e}); fetching logs at the end")
        return False
    return True
