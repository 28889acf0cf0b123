"""Campaign against ``gpusleep switch`` (issue 13): many clients at once, of every kind a production front door
meets (plain and streaming requests, clients that leave mid-stream, clients that read slowly, bodies over the
cap), in front of three backends under a GPU memory budget whose sleeps and wake-ups fail at random.

What must hold whatever happens:
  * every answer is one of 200 (and then the right text, from the right model), 413, 502 (naming a backend
    and its action) or 503 (``SwitchTimeoutError``): never a 500, never a wrong or mixed-up answer;
  * the awake backends never hold more than the budget (checked at every wake-up a backend sees);
  * no model request runs on a backend while it is asleep, no backend is put to sleep under a running
    request, and a backend's sleep and wake-up never overlap;
  * afterwards no lease is left, every backend's state is known, and with faults turned off every model is
    served again (no lock or lease was lost on the way).

Size: ``$GPUSLEEP_CAMPAIGN_SCALE`` (default 1, the CI size) times 3 seeds of 120 clients.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from _server_testkit import serve_in_thread
from campaign_model import campaign_scale
from test_switch_router import Backend, Monitor, backend_app, big_body, read_http_body, slow_reader

from gpusleep.errors import OutOfMemoryError
from gpusleep.switch import create_switch_app, parse_config

pytestmark = pytest.mark.timeout(300)

MEMORY = {"alpha": 4, "beta": 4, "gamma": 6}
BUDGET = 10
CLIENTS = 120
BIG_BYTES = 1 << 20
BODY_CAP_BYTES = 256 << 10


class FaultyBackend(Backend):
    """A backend whose sleeps and wake-ups fail at random while ``faults_on`` is set."""

    def __init__(self, model: str, monitor: Monitor, rng: random.Random, probability: float) -> None:
        super().__init__(model, monitor)
        self.rng = rng
        self.rng_lock = threading.Lock()
        self.probability = probability
        self.faults_on = True
        self.injected = Counter()

    def _fault(self, action: str) -> bool:
        with self.rng_lock:
            hit = self.faults_on and self.rng.random() < self.probability
        if hit:
            self.injected[action] += 1
        return hit

    def sleep(self, level):
        if self._fault("sleep"):
            raise RuntimeError(f"{self.model}: injected sleep failure")
        return super().sleep(level)

    def wake_up(self, tags):
        if self._fault("wake_up"):
            raise OutOfMemoryError(f"{self.model}: injected: not enough GPU memory to wake")
        return super().wake_up(tags)


@contextlib.contextmanager
def campaign_switch(seed: int) -> Iterator[tuple]:
    monitor = Monitor(MEMORY)
    rng = random.Random(seed)
    backends = {m: FaultyBackend(m, monitor, random.Random(rng.random()), probability=0.15) for m in MEMORY}
    for backend in backends.values():
        backend.asleep = set()  # all start awake: over the budget until the first switch makes room
    with contextlib.ExitStack() as stack:
        urls = {m: stack.enter_context(serve_in_thread(backend_app(b))) for m, b in backends.items()}
        config = parse_config(
            {
                "backends": [{"model": m, "url": urls[m], "gpu_memory_bytes": MEMORY[m]} for m in MEMORY],
                "gpu_memory_budget_bytes": BUDGET,
                "switch_timeout_s": 10,
                "max_body_bytes": BODY_CAP_BYTES,
                "response_buffer_bytes": 4 * BIG_BYTES,
            }
        )
        switch_url = stack.enter_context(serve_in_thread(create_switch_app(config)))
        client = stack.enter_context(httpx.Client(base_url=switch_url, timeout=60))
        yield client, backends, monitor


def check_error(answer: httpx.Response) -> str:
    """The answer is one of the errors the switch may give; returns its status and type."""
    assert answer.status_code in (413, 502, 503), (answer.status_code, answer.text[:500])
    error = answer.json()["error"]
    expected = {413: "RequestTooLargeError", 502: "BackendError", 503: "SwitchTimeoutError"}[answer.status_code]
    assert error["type"] == expected, error
    if answer.status_code == 502:
        assert error["backend"] in MEMORY and error["backend_action"] in ("sleep", "wake_up"), error
    return f"{answer.status_code} {expected}"


def plain(client: httpx.Client, model: str, i: int) -> str:
    answer = client.post("/v1/completions", json={"model": model, "prompt": f"p{i}"})
    if answer.status_code != 200:
        return check_error(answer)
    assert answer.json() == {"model": model, "text": f"p{i}"[::-1]}
    return "200 plain"


def streamed(client: httpx.Client, model: str, i: int) -> str:
    with client.stream("POST", "/v1/completions", json={"model": model, "prompt": f"s{i}", "stream": True}) as answer:
        if answer.status_code != 200:
            answer.read()
            return check_error(answer)
        events = [
            json.loads(line[6:]) for line in answer.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"
        ]
    assert all(e["model"] == model for e in events) and "".join(e["text"] for e in events) == f"s{i}"[::-1]
    return "200 streamed"


def leaves_mid_stream(client: httpx.Client, model: str, i: int) -> str:
    with client.stream("POST", "/v1/completions", json={"model": model, "prompt": "x" * 50, "stream": True}) as answer:
        if answer.status_code != 200:
            answer.read()
            return check_error(answer)
        next(answer.iter_lines())
    return "left mid-stream"


def reads_slowly(client: httpx.Client, model: str, i: int) -> str:
    sock = slow_reader(str(client.base_url), {"model": model, "big_bytes": BIG_BYTES})
    sock.settimeout(60)
    try:
        time.sleep(0.2)  # reads nothing meanwhile: the answer piles up in the switch
        head = sock.recv(16, socket.MSG_PEEK)  # the status line, left in place
        if not head.startswith(b"HTTP/1.1 200"):
            return "slow reader refused"  # an error answer (its shape is checked on the other paths)
        assert read_http_body(sock) == big_body(BIG_BYTES)
    finally:
        sock.close()
    return "200 read slowly"


def too_big(client: httpx.Client, model: str, i: int) -> str:
    answer = client.post("/v1/completions", json={"model": model, "prompt": "y" * BODY_CAP_BYTES})
    assert answer.status_code == 413, answer.text[:300]
    return check_error(answer)


KINDS: list[Callable[[httpx.Client, str, int], str]] = [
    plain,
    plain,
    plain,
    streamed,
    streamed,
    leaves_mid_stream,
    reads_slowly,
    too_big,
]


@pytest.mark.parametrize("seed", range(3 * campaign_scale()))
def test_the_switch_keeps_its_promises_under_a_mix_of_clients_and_failing_backends(seed):
    rng = random.Random(seed)
    jobs = [(rng.choice(KINDS), rng.choice(sorted(MEMORY)), i) for i in range(CLIENTS * campaign_scale())]
    with campaign_switch(seed) as (client, backends, monitor):
        with ThreadPoolExecutor(8) as pool:
            outcomes = Counter(pool.map(lambda job: job[0](client, job[1], job[2]), jobs))
        for backend in backends.values():
            backend.faults_on = False
        status = {s["model"]: s for s in client.get("/switch/status").json()["backends"]}
        assert all(s["requests_in_flight"] == 0 for s in status.values()), status
        for model in sorted(MEMORY):  # every model is served again once nothing fails
            assert plain(client, model, -1) == "200 plain"
        status = {s["model"]: s for s in client.get("/switch/status").json()["backends"]}
        assert all(s["awake"] is not None for s in status.values()), status
    assert monitor.max_awake_bytes <= BUDGET, monitor.max_awake_bytes
    for backend in backends.values():
        assert backend.violations == [], backend.violations
        assert set(backend.in_flight_at_sleep) <= {0}, "a backend was put to sleep under a running request"
        assert backend.max_concurrent_calls == 1
    injected = sum(sum(b.injected.values()) for b in backends.values())
    print(f"seed {seed}: {dict(outcomes)}; {injected} injected faults")
    assert outcomes["200 plain"] > 0 and injected > 0  # the campaign exercised both paths
