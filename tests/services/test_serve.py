"""Ray Serve app over HTTP on 127.0.0.1: generation, batching, multiplexing, bad input, auth, page."""

import base64
import io
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import free_port, skip_unless

from services.config import ModelConfig, load_config
from services.serving.config import ServeConfig
from services.training.learner import Learner

pytestmark = [pytest.mark.service, pytest.mark.slow]
TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def server(ray_local, digits_assets, tmp_path_factory):
    from ray import serve

    from services.serving.app import build_app

    ckpt = tmp_path_factory.mktemp("serve") / "step_000001"
    learner = Learner.from_config(load_config(None, ["model.pretrain_steps=5"]), str(digits_assets.model_path))
    with torch.no_grad():  # a "trained" checkpoint whose weights differ from the base model's
        for p in learner.params:
            p.add_(0.05 * torch.randn_like(p))
    learner.save(ckpt)
    port = free_port()
    cfg = ServeConfig(
        model=ModelConfig(kind="digits", pretrain_steps=5),
        checkpoints={"trained": str(ckpt)},
        replica_cpus=0.5,
        max_batch_size=8,
        batch_wait_timeout_s=0.2,
        max_images=4,
        port=port,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg, str(digits_assets.model_path)), name="normguard", route_prefix="/")
    auth_cfg = cfg.model_copy(update={"auth_token": "s3cret"})
    serve.run(build_app(auth_cfg, str(digits_assets.model_path)), name="authed", route_prefix="/authed")
    page_cfg = auth_cfg.model_copy(update={"public_page": True})
    serve.run(build_app(page_cfg, str(digits_assets.model_path)), name="pubauth", route_prefix="/pubauth")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _post(url, payload, **kw):
    return httpx.post(f"{url}/v1/generate", json=payload, timeout=TIMEOUT_S, **kw)


def _decode(b64: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(b64)))))


def test_health_models_and_openapi(server, digits_assets):
    assert httpx.get(f"{server}/healthz", timeout=TIMEOUT_S).json() == {"status": "ok"}
    r = httpx.get(f"{server}/v1/models", timeout=TIMEOUT_S)
    models = r.json()
    assert [m["id"] for m in models["models"]] == ["base", "trained"] and models["default_steps"] == 4
    base, trained = models["models"]
    assert base == {"id": "base", "base_model": "digits", "step": None, "method": None, "normguard": None}
    assert trained["base_model"] == "digits" and trained["step"] == 0  # the fixture's untrained learner
    # ids and what a client needs, never the server's disk layout
    assert "/" not in r.text and str(digits_assets.model_path) not in r.text
    assert "/v1/generate" in httpx.get(f"{server}/openapi.json", timeout=TIMEOUT_S).json()["paths"]


def test_generate_json_and_png(server):
    r = _post(server, {"prompt": ["a handwritten digit 3", "a handwritten digit 5"], "seed": 7})
    assert r.status_code == 200
    body = r.json()
    assert len(body["images"]) == 2 and body["num_steps"] == 4 and body["seed"] == 7
    assert _decode(body["images"][0]).shape == (16, 16, 3)
    png = _post(server, {"prompt": "a handwritten digit 3", "seed": 7, "format": "png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert base64.b64encode(png.content).decode() == body["images"][0]  # same seed, same image


def test_concurrent_requests_are_batched(server):
    payload = {"prompt": "a handwritten digit 2", "num_steps": 6}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda s: _post(server, {**payload, "seed": s}), range(6)))
    assert all(r.status_code == 200 for r in responses)
    assert max(r.json()["batch_requests"] for r in responses) > 1


def test_multiplexing_picks_the_requested_checkpoint(server):
    req = {"prompt": "a handwritten digit 8", "seed": 11}
    base = _post(server, {**req, "checkpoint": "base"}).json()["images"][0]
    again = _post(server, {**req, "checkpoint": "base"}).json()["images"][0]
    trained = _post(server, {**req, "checkpoint": "trained"}).json()["images"][0]
    assert base == again and base != trained


def test_renormalize_flag_runs(server):
    r = _post(server, {"prompt": "a handwritten digit 4", "seed": 1, "checkpoint": "trained", "renormalize": True})
    assert r.status_code == 200 and len(r.json()["images"]) == 1


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"prompt": "a handwritten digit 1", "num_steps": 999}, 422, "num_steps must be in [1, 50]"),
        ({"prompt": "a handwritten digit 1", "num_steps": 0}, 422, "greater than or equal to 1"),
        ({"prompt": "a handwritten digit 1", "size": 512}, 422, "size must be one of [16]"),
        ({"prompt": ["a handwritten digit 1"] * 5}, 422, "at most 4 images"),
        ({"prompt": "a handwritten digit 1", "checkpoint": "nope"}, 404, "unknown checkpoint 'nope'"),
        ({"prompt": "a photo of a cat"}, 422, "a handwritten digit 3"),
        ({"prompt": "a handwritten digit 1", "stepz": 3}, 422, "stepz"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_service_keeps_serving(server, payload, status, message):
    r = _post(server, payload)
    assert r.status_code == status and message in r.text
    assert _post(server, {"prompt": "a handwritten digit 1", "seed": 0}).status_code == 200


def test_malformed_json(server):
    r = httpx.post(
        f"{server}/v1/generate", content=b"{not json", headers={"content-type": "application/json"}, timeout=TIMEOUT_S
    )
    assert r.status_code == 422 and "JSON" in r.text


def test_bearer_token_covers_every_route_but_health(server):
    url = f"{server}/authed"
    good = {"Authorization": "Bearer s3cret"}
    for path in ("/v1/models", "/", "/openapi.json", "/docs", "/redoc"):
        assert httpx.get(f"{url}{path}", timeout=TIMEOUT_S).status_code == 401, path
        assert (
            httpx.get(f"{url}{path}", headers={"Authorization": "Bearer s3creT"}, timeout=TIMEOUT_S).status_code == 401
        )
        assert httpx.get(f"{url}{path}", headers=good, timeout=TIMEOUT_S).status_code == 200, path
    assert httpx.get(f"{url}/healthz", timeout=TIMEOUT_S).status_code == 200  # health stays open
    # the scheme is case-insensitive (RFC 7235 section 2.1); the token is not
    for header in ("bearer s3cret", "BEARER s3cret", "Bearer  s3cret"):
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": header}, timeout=TIMEOUT_S).status_code == 200
    for header in ("Basic s3cret", "Bearers3cret", "s3cret", "bearer S3CRET", "Bearer"):
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": header}, timeout=TIMEOUT_S).status_code == 401
    # public_page: the page is open, the API is not
    assert httpx.get(f"{server}/pubauth/", timeout=TIMEOUT_S).status_code == 200
    assert httpx.get(f"{server}/pubauth/v1/models", timeout=TIMEOUT_S).status_code == 401


def test_a_bad_request_fails_alone_in_a_batch(server):
    """Requests merged by @serve.batch: extreme seeds and NaN guidance get their own 4xx, every good one 200."""
    good = [{"prompt": f"a handwritten digit {d}", "seed": d} for d in range(6)]
    bad = [
        {"prompt": "a handwritten digit 1", "seed": 2**64},
        {"prompt": "a handwritten digit 1", "seed": -1},
        {"prompt": "a handwritten digit 1", "guidance_scale": float("nan")},
        {"prompt": "a handwritten digit 1", "guidance_scale": float("inf")},
        {"prompt": "a handwritten digit 1", "num_steps": 10**30},
    ]
    mixed = [p for pair in zip(good, bad + [good[0]]) for p in pair]

    def post(p):  # json.dumps writes NaN / Infinity literals, as a careless or hostile client would
        body = json.dumps(p)
        return httpx.post(
            f"{server}/v1/generate", content=body, headers={"content-type": "application/json"}, timeout=TIMEOUT_S
        )

    with ThreadPoolExecutor(len(mixed)) as pool:
        responses = list(pool.map(post, mixed))
    for payload, r in zip(mixed, responses):
        if payload in bad:
            assert r.status_code == 422, (payload, r.status_code, r.text[:300])
            detail = r.json()["detail"]
            assert isinstance(detail, list) and {"loc", "msg", "type"} <= set(detail[0])
        else:
            assert r.status_code == 200, (payload, r.text[:300])
    assert _post(server, {"prompt": "a handwritten digit 2", "seed": 2**63 - 1}).status_code == 200


def test_body_size_limit_and_no_echo(server):
    huge = {"prompt": "a handwritten digit 1 " + "x" * 20_000_000}
    r = _post(server, huge)
    assert r.status_code == 413 and len(r.content) < 1000
    long_prompt = {"prompt": "y" * 5000}  # under the body limit, over max_prompt_chars
    r = _post(server, long_prompt)
    assert r.status_code == 422 and len(r.content) < 2000 and "at most 1000 characters" in r.text


def test_web_page_compares_checkpoints_in_headless_chromium(server, tmp_path):
    """The page's comparison: one prompt and seed through every ticked checkpoint, renormalisation off
    and on, at each step count, one row each with its steps and the reply's timing."""
    skip_unless(shutil.which("chromium") is not None, "chromium not installed (apt-get install chromium)")
    query = "autorun=1&prompt=a%20handwritten%20digit%207&steps=2,4&count=2&seed=5&renorm=1"
    dom = _page_dom(f"{server}/?{query}", tmp_path, screenshot=tmp_path / "page.png")
    rows = dom.split('class="result"')[1:]
    labels = [r.split('class="label">')[1].split("<")[0] for r in rows]
    assert labels == [
        f"{c} · {n} steps · renormalised {on}" for n in (2, 4) for c in ("base", "trained") for on in ("off", "on")
    ], labels
    for r, label in zip(rows, labels):
        assert r.count('src="data:image/png;base64,') == 2, label
        timing = r.split('class="timing">')[1].split("<")[0]
        assert timing.startswith(label.split(" · ")[1]) and "ms round trip" in timing and "ms model" in timing, timing
    # the same seed: a checkpoint's renormalised row differs from its plain row only by the setting, and
    # base and trained start from the same noise (their images differ because the weights do)
    images = [[s.split('"')[0] for s in r.split('src="data:image/png;base64,')[1:]] for r in rows]
    assert images[0] != images[2], "base and trained rows are the same images"
    assert "8 rows, 0 failed" in dom.split('id="status"')[1][:300]
    assert (tmp_path / "page.png").stat().st_size > 10_000  # the screenshot rendered


CHROMIUM = [
    "chromium",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--virtual-time-budget=120000",
]


def _page_dom(url: str, profile, screenshot=None) -> str:
    """The page's DOM after its scripts ran, from headless Chromium (and a screenshot, if asked)."""
    if screenshot is not None:
        shot = [*CHROMIUM, f"--user-data-dir={profile}-shot", "--window-size=1400,1400", f"--screenshot={screenshot}"]
        subprocess.run([*shot, url], capture_output=True, text=True, timeout=240)
    cmd = [*CHROMIUM, f"--user-data-dir={profile}", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240).stdout


def test_web_page_under_auth_in_headless_chromium(server, tmp_path):
    """With auth_token set, the page (public_page) asks for the token and works with it."""
    skip_unless(shutil.which("chromium") is not None, "chromium not installed (apt-get install chromium)")
    base = f"{server}/pubauth/?autorun=1&prompt=a%20handwritten%20digit%205"
    dom = _page_dom(base, tmp_path / "a")
    assert "needs a token" in dom and 'src="data:image/png;base64,' not in dom
    dom = _page_dom(base + "&token=s3cret&steps=2&renorm=0&checkpoints=trained", tmp_path / "b")
    assert dom.count('src="data:image/png;base64,') == 4, dom[-2000:]
    assert "1 rows, 0 failed" in dom.split('id="status"')[1][:300]


def _fuzz_strategies(schema: dict):
    """Hypothesis strategies for POST /v1/generate bodies, from the published OpenAPI schema: every
    property gets values of its own type at and far beyond its bounds (extreme integers, NaN / Inf,
    huge strings), values of other types, and deeply nested junk; plus unknown keys and non-object
    bodies. Valid values are kept cheap (few steps, the model's size) so the test stays bounded."""
    from hypothesis import strategies as st

    req = schema["components"]["schemas"]["GenerateRequest"]
    junk = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=20,
    )
    huge_int = st.integers(min_value=-(2**80), max_value=2**80)

    def for_property(name: str, prop: dict):
        kinds = {p.get("type") for p in prop.get("anyOf", [prop])}
        own = []
        if "integer" in kinds:
            cheap = st.integers(min_value=0, max_value=4) if name in ("num_steps", "seed") else st.just(16)
            own += [huge_int, cheap, st.sampled_from([-1, 0, 2**63 - 1, 2**63, 2**64, 10**30])]
        if "number" in kinds:
            own += [st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1.0, 1e6, 1e6 + 1, -0.0])]
        if "string" in kinds:
            own += [st.text(max_size=30), st.just("z" * 3000), st.sampled_from(["json", "png", "base", "nope"])]
        if "array" in kinds:
            own += [st.lists(st.text(max_size=10), max_size=6)]
        if "boolean" in kinds:
            own += [st.booleans()]
        return st.one_of(*own, junk)

    props = {n: for_property(n, p) for n, p in req["properties"].items()}
    objects = st.fixed_dictionaries({}, optional=props).flatmap(
        lambda d: st.dictionaries(st.text(max_size=8), junk, max_size=2).map(lambda extra: {**extra, **d})
    )
    deep = st.integers(min_value=100, max_value=100_000).map(lambda n: "[" * n + "]" * n)
    raw = st.one_of(objects.map(json.dumps), junk.map(json.dumps), deep, st.binary(max_size=64))
    return raw


def test_fuzzed_requests_never_give_5xx_nor_fail_their_neighbours(server):
    """Hypothesis fuzz of the generate endpoint from its OpenAPI schema: each example is a burst of three
    fuzzed bodies and three good requests sent together (so @serve.batch merges them): no 5xx ever, and
    every good request gets its 200."""
    from hypothesis import HealthCheck, given, settings

    schema = httpx.get(f"{server}/openapi.json", timeout=TIMEOUT_S).json()
    bodies = _fuzz_strategies(schema)
    good = [{"prompt": f"a handwritten digit {d}", "seed": d, "num_steps": 2} for d in range(3)]
    seen = {"examples": 0}

    def send(body):
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        return httpx.post(
            f"{server}/v1/generate", content=content, headers={"content-type": "application/json"}, timeout=TIMEOUT_S
        )

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(bodies, bodies, bodies)
    def burst(a, b, c):
        seen["examples"] += 1
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(send, [a, good[0], b, good[1], c, good[2]]))
        for sent, r in zip([a, good[0], b, good[1], c, good[2]], responses):
            assert r.status_code < 500, (str(sent)[:200], r.status_code, r.text[:300])
        assert [r.status_code for r in responses[1::2]] == [200, 200, 200], [r.text[:200] for r in responses[1::2]]

    burst()
    assert seen["examples"] == 25


def test_a_failing_batch_is_redone_request_by_request(digits_assets, monkeypatch):
    """In-process: when the merged batch raises (one poisoned request), each request is redone alone;
    only the poisoned one carries an error, and the others' images equal those of a clean batch."""
    from services.serving.app import GeneratorCore
    from services.serving.generator import GenerationItem

    core = GeneratorCore(ServeConfig(model=ModelConfig(kind="digits", pretrain_steps=5)), str(digits_assets.model_path))
    gen = core.load("base")
    items = [
        GenerationItem(prompts=(f"a handwritten digit {d}",), seed=d, num_steps=2, guidance_scale=1.0) for d in range(4)
    ]
    clean = GeneratorCore.run_isolated(gen, items)
    assert all(r["batch_requests"] == 4 for r in clean)
    real_run = GeneratorCore.run

    def poisoned(gen, batch):
        if any(it.seed == 2 for it in batch):
            raise RuntimeError("poisoned request")
        return real_run(gen, batch)

    monkeypatch.setattr(GeneratorCore, "run", staticmethod(poisoned))
    out = GeneratorCore.run_isolated(gen, items)
    assert out[2] == {"error": "RuntimeError: poisoned request"}
    for i in (0, 1, 3):
        assert out[i]["batch_requests"] == 1 and out[i]["images"] == clean[i]["images"]


class _Payload:
    """Unpickling this runs a shell command (what a hostile checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_malicious_pickle_is_refused_unread(digits_assets, tmp_path):
    """The server reads only weights.safetensors: a pickle named learner.pt, or a pickle disguised as
    the safetensors file, is refused with a clear error and nothing in it runs."""
    import pickle

    from services.checkpoints import CheckpointError
    from services.serving.app import GeneratorCore

    marker = tmp_path / "pwned"
    evil_pt, disguised = tmp_path / "evil-pt", tmp_path / "evil-st"
    evil_pt.mkdir()
    disguised.mkdir()
    (evil_pt / "learner.pt").write_bytes(pickle.dumps({"weights": _Payload(marker)}))
    (disguised / "weights.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    pickle.loads((evil_pt / "learner.pt").read_bytes())  # the payload is live: unpickling runs it
    assert marker.exists()
    marker.unlink()
    cfg = ServeConfig(
        model=ModelConfig(kind="digits", pretrain_steps=5), checkpoints={"a": str(evil_pt), "b": str(disguised)}
    )
    core = GeneratorCore(cfg, str(digits_assets.model_path))
    with pytest.raises(CheckpointError, match="pickled checkpoint .* is refused"):
        core.load("a")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        core.load("b")
    assert not marker.exists()
    assert core.load("base") is not None  # the service itself is unharmed
