"""A ``gpusleep`` backend for tests/switch/test_switch_kinds.py: a model whose weights (3 MiB, seeded from its name)
and KV cache (2 MiB) live in a ``gpusleep.Allocator`` on the driver double, served with
``gpusleep.server.install`` (so it speaks the vLLM dialect and the SGLang one). Its answer's text is the
prompt reversed while the weights read back bit-exact, "weights lost" otherwise. ``POST /collective_rpc
{"method": "reload_weights"}`` writes the weights again (the reload of a level-2 wake-up). It keeps its
memory in the shared ledger (switch_ledger.py): refused start when the GPU lacks ``--gpu-bytes``, and after
each control call what it holds (GPU: the declared bytes while awake; host: its allocator's backed-up bytes).

    python switch_standin_gpusleep.py --model NAME --port P --ledger DIR --capacity BYTES --gpu-bytes N
"""

from __future__ import annotations

import argparse
import os
import sys

import uvicorn
from fastapi import FastAPI, Request

# Run as a script: its own folder is on sys.path; the shared test modules (fakecuda, helpers) are one up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fakecuda import harness  # noqa: E402
from helpers import MiB, pattern, write_blobs  # noqa: E402
from switch_ledger import Ledger  # noqa: E402

import gpusleep  # noqa: E402
import gpusleep.server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--ledger", required=True)
    for name in ("--port", "--capacity", "--gpu-bytes"):
        parser.add_argument(name, type=int, required=True)
    args = parser.parse_args()
    ledger = Ledger(args.ledger, args.capacity)
    if not ledger.hold(args.model, args.gpu_bytes, 0):
        print(
            f"free memory on the GPU ({ledger.free_bytes(args.model)} bytes) is less than desired "
            f"({args.gpu_bytes} bytes)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
    fake = harness.FakeCuda(os.environ["GPUSLEEP_CUDA_DRIVER"])
    fake.configure(devices=1, capacity_bytes=64 * MiB, granularity_bytes=2 * MiB, seed=len(args.model))
    alloc = gpusleep.Allocator()
    alloc.set_policy("weights", "offload")
    alloc.set_policy("kv_cache", "discard")
    seed = sum(map(ord, args.model))
    blobs = write_blobs(alloc, fake, [3 * MiB, 4096], seed=seed, tag="weights")
    alloc.allocate(2 * MiB, tag="kv_cache")
    app = FastAPI()

    @app.middleware("http")
    async def keep_the_ledger(request: Request, call_next):
        response = await call_next(request)
        if request.method == "POST" and request.url.path in (
            "/sleep",
            "/wake_up",
            "/release_memory_occupation",
            "/resume_memory_occupation",
        ):
            stats = alloc.stats()
            host = sum(t.bytes_backed_up for t in stats.tags.values())
            ledger.hold(args.model, 0 if stats.is_sleeping else args.gpu_bytes, host, check_gpu=False)
        return response

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:
        intact = all(fake.read(a, len(d)) == d for a, d in blobs.items())
        text = body["prompt"][::-1] if intact else "weights lost"
        return {
            "model": args.model,
            "text": text,
            "weights_intact": intact,
            "pid": os.getpid(),
            "choices": [{"index": 0, "text": text}],
        }

    @app.post("/collective_rpc")
    def collective_rpc(body: dict) -> dict:
        assert body == {"method": "reload_weights"}, body
        for i, (address, data) in enumerate(blobs.items()):
            fake.write(address, pattern(len(data), seed + i))
        return {"results": [None]}

    gpusleep.server.install(app, alloc)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
