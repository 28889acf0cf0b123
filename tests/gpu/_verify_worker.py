"""Verified wakes on a real GPU: ``python _verify_worker.py``.

The chunk hash kernel (PTX JIT-compiled by this driver) must equal its host twin on odd sizes; a wake must
be proven by that kernel, not by the read-back fallback; a host copy damaged while asleep (first byte, a
piece's last byte, the odd tail) must be refused with the tag left asleep, and repaired it must wake
bit-exact; an in-place write to a kept copy without mark_changed must be copied at the next sleep, and
only its piece. Prints one GPUSLEEP_RESULT JSON line (assertions: test_gpu_verified_wake.py)."""

from __future__ import annotations

import random
import traceback

from gpu_workers import emit_result

import gpusleep
from gpusleep import _C

MiB = 1 << 20
PIECE = 4 * MiB
SIZES = (1, 7, 4096 + 3, PIECE - 8, 3 * PIECE + 12345, 256 * MiB + 5)


def run() -> dict:
    facts: dict = {
        "driver_version": _C.device_info(0).driver_version,
        "module_loading": __import__("os").environ.get("CUDA_MODULE_LOADING", "default"),
    }
    alloc = gpusleep.Allocator(log_transitions=False, verify="full")
    # 1. The kernel against its host twin.
    mismatched = []
    for size in SIZES:
        data = random.Random(size).randbytes(size)
        address = alloc.allocate(size, tag="scratch")
        alloc.write_device(address, data)
        if alloc.device_chunk_hashes(address) != _C.chunk_hash_pieces(data, PIECE):
            mismatched.append(size)
        alloc.free(address)
    facts["kernel_mismatched_sizes"] = mismatched
    facts["fallback_reason"] = alloc.stats().verify_fallback_reason

    # 2. A verified round trip and its cost.
    size = 512 * MiB + 3
    data = random.Random(1).randbytes(size)
    weights = alloc.allocate(size, tag="weights")
    alloc.write_device(weights, data)
    second = alloc.allocate(PIECE + 11, tag="weights")  # two ranges in one launch batch
    second_data = random.Random(2).randbytes(PIECE + 11)
    alloc.write_device(second, second_data)
    alloc.reserve_host_memory()
    sleep = alloc.sleep(level=1)
    wake = alloc.wake_up()
    facts["second_exact"] = alloc.read_device(second, PIECE + 11) == second_data
    alloc.free(second)
    facts.update(
        sleep_bytes_hashed=sleep.bytes_hashed,
        sleep_verify_seconds=sleep.verify_seconds,
        sleep_copy_seconds=sleep.copy_seconds,
        wake_verified_by_hash=wake.bytes_verified_by_hash,
        wake_verified_by_read_back=wake.bytes_verified_by_read_back,
        wake_verify_seconds=wake.verify_seconds,
        wake_copy_seconds=wake.copy_seconds,
        round_trip_exact=alloc.read_device(weights, size) == data,
        wake_bytes_verified=wake.bytes_verified,
    )

    # 3. Host memory damaged while asleep: refused, still asleep, named; repaired: wakes exact.
    refusals = []
    alloc.sleep(level=1)
    for offset in (0, PIECE - 1, size - 1):
        alloc._flip_host_backup_byte(weights + offset)
        try:
            alloc.wake_up()
            refusals.append({"offset": offset, "refused": False})
        except gpusleep.WakeVerificationError as exc:
            named = any(a <= weights + offset < a + n for _, a, n in exc.blocks)
            refusals.append(
                {"offset": offset, "refused": True, "named": named, "asleep": "weights" in alloc.sleeping_tags}
            )
            alloc._flip_host_backup_byte(weights + offset)
            continue
        break
    alloc.wake_up()
    facts["damage"] = refusals
    facts["repaired_exact"] = alloc.read_device(weights, size) == data

    # 4. A kept copy, written in place without mark_changed: only the changed piece is copied, and it comes back.
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    alloc.sleep(level=1)
    alloc.wake_up()
    alloc.write_device(weights + 5 * PIECE + 17, b"\x01\x02\x03")
    expected = bytearray(data)
    expected[5 * PIECE + 17 : 5 * PIECE + 20] = b"\x01\x02\x03"
    resleep = alloc.sleep(level=1)
    alloc.wake_up()
    facts.update(
        resleep_pieces_changed=resleep.pieces_changed,
        resleep_bytes_offloaded=resleep.bytes_offloaded,
        resleep_verify_seconds=resleep.verify_seconds,
        resleep_seconds=resleep.seconds,
        in_place_write_kept=alloc.read_device(weights, size) == bytes(expected),
    )
    alloc.close()
    return facts


if __name__ == "__main__":
    try:
        emit_result(run())
    except Exception:  # noqa: BLE001 - the test prints it
        emit_result({"error": traceback.format_exc()})
