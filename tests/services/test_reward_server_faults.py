"""A reward server that answers garbage, too slowly or too much, in a training run: a clear error naming the
scorer; ``reward.retries`` and ``required`` decide what it costs, as for a scorer in the process. The server
is a plain HTTP server on loopback (no Ray); the runs are the embedded default on the local backend, about
10 s each on 2 cores."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import tiny_overrides

from services.config import load_config
from services.training.run import run_training
from services.training.scoring import ScorerWorker
from services.types import ScorerBuild, ScoreRequest

pytestmark = [pytest.mark.service, pytest.mark.slow]
SLOW_S = 1.0  # the slow answer's delay; the client waits half of it
REPLIES = {
    "garbage": (b"<html>oops</html>", "malformed reply"),
    "slow": (b"", f"did not answer within {SLOW_S / 2:g} s"),
    "large": (json.dumps({"scores": [0.5] * 400_000}).encode(), "max_reply_bytes"),
}
KEYS = ("reward/mean", "reward/digits_ink", "loss/total")


@pytest.fixture(scope="module")
def bad_server():
    """``POST /<mode>/score`` answers as ``mode`` says; ``seen[mode]`` counts the requests."""
    seen: dict[str, int] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            mode = self.path.strip("/").split("/")[0]
            seen[mode] = seen.get(mode, 0) + 1
            if mode == "slow":
                time.sleep(SLOW_S)
            body = REPLIES[mode][0] or b'{"scores": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow / long answer
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def _served(url: str, mode: str, *, required: bool) -> str:
    server = f"{{url: '{url}/{mode}', timeout_s: {SLOW_S / 2}, api_key_env: null, connect_retries: 0}}"
    return f"{{name: judge_{mode}, weight: 0.5, required: {str(required).lower()}, server: {server}}}"


@pytest.mark.parametrize("mode", sorted(REPLIES))
def test_an_optional_served_scorers_bad_answer_is_retried_then_left_out(bad_server, mode):
    """In the worker: tried ``1 + reward.retries`` times, then left out of the reply, the error naming it."""
    url, seen = bad_server
    before = seen.get(mode, 0)
    opts = {"scorer": f"judge_{mode}", "url": f"{url}/{mode}", "timeout_s": SLOW_S / 2, "api_key_env": None}
    specs = {
        "ink": ScorerBuild(impl="served_scorers:MeanScorer"),
        f"judge_{mode}": ScorerBuild(options=opts, impl="services.rewards.remote:RemoteScorer", required=False),
    }
    worker = ScorerWorker(specs, retries=2, backoff_s=0.0)
    images = torch.rand(3, 3, 8, 8)
    got = worker.score_batch(ScoreRequest(images=images, prompts=list("abc"), group_ids=torch.tensor([0, 0, 1])))
    assert set(got.scores) == {"ink"} and torch.allclose(got.scores["ink"], images.mean(dim=(1, 2, 3)))
    assert got.failed[f"judge_{mode}"].startswith(f"RewardServerError: judge_{mode}: ")
    assert REPLIES[mode][1] in got.failed[f"judge_{mode}"]
    assert seen[mode] - before == 3


def _rows(summary) -> list[dict]:
    return [r for r in summary.history if "reward/mean" in r]


def test_a_run_goes_on_without_an_optional_scorer_and_stops_on_a_required_one(
    bad_server, digits_assets, tmp_path, caplog
):
    """Beside the local ``digits_ink``: an optional served judge answering garbage is left out of each step's
    reward (the run's metrics are those of ``digits_ink`` alone, the skip counted); a required one fails
    the run, naming the scorer (the evaluation before step 1 scores it first, without ``reward.retries``)."""
    url, seen = bad_server
    alone = run_training(load_config(None, tiny_overrides(tmp_path, "alone")), local=True, progress=False)
    scorers = f"[{{name: digits_ink}}, {_served(url, 'garbage', required=False)}]"
    over = tiny_overrides(tmp_path, "optional", **{"reward.scorers": scorers, "reward.retries": 1})
    with caplog.at_level("WARNING"):
        beside = run_training(load_config(None, over), local=True, progress=False)
    assert [{k: r[k] for k in KEYS} for r in _rows(beside)] == [{k: r[k] for k in KEYS} for r in _rows(alone)]
    assert [r["reward/skipped_scorers"] for r in _rows(beside)] == [1.0, 1.0]
    assert [r["reward/skipped_scorers"] for r in _rows(alone)] == [0.0, 0.0]
    assert "optional scorer judge_garbage left out of this step's reward" in caplog.text
    before = seen["garbage"]
    scorers = f"[{{name: digits_ink}}, {_served(url, 'garbage', required=True)}]"
    over = tiny_overrides(tmp_path, "required", **{"reward.scorers": scorers, "reward.retries": 1})
    with pytest.raises(RuntimeError, match="judge_garbage: malformed reply"):
        run_training(load_config(None, over), local=True, progress=False)
    assert seen["garbage"] > before  # it fails in the run's first scoring, the evaluation before step 1
