"""A training run that scores through the Serve reward deployment (``services.rewards.server``), by handle from
the scorer actor inside the cluster and over HTTP (bearer token) from a trainer outside it, on the session's
local Ray: both give the metrics of the same run scoring in-process on the pixels a server sees (uint8, as
its PNGs carry them). About a minute on 2 cores."""

import os
from pathlib import Path

import pytest
from conftest import free_port, tiny_overrides

from services.config import load_config
from services.training.run import run_training

pytestmark = [pytest.mark.service, pytest.mark.slow]
KEY = "test-token-38-training"
KEYS = ("reward/mean", "reward/std", "reward/digits_ink", "loss/total", "normguard/ratio_mean")


@pytest.fixture(scope="module")
def ink_server(ray_local, digits_assets):
    """``digits_ink`` as a Serve application on the session's Ray (one ``ray.init`` per process), its token
    and the prepared scorer directory given to the replica through its runtime_env."""
    from ray import serve

    from services.rewards.server import RewardServerConfig, deploy

    root = Path(__file__).parents[2]
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    env = {"env_vars": {"PYTHONPATH": f"{root}:{root / 'tests'}", "NORMGUARD_REWARD_KEY": KEY}}
    cfg = RewardServerConfig(
        scorer="digits_ink", path=str(digits_assets.scorer_path), app="ink", num_cpus=0, runtime_env=env
    )
    deploy(cfg)
    yield f"http://127.0.0.1:{port}{cfg.prefix}"
    serve.shutdown()


def _rows(tmp_path, name: str, scorer: str, *, local: bool) -> list[dict]:
    over = tiny_overrides(tmp_path, name, **{"reward.scorers": f"[{scorer}]"})
    summary = run_training(load_config(None, over), local=local, progress=False)
    rows = [{k: r[k] for k in KEYS} for r in summary.history if "reward/mean" in r]
    assert len(rows) == 2 and all(r["faults/failures"] == 0 for r in summary.history if "reward/mean" in r)
    return rows


def _close(a: list[dict], b: list[dict]) -> bool:
    return all(x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7) for x, y in zip(a, b, strict=True) for k in KEYS)


def test_a_run_scores_through_the_serve_deployment_by_handle_as_in_process(ink_server, digits_assets, tmp_path):
    """Ray backend: the scorer actor reaches the deployment by Serve handle (``server: {app: ink}``); the
    in-process twin runs in this process (the test scorer is importable here, not in the cluster's workers)."""
    here = f"{{name: digits_ink, impl: 'served_scorers:QuantisedInk', path: '{digits_assets.scorer_path}'}}"
    in_process = _rows(tmp_path, "in-process", here, local=True)
    by_handle = _rows(tmp_path, "by-handle", "{name: digits_ink, server: {app: ink, timeout_s: 60}}", local=False)
    assert _close(by_handle, in_process), (by_handle, in_process)


def test_a_trainer_outside_the_cluster_scores_over_http_with_its_token(ink_server, digits_assets, tmp_path):
    """Local backend (the trainer's own process, as outside the cluster): ``server: {url: ...}`` with the
    bearer token from ``$NORMGUARD_REWARD_KEY``; a wrong token fails the step with the server's 401."""
    here = f"{{name: digits_ink, impl: 'served_scorers:QuantisedInk', path: '{digits_assets.scorer_path}'}}"
    in_process = _rows(tmp_path, "in-process-local", here, local=True)
    served = f"{{name: digits_ink, server: {{url: '{ink_server}', timeout_s: 60}}}}"
    os.environ["NORMGUARD_REWARD_KEY"] = KEY
    try:
        over_http = _rows(tmp_path, "over-http", served, local=True)
        os.environ["NORMGUARD_REWARD_KEY"] = "wrong"
        over = tiny_overrides(tmp_path, "wrong-token", **{"reward.scorers": f"[{served}]", "reward.retries": 0})
        with pytest.raises(RuntimeError, match="digits_ink: .* answered HTTP 401"):
            run_training(load_config(None, over), local=True, progress=False)
    finally:
        os.environ.pop("NORMGUARD_REWARD_KEY", None)
    assert _close(over_http, in_process), (over_http, in_process)
