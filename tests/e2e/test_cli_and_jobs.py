"""End to end: the console script trains and prints its summary; a job is submitted with the Jobs
SDK to a local Ray head that the test starts on its own ports and stops by PID."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import cli_env, free_port, tiny_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


AGENT_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "ray-client-server-port",
)


def test_normguard_train_cli(digits_assets, tmp_path):
    # a relative output dir, as in the shipped configs: the learner actors must not write checkpoints
    # relative to their own working directory
    over = tiny_overrides("runs", "cli", **{"resources.num_learners": 1, "train.checkpoint_every": 1})
    out = subprocess.run(
        [str(BIN / "normguard"), "train", *over],
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "+renorm" in out.stdout and "|v|/|vref|" in out.stdout and "What it shows" in out.stdout
    assert max(len(line) for line in out.stdout.split("cli: run directory")[0].splitlines()) <= 100
    run = tmp_path / "runs" / "cli"
    assert (run / "summary.json").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step_000002"
    assert (run / "checkpoints" / "step_000001" / "coordinator.json").is_file()
    # rerunning a finished run (with the flag placed among the overrides) changes nothing
    lines = (run / "metrics.jsonl").read_text()
    again = subprocess.run(
        [str(BIN / "normguard"), "train", over[0], "--local", *over[1:]],
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run / "metrics.jsonl").read_text() == lines and "+renorm" in again.stdout


def test_a_killed_driver_resumes_and_ends_identical_to_the_uninterrupted_run(digits_assets, tmp_path):
    """SIGKILL the training process (no chance to clean up) once its step-2 checkpoint is complete, then
    rerun the same command: it resumes from that checkpoint, every step is in metrics.jsonl once, and
    the metrics and the final evaluation equal those of a run that was never interrupted."""
    import json

    from services.config import load_config
    from services.training.run import run_training

    inner = {"train.steps": 4, "train.checkpoint_every": 2}
    straight = run_training(
        load_config(None, tiny_overrides(tmp_path, "straight", **inner)), local=True, progress=False
    )
    over = tiny_overrides(tmp_path, "killed", **inner)
    cmd = [str(BIN / "normguard"), "train", "--local", *over]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    manifest = tmp_path / "killed" / "checkpoints" / "step_000002" / "manifest.json"
    deadline = time.monotonic() + 300
    while not manifest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert manifest.is_file() and not (tmp_path / "killed" / "summary.json").is_file()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cli_env())
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    keys = ("reward/mean", "loss/total", "normguard/ratio_mean")
    base = [r for r in straight.history if "reward/mean" in r]
    assert [{k: r[k] for k in keys} for r in train] == [{k: r[k] for k in keys} for r in base]
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["after"] == straight.after


def test_unknown_override_fails_fast_with_the_field_name(tmp_path):
    out = subprocess.run(
        [str(BIN / "normguard"), "train", "normguard.wieght=1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
        cwd=ROOT,
    )
    assert out.returncode != 0 and "wieght" in out.stderr


@pytest.fixture
def ray_head():
    port, dash = free_port(), free_port()
    # Ray puts its Unix sockets under the temp dir; pytest's tmp_path is too long for the 107-byte
    # socket-path limit, so the head gets its own short directory (kept apart from other clusters).
    temp_dir = tempfile.mkdtemp(prefix="ngray-", dir="/tmp")
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        f"--dashboard-port={dash}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        "--disable-usage-stats",
        "--block",
        f"--temp-dir={temp_dir}",
        # fixed-default ports of the head's agents, taken by any other Ray on the machine (e.g. the
        # service tests' cluster): without its own, the job agent never comes up
        *(f"--{flag}={free_port()}" for flag in AGENT_PORT_FLAGS),
    ]
    proc = subprocess.Popen(
        cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 90
    import httpx

    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("local Ray head did not come up in 90 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)  # stop our head (and its children) by PID, not `ray stop`
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_job_to_a_local_head(digits_assets, ray_head, tmp_path):
    over = tiny_overrides(tmp_path, "job", **{"resources.num_learners": 1, "rollout.num_samplers": 1})
    cmd = [str(BIN / "normguard"), "submit", *over, "--address", ray_head]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=cli_env(), cwd=ROOT)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "SUCCEEDED" in out.stdout and "+renorm" in out.stdout
    assert (tmp_path / "job" / "summary.json").is_file()


def test_sigterm_at_step_6_of_12_checkpoints_it_says_so_and_the_rerun_ends_as_the_calm_run(digits_assets, tmp_path):
    """What Kubernetes, a spot reclaim and ``ray job stop`` send, through Ray (not ``--local``): SIGTERM while step
    6 of 12 is in flight (checkpoints every 4). The step finishes and is checkpointed, one line names it and the
    command that resumes, the exit status is 143 with no stack dump; the same command then ends with the calm
    run's metrics and final evaluation, every step once."""
    import json

    inner = {"train.steps": 12, "train.checkpoint_every": 4, "resources.num_learners": 1, "logging.backends": "[]"}

    def train(name: str, **popen) -> subprocess.Popen:
        cmd = [str(BIN / "normguard"), "train", *tiny_overrides(tmp_path, name, **inner)]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), **popen)

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    calm = train("calm")
    assert calm.wait(timeout=600) == 0, calm.communicate()[1][-3000:]
    proc, metrics = train("stopped"), tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # step 5 logged: step 6 is in flight
        if metrics.is_file() and any(r.get("step") == 5 and "reward/mean" in r for r in rows("stopped")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    done = [r["step"] for r in rows("stopped") if "reward/mean" in r]
    assert done == list(range(1, done[-1] + 1)) and 6 <= done[-1] < 12  # the step in flight finished
    latest = (tmp_path / "stopped" / "checkpoints" / "latest").read_text()
    assert latest == f"step_{done[-1]:06d}", (latest, done)  # it, not the periodic step 4
    said = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(said) == 1 and f"after step {done[-1]} of 12" in said[0] and "normguard train" in said[0], said
    assert "rerun" in said[0] and "Traceback" not in err and "SIGTERM received at" not in err  # no stack dump
    again = train("stopped")
    assert again.wait(timeout=600) == 0, again.communicate()[1][-3000:]
    keys = ("step", "reward/mean", "loss/total", "normguard/ratio_mean")
    steps = [{k: r[k] for k in keys} for r in rows("stopped") if "reward/mean" in r]
    assert steps == [{k: r[k] for k in keys} for r in rows("calm") if "reward/mean" in r]  # every step once
    after = [json.loads((tmp_path / n / "summary.json").read_text())["after"] for n in ("calm", "stopped")]
    assert after[0] == after[1]
