"""A stand-in for an inference engine behind ``gpusleep switch``, in the shape of vLLM's or SGLang's HTTP
server (tests/switch/test_switch_kinds.py launches it; no real engine runs without a GPU). Its "weights" are bytes
derived from its model name: an answer's text is the prompt reversed while they are intact, "weights lost"
otherwise. It keeps its memory in the shared ledger (switch_ledger.py) and refuses to start, as vLLM does,
when the GPU has less free than it needs.

    python switch_standin_engine.py --dialect vllm|sglang|none --model NAME --port P --ledger DIR
        --capacity BYTES --gpu-bytes N --host-bytes N [--startup-s S]

vllm: ``POST /sleep?level=1|2`` (a sleep while asleep is ignored, as in vLLM), ``POST /wake_up[?tags=...]``,
``GET /is_sleeping``, ``POST /collective_rpc {"method": "reload_weights"}`` (needs the weights' memory
awake), ``POST /reset_prefix_cache``; after a level-2 wake-up the prefix cache must be reset before
answers say ``prefix_cache_ok``. sglang: ``POST /flush_cache``, ``POST /release_memory_occupation``
(refused with ``success: false`` unless the cache was flushed since the last request: the stand-in's way of
checking the order), ``POST /resume_memory_occupation``; no ``/is_sleeping``, as in SGLang. none: no sleep
API (a llama.cpp server, say). Every control call is listed by ``GET /standin/calls``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

# Run as a script: its own folder is on sys.path; the shared test modules (fakecuda, helpers) are one up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from switch_ledger import Ledger  # noqa: E402

SLEEPING = {
    "error": {
        "message": "Model is currently in sleep mode. Please wake it up first with a POST request to /wake_up",
        "type": "ModelSleepingError",
        "code": 503,
    }
}


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--dialect", "--model", "--ledger"):
        parser.add_argument(name, required=True)
    for name in ("--port", "--capacity", "--gpu-bytes", "--host-bytes"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--startup-s", type=float, default=0.0)
    args = parser.parse_args()
    ledger = Ledger(args.ledger, args.capacity)
    expected = hashlib.sha256(args.model.encode()).digest()
    half = args.gpu_bytes // 2
    time.sleep(args.startup_s)  # loading the model
    if not ledger.hold(args.model, args.gpu_bytes, 0):
        print(
            f"ValueError: Free memory on device ({ledger.free_bytes(args.model)} bytes) on startup is less than "
            f"desired GPU memory ({args.gpu_bytes} bytes)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
    s = {
        "weights": expected,
        "host_copy": None,
        "weights_mapped": True,
        "kv_mapped": True,
        "prefix_stale": False,
        "flushed": False,
        "calls": [],
    }

    def held() -> None:
        gpu = (half if s["weights_mapped"] else 0) + (args.gpu_bytes - half if s["kv_mapped"] else 0)
        ledger.hold(args.model, gpu, args.host_bytes if s["host_copy"] is not None else 0, check_gpu=False)

    def asleep() -> bool:
        return not (s["weights_mapped"] and s["kv_mapped"])

    def call(request: Request) -> None:
        s["calls"].append(
            f"{request.method} {request.url.path}" + (f"?{request.url.query}" if request.url.query else "")
        )

    async def completions(request: Request) -> JSONResponse:
        if asleep():
            return JSONResponse(SLEEPING, status_code=503)
        body = await request.json()
        s["flushed"] = False
        intact = s["weights"] == expected
        text = body["prompt"][::-1] if intact else "weights lost"
        return JSONResponse(
            {
                "model": args.model,
                "text": text,
                "weights_intact": intact,
                "pid": os.getpid(),
                "prefix_cache_ok": not s["prefix_stale"],
                "choices": [{"index": 0, "text": text}],
            }
        )

    def sleep_to(level: int) -> None:
        s["host_copy"] = s["weights"] if level == 1 else None
        s["weights"] = None
        s["weights_mapped"] = s["kv_mapped"] = False
        held()

    def map_(part: str) -> bool:
        need = half if part == "weights" else args.gpu_bytes - half
        gpu, _ = ledger.totals()
        if gpu + need > args.capacity:
            return False
        s[f"{part}_mapped"] = True
        if part == "weights":
            s["weights"] = s["host_copy"] if s["host_copy"] is not None else b"\0" * len(expected)
            s["host_copy"] = None
        else:
            s["prefix_stale"] = s["weights"] != expected or s["prefix_stale"]
        held()
        return True

    async def sleep(request: Request) -> JSONResponse:
        call(request)
        if not asleep():  # vLLM ignores a sleep while asleep
            sleep_to(int(request.query_params.get("level", "1")))
        return JSONResponse({})

    async def wake_up(request: Request) -> JSONResponse:
        call(request)
        tags = request.query_params.getlist("tags") or ["weights", "kv_cache"]
        for tag in tags:
            part = "kv" if tag == "kv_cache" else "weights"
            if not s[f"{part}_mapped"] and not map_(part):
                return JSONResponse(
                    {"error": {"message": "CUDA out of memory", "type": "OutOfMemoryError", "code": 500}},
                    status_code=500,
                )
        return JSONResponse({})

    async def is_sleeping(request: Request) -> JSONResponse:
        return JSONResponse({"is_sleeping": asleep()})

    async def collective_rpc(request: Request) -> JSONResponse:
        call(request)
        body = await request.json()
        if body.get("method") != "reload_weights" or not s["weights_mapped"]:
            return JSONResponse({"error": {"message": f"cannot run {body!r} now", "code": 500}}, status_code=500)
        s["weights"] = expected
        return JSONResponse({"results": [None]})

    async def reset_prefix_cache(request: Request) -> JSONResponse:
        call(request)
        s["prefix_stale"] = False
        return JSONResponse({})

    async def flush_cache(request: Request) -> JSONResponse:
        call(request)
        s["flushed"] = True
        return JSONResponse({"success": True})

    async def release(request: Request) -> JSONResponse:
        call(request)
        if not s["flushed"]:
            return JSONResponse({"success": False, "message": "stand-in: flush the cache before a release"})
        if not asleep():
            sleep_to(1)  # as SGLang with --enable-weights-cpu-backup
        return JSONResponse({"success": True, "message": "released"})

    async def resume(request: Request) -> JSONResponse:
        call(request)
        for part in ("weights", "kv"):
            if not s[f"{part}_mapped"] and not map_(part):
                return JSONResponse({"success": False, "message": "out of memory"})
        return JSONResponse({"success": True, "message": "resumed"})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def calls(request: Request) -> JSONResponse:
        return JSONResponse(s["calls"])

    routes = [
        Route("/health", health),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/standin/calls", calls),
    ]
    if args.dialect == "vllm":
        routes += [
            Route("/sleep", sleep, methods=["POST"]),
            Route("/wake_up", wake_up, methods=["POST"]),
            Route("/is_sleeping", is_sleeping),
            Route("/collective_rpc", collective_rpc, methods=["POST"]),
            Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"]),
        ]
    elif args.dialect == "sglang":
        routes += [
            Route("/flush_cache", flush_cache, methods=["POST"]),
            Route("/release_memory_occupation", release, methods=["POST"]),
            Route("/resume_memory_occupation", resume, methods=["POST"]),
        ]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
