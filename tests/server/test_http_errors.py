"""Every error of the demo server in the one OpenAI-style shape, from a real uvicorn server on loopback:
validation errors (400, never echoing the body), unknown paths and methods, bodies over the cap, and
sampling parameters that used to crash the sampler or answer cryptically."""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("torch")

from _server_testkit import FakeController, loopback_server  # noqa: E402

from gpusleep.demo import TinyEngine, TinyTransformerConfig, create_app  # noqa: E402
from gpusleep.server import SleepModeOptions  # noqa: E402

SMALL = TinyTransformerConfig(d_model=32, n_heads=2, d_ff=64, max_seq_len=64)
BODY_CAP_BYTES = 256 * 1024


def assert_error_shape(r: httpx.Response, status: int, param=...) -> dict:
    """The one error shape: {"error": {"message": str, "type": str, "code": status, "param": str|None}}."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] == status
    assert "param" in error and (error["param"] is None or isinstance(error["param"], str))
    if param is not ...:
        assert error["param"] == param, error
    return error


@pytest.fixture(scope="module")
def http():
    app = create_app(TinyEngine(SMALL), FakeController(), SleepModeOptions(max_body_bytes=BODY_CAP_BYTES))
    with loopback_server() as server, server.mount(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
        ("/v1/completions", {}, "prompt"),
        ("/v1/completions", {"prompt": [], "max_tokens": 2}, "prompt.str"),
        ("/v1/embeddings", {"input": []}, "input.str"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/completions", {"prompt": "x", "seed": 2**70}, "seed"),
        ("/v1/completions", {"prompt": "x", "seed": -(2**63) - 1}, "seed"),
        ("/v1/completions", {"prompt": "x", "temperature": 2.5}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_validation_errors_are_400_in_the_one_shape(http, path, body, param):
    error = assert_error_shape(http.post(path, json=body), 400, param)
    assert error["type"] == "BadRequestError" and path in error["message"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_sampling_numbers_are_refused_clearly(http, value):
    for field in ("temperature", "top_p"):
        r = http.post(
            "/v1/completions",
            content=f'{{"prompt": "x", "{field}": {value}}}',
            headers={"content-type": "application/json"},
        )
        error = assert_error_shape(r, 400, field)
        assert "finite" in error["message"]


def test_tiny_temperature_samples_instead_of_failing(http):
    for temperature in (1e-39, 5e-324, 1e-7):
        r = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4, "temperature": temperature, "seed": 1})
        assert r.status_code == 200, r.text
    greedy = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4, "temperature": 0}).json()
    tiny = http.post("/v1/completions", json={"prompt": "abc", "max_tokens": 4, "temperature": 1e-39, "seed": 3}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_extreme_seeds_in_range_are_served(http):
    for seed in (0, -(2**63), 2**64 - 1):
        r = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "seed": seed})
        assert r.status_code == 200, r.text


def test_a_large_invalid_body_is_not_echoed(http):
    body = json.dumps({"input": list(range(30_000))})  # ~190 kB, under the cap, wrong type
    r = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert_error_shape(r, 400)
    assert len(r.content) < 2000


def test_invalid_json_is_400(http):
    r = http.post("/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    error = assert_error_shape(r, 400, "body")
    assert "not valid JSON" in error["message"]


def test_a_body_over_the_cap_is_413(http):
    r = http.post("/v1/embeddings", json={"input": "x" * (BODY_CAP_BYTES + 1)})
    error = assert_error_shape(r, 413)
    assert error["type"] == "RequestTooLargeError" and error["max_body_bytes"] == BODY_CAP_BYTES
    assert len(r.content) < 2000
    assert http.post("/tokenize", json={"prompt": "x" * (BODY_CAP_BYTES + 1)}).status_code == 413


def test_unknown_paths_and_methods_in_the_one_shape(http):
    error = assert_error_shape(http.get("/v1/nothing"), 404, None)
    assert error["type"] == "NotFoundError" and "/v1/nothing" in error["message"]
    r = http.get("/v1/completions")
    error = assert_error_shape(r, 405, None)
    assert error["type"] == "MethodNotAllowedError" and "POST" in r.headers["allow"]


def test_unknown_model_and_bad_tokens_in_the_one_shape(http):
    assert_error_shape(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert_error_shape(http.post("/detokenize", json={"tokens": [1, 100000]}), 400)
    assert_error_shape(http.post("/tokenize", json={}), 400)
    assert_error_shape(http.post("/v1/embeddings", json={"input": ""}), 400)


def test_control_plane_errors_have_param_too(http):
    assert_error_shape(http.post("/sleep?level=3"), 400, "level")
    assert_error_shape(http.post("/wake_up?tags="), 400, "tags")
