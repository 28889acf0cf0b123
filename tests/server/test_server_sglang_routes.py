"""The SGLang dialect of the control plane (gpusleep/server/sglang.py), driven the way RL frameworks drive
SGLang servers: verl and AReaL POST ``{"tags": [...]}`` (or ``{"tags": null}``), slime POSTs and calls
``.json()`` on the answer, SGLang's own clients may send extra keys (``reset_connector``) or no body, and
SGLang serves the same routes on GET. The server is a real uvicorn on loopback with a real
:class:`gpusleep.Allocator` on the driver double behind it, holding SGLang's three tags."""

from __future__ import annotations

import threading

import httpx
import pytest
import requests
from _server_testkit import SPEC_503_BODY, WAIT_S, FakeController, loopback_server, make_model_app, wait_until
from fastapi import FastAPI

from gpusleep.server import DEFAULT_PROTECTED_PATHS, SleepModeOptions, install

MiB = 1 << 20
SIZES = {"weights": 6 * MiB, "kv_cache": 10 * MiB, "cuda_graph": 2 * MiB}


@pytest.fixture(scope="module")
def server():
    with loopback_server() as srv:
        yield srv


@pytest.fixture
def engine(alloc):
    """An allocator holding SGLang's tags, each filled with its own byte; ``engine.addresses[tag]``."""
    alloc.addresses = {}
    for index, (tag, size) in enumerate(SIZES.items()):
        address = alloc.allocate(size, tag)
        alloc.write_device(address, bytes([0x10 + index]) * size)
        alloc.addresses[tag] = address
    return alloc


def engine_app(alloc, options=None) -> FastAPI:
    """A model server on ``alloc``: one protected endpoint, and the control plane."""
    app = FastAPI()

    @app.post("/v1/completions")
    def completions() -> dict:
        return {"model_ran": True}

    install(app, alloc, options)
    return app


def mapped(alloc, tag: str) -> int:
    return alloc.stats().tags[tag].bytes_mapped


def test_verl_release_and_resume_of_named_tags(server, engine):
    """verl: release ["kv_cache", "weights"] (and cuda_graph) before training, resume weights, update
    them in place, resume kv_cache; the protected endpoints answer the spec's 503 meanwhile."""
    with server.mount(engine_app(engine)) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        r = http.post("/release_memory_occupation", json={"tags": ["kv_cache", "weights", "cuda_graph"]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True and set(body["tags"]) == set(SIZES) and body["is_sleeping"] is True
        assert engine.sleeping_tags == set(SIZES)
        assert http.post("/v1/completions", json={}).json() == SPEC_503_BODY
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}

        r = http.post("/resume_memory_occupation", json={"tags": ["weights"]})
        assert r.status_code == 200 and r.json()["success"] is True and r.json()["tags"] == ["weights"]
        assert engine.sleeping_tags == {"kv_cache", "cuda_graph"}
        assert engine.read_device(engine.addresses["weights"], SIZES["weights"]) == bytes([0x10]) * SIZES["weights"]
        assert http.post("/v1/completions", json={}).status_code == 503, "still released: kv_cache and cuda_graph"

        r = http.post("/resume_memory_occupation", json={"tags": ["kv_cache", "cuda_graph"]})
        assert r.status_code == 200 and r.json()["success"] is True
        assert not engine.is_sleeping
        assert http.post("/v1/completions", json={}).status_code == 200
    assert engine.read_device(engine.addresses["kv_cache"], SIZES["kv_cache"]) == bytes(SIZES["kv_cache"])


def test_slime_release_everything_then_resume_everything_with_requests(server, engine):
    """slime: ``requests.post(...).json()``; ``tags: null`` releases every tag and resumes every tag
    that was released; the answer is JSON either way."""
    with server.mount(engine_app(engine)) as url:
        answer = requests.post(f"{url}/release_memory_occupation", json={"tags": None}, timeout=WAIT_S).json()
        assert answer["success"] is True and isinstance(answer["message"], str)
        assert engine.sleeping_tags == set(SIZES)
        for tag in SIZES:
            assert mapped(engine, tag) == 0
        answer = requests.post(f"{url}/resume_memory_occupation", json={"tags": None}, timeout=WAIT_S).json()
        assert answer["success"] is True and set(answer["tags"]) == set(SIZES)
        assert not engine.is_sleeping


@pytest.mark.parametrize(
    "method,body",
    [
        ("POST", None),  # no body at all
        ("POST", {}),  # an empty object
        ("POST", {"tags": None, "reset_connector": True}),  # an extra key SGLang's newer clients send
        ("GET", {"tags": None}),  # SGLang serves GET too
    ],
    ids=["post-no-body", "post-empty", "post-extra-key", "get"],
)
def test_call_shapes_release_everything(server, engine, method, body):
    with server.mount(engine_app(engine)) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        r = http.request(method, "/release_memory_occupation", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["success"] is True
        assert engine.sleeping_tags == set(SIZES)
        r = http.request(method, "/resume_memory_occupation", json=body)
        assert r.status_code == 200 and r.json()["success"] is True
        assert not engine.is_sleeping


def test_tags_the_server_does_not_hold_are_ignored_and_named(server, alloc):
    """An RL framework sends SGLang's full tag list to a server whose CUDA graphs are not sleepable."""
    alloc.allocate(4 * MiB, "kv_cache")
    with server.mount(engine_app(alloc)) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        r = http.post("/release_memory_occupation", json={"tags": ["kv_cache", "cuda_graph"]})
        body = r.json()
        assert r.status_code == 200 and body["success"] is True
        assert (
            body["tags"] == ["kv_cache"] and body["ignored_tags"] == ["cuda_graph"] and "cuda_graph" in body["message"]
        )
        r = http.post("/resume_memory_occupation", json={"tags": ["cuda_graph"]})
        assert r.status_code == 200 and r.json()["success"] is True and r.json()["tags"] == []
        assert alloc.sleeping_tags == {"kv_cache"}, "nothing held under cuda_graph: nothing resumed"
        assert http.post("/resume_memory_occupation", json={"tags": ["kv_cache"]}).json()["success"] is True


@pytest.mark.parametrize(
    "body",
    [{"tags": "kv_cache"}, {"tags": [""]}, {"tags": [3]}, ["kv_cache"]],
    ids=["string", "empty-name", "number", "not-an-object"],
)
def test_bad_bodies_are_400_with_success_false_and_change_nothing(server, engine, body):
    with server.mount(engine_app(engine)) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        r = http.post("/release_memory_occupation", json=body)
        assert r.status_code == 400
        answer = r.json()
        assert answer["success"] is False and answer["error"]["type"] == "BadRequestError"
        assert answer["message"] == answer["error"]["message"] and answer["error"]["param"] == "tags"
        r = http.post("/release_memory_occupation", content=b"{not json")
        assert r.status_code == 400 and r.json()["success"] is False
    assert not engine.is_sleeping


def test_the_control_token_guards_the_sglang_routes_too(server, engine):
    app = engine_app(engine, SleepModeOptions(control_token="s3cret"))
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        r = http.post("/release_memory_occupation", json={"tags": None})
        assert r.status_code == 401 and r.json()["success"] is False
        assert r.json()["error"]["type"] == "AuthenticationError" and r.headers["www-authenticate"] == "Bearer"
        assert not engine.is_sleeping
        r = http.post("/release_memory_occupation", json={"tags": None}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and engine.is_sleeping
        r = http.post("/resume_memory_occupation", json={}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and not engine.is_sleeping


def test_a_resume_without_gpu_memory_answers_409_with_success_false_and_stays_released(server, engine, fake):
    with server.mount(engine_app(engine)) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        assert http.post("/release_memory_occupation", json={"tags": ["weights"]}).json()["success"] is True
        fake.set_foreign_load(0, fake.free_bytes(0))
        try:
            r = http.post("/resume_memory_occupation", json={"tags": ["weights"]})
            assert r.status_code == 409
            answer = r.json()
            assert answer["success"] is False and answer["error"]["type"] == "InsufficientMemoryError"
            assert engine.sleeping_tags == {"weights"}
        finally:
            fake.set_foreign_load(0, 0)
        assert http.post("/resume_memory_occupation", json={"tags": ["weights"]}).json()["success"] is True
    assert engine.read_device(engine.addresses["weights"], SIZES["weights"]) == bytes([0x10]) * SIZES["weights"]


def test_a_release_waits_for_the_requests_in_flight(server, engine):
    """The same drain as POST /sleep: a running generation finishes before its memory goes."""
    controller = FakeController()
    app = make_model_app(controller)
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        results = {}
        running = threading.Thread(target=lambda: results.setdefault("r", http.post("/v1/completions?hold=1", json={})))
        running.start()
        wait_until(lambda: controller.requests_running == 1, "the request to run")
        releasing = threading.Thread(target=lambda: results.setdefault("s", http.post("/release_memory_occupation")))
        releasing.start()
        wait_until(lambda: not app.state.gpusleep_gate.admitting, "the release to close the gate")
        assert controller.sleep_calls == [], "released while a request was running"
        controller.hold.set()
        running.join(WAIT_S)
        releasing.join(WAIT_S)
        assert results["r"].status_code == 200 and results["s"].json()["success"] is True
    assert controller.in_flight_at_sleep == [0] and controller.sleep_calls == [1]


def test_a_controller_without_tagged_sleep_refuses_named_tags(server):
    """FakeController.sleep(level) takes no tags=: releasing named tags is refused, everything works."""
    controller = FakeController()
    with server.mount(make_model_app(controller)) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        r = http.post("/release_memory_occupation", json={"tags": ["kv_cache"]})
        assert r.status_code == 400 and r.json()["success"] is False and "tags=" in r.json()["message"]
        assert controller.sleep_calls == []
        assert http.post("/release_memory_occupation", json={"tags": None}).json()["success"] is True
        assert controller.sleep_calls == [1]


def test_the_routes_can_be_left_out(server, engine):
    app = engine_app(engine, SleepModeOptions(sglang_routes=False))
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        assert http.post("/release_memory_occupation", json={}).status_code == 404
    assert not engine.is_sleeping


def test_the_routes_are_in_the_openapi_schema(server, engine):
    with server.mount(engine_app(engine)) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        paths = http.get("/openapi.json").json()["paths"]
    for path in ("/release_memory_occupation", "/resume_memory_occupation"):
        assert set(paths[path]) == {"get", "post"}


# SGLang's own endpoints that run the model (its http_server.py): while anything is released they answer
# the spec's 503 like the vLLM paths. Those that need no weights keep answering.
SGLANG_MODEL_PATHS = (
    ("POST", "/generate"),
    ("PUT", "/generate"),
    ("POST", "/generate_from_file"),
    ("POST", "/encode"),
    ("PUT", "/encode"),
    ("POST", "/classify"),
    ("POST", "/v1/classify"),
    ("POST", "/v1/responses"),
    ("POST", "/vertex_generate"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/score"),
    ("POST", "/v1/rerank"),
    ("PUT", "/v1/rerank"),
    ("POST", "/invocations"),
)
SGLANG_FREE_PATHS = (
    ("GET", "/health"),
    ("GET", "/get_model_info"),
    ("GET", "/get_server_info"),
    ("GET", "/v1/models"),
    ("POST", "/v1/tokenize"),
    ("POST", "/tokenize"),
    ("POST", "/v1/detokenize"),
    ("GET", "/ping"),
    ("POST", "/flush_cache"),
)


def sglang_app(alloc) -> FastAPI:
    """A server shaped like SGLang's http_server: its model endpoints and some that need no model."""
    app = FastAPI()

    def model_ran() -> dict:
        return {"model_ran": True}

    def no_model() -> dict:
        return {"ok": True}

    for method, path in SGLANG_MODEL_PATHS:
        app.add_api_route(path, model_ran, methods=[method], name=f"{method}{path}")
    for method, path in SGLANG_FREE_PATHS:
        app.add_api_route(path, no_model, methods=[method], name=f"{method}{path}")
    install(app, alloc)
    return app


def test_sglang_model_endpoints_are_protected_by_default():
    assert {path for _, path in SGLANG_MODEL_PATHS} <= set(DEFAULT_PROTECTED_PATHS)
    assert not {path for _, path in SGLANG_FREE_PATHS} & set(DEFAULT_PROTECTED_PATHS)


def test_sglang_generate_endpoints_answer_the_spec_503_while_released(server, engine):
    with server.mount(sglang_app(engine)) as url, httpx.Client(base_url=url, timeout=WAIT_S) as http:
        for method, path in SGLANG_MODEL_PATHS + SGLANG_FREE_PATHS:
            assert http.request(method, path, json={}).status_code == 200, f"{method} {path} awake"
        assert http.post("/release_memory_occupation", json={"tags": ["kv_cache"]}).json()["success"] is True
        for method, path in SGLANG_MODEL_PATHS:
            r = http.request(method, path, json={"text": "hi"})
            assert r.status_code == 503, f"{method} {path} served while released"
            assert r.json() == SPEC_503_BODY and r.headers["retry-after"] == "5"
        for method, path in SGLANG_FREE_PATHS:
            r = http.request(method, path, json={})
            assert r.status_code == 200 and r.json() == {"ok": True}, f"{method} {path} needs no model"
        assert http.post("/resume_memory_occupation", json={}).json()["success"] is True
        for method, path in SGLANG_MODEL_PATHS:
            assert http.request(method, path, json={}).json() == {"model_ran": True}
