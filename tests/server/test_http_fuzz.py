"""Schemathesis against the demo server on loopback, from its own OpenAPI schema (model endpoints and
control plane alike), with a bounded budget: no 5xx other than the spec's 503, and every answer is
JSON (or the Prometheus text of /metrics) with every error in the one shape."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("torch")
schemathesis = pytest.importorskip("schemathesis")

from _server_testkit import SPEC_503_BODY, FakeController, loopback_server  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from gpusleep.demo import TinyEngine, TinyTransformerConfig, create_app  # noqa: E402
from gpusleep.server import SleepModeOptions  # noqa: E402

SMALL = TinyTransformerConfig(d_model=16, n_heads=2, d_ff=32, max_seq_len=24)  # short answers: a bounded budget
#: Examples per operation; CI keeps the default, a longer local run sets GPUSLEEP_FUZZ_EXAMPLES.
EXAMPLES = int(os.environ.get("GPUSLEEP_FUZZ_EXAMPLES", "15"))


@pytest.fixture(scope="module")
def demo_schema():
    app = create_app(TinyEngine(SMALL), FakeController(), SleepModeOptions(max_body_bytes=1 << 20))
    with loopback_server() as server, server.mount(app) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/health"),
    ("GET", "/version"),
    ("POST", "/sleep"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("GET", "/metrics"),
    ("POST", "/release_memory_occupation"),
    ("GET", "/release_memory_occupation"),
    ("POST", "/resume_memory_occupation"),
    ("GET", "/resume_memory_occupation"),
]


WITHOUT_INPUT = ("/v1/models", "/health", "/version", "/is_sleeping", "/metrics")
#: The SGLang dialect (gpusleep/server/sglang.py) answers its errors as SGLang does, {"success": false,
#: "message": ...}, with the one error object beside them.
SGLANG_PATHS = ("/release_memory_occupation", "/resume_memory_occupation")


def test_the_schema_lists_every_endpoint(demo_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in demo_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize(
    "mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE], ids=["valid", "invalid"]
)
@pytest.mark.parametrize("method, path", OPERATIONS)
def test_no_server_error_and_one_error_shape(demo_schema, method, path, mode):
    if mode == schemathesis.GenerationMode.NEGATIVE and (
        path in WITHOUT_INPUT or (method == "GET" and path in SGLANG_PATHS)
    ):
        pytest.skip(f"{method} {path} takes no input: there is no invalid request to make")
    if mode == schemathesis.GenerationMode.NEGATIVE and path == "/v1/models/{model_id}":
        pytest.skip("any text is a model id (an unknown one is a 404, checked by the valid cases)")
    operation = demo_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
    )
    def check(case) -> None:
        check_answer(case)

    check()


def check_event_stream(text: str, what: str) -> None:
    """Server-sent events: every event is JSON, ending with [DONE], or with one error in the one shape."""
    events = [line[len("data: ") :] for line in text.split("\n\n") if line]
    assert events and all(not e.startswith("data:") for e in events), what
    if events[-1] == "[DONE]":
        assert all(json.loads(e)["object"] for e in events[:-1]), what
    else:
        assert set(json.loads(events[-1])) == {"error"}, what


def check_answer(case) -> None:
    response = case.call(timeout=30)
    status = response.status_code
    what = f"{case.method} {case.formatted_path} -> {status}: {response.text[:300]}"
    if case.path == "/metrics" and status == 200:
        assert response.headers["content-type"][0].startswith("text/plain"), what
        return
    if status == 200 and response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        check_event_stream(response.text, what)  # "stream": true
        return
    body = response.json()  # every answer is JSON
    if status == 503:
        assert body == SPEC_503_BODY, what  # the only 5xx: the spec's, while the fuzzer put the model to sleep
        return
    assert status < 500, what
    if status >= 400 and case.path in SGLANG_PATHS:
        assert set(body) == {"success", "message", "error"} and body["success"] is False, what
        assert body["message"] == body["error"]["message"], what
        body = {"error": body["error"]}
    if status >= 400:
        assert set(body) == {"error"}, what
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"], what
        assert isinstance(error["type"], str) and error["type"], what
        assert error["code"] == status, what
        assert "param" in error and (error["param"] is None or isinstance(error["param"], str)), what
