"""gpusleep.client: on the spec's 503 the clients wake the model and retry once, through a real
sleep and wake of a real uvicorn server on loopback."""

from __future__ import annotations

import anyio
import httpx
import pytest
from _server_testkit import SPEC_503_BODY, FakeController, loopback_server, make_model_app
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from gpusleep.client import AsyncClient, Client, ControlPlaneError, is_model_sleeping, wrap_openai
from gpusleep.errors import OutOfMemoryError
from gpusleep.server import SleepModeOptions


@pytest.fixture(scope="module")
def server():
    with loopback_server() as srv:
        yield srv


def _rejected(http: httpx.Client) -> float:
    line = [ln for ln in http.get("/metrics").text.splitlines() if ln.startswith("gpusleep_rejected_requests_total ")]
    return float(line[0].split()[1])


def test_client_wakes_the_model_and_retries_once(server):
    controller = FakeController()
    with server.mount(make_model_app(controller)) as url, Client(url) as client:
        assert client.sleep(level=1)["is_sleeping"] is True
        assert client.is_sleeping() is True
        r = client.post("/v1/completions", json={"prompt": "hello"})
        assert r.status_code == 200
        assert r.json()["body"] == '{"prompt":"hello"}'  # the body was sent again, intact
        assert controller.wake_calls == [None]
        assert client.is_sleeping() is False
        assert _rejected(client) == 1  # exactly one 503 before the retry
        # Awake: no wake-up call at all.
        assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 200
        assert controller.wake_calls == [None]


def test_client_sends_wake_tags_and_control_token(server):
    controller = FakeController()
    app = make_model_app(controller, SleepModeOptions(control_token="tok"))
    with server.mount(app) as url, Client(url, control_token="tok", wake_tags=["weights", "kv_cache"]) as client:
        client.sleep(2)
        assert client.post("/v1/chat/completions", json={}).status_code == 200
        assert controller.wake_calls == [["weights", "kv_cache"]]
        assert controller.sleep_calls == [2]


def test_failed_wake_raises_with_the_servers_reason(server):
    controller = FakeController(wake_error=OutOfMemoryError("no memory", 5 << 30, 1 << 30, 0))
    with server.mount(make_model_app(controller)) as url, Client(url) as client:
        client.sleep()
        with pytest.raises(ControlPlaneError) as info:
            client.post("/v1/completions", json={})
        assert info.value.status_code == 409
        assert info.value.error_type == "InsufficientMemoryError"
        assert info.value.body["error"]["bytes_needed"] == 5 << 30
        assert "waking the model" in str(info.value)
        assert client.is_sleeping() is True


def test_wake_with_a_wrong_token_raises_401(server):
    controller = FakeController()
    app = make_model_app(controller, SleepModeOptions(control_token="right"))
    with (
        server.mount(app) as url,
        Client(url, control_token="right") as good,
        Client(url, control_token="wrong") as bad,
    ):
        good.sleep()
        with pytest.raises(ControlPlaneError) as info:
            bad.post("/v1/completions", json={})
        assert info.value.status_code == 401 and info.value.error_type == "AuthenticationError"
        assert controller.wake_calls == []


def test_retry_happens_once_only(server):
    class NeverWakes(FakeController):
        def wake_up(self, tags):
            self.wake_calls.append(tags)  # claims success, stays asleep

    controller = NeverWakes()
    with server.mount(make_model_app(controller)) as url, Client(url) as client:
        client.sleep()
        r = client.post("/v1/completions", json={})
        assert r.status_code == 503 and r.json() == SPEC_503_BODY and is_model_sleeping(r)
        assert controller.wake_calls == [None]


def test_other_503_is_returned_without_waking(server):
    app = FastAPI()
    wake_calls = []

    @app.post("/v1/completions")
    def overloaded():
        return JSONResponse({"error": {"message": "busy", "type": "Overloaded", "code": 503}}, status_code=503)

    @app.post("/wake_up")
    def wake_up():
        wake_calls.append(1)
        return {}

    with server.mount(app) as url, Client(url) as client:
        r = client.post("/v1/completions")
        assert r.status_code == 503 and r.json()["error"]["type"] == "Overloaded"
        assert not is_model_sleeping(r)
        assert wake_calls == []


def test_streamed_request_body_is_sent_again(server):
    controller = FakeController()
    with server.mount(make_model_app(controller)) as url, Client(url) as client:
        client.sleep()
        r = client.post("/v1/completions", content=iter([b'{"a":', b"1}"]))
        assert r.status_code == 200 and r.json()["body"] == '{"a":1}'


def test_async_client_wakes_the_model_and_retries_once(server):
    controller = FakeController()

    async def scenario(url: str) -> None:
        async with AsyncClient(url) as client:
            await client.sleep(level=2)
            assert await client.is_sleeping() is True
            r = await client.post("/v1/embeddings", json={"input": "x"})
            assert r.status_code == 200 and r.json()["body"] == '{"input":"x"}'
            assert await client.is_sleeping() is False
            assert (await client.wake_up(["weights"]))["is_sleeping"] is False

    with server.mount(make_model_app(controller)) as url:
        anyio.run(scenario, url)
    assert controller.sleep_calls == [2]
    assert controller.wake_calls == [None, ["weights"]]


def test_control_errors_are_clear(server):
    with server.mount(make_model_app(FakeController())) as url, Client(url) as client:
        with pytest.raises(ControlPlaneError) as info:
            client.sleep(level=3)
        assert info.value.status_code == 400 and info.value.error_type == "InvalidSleepLevelError"
        assert "POST /sleep?level=3 answered 400" in str(info.value)


def test_wrap_openai_wakes_and_retries(server):
    openai = pytest.importorskip("openai")
    controller = FakeController()
    with server.mount(make_model_app(controller)) as url:
        base = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        wrapped = wrap_openai(base)
        with Client(url) as control:
            control.sleep()
        wrapped.completions.create(model="m", prompt="hi", max_tokens=1)
        assert controller.wake_calls == [None]

        async def async_scenario() -> None:
            client = wrap_openai(openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0))
            await client.completions.create(model="m", prompt="x", max_tokens=1)

        with Client(url) as control:
            control.sleep()
        anyio.run(async_scenario)
        assert controller.wake_calls == [None, None]


def test_wrap_openai_rejects_other_objects():
    pytest.importorskip("openai")
    with pytest.raises(TypeError, match="openai.OpenAI"):
        wrap_openai(object())


def test_many_clients_waking_a_sleeping_model_together_all_get_their_answer(server):
    """Only one wake-up runs at a time; the others are told 409 TransitionInProgressError and the
    clients ask again until the model is awake, so every request gets its 200."""
    controller = FakeController(call_seconds=0.05)  # a wake-up long enough for the others to meet it
    clients = 8

    async def scenario(url: str) -> list:
        results = []
        async with AsyncClient(url, timeout=30, limits=httpx.Limits(max_connections=clients + 2)) as client:
            await client.sleep(level=1, mode="wait")

            async def one(i: int) -> None:
                results.append(await client.post("/v1/completions", json={"i": i}))

            async with anyio.create_task_group() as tg:
                for i in range(clients):
                    tg.start_soon(one, i)
        return results

    with server.mount(make_model_app(controller)) as url:
        results = anyio.run(scenario, url)
    assert [r.status_code for r in results] == [200] * clients
    assert 1 <= len(controller.wake_calls) <= clients
    assert controller.max_concurrent_calls == 1


def test_client_sleep_passes_the_mode(server):
    controller = FakeController()
    with server.mount(make_model_app(controller)) as url, Client(url) as client:
        body = client.sleep(level=2, mode="abort")
        assert body["mode"] == "abort" and body["level"] == 2 and body["already_sleeping"] is False
        with pytest.raises(ControlPlaneError) as info:
            client.sleep(level=1, mode="later")
        assert info.value.status_code == 400 and info.value.body["error"]["param"] == "mode"
