"""The SGLang dialect's promises and the answer's model name, in process: backends in the shape of SGLang's
HTTP server (``/flush_cache``, ``/release_memory_occupation``, ``/resume_memory_occupation``, no
``/is_sleeping``) served by uvicorn on loopback behind the switch app, and the renaming of ``"model"`` in
JSON answers and server-sent events (Note [The answer names the model that was asked for] in relay.py)."""

from __future__ import annotations

import json

import httpx
import pytest
from _server_testkit import serve_in_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from gpusleep.switch import create_switch_app, parse_config
from gpusleep.switch.relay import ModelRenamer

pytestmark = pytest.mark.timeout(60)


class SglangShaped:
    """SGLang's control endpoints; ``release_ok`` decides the release's ``success``."""

    def __init__(self, served: str) -> None:
        self.served = served
        self.released = False
        self.release_ok = True
        self.calls: list[str] = []

    def app(self) -> Starlette:
        async def flush(request: Request) -> JSONResponse:
            self.calls.append("flush_cache")
            return JSONResponse({"success": True})

        async def release(request: Request) -> JSONResponse:
            self.calls.append("release")
            if not self.release_ok:
                return JSONResponse({"success": False, "message": "requests are still running"})
            self.released = True
            return JSONResponse({"success": True, "message": "ok"})

        async def resume(request: Request) -> JSONResponse:
            self.calls.append("resume")
            self.released = False
            return JSONResponse({"success": True, "message": "ok"})

        async def completions(request: Request):
            body = await request.json()
            assert not self.released, "a request reached a released SGLang"
            if body.get("stream"):

                async def events():
                    for piece in ("a", "b"):
                        yield f"data: {json.dumps({'model': self.served, 'choices': [{'text': piece}]})}\n\n"
                    yield "data: [DONE]\n\n"

                return StreamingResponse(events(), media_type="text/event-stream")
            return JSONResponse({"model": self.served, "choices": [{"text": body["prompt"][::-1]}]})

        return Starlette(
            routes=[
                Route("/flush_cache", flush, methods=["POST"]),
                Route("/release_memory_occupation", release, methods=["POST"]),
                Route("/resume_memory_occupation", resume, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"]),
            ]
        )


def test_an_sglang_backend_counts_as_released_only_when_its_release_succeeds():
    one, two = SglangShaped("org/one"), SglangShaped("org/two")
    with serve_in_thread(one.app()) as url1, serve_in_thread(two.app()) as url2:
        config = parse_config(
            {
                "backends": [
                    {"model": "one", "url": url1, "kind": "sglang", "served_model": "org/one"},
                    {"model": "two", "url": url2, "kind": "sglang", "served_model": "org/two"},
                ]
            }
        )
        with serve_in_thread(create_switch_app(config)) as switch, httpx.Client(base_url=switch, timeout=30) as client:
            # Unknown at start, and SGLang cannot say: both are taken as awake, so one is released for the other.
            answer = client.post("/v1/completions", json={"model": "one", "prompt": "ab"})
            assert answer.json() == {"model": "one", "choices": [{"text": "ba"}]}
            assert two.calls == ["flush_cache", "release"] and one.calls == []  # one was awake already

            one.release_ok = False  # a release that answers success: false is a failed sleep
            answer = client.post("/v1/completions", json={"model": "two", "prompt": "cd"})
            assert answer.status_code == 502
            error = answer.json()["error"]
            assert (error["backend"], error["backend_action"]) == ("one", "sleep")
            assert "success: false" in error["message"] and "requests are still running" in error["message"]
            assert two.calls == ["flush_cache", "release"]  # two was not resumed over one
            status = {b["model"]: b for b in client.get("/switch/status").json()["backends"]}
            assert status["one"]["state"] == "unknown" and status["two"]["state"] == "asleep_l1"

            one.release_ok = True
            answer = client.post("/v1/completions", json={"model": "two", "prompt": "cd"})
            assert answer.json() == {"model": "two", "choices": [{"text": "dc"}]}
            assert one.calls[-2:] == ["flush_cache", "release"] and two.calls[-1] == "resume"


def test_server_sent_events_name_the_model_that_was_asked_for():
    backend = SglangShaped("org/one")
    with serve_in_thread(backend.app()) as url:
        config = parse_config({"backends": [{"model": "one", "url": url, "kind": "sglang", "served_model": "org/one"}]})
        with serve_in_thread(create_switch_app(config)) as switch, httpx.Client(base_url=switch, timeout=30) as client:
            with client.stream("POST", "/v1/completions", json={"model": "one", "prompt": "x", "stream": True}) as s:
                lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert [(e["model"], e["choices"][0]["text"]) for e in events] == [("one", "a"), ("one", "b")]


def test_the_renamer_rewrites_across_chunk_boundaries_and_leaves_other_models_alone():
    events = ModelRenamer("org/m", "m", "text/event-stream")
    stream = b'data: {"model": "org/m", "x": 1}\n\ndata: {"model": "other"}\n\n: comment\ndata: [DONE]\n\n'
    out = b"".join(events.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)) + events.end()
    assert out == b'data: {"model": "m", "x": 1}\n\ndata: {"model": "other"}\n\n: comment\ndata: [DONE]\n\n'

    whole = ModelRenamer("org/m", "m", "application/json")
    body = json.dumps({"model": "org/m", "choices": [{"text": "é"}]}).encode()
    assert whole.feed(body[:5]) == b"" and whole.feed(body[5:]) == b""
    assert json.loads(whole.end()) == {"model": "m", "choices": [{"text": "é"}]}

    assert (
        ModelRenamer.for_answer(
            "org/m", "m", httpx.Headers({"content-type": "application/json", "content-encoding": "gzip"})
        )
        is None
    )
    assert ModelRenamer.for_answer("org/m", "m", httpx.Headers({"content-type": "text/plain"})) is None
    assert ModelRenamer.for_answer(None, "m", httpx.Headers({"content-type": "application/json"})) is None
