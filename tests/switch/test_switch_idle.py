"""Idle sleep and wake on request in a model server with ``gpusleep.server`` installed (issue 13, part 3),
through a real uvicorn server on loopback with its lifespan on, as ``gpusleep serve`` runs it."""

from __future__ import annotations

import threading

import httpx
import pytest
from _server_testkit import SPEC_503_BODY, FakeController, make_model_app, serve_in_thread, wait_until

from gpusleep.server import SleepModeOptions

pytestmark = pytest.mark.timeout(60)

IDLE_S = 0.2


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("level", [1, 2])
def test_an_idle_model_sleeps_at_the_idle_level_and_a_request_keeps_getting_the_503_by_default(level):
    controller = FakeController()
    app = make_model_app(controller, SleepModeOptions(idle_sleep_seconds=IDLE_S, idle_sleep_level=level))
    with serve_in_thread(app, lifespan="on") as url, httpx.Client(base_url=url, timeout=10) as client:
        wait_until(lambda: client.get("/is_sleeping").json()["is_sleeping"], "the idle sleep")
        assert controller.sleep_calls == [level]
        refused = client.post("/v1/completions", json={"prompt": "hi"})
        assert (refused.status_code, refused.json()) == (503, SPEC_503_BODY)
        assert metric(client, "gpusleep_idle_sleeps_total") == 1
        assert metric(client, "gpusleep_sleep_level") == level
    assert controller.violations == [] and controller.in_flight_at_sleep == [0]


def test_a_request_in_flight_holds_off_the_idle_sleep():
    controller = FakeController()
    app = make_model_app(controller, SleepModeOptions(idle_sleep_seconds=IDLE_S, wake_on_request=True))
    with serve_in_thread(app, lifespan="on") as url, httpx.Client(base_url=url, timeout=10) as client:
        result = {}
        held = threading.Thread(target=lambda: result.update(r=client.post("/v1/completions?hold=1", json={})))
        held.start()
        wait_until(lambda: controller.requests_running == 1, "the held request to run")
        threading.Event().wait(5 * IDLE_S)  # several idle periods pass while the request runs
        assert controller.requests_running == 1 and not controller.is_sleeping
        sleeps_while_held = len(controller.sleep_calls)
        controller.hold.set()
        held.join(10)
        assert result["r"].status_code == 200
        wait_until(lambda: len(controller.sleep_calls) > sleeps_while_held, "the idle sleep once the request finished")
    assert not controller.violations and set(controller.in_flight_at_sleep) == {0}


def test_wake_on_request_wakes_the_model_and_serves_every_waiting_request():
    controller = FakeController(call_seconds=0.05)
    options = SleepModeOptions(idle_sleep_seconds=IDLE_S, wake_on_request=True)
    app = make_model_app(controller, options)
    with serve_in_thread(app, lifespan="on") as url, httpx.Client(base_url=url, timeout=10) as client:
        wait_until(lambda: client.get("/is_sleeping").json()["is_sleeping"], "the idle sleep")
        answers = []

        def ask(i: int) -> None:
            answers.append(client.post("/v1/chat/completions", json={"i": i}))

        askers = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(20)
        assert sorted(r.status_code for r in answers) == [200] * 8
        assert sorted(r.json()["body"] for r in answers) == sorted(f'{{"i":{i}}}' for i in range(8))
        assert len(controller.wake_calls) == 1, "one wake-up for all the waiting requests"
        assert metric(client, "gpusleep_wakes_on_request_total") == 1
        assert metric(client, "gpusleep_wake_on_request_first_byte_seconds_count") == 8
        assert metric(client, "gpusleep_wake_on_request_first_byte_seconds_sum") > 0
    assert controller.violations == [] and controller.max_concurrent_calls == 1


def test_a_failed_wake_on_request_answers_the_503_and_the_server_keeps_answering():
    controller = FakeController(wake_error=MemoryError("out of GPU memory: 8 GiB needed, 1 GiB free"))
    app = make_model_app(controller, SleepModeOptions(idle_sleep_seconds=IDLE_S, wake_on_request=True))
    with serve_in_thread(app, lifespan="on") as url, httpx.Client(base_url=url, timeout=10) as client:
        wait_until(lambda: client.get("/is_sleeping").json()["is_sleeping"], "the idle sleep")
        refused = client.post("/v1/completions", json={})
        assert (refused.status_code, refused.json()) == (503, SPEC_503_BODY)
        assert client.get("/v1/models").status_code == 200
        assert metric(client, 'gpusleep_transition_failures_total{action="wake_up"}') == 1


def test_a_failing_idle_sleep_is_not_retried_in_a_loop():
    controller = FakeController(sleep_error=RuntimeError("no CUDA device"))
    app = make_model_app(controller, SleepModeOptions(idle_sleep_seconds=IDLE_S))
    with serve_in_thread(app, lifespan="on") as url, httpx.Client(base_url=url, timeout=10) as client:
        wait_until(lambda: len(controller.sleep_calls) >= 1, "the first idle sleep")
        calls_after_first = len(controller.sleep_calls)
        threading.Event().wait(IDLE_S / 2)
        assert len(controller.sleep_calls) <= calls_after_first + 1
        assert client.post("/v1/completions", json={}).status_code == 200


@pytest.mark.parametrize(
    "bad",
    [
        dict(idle_sleep_seconds=0),
        dict(idle_sleep_seconds=-1.0),
        dict(idle_sleep_seconds=float("inf")),
        dict(idle_sleep_level=3),
        dict(wake_on_request_timeout_seconds=0),
    ],
)
def test_bad_idle_options_are_refused_with_the_value(bad):
    with pytest.raises(ValueError) as error:
        SleepModeOptions(**bad)
    assert repr(next(iter(bad.values()))) in str(error.value)


def test_requests_that_waited_for_a_wake_that_failed_all_get_the_503_without_trying_again_one_by_one():
    """8 requests arrive while the model sleeps and its wake-up fails (out of GPU memory, after a while): one wake
    for all of them, and each gets the 503 once it failed, not a wake attempt of its own in turn (8 times the
    wait, and 8 failures counted for one event)."""
    controller = FakeController(wake_error=MemoryError("out of GPU memory: 8 GiB needed, 1 GiB free"), call_seconds=0.2)
    app = make_model_app(controller, SleepModeOptions(idle_sleep_seconds=IDLE_S, wake_on_request=True))
    with serve_in_thread(app, lifespan="on") as url, httpx.Client(base_url=url, timeout=30) as client:
        wait_until(lambda: client.get("/is_sleeping").json()["is_sleeping"], "the idle sleep")
        answers = []
        askers = [
            threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json={}))) for _ in range(8)
        ]
        for t in askers:
            t.start()
        for t in askers:
            t.join(30)
        assert [(r.status_code, r.json()) for r in answers] == [(503, SPEC_503_BODY)] * 8
        assert len(controller.wake_calls) == 1, controller.wake_calls
        assert metric(client, 'gpusleep_transition_failures_total{action="wake_up"}') == 1
        assert client.post("/v1/completions", json={}).status_code == 503  # a later request tries again
        assert len(controller.wake_calls) == 2
