"""The demo server on a real GPU: it generates, sleeps (503 while asleep), wakes, and generates the
same text with the same seed; a level-2 sleep reloads the weights on wake. Needs CUDA (marker ``gpu``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="the demo server needs gpusleep[serve] (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the demo server needs gpusleep[serve] (fastapi, uvicorn)")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"
    ),
]

SPEC_503_BODY = {
    "error": {
        "message": "Model is currently in sleep mode. Please wake it up first with a POST request to /wake_up",
        "type": "ModelSleepingError",
        "code": 503,
    }
}
COMPLETION = {"prompt": "The GPU went to sleep and", "max_tokens": 24, "temperature": 0.8, "seed": 1234}


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[1] for line in text.splitlines() if line.split(" ")[0] == name))


@pytest.fixture(scope="module")
def http():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env.pop("GPUSLEEP_CUDA_DRIVER", None)  # the real driver, never the test double
    env.pop("GPUSLEEP_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpusleep.cli", "serve", "--device", "cuda", "--port", str(port), "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"gpusleep serve exited with {proc.returncode}:\n{proc.stdout.read()}"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gpusleep serve did not answer /health within 120 s"
            time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=120) as client:
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


def _complete(http: httpx.Client) -> str:
    r = http.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("level", [1, 2])
def test_generate_sleep_503_wake_same_text(http, level):
    before = _complete(http)
    assert len(before) == COMPLETION["max_tokens"]

    r = http.post(f"/sleep?level={level}")
    assert r.status_code == 200, r.text
    report = r.json()["report"]
    assert report["bytes_freed"] > 0
    if level == 1:
        assert report["bytes_offloaded"] > 0
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}

    asleep = http.post("/v1/completions", json=COMPLETION)
    assert asleep.status_code == 503 and asleep.json() == SPEC_503_BODY and "retry-after" in asleep.headers
    assert http.post("/tokenize", json={"prompt": "still works"}).status_code == 200
    assert http.get("/v1/models").status_code == 200
    metrics = http.get("/metrics").text
    assert _metric(metrics, "gpusleep_sleeping") == 1
    assert _metric(metrics, 'gpusleep_tag_asleep_bytes{tag="weights"}') > 0

    r = http.post("/wake_up")
    assert r.status_code == 200, r.text
    assert r.json()["is_sleeping"] is False
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert _complete(http) == before


def test_staged_wake_keeps_503_until_everything_is_awake(http):
    before = _complete(http)
    assert http.post("/sleep?level=1").status_code == 200
    r = http.post("/wake_up?tags=weights")
    assert r.status_code == 200 and r.json()["is_sleeping"] is True
    assert http.post("/v1/completions", json=COMPLETION).status_code == 503
    unknown = http.post("/wake_up?tags=no_such_tag")
    assert unknown.status_code == 400 and unknown.json()["error"]["type"] == "UnknownTagError"
    assert http.post("/wake_up?tags=kv_cache").json()["is_sleeping"] is False
    assert _complete(http) == before
