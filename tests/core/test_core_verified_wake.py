"""Verified wakes and changed-piece re-sleeps (Note [Verified wakes] in csrc/allocator.h), through the driver
double: copies that go wrong without an error are caught before the memory counts as awake, the wake is rolled
back and can be retried, and a re-sleep of a kept host copy copies exactly the pieces that changed."""

from __future__ import annotations

import logging
import pathlib
import random
import re
import shutil
import subprocess

import pytest
from helpers import MiB, assert_blobs_intact, pattern, write_blobs

import gpusleep
from gpusleep import _C

REPO = pathlib.Path(__file__).resolve().parents[2]
PIECE = 4 * MiB
UNKNOWN = 999
UNSUPPORTED_PTX_VERSION = 222  # what a driver too old for the PTX answers: final
OUT_OF_MEMORY = 2
MASK = (1 << 64) - 1


# ----------------------------------------------------------------------------- the hash itself


def reference_hash(data: bytes, piece_bytes: int) -> list[int]:
    """An independent reading of chunk_hash.h's definition: per piece, the sum of mix64(word + (i + 1) * step)."""

    def mix64(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    padded = data + b"\0" * (-len(data) % 8)
    sums = [0] * ((len(data) + piece_bytes - 1) // piece_bytes)
    for i in range(len(padded) // 8):
        word = int.from_bytes(padded[8 * i : 8 * i + 8], "little")
        term = mix64((word + (i + 1) * 0x9E3779B97F4A7C15) & MASK)
        piece = (8 * i) // piece_bytes
        sums[piece] = (sums[piece] + term) & MASK
    return sums


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 63, 64, 65, 4099, 3 * 256 + 5])
@pytest.mark.parametrize("piece_bytes", [8, 64, 256])
def test_the_host_twin_equals_the_reference_hash_on_random_data_and_odd_sizes(size, piece_bytes):
    data = random.Random(size * 1000 + piece_bytes).randbytes(size)
    assert _C.chunk_hash_pieces(data, piece_bytes) == reference_hash(data, piece_bytes)


def test_the_hash_sees_a_flipped_bit_a_swap_and_a_shift():
    data = random.Random(7).randbytes(4096)
    base = _C.chunk_hash_pieces(data, 4096)
    flipped = bytearray(data)
    flipped[1234] ^= 0x10
    swapped = data[8:16] + data[0:8] + data[16:]
    shifted = b"\0" * 8 + data[:-8]
    for changed in (bytes(flipped), swapped, shifted):
        assert _C.chunk_hash_pieces(changed, 4096) != base
    assert sum(_C.chunk_hash_pieces(data, 64)) & MASK == base[0], "a range's hash is the sum of its pieces'"


def test_the_embedded_ptx_is_what_the_kernel_source_compiles_to(tmp_path):
    if shutil.which("llc") is None or shutil.which("opt") is None:
        pytest.skip("LLVM's opt and llc are not installed: the PTX cannot be regenerated here")
    recorded = re.search(r"^// llc: LLVM (\S+)$", (REPO / "csrc" / "chunk_hash_ptx.h").read_text(), re.M).group(1)
    local = re.search(
        r"LLVM version (\S+)", subprocess.run(["llc", "--version"], capture_output=True, text=True).stdout
    ).group(1)
    if local != recorded:
        pytest.skip(
            f"the PTX was generated with LLVM {recorded}, this machine has {local}: other versions print "
            "different (equally valid) PTX"
        )
    out = tmp_path / "chunk_hash_ptx.h"
    subprocess.run(["bash", str(REPO / "scripts" / "gen_chunk_hash_ptx.sh"), str(out)], check=True, capture_output=True)
    assert out.read_text() == (REPO / "csrc" / "chunk_hash_ptx.h").read_text(), (
        "csrc/chunk_hash_ptx.h is stale: run scripts/gen_chunk_hash_ptx.sh"
    )


def test_the_ptx_is_one_a_cuda_12_0_driver_can_jit():
    ptx = (REPO / "csrc" / "chunk_hash_ptx.h").read_text()
    major, minor = map(int, re.search(r"^\.version (\d+)\.(\d+)$", ptx, re.M).groups())
    assert (major, minor) <= (8, 0), "CUDA 12.0 drivers JIT PTX ISA 8.0 at most"
    assert int(re.search(r"^\.target sm_(\d+)$", ptx, re.M).group(1)) <= 70, "Volta and newer"
    assert ".visible .entry gpusleep_hash_pieces(" in ptx
    assert ".extern" not in ptx and "call" not in ptx, "self-contained: no device functions, nothing to link"


# ----------------------------------------------------------------------------- verified wakes


@pytest.mark.parametrize("kind", ["flip_byte", "wrong_offset", "lost_tail"])
def test_a_restore_copy_that_goes_wrong_fails_the_wake_and_a_retry_restores_exactly(alloc, fake, kind):
    blobs = write_blobs(alloc, fake, [PIECE + 3 * MiB + 5, MiB], seed=1)
    alloc.sleep(level=1)
    used_asleep = fake.used_bytes(0)
    fake.corrupt_copy("cuMemcpyHtoDAsync", nth=1, kind=kind)
    with pytest.raises(gpusleep.WakeVerificationError) as info:
        alloc.wake_up()
    error = info.value
    assert error.tags == ["weights"]
    assert error.blocks, "the error names the blocks"
    assert all(tag == "weights" and size <= PIECE for tag, _, size in error.blocks)
    assert any(
        address in range(base, base + len(data)) for _, address, _ in error.blocks for base, data in blobs.items()
    )
    assert "rolled back" in str(error) and "wake_up again" in str(error)
    assert not error.host_copy_damaged, "the restore went wrong, not the host copy: a retry helps"
    assert alloc.sleeping_tags == {"weights"}, "the tag stays asleep"
    assert fake.used_bytes(0) == used_asleep, "what the failed wake mapped was released"
    assert alloc.stats().counters["wake_verification_failures"] == 1
    for base, data in blobs.items():
        assert alloc.read_host_backup(base, len(data)) == data, "the host copy stays"
    report = alloc.wake_up()  # the retry restores again
    assert report.bytes_verified_by_hash == report.bytes_restored == sum(map(len, blobs.values()))
    assert_blobs_intact(fake, blobs)


def test_a_restore_copy_that_goes_wrong_is_served_with_verification_off(unverified_alloc, fake):
    # What "off" means, and what every peer does today: the wrong bytes are served without an error.
    blobs = write_blobs(unverified_alloc, fake, [2 * MiB], seed=2)
    unverified_alloc.sleep(level=1)
    fake.corrupt_copy("cuMemcpyHtoDAsync", nth=1, kind="flip_byte")
    report = unverified_alloc.wake_up()
    assert report.bytes_verified == 0
    ((address, data),) = blobs.items()
    assert fake.read(address, len(data)) != data
    assert unverified_alloc.stats().verify == "off"


def test_a_corrupted_device_to_host_copy_is_caught_at_the_wake(alloc, fake):
    # The sleep hashes the device bytes before copying them out: a copy that went wrong on the way to the host
    # leaves a host copy that no longer matches, whatever the wake's own copies do.
    _blobs = write_blobs(alloc, fake, [3 * MiB], seed=3)
    fake.corrupt_copy("cuMemcpyDtoHAsync", nth=1, kind="lost_tail")
    alloc.sleep(level=1)
    with pytest.raises(gpusleep.WakeVerificationError):
        alloc.wake_up()
    assert alloc.sleeping_tags == {"weights"}


def test_a_verified_wake_holds_no_gpu_memory_beyond_its_segments_and_sleep_frees_everything(alloc, fake):
    write_blobs(alloc, fake, [5 * MiB + 1], seed=4)
    used_awake = fake.used_bytes(0)
    sleep = alloc.sleep(level=1)
    assert sleep.bytes_hashed == 5 * MiB + 1
    assert fake.used_bytes(0) == 0, "the hash sums' device buffer lives only inside a call"
    wake = alloc.wake_up()
    assert wake.bytes_verified_by_hash == 5 * MiB + 1 and wake.bytes_verified_by_read_back == 0
    assert fake.used_bytes(0) == used_awake
    assert fake.kernels_run() >= 2, "hashed on the (simulated) GPU at the sleep and at the wake"


def test_a_hash_that_fails_at_sleep_leaves_the_sleep_unhashed_and_the_wake_reads_back(alloc, fake):
    blobs = write_blobs(alloc, fake, [3 * MiB], seed=5)
    fake.inject_fault("cuLaunchKernel", nth=1, error=UNKNOWN)
    sleep = alloc.sleep(level=1)  # verification is no reason to keep the GPU memory
    assert sleep.bytes_hashed == 0 and alloc.stats().counters["verify_hash_failed"] == 1
    wake = alloc.wake_up()
    assert wake.bytes_verified_by_read_back == 3 * MiB
    assert_blobs_intact(fake, blobs)
    alloc.sleep(level=1)
    assert alloc.wake_up().bytes_verified_by_hash == 3 * MiB, "the kernel is used again"


def test_a_hash_that_fails_at_wake_verifies_by_reading_back(alloc, fake):
    blobs = write_blobs(alloc, fake, [3 * MiB], seed=6)
    alloc.sleep(level=1)
    fake.inject_fault("cuLaunchKernel", nth=1, error=UNKNOWN)
    report = alloc.wake_up()
    assert report.bytes_verified_by_read_back == 3 * MiB
    assert_blobs_intact(fake, blobs)


def test_a_hash_stream_that_cannot_drain_fails_the_sleep_before_anything_changes(alloc, fake):
    # Its kernels may still read the memory: nothing may be released under them.
    blobs = write_blobs(alloc, fake, [3 * MiB], seed=23)
    fake.inject_fault("cuStreamSynchronize", nth=1, error=UNKNOWN)  # the hash's own wait
    fake.inject_fault("cuStreamSynchronize", nth=2, error=UNKNOWN)  # and the drain after it
    with pytest.raises(gpusleep.CudaError):
        alloc.sleep(level=1)
    assert not alloc.is_sleeping and alloc.stats().host.bytes_in_use == 0
    assert_blobs_intact(fake, blobs)
    alloc.sleep(level=1)
    alloc.wake_up()
    assert_blobs_intact(fake, blobs)


def test_a_kernel_that_cannot_load_for_lack_of_memory_is_tried_again(alloc, fake):
    blobs = write_blobs(alloc, fake, [2 * MiB], seed=24)
    fake.inject_fault("cuModuleLoadDataEx", nth=1, error=OUT_OF_MEMORY)  # a full GPU at the first sleep
    assert alloc.sleep(level=1).bytes_hashed == 0
    assert "tried again" in alloc.stats().verify_fallback_reason
    assert alloc.wake_up().bytes_verified_by_read_back == 2 * MiB, "no hashes from that sleep"
    assert alloc.sleep(level=1).bytes_hashed == 2 * MiB, "loaded at the next call"
    assert alloc.stats().verify_fallback_reason == ""
    assert alloc.wake_up().bytes_verified_by_hash == 2 * MiB
    assert_blobs_intact(fake, blobs)


def test_without_the_kernel_wakes_are_verified_by_reading_back_and_say_so_once(alloc, fake, caplog):
    fake.inject_fault("cuModuleLoadDataEx", nth=1, error=UNSUPPORTED_PTX_VERSION)  # a driver too old for this PTX
    blobs = write_blobs(alloc, fake, [3 * MiB + 7], seed=7)
    sleep = alloc.sleep(level=1)
    assert sleep.bytes_hashed == 0
    fake.corrupt_copy("cuMemcpyHtoDAsync", nth=1, kind="flip_byte")
    with pytest.raises(gpusleep.WakeVerificationError, match="read back"):
        alloc.wake_up()
    with caplog.at_level(logging.WARNING, logger="gpusleep"):
        report = alloc.wake_up()
        alloc.sleep(level=1)
        alloc.wake_up()
    assert report.bytes_verified_by_read_back == 3 * MiB + 7 and report.bytes_verified_by_hash == 0
    warnings = [r for r in caplog.records if "reading the restored bytes back" in r.getMessage()]
    assert len(warnings) == 1, "said once"
    assert "cuModuleLoadDataEx" in warnings[0].getMessage()
    assert "cuModuleLoadDataEx" in alloc.stats().verify_fallback_reason
    assert_blobs_intact(fake, blobs)


def test_a_ptx_the_driver_cannot_jit_is_reported_with_the_jits_own_words(alloc, fake, caplog):
    fake.set_jit_limits(max_ptx=(6, 5))  # a driver older than the kernel's PTX ISA 7.0
    blobs = write_blobs(alloc, fake, [2 * MiB], seed=31)
    with caplog.at_level(logging.WARNING, logger="gpusleep"):
        assert alloc.sleep(level=1).bytes_hashed == 0
        assert alloc.wake_up().bytes_verified_by_read_back == 2 * MiB
    reason = alloc.stats().verify_fallback_reason
    assert "CUDA_ERROR_UNSUPPORTED_PTX_VERSION" in reason and "the JIT said" in reason and "7.0" in reason
    assert any("the JIT said" in r.getMessage() for r in caplog.records), "the log line carries it too"
    assert_blobs_intact(fake, blobs)


def test_a_device_too_full_for_the_hash_sums_verifies_by_reading_back_against_the_hashes(alloc, fake):
    blobs = write_blobs(alloc, fake, [4 * MiB], seed=8)
    ((address, data),) = blobs.items()
    alloc.sleep(level=1)
    alloc._flip_host_backup_byte(address + 5)  # damage the read-back would not see against the copy itself
    # Another tenant leaves exactly what the wake needs: no granule for the sums buffer.
    fake.set_foreign_load(0, fake.free_bytes(0) - 4 * MiB)
    try:
        with pytest.raises(gpusleep.WakeVerificationError) as info:
            alloc.wake_up()
        assert info.value.host_copy_damaged
        alloc._flip_host_backup_byte(address + 5)
        report = alloc.wake_up()
    finally:
        fake.set_foreign_load(0, 0)
    assert report.bytes_verified_by_read_back == 4 * MiB
    assert alloc.stats().counters["verify_hash_no_memory"] == 2
    assert_blobs_intact(fake, blobs)


def test_a_refused_release_of_the_hash_buffer_is_kept_and_retried(alloc, fake):
    blobs = write_blobs(alloc, fake, [2 * MiB], seed=9)
    fake.inject_fault("cuMemUnmap", nth=1, error=UNKNOWN)  # the sleep's first unmap: the sums buffer's
    report = alloc.sleep(level=1)
    assert alloc.sleeping_tags == {"weights"}
    assert report.bytes_release_pending > 0 and alloc.stats().counters["release_refused"] == 1
    alloc.wake_up()  # retries it first
    assert alloc.stats().bytes_release_pending == 0
    assert_blobs_intact(fake, blobs)


def test_verify_rejects_unknown_modes_and_reads_the_environment(fake, monkeypatch):
    with pytest.raises(ValueError, match="verify"):
        gpusleep.Allocator(verify="sometimes")
    monkeypatch.setenv("GPUSLEEP_VERIFY", "off")
    with gpusleep.Allocator() as allocator:
        assert allocator.stats().verify == "off"
    monkeypatch.setenv("GPUSLEEP_VERIFY", "maybe")
    with pytest.raises(ValueError, match="GPUSLEEP_VERIFY"):
        gpusleep.Allocator()


# ----------------------------------------------------------------------------- changed-piece re-sleeps


def test_an_in_place_write_without_mark_changed_is_copied_at_the_next_sleep(alloc, fake):
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    size = 3 * PIECE + 5
    ((address, data),) = write_blobs(alloc, fake, [size], seed=10).items()
    alloc.sleep(level=1)
    alloc.wake_up()
    fake.write(address + PIECE + 100, b"\x01\x02\x03")  # an RL step writes in place, and says nothing
    report = alloc.sleep(level=1)
    assert report.pieces_changed == 1
    assert report.bytes_offloaded == PIECE and report.bytes_reused == size - PIECE, "only the changed piece"
    alloc.wake_up()
    expected = bytearray(data)
    expected[PIECE + 100 : PIECE + 103] = b"\x01\x02\x03"
    assert fake.read(address, size) == bytes(expected)


def test_unchanged_kept_weights_are_not_copied_with_or_without_mark_changed(alloc, fake):
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    blobs = write_blobs(alloc, fake, [PIECE + 3, 2 * MiB], seed=11)
    alloc.sleep(level=1)
    alloc.wake_up()
    for hint in (False, True):
        if hint:
            alloc.mark_changed("weights")  # a hint only: the hashes say nothing changed
        report = alloc.sleep(level=1)
        assert report.bytes_offloaded == 0 and report.pieces_changed == 0
        assert report.bytes_reused == PIECE + 3 + 2 * MiB
        alloc.wake_up()
        assert_blobs_intact(fake, blobs)


def test_a_reused_block_in_global_mode_is_caught_by_its_hash(global_mode, fake):
    global_mode.set_policy("weights", "offload", keep_host_copy=True)
    previous = _C.set_current_tag("weights")
    try:
        size = 2 * PIECE
        block = _C.torch_malloc(size, 0, 0)
        fake.write(block, pattern(size, 12))
        global_mode.sleep(level=1)
        global_mode.wake_up()
        _C.torch_free(block, size, 0, 0)
        again = _C.torch_malloc(size, 0, 0)  # the caching arena hands the same block to a new tensor
        assert again == block
        fake.write(again, pattern(MiB, 13))  # which writes its first MiB
        report = global_mode.sleep(level=1)
        assert report.pieces_changed == 1 and report.bytes_offloaded == PIECE
        global_mode.wake_up()
        assert fake.read(again, size) == pattern(MiB, 13) + pattern(size, 12)[MiB:]
        _C.torch_free(again, size, 0, 0)
    finally:
        _C.set_current_tag(previous)


def test_a_failed_hash_keeps_the_kept_copy_and_the_wake_checks_it_against_its_hashes(alloc, fake):
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    ((address, data),) = write_blobs(alloc, fake, [2 * PIECE], seed=16).items()
    alloc.sleep(level=1)
    alloc.wake_up()
    fake.inject_fault("cuMemcpyDtoHAsync", nth=1, error=UNKNOWN)  # the hash sums: no hash this time
    report = alloc.sleep(level=1)
    assert report.bytes_offloaded == 0 and report.bytes_reused == 2 * PIECE, "the kept copy, trusted by its hints"
    wake = alloc.wake_up()
    assert wake.bytes_verified_by_hash == 2 * PIECE, "against the hashes the kept copy was made with"
    assert fake.read(address, 2 * PIECE) == data


def test_a_failed_changed_piece_copy_drops_the_stale_kept_copy_and_the_next_sleep_copies_all(alloc, fake):
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    size = 2 * PIECE
    ((address, data),) = write_blobs(alloc, fake, [size], seed=14).items()
    alloc.sleep(level=1)
    alloc.wake_up()
    fake.write(address, pattern(PIECE, 15))
    fake.inject_fault("cuMemcpyDtoHAsync", nth=2, error=UNKNOWN)  # 1: the hash sums; 2: the changed piece
    with pytest.raises(gpusleep.CudaError):
        alloc.sleep(level=1)
    assert not alloc.is_sleeping
    report = alloc.sleep(level=1)
    assert report.bytes_offloaded == size, "the kept copy was partly written: dropped, copied again in full"
    alloc.wake_up()
    assert fake.read(address, size) == pattern(PIECE, 15) + data[PIECE:]


# ----------------------------------------------------------------------------- tools on top


def test_device_chunk_hashes_are_the_host_twin_of_the_device_bytes(alloc, fake):
    size = 2 * PIECE + 12345
    ((address, data),) = write_blobs(alloc, fake, [size], seed=20).items()
    assert alloc.device_chunk_hashes(address) == _C.chunk_hash_pieces(data, PIECE)
    assert alloc.device_chunk_hashes(address + 100) == _C.chunk_hash_pieces(data, PIECE), "any address inside"
    alloc.sleep(level=1)
    with pytest.raises(gpusleep.SleepStateError):
        alloc.device_chunk_hashes(address)


def test_host_memory_damaged_while_asleep_is_refused_and_repairing_it_wakes(alloc, fake):
    size = PIECE + 9
    ((address, data),) = write_blobs(alloc, fake, [size], seed=21).items()
    alloc.sleep(level=1)
    for offset in (0, PIECE - 1, size - 1):  # first byte, a piece's last byte, the odd tail's last byte
        alloc._flip_host_backup_byte(address + offset)
        with pytest.raises(gpusleep.WakeVerificationError) as info:
            alloc.wake_up()
        ((tag, block, length),) = info.value.blocks
        assert tag == "weights" and block <= address + offset < block + length
        assert info.value.host_copy_damaged and "fails the same way" in str(info.value)
        alloc._flip_host_backup_byte(address + offset)  # repaired
    alloc.wake_up()
    assert fake.read(address, size) == data


def test_a_damaged_host_copy_can_be_accepted_as_it_is(alloc, fake):
    ((address, data),) = write_blobs(alloc, fake, [2 * MiB], seed=25).items()
    alloc.sleep(level=1)
    alloc._flip_host_backup_byte(address + 77)
    for _ in range(2):
        with pytest.raises(gpusleep.WakeVerificationError):
            alloc.wake_up()  # every retry fails the same way
    alloc.trust_host_copies(["weights"])
    report = alloc.wake_up()
    assert report.bytes_verified_by_read_back == 2 * MiB, "the restore is still checked, against the copy"
    expected = bytearray(data)
    expected[77] ^= 0xFF
    assert fake.read(address, 2 * MiB) == bytes(expected)


def test_a_kept_host_copy_can_be_read_while_awake(alloc, fake):
    alloc.set_policy("weights", "offload", keep_host_copy=True)
    ((address, data),) = write_blobs(alloc, fake, [MiB + 1], seed=22).items()
    with pytest.raises(gpusleep.SleepStateError):
        alloc.read_host_backup(address, 16)  # never slept: no copy
    alloc.sleep(level=1)
    alloc.wake_up()
    assert alloc.read_host_backup(address, MiB + 1) == data
