"""The control plane against a real uvicorn server on loopback: every endpoint of the spec in both
states, the exact 503 body, the query parameters, the token check and bad inputs."""

from __future__ import annotations

import subprocess
import sys
import threading

import httpx
import pytest
from _server_testkit import (
    SPEC_503_BODY,
    UNPROTECTED_PATHS,
    FakeController,
    loopback_server,
    make_model_app,
    wait_until,
)
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from gpusleep.errors import CudaError, DriverUnavailableError, OutOfMemoryError, SleepStateError, WakeVerificationError
from gpusleep.server import (
    DEFAULT_PROTECTED_PATHS,
    SGLANG_PROTECTED_PATHS,
    SPEC_PROTECTED_PATHS,
    SleepModeOptions,
    install,
)

SPEC_PROTECTED = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/pooling",
    "/score",
    "/v1/score",
    "/rerank",
    "/v1/rerank",
    "/v2/rerank",
    "/v1/audio/transcriptions",
    "/invocations",
)


@pytest.fixture(scope="module")
def server():
    with loopback_server() as srv:
        yield srv


@pytest.fixture
def controller():
    return FakeController(with_stats=True)


@pytest.fixture
def url(server, controller):
    with server.mount(make_model_app(controller)) as base:
        yield base


@pytest.fixture
def http(url):
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client


def test_default_protected_list_is_the_spec_list_and_sglangs():
    assert set(SPEC_PROTECTED_PATHS) == set(SPEC_PROTECTED)
    assert set(DEFAULT_PROTECTED_PATHS) == set(SPEC_PROTECTED) | set(SGLANG_PROTECTED_PATHS)


def test_is_sleeping_follows_sleep_and_wake(http, controller):
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    r = http.post("/sleep")
    assert r.status_code == 200
    assert r.json()["is_sleeping"] is True
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    r = http.post("/wake_up")
    assert r.status_code == 200 and r.json()["is_sleeping"] is False
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert controller.sleep_calls == [1] and controller.wake_calls == [None]


@pytest.mark.parametrize("query, level", [("", 1), ("?level=1", 1), ("?level=2", 2)])
def test_sleep_level_query_parameter(http, controller, query, level):
    r = http.post(f"/sleep{query}")
    assert r.status_code == 200
    body = r.json()
    assert body["level"] == level
    assert body["report"]["level"] == level  # the controller's SleepReport, as JSON
    assert body["report"]["bytes_freed"] == 8192
    assert controller.sleep_calls == [level]


@pytest.mark.parametrize("query", ["?level=3", "?level=0", "?level=abc", "?level=1.5", "?level=", "?level=1&level=2"])
def test_bad_sleep_level_is_400_and_nothing_sleeps(http, controller, query):
    r = http.post(f"/sleep{query}")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "InvalidSleepLevelError" and error["code"] == 400
    assert "level must be 1" in error["message"] and "or 2" in error["message"]
    assert controller.sleep_calls == []
    assert http.post("/v1/completions").status_code == 200


@pytest.mark.parametrize("path", SPEC_PROTECTED)
def test_protected_endpoint_in_both_states(http, path):
    awake = http.post(path)
    assert awake.status_code == 200 and awake.json()["model_ran"] is True
    assert http.post("/sleep").status_code == 200
    for method in ("POST", "GET"):
        asleep = http.request(method, path)
        assert asleep.status_code == 503
        assert asleep.json() == SPEC_503_BODY
        assert asleep.headers["retry-after"] == "5"
    assert http.post("/wake_up").status_code == 200
    assert http.post(path).status_code == 200


def test_trailing_slash_is_protected_too(http):
    http.post("/sleep")
    assert http.post("/v1/completions/").status_code == 503


@pytest.mark.parametrize("method, path", UNPROTECTED_PATHS)
def test_unprotected_endpoints_work_in_both_states(http, method, path):
    assert http.request(method, path).status_code == 200
    http.post("/sleep?level=2")
    r = http.request(method, path)
    assert r.status_code == 200 and r.json() == {"ok": True}


def test_wake_up_repeated_tags_and_staged_wake(http, controller):
    http.post("/sleep")
    r = http.post("/wake_up", params=[("tags", "weights")])
    assert r.status_code == 200
    assert r.json()["tags"] == ["weights"] and r.json()["is_sleeping"] is True
    assert http.post("/v1/completions").status_code == 503  # the KV cache still sleeps
    r = http.post("/wake_up?tags=kv_cache&tags=weights")
    assert r.status_code == 200 and r.json()["is_sleeping"] is False
    assert controller.wake_calls == [["weights"], ["kv_cache", "weights"]]
    assert http.post("/v1/completions").status_code == 200


@pytest.mark.parametrize("query", ["?tags=nonsense", "?tags=weights&tags=nonsense"])
def test_unknown_tag_is_400_and_model_stays_asleep(http, controller, query):
    http.post("/sleep")
    r = http.post(f"/wake_up{query}")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "UnknownTagError"
    assert error["unknown_tags"] == ["nonsense"]
    assert error["known_tags"] == ["kv_cache", "weights"]
    assert controller.wake_calls == []
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    assert http.post("/v1/completions").status_code == 503


def test_empty_tag_is_400(http, controller):
    r = http.post("/wake_up?tags=")
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    assert controller.wake_calls == []


def test_methods_other_than_the_spec_are_refused(http):
    assert http.get("/sleep").status_code == 405
    assert http.get("/wake_up").status_code == 405
    assert http.post("/is_sleeping").status_code == 405


def test_wake_without_enough_gpu_memory_is_409_and_a_retry_works(server):
    controller = FakeController(wake_error=OutOfMemoryError("cuMemCreate failed", 3 << 30, 1 << 30, 0))
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url) as http:
        http.post("/sleep")
        r = http.post("/wake_up")
        assert r.status_code == 409
        error = r.json()["error"]
        assert error["type"] == "InsufficientMemoryError"
        assert error["bytes_needed"] == 3 << 30 and error["bytes_free"] == 1 << 30 and error["device"] == 0
        assert str(3 << 30) in error["message"] and "stays asleep" in error["message"]
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
        assert http.post("/v1/chat/completions").json() == SPEC_503_BODY
        controller.wake_error = None
        assert http.post("/wake_up").status_code == 200
        assert http.post("/v1/chat/completions").status_code == 200


def test_a_wake_whose_restored_bytes_fail_verification_keeps_the_model_unavailable(server):
    blocks = [("weights", 0x7F0000000000 + i * (4 << 20), 4 << 20) for i in range(20)]
    controller = FakeController(wake_error=WakeVerificationError("2 block(s) differ", ["weights"], blocks))
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url) as http:
        http.post("/sleep")
        r = http.post("/wake_up")
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "WakeVerificationError" and error["tags"] == ["weights"]
        assert error["host_copy_damaged"] is False and "POST /wake_up again" in error["message"]
        assert error["blocks_total"] == 20 and len(error["blocks"]) == 16
        assert error["blocks"][0] == {"tag": "weights", "address": 0x7F0000000000, "num_bytes": 4 << 20}
        assert "stays asleep" in error["message"] and "2 block(s) differ" in error["message"]
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
        assert http.post("/v1/chat/completions").json() == SPEC_503_BODY, "wrong weights are never served"
        assert _metric(http.get("/metrics").text, "gpusleep_wake_verification_failures_total") == 1
        controller.wake_error = None
        assert http.post("/wake_up").status_code == 200
        assert http.post("/v1/chat/completions").status_code == 200


@pytest.mark.parametrize(
    "error, status, error_type",
    [
        (DriverUnavailableError("sleep mode needs a CUDA device"), 501, "SleepModeUnavailableError"),
        (SleepStateError("already changing"), 409, "SleepStateError"),
        (ValueError("offload_tags applies to level 1 only"), 400, "BadRequestError"),
        (CudaError("cuMemUnmap failed", 1, "CUDA_ERROR_INVALID_VALUE"), 500, "CudaError"),
        (RuntimeError("boom"), 500, "SleepModeError"),
    ],
)
def test_sleep_failures_answer_json_and_the_model_keeps_serving(server, error, status, error_type):
    controller = FakeController(sleep_error=error)
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url) as http:
        r = http.post("/sleep?level=2")
        assert r.status_code == status
        body = r.json()["error"]
        assert body["type"] == error_type and body["code"] == status
        assert "POST /sleep?level=2" in body["message"] and str(error) in body["message"]
        assert http.get("/is_sleeping").json() == {"is_sleeping": False}
        assert http.post("/v1/completions").status_code == 200
        # A 501 (no sleep mode here) is no failed transition: nothing was tried; it is counted apart.
        counter = "unavailable_transitions" if status == 501 else "transition_failures"
        failures = [
            line
            for line in http.get("/metrics").text.splitlines()
            if line.startswith(("gpusleep_transition_failures_total{", "gpusleep_unavailable_transitions_total{"))
        ]
        assert failures == [f'gpusleep_{counter}_total{{action="sleep"}} 1.0']


def test_control_token_guards_sleep_and_wake_only(server, controller):
    app = make_model_app(controller, SleepModeOptions(control_token="s3cret"))
    with server.mount(app) as url, httpx.Client(base_url=url) as http:
        for path in ("/sleep", "/wake_up"):
            missing = http.post(path)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"].startswith("Bearer")
            assert missing.json()["error"]["type"] == "AuthenticationError"
            assert "Authorization: Bearer" in missing.json()["error"]["message"]
            wrong = http.post(path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and "invalid_token" in wrong.headers["www-authenticate"]
            basic = http.post(path, headers={"Authorization": "Basic czNjcmV0"})
            assert basic.status_code == 401
        assert controller.sleep_calls == [] and controller.wake_calls == []
        assert http.get("/is_sleeping").status_code == 200
        assert http.get("/metrics").status_code == 200
        auth = {"Authorization": "Bearer s3cret"}
        assert http.post("/sleep?level=2", headers=auth).status_code == 200
        assert http.post("/wake_up", headers=auth).status_code == 200
        assert controller.sleep_calls == [2] and controller.wake_calls == [None]


def test_control_token_from_environment(server, controller, monkeypatch):
    monkeypatch.setenv("GPUSLEEP_TOKEN", "from-env")
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url) as http:
        assert http.post("/sleep").status_code == 401
        assert http.post("/sleep", headers={"Authorization": "Bearer from-env"}).status_code == 200


def test_protected_list_is_configurable(server, controller):
    options = SleepModeOptions(protected_paths=("/custom/generate",), retry_after_seconds=12)
    app = make_model_app(controller, options, protected_paths=("/custom/generate", "/v1/completions"))
    with server.mount(app) as url, httpx.Client(base_url=url) as http:
        http.post("/sleep")
        r = http.post("/custom/generate")
        assert r.status_code == 503 and r.json() == SPEC_503_BODY and r.headers["retry-after"] == "12"
        assert http.post("/v1/completions").status_code == 200  # not in the configured list


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split(" ")[0] == name]
    assert len(values) == 1, f"{name} not found once in /metrics"
    return values[0]


def test_metrics_in_prometheus_format(http):
    text = http.get("/metrics").text
    assert _metric(text, "gpusleep_sleeping") == 0
    assert _metric(text, 'gpusleep_tag_mapped_bytes{tag="weights"}') == 4096
    http.post("/sleep")
    http.post("/v1/completions")  # refused: counted
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _metric(text, "gpusleep_sleeping") == 1
    assert _metric(text, "gpusleep_sleep_level") == 1
    assert _metric(text, "gpusleep_last_sleep_offloaded_bytes") == 4096
    assert _metric(text, "gpusleep_last_sleep_freed_bytes") == 8192
    assert _metric(text, "gpusleep_last_sleep_freed_measured_bytes") == 8192 - 1024
    assert _metric(text, "gpusleep_offloaded_bytes_total") == 4096
    assert _metric(text, "gpusleep_freed_bytes_total") == 8192
    assert _metric(text, "gpusleep_last_sleep_duration_seconds") > 0
    assert _metric(text, "gpusleep_rejected_requests_total") == 1
    assert _metric(text, 'gpusleep_tag_asleep_bytes{tag="weights"}') == 4096
    assert _metric(text, 'gpusleep_tag_backed_up_bytes{tag="weights"}') == 4096
    assert _metric(text, "gpusleep_host_pinned_bytes") == 65536
    http.post("/wake_up")
    text = http.get("/metrics").text
    assert _metric(text, "gpusleep_sleeping") == 0
    assert _metric(text, "gpusleep_sleep_level") == 0
    assert _metric(text, "gpusleep_last_wake_duration_seconds") > 0
    assert _metric(text, "gpusleep_last_wake_restored_bytes") == 4096
    assert _metric(text, "gpusleep_wakes_total") == 1 and _metric(text, "gpusleep_sleeps_total") == 1


def test_metrics_without_stats_controller(server):
    controller = FakeController(with_stats=False)
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url) as http:
        http.post("/sleep?level=2")
        text = http.get("/metrics").text
        assert _metric(text, "gpusleep_sleep_level") == 2
        assert _metric(text, "gpusleep_last_sleep_offloaded_bytes") == 0
        assert "gpusleep_tag_mapped_bytes" not in text


def test_drain_timeout_abandons_sleep_and_keeps_serving(server, controller):
    app = make_model_app(controller, SleepModeOptions(drain_timeout_seconds=0.2))
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=10) as http:
        held = {}
        t = threading.Thread(target=lambda: held.update(r=http.post("/v1/completions?hold=1")))
        t.start()
        try:
            gate = app.state.gpusleep_gate
            wait_until(lambda: gate.in_flight == 1, "the held request to be admitted")
            r = http.post("/sleep")
            assert r.status_code == 409
            error = r.json()["error"]
            assert error["type"] == "SleepTimeoutError" and error["in_flight"] == 1
            assert "was not put to sleep" in error["message"]
            assert controller.sleep_calls == []
            assert http.get("/is_sleeping").json() == {"is_sleeping": False}
            assert http.post("/v1/embeddings").status_code == 200
        finally:
            controller.hold.set()
            t.join(10)
        assert held["r"].status_code == 200


def test_install_on_a_plain_starlette_app(server, controller):
    async def generate(request):
        return JSONResponse({"text": "hi"})

    async def tokenize(request):
        return JSONResponse({"tokens": [1]})

    app = Starlette(
        routes=[Route("/v1/completions", generate, methods=["POST"]), Route("/tokenize", tokenize, methods=["POST"])]
    )
    gate = install(app, controller)
    assert app.state.gpusleep_gate is gate
    with server.mount(app) as url, httpx.Client(base_url=url) as http:
        assert http.post("/v1/completions").json() == {"text": "hi"}
        assert http.post("/sleep").status_code == 200
        assert http.post("/v1/completions").json() == SPEC_503_BODY
        assert http.post("/tokenize").status_code == 200
        assert http.post("/wake_up").status_code == 200
        assert http.post("/v1/completions").status_code == 200


def test_install_rejects_an_object_that_cannot_sleep():
    with pytest.raises(TypeError, match="wake_up"):
        install(Starlette(), type("NoWake", (), {"sleep": lambda self, level: None, "is_sleeping": False})())


def test_options_validate_their_values():
    with pytest.raises(ValueError, match="starting with '/'"):
        SleepModeOptions(protected_paths=("v1/completions",))
    with pytest.raises(TypeError):
        SleepModeOptions(protected_paths="/v1/completions")
    with pytest.raises(ValueError, match="drain_timeout_s"):
        SleepModeOptions(drain_timeout_seconds=0)


def test_importing_server_and_client_does_not_import_torch():
    code = "import sys, gpusleep.server, gpusleep.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
