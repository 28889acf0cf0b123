"""The demo server: ``gpusleep serve`` as a real process on loopback (CPU), and the demo app's
endpoints in both sleep states with a fake controller."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("torch")

from _server_testkit import (  # noqa: E402
    SPEC_503_BODY,
    WAIT_S,
    FakeController,
    loopback_server,
    start_cli_server,
    stop_cli_server,
)

from gpusleep.cli import build_parser  # noqa: E402
from gpusleep.demo import TinyEngine, TinyTransformerConfig, create_app  # noqa: E402

TOKEN = "demo-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def cpu_server():
    proc, url = start_cli_server("--device", "cpu", "--token", TOKEN)
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            yield http
    finally:
        stop_cli_server(proc)


def test_cli_defaults_bind_loopback():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.model is None and args.device == "auto"


def test_models(cpu_server):
    data = cpu_server.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["gpusleep-tiny"] and data[0]["object"] == "model"


def test_served_model_name_is_the_name_clients_use():
    proc, url = start_cli_server("--device", "cpu", "--served-model-name", "qwen-7b-chat")
    try:
        with httpx.Client(base_url=url, timeout=WAIT_S) as client:
            assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["qwen-7b-chat"]
            body = {"model": "qwen-7b-chat", "prompt": "Hello", "max_tokens": 3}
            answer = client.post("/v1/completions", json=body)
            assert answer.status_code == 200 and answer.json()["model"] == "qwen-7b-chat"
            assert client.post("/v1/completions", json={**body, "model": "gpusleep-tiny"}).status_code == 404
    finally:
        stop_cli_server(proc)


def test_completions_same_seed_same_text(cpu_server):
    body = {"model": "gpusleep-tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.8, "seed": 7}
    first = cpu_server.post("/v1/completions", json=body).json()
    second = cpu_server.post("/v1/completions", json=body).json()
    assert first["object"] == "text_completion"
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert len(first["choices"][0]["text"]) == 12
    assert first["usage"] == {"prompt_tokens": 16, "completion_tokens": 12, "total_tokens": 28}
    other = cpu_server.post("/v1/completions", json={**body, "seed": 8}).json()
    assert other["choices"][0]["text"] != first["choices"][0]["text"]
    two = cpu_server.post("/v1/completions", json={**body, "prompt": ["a", "b"]}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]


def test_chat_completions(cpu_server):
    body = {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 5, "temperature": 0}
    r = cpu_server.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert choice["message"]["role"] == "assistant" and len(choice["message"]["content"]) == 5
    assert r.json()["choices"][0] == cpu_server.post("/v1/chat/completions", json=body).json()["choices"][0]


def test_embeddings(cpu_server):
    r = cpu_server.post("/v1/embeddings", json={"input": ["one", "two"]})
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    assert len(data[0]["embedding"]) == TinyTransformerConfig().d_model
    assert data[0]["embedding"] != data[1]["embedding"]


def test_tokenize_and_detokenize(cpu_server):
    tokens = cpu_server.post("/tokenize", json={"prompt": "héllo"}).json()
    assert tokens["count"] == 6 and tokens["max_model_len"] == 512
    assert cpu_server.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "héllo"}
    chat = cpu_server.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]}).json()
    assert chat["count"] > 1


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404),
        ("/v1/completions", {"prompt": "x", "logprobs": 1}, 400),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400),
        ("/v1/chat/completions", {"messages": []}, 400),
        ("/detokenize", {"tokens": [1, 100000]}, 400),
        ("/tokenize", {}, 400),
    ],
)
def test_bad_requests(cpu_server, path, body, status):
    r = cpu_server.post(path, json=body)
    assert r.status_code == status
    assert r.json()["error"]["code"] == status and r.json()["error"]["message"]


def test_sleep_on_cpu_says_it_needs_cuda_and_keeps_serving(cpu_server):
    assert cpu_server.post("/sleep").status_code == 401  # the token is required
    for path in ("/sleep?level=1", "/wake_up"):
        r = cpu_server.post(path, headers=AUTH)
        assert r.status_code == 501
        error = r.json()["error"]
        assert error["type"] == "SleepModeUnavailableError" and "needs a CUDA device" in error["message"]
    assert cpu_server.get("/is_sleeping").json() == {"is_sleeping": False}
    assert cpu_server.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert "gpusleep_sleeping 0.0" in cpu_server.get("/metrics").text


def test_sleep_attempts_on_cpu_turn_no_completion_away(cpu_server):
    """On the CPU sleep answers 501 at once: it never closes admission, so no completion gets a 503
    and no attempt waits for the running ones (the old gate drained first, then said 501)."""
    body = {"prompt": "Once", "max_tokens": 3, "temperature": 0}
    clients, per_client, attempts = 4, 12, 16

    def complete(_: int) -> list:
        return [cpu_server.post("/v1/completions", json=body).status_code for _ in range(per_client)]

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(complete, i) for i in range(clients)]
        sleeps = [cpu_server.post("/sleep", headers=AUTH).status_code for _ in range(attempts)]
        statuses = [s for f in futures for s in f.result(timeout=120)]
    assert sleeps == [501] * attempts
    assert statuses == [200] * (clients * per_client)


def test_demo_endpoints_in_both_states():
    engine = TinyEngine(TinyTransformerConfig(d_model=32, n_heads=2, d_ff=64, max_seq_len=64))
    controller = FakeController()
    app = create_app(engine, controller)
    body = {"prompt": "abc", "max_tokens": 6, "temperature": 0.9, "seed": 11}
    protected = [
        ("/v1/completions", body),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 1}),
        ("/v1/embeddings", {"input": "abc"}),
    ]
    unprotected = [
        ("POST", "/tokenize", {"prompt": "abc"}),
        ("POST", "/detokenize", {"tokens": [97]}),
        ("GET", "/v1/models", None),
        ("GET", "/health", None),
    ]
    with loopback_server() as server, server.mount(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        before = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        for path, payload in protected:
            assert http.post(path, json=payload).status_code == 200
        assert http.post("/sleep?level=1").status_code == 200
        for path, payload in protected:
            r = http.post(path, json=payload)
            assert r.status_code == 503 and r.json() == SPEC_503_BODY
        for method, path, payload in unprotected:
            assert http.request(method, path, json=payload).status_code == 200
        assert http.get("/is_sleeping").json() == {"is_sleeping": True}
        assert http.post("/wake_up").status_code == 200
        assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == before


def test_cli_reports_a_bad_model_directory_or_device_clearly(tmp_path, capsys):
    from gpusleep.cli import main

    assert main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpusleep serve: --model ") and ("transformers" in err or "config.json" in err)
    try:  # refused by the argument parser (exit status 2) or by the command itself (returns 2)
        status = main(["serve", "--device", "tpu"])
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2 and "--device" in err and "tpu" in err
