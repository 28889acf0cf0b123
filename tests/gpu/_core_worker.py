"""The core on a real GPU without torch: ``python _core_worker.py``.

gpusleep.Allocator.allocate() maps memory; bytes go in and out through the driver's own synchronous
copies (ctypes on libcuda, cuda_driver.py). Level 1 must bring offloaded bytes back bit-exact and
discarded ones zero-filled, at the same addresses; level 2 zero-fills everything; cuMemGetInfo must show
the memory released while asleep. Prints one GPUSLEEP_RESULT JSON line (assertions: test_gpu_core.py)."""

from __future__ import annotations

import hashlib
import os
import random
import sys
import traceback

from cuda_driver import Driver
from gpu_workers import emit_result

import gpusleep

MiB = 1 << 20
WEIGHTS_BYTES = 96 * MiB + 12345  # not a granularity multiple on purpose
KV_BYTES = 32 * MiB


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run() -> dict:
    drv = Driver()
    drv.check("cuInit", drv.init())
    drv.check("cuCtxSetCurrent", drv.set_current(drv.primary_context(drv.device(0))))
    alloc = gpusleep.Allocator()
    weights = alloc.allocate(WEIGHTS_BYTES, tag="weights")
    kv = alloc.allocate(KV_BYTES, tag="kv_cache")
    payload = random.Random(7).randbytes(WEIGHTS_BYTES)
    drv.check("cuMemcpyHtoD", drv.htod(weights, payload))
    drv.check("cuMemcpyHtoD", drv.htod(kv, b"\x5a" * KV_BYTES))
    facts: dict = {"weights_bytes": WEIGHTS_BYTES, "kv_bytes": KV_BYTES, "payload_sha256": digest(payload)}

    def free_now() -> int:
        drv.check("cuCtxSynchronize", drv.ctx_synchronize())
        rc, free, _ = drv.mem_get_info()
        drv.check("cuMemGetInfo", rc)
        return free

    def read(address: int, size: int) -> bytes:
        rc, data = drv.dtoh(address, size)
        drv.check("cuMemcpyDtoH", rc)
        return data

    # Level 1: weights offloaded, KV discarded.
    free_awake = free_now()
    sleep1 = alloc.sleep(level=1)
    facts["level1_freed_bytes"] = free_now() - free_awake
    facts["level1_bytes_offloaded"] = sleep1.bytes_offloaded
    alloc.wake_up()
    facts["level1_weights_sha256"] = digest(read(weights, WEIGHTS_BYTES))
    kv_after = read(kv, KV_BYTES)
    facts["level1_kv_zero_filled"] = kv_after.count(0) == KV_BYTES

    # Level 2: everything discarded; staged wake.
    free_awake = free_now()
    alloc.sleep(level=2)
    facts["level2_freed_bytes"] = free_now() - free_awake
    alloc.wake_up(tags=["weights"])
    facts["level2_weights_zero_filled"] = read(weights, WEIGHTS_BYTES).count(0) == WEIGHTS_BYTES
    facts["level2_kv_still_asleep"] = "kv_cache" in alloc.sleeping_tags
    alloc.wake_up(tags=["kv_cache"])

    # Write again after level 2 (the memory is writable at the same address) and do one more level-1 cycle.
    drv.check("cuMemcpyHtoD", drv.htod(weights, payload))
    alloc.sleep(level=1)
    alloc.wake_up()
    facts["second_level1_weights_sha256"] = digest(read(weights, WEIGHTS_BYTES))

    stats = alloc.stats()
    facts["host_bytes_pinned"] = stats.host.bytes_pinned
    facts["driver_counters"] = {k: list(v) for k, v in gpusleep._C.driver_counters().items()}
    alloc.free(weights)
    alloc.free(kv)
    alloc.close()
    return facts


def main() -> int:
    os.environ.pop("GPUSLEEP_CUDA_DRIVER", None)
    try:
        facts, status = run(), 0
    except Exception:  # noqa: BLE001
        facts, status = {"error": traceback.format_exc()}, 1
        traceback.print_exc()
    emit_result(facts)
    return status


if __name__ == "__main__":
    sys.exit(main())
