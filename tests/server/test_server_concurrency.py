"""Sleep never pulls memory from under a running request, and sleep/wake calls are serialized:
checked against a real uvicorn server with many clients while another client sleeps and wakes."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _server_testkit import SPEC_503_BODY, FakeController, loopback_server, make_model_app, wait_until

from gpusleep.server import DEFAULT_PROTECTED_PATHS


@pytest.fixture(scope="module")
def server():
    with loopback_server() as srv:
        yield srv


def test_sleep_waits_for_the_running_request_and_refuses_new_ones(server):
    controller = FakeController()
    app = make_model_app(controller)
    gate = app.state.gpusleep_gate
    with server.mount(app) as url, httpx.Client(base_url=url, timeout=10) as http, ThreadPoolExecutor(2) as pool:
        running = pool.submit(http.post, "/v1/completions?hold=1")
        wait_until(lambda: controller.requests_running == 1, "the request to start running")
        sleeping = pool.submit(http.post, "/sleep")
        wait_until(lambda: gate.transition == "sleep", "sleep to start draining")
        # Draining: the running request holds the model, new protected requests get the 503 ...
        late = http.post("/v1/chat/completions")
        assert late.status_code == 503 and late.json() == SPEC_503_BODY
        assert late.headers["retry-after"] == "5"
        # ... endpoints that need no model keep working, and the controller has not been touched.
        assert http.post("/tokenize").status_code == 200
        assert controller.sleep_calls == [] and not sleeping.done()
        controller.hold.set()
        assert running.result(timeout=10).status_code == 200
        assert sleeping.result(timeout=10).status_code == 200
    assert controller.in_flight_at_sleep == [0]
    assert controller.violations == []


def test_many_clients_while_another_sleeps_and_wakes(server):
    controller = FakeController(call_seconds=0.002)
    app = make_model_app(controller)
    clients, requests_per_client, cycles = 6, 40, 10
    statuses = []
    lock = threading.Lock()
    rng = random.Random(1234)
    paths = [rng.choice(DEFAULT_PROTECTED_PATHS) for _ in range(clients * requests_per_client)]

    def client(index: int, http: httpx.Client) -> None:
        for path in paths[index::clients]:
            r = http.post(f"{path}?work=1", json={"client": index})
            ok = r.status_code == 200 and r.json()["model_ran"] is True
            refused = r.status_code == 503 and r.json() == SPEC_503_BODY and r.headers.get("retry-after") == "5"
            with lock:
                statuses.append(r.status_code if (ok or refused) else f"unexpected {r.status_code}: {r.text}")

    def until_started(http: httpx.Client, path: str) -> None:
        """A call that meets another transition is refused with 409 and the state; retry until it runs."""
        for _ in range(10_000):
            r = http.post(path)
            if r.status_code == 200:
                return
            assert r.status_code == 409 and r.json()["error"]["type"] == "TransitionInProgressError", r.text
        raise AssertionError(f"POST {path} never started")

    def sleeper(http: httpx.Client) -> None:
        for i in range(cycles):
            until_started(http, f"/sleep?level={1 + i % 2}")
            until_started(http, "/wake_up")

    def waker(http: httpx.Client) -> None:  # wake calls racing with the sleeper's calls
        for _ in range(cycles):
            r = http.post("/wake_up")
            assert r.status_code == 200 or r.json()["error"]["type"] == "TransitionInProgressError", r.text

    with (
        server.mount(app) as url,
        httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=16)) as http,
    ):
        with ThreadPoolExecutor(clients + 2) as pool:
            futures = [pool.submit(client, i, http) for i in range(clients)]
            futures += [pool.submit(sleeper, http), pool.submit(waker, http)]
            for f in futures:
                f.result(timeout=60)
        assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert len(statuses) == clients * requests_per_client
    assert [s for s in statuses if s not in (200, 503)] == []
    assert controller.violations == []
    assert controller.in_flight_at_sleep == [0] * cycles
    assert controller.sleep_calls == [1 + i % 2 for i in range(cycles)]
    assert cycles <= len(controller.wake_calls) <= 2 * cycles
    assert controller.max_concurrent_calls == 1
    assert app.state.gpusleep_gate.in_flight == 0
