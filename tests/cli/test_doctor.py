"""`gpusleep doctor` end to end on the driver double (the simulated GPU), as a user runs it: the table, the
JSON, the exit status, and checks that fail when the driver misbehaves (issue 20, part 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import MiB, pattern

import gpusleep
from gpusleep import doctor


def test_device_info_reads_the_driver_without_leaving_a_context(fake):
    info = gpusleep._C.device_info(1)
    assert info.device == 1 and info.name.startswith("fakecuda")
    assert info.granularity_minimum_bytes == fake.granularity_bytes
    assert info.vmm_supported == 1 and info.host_numa_node == 1 and list(info.peers) == [0]
    assert info.free_bytes == fake.free_bytes(1) - 32 * MiB, "measured with the context the query held"
    assert not fake.context_active(1), "the query gave its context back"
    fake.set_host_numa_id(1, None)
    assert gpusleep._C.device_info(1).host_numa_node == -1, "an attribute the driver does not know is -1"
    with pytest.raises(ValueError):
        gpusleep._C.device_info(2)


def test_write_and_read_device_copy_exact_bytes_and_refuse_what_is_not_awake(alloc, fake):
    address = alloc.allocate(3 * MiB + 5, tag="weights")
    alloc.write_device(address + 7, pattern(2 * MiB + 1, 1))
    assert fake.read(address + 7, 2 * MiB + 1) == pattern(2 * MiB + 1, 1)
    fake.write(address, pattern(MiB, 2))
    assert alloc.read_device(address, MiB) == pattern(MiB, 2)
    with pytest.raises(ValueError, match="runs past"):
        alloc.read_device(address, 64 * MiB)
    with pytest.raises(ValueError, match="not inside"):
        alloc.write_device(address + 256 * MiB, b"x")
    alloc.sleep(level=1)
    with pytest.raises(gpusleep.SleepStateError):
        alloc.read_device(address, 16)
    alloc.wake_up()
    assert alloc.read_device(address, MiB) == pattern(MiB, 2)
    assert fake.pageable_copy_count() == 0, "staged through pinned memory"


def test_doctor_passes_on_a_healthy_simulated_gpu(fake):
    report = doctor.run(device=0, size_gib=0.25, torch_checks=False)
    assert report.verdict == "ok" and report.exit_code == doctor.EXIT_OK, report.table()
    assert report.simulated and "SIMULATED GPU" in report.table()
    names = [c.name for c in report.checks]
    for name in (
        "driver",
        "device 0",
        "level-1 round trip",
        "verified wake",
        "damaged copy refused",
        "pinned copy",
        "memory freed",
        "level-2 round trip",
    ):
        assert name in names, names
    verified = next(c for c in report.checks if c.name == "verified wake")
    assert verified.facts["bytes_verified_by_hash"] > 0 and verified.facts["bytes_verified_by_read_back"] == 0
    freed = next(c for c in report.checks if c.name == "memory freed")
    assert freed.facts["bytes_freed_measured"] == freed.facts["bytes_freed"] > 0
    assert fake.used_bytes(0) == 0, "the doctor gave everything back"


def test_doctor_fails_when_a_restore_comes_back_wrong(fake):
    fake.inject_fault("cuMemcpyHtoDAsync_v2", nth=1, error=999)  # the wake's first restore copy is refused
    report = doctor.run(device=0, size_gib=0.25, torch_checks=False)
    assert report.verdict == "failed" and report.exit_code == doctor.EXIT_FAILED
    failed = [c for c in report.checks if c.status == "failed"]
    assert failed and "CUDA_ERROR_UNKNOWN" in failed[0].summary, report.table()


def test_doctor_verifies_by_reading_back_where_the_hash_kernel_cannot_load(fake, monkeypatch):
    monkeypatch.setenv("GPUSLEEP_VERIFY", "off")  # the doctor proves what the machine can do, whatever this says
    fake.inject_fault("cuModuleLoadDataEx", nth=1, error=222)  # UNSUPPORTED_PTX_VERSION: this driver cannot JIT it
    report = doctor.run(device=0, size_gib=0.25, torch_checks=False)
    assert report.verdict == "ok", report.table()
    verified = next(c for c in report.checks if c.name == "verified wake")
    assert verified.facts["bytes_verified_by_read_back"] > 0 and "reading back" in verified.summary
    damaged = next(c for c in report.checks if c.name == "damaged copy refused")
    assert damaged.status == "info" and "not checkable" in damaged.summary, "read-back cannot see host-copy damage"


def test_doctor_fails_when_a_damaged_copy_is_not_refused(fake, monkeypatch):
    monkeypatch.setattr(gpusleep.Allocator, "_flip_host_backup_byte", lambda self, address: None)  # no damage
    report = doctor.run(device=0, size_gib=0.25, torch_checks=False)
    damaged = next(c for c in report.checks if c.name == "damaged copy refused")
    assert damaged.status == "failed" and "SERVED" in damaged.summary
    assert report.exit_code == doctor.EXIT_FAILED


def test_doctor_fails_when_the_memory_is_not_really_freed(fake, monkeypatch):
    # Something holds the weights during the sleep (an NCCL registration would): gpusleep releases them, the
    # driver's free memory does not rise.
    real_sleep = gpusleep.Allocator.sleep

    def sleep_while_the_weights_are_held(self, level=1, *args, **kwargs):
        if level != 1:
            return real_sleep(self, level, *args, **kwargs)
        with fake.retained_allocation(self.__dict__["_doctor_test_addresses"][0]):
            return real_sleep(self, level, *args, **kwargs)

    monkeypatch.setattr(gpusleep.Allocator, "sleep", sleep_while_the_weights_are_held)
    monkeypatch.setattr(gpusleep.Allocator, "allocate", _remembering_allocate(gpusleep.Allocator.allocate))
    report = doctor.run(device=0, size_gib=0.25, torch_checks=False)
    freed = next(c for c in report.checks if c.name == "memory freed")
    assert freed.status == "failed" and report.exit_code == doctor.EXIT_FAILED, report.table()
    assert freed.facts["bytes_freed_measured"] < freed.facts["bytes_freed"]


def _remembering_allocate(real):
    def allocate(self, size_bytes, tag=None, device=0):
        address = real(self, size_bytes, tag, device)
        self.__dict__.setdefault("_doctor_test_addresses", []).append(address)
        return address

    return allocate


def test_the_cli_prints_json_and_exits_3_without_a_driver(tmp_path):
    env = dict(os.environ, GPUSLEEP_CUDA_DRIVER=str(tmp_path / "no-such-libcuda.so"))
    proc = subprocess.run(
        [sys.executable, "-m", "gpusleep.cli", "doctor", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == doctor.EXIT_NO_GPU, proc.stderr
    out = json.loads(proc.stdout)
    assert out["verdict"] == "no GPU" and out["checks"][0]["status"] == "failed"


def test_the_cli_runs_the_doctor_on_the_simulated_gpu(fakecuda_driver):
    env = dict(os.environ, GPUSLEEP_CUDA_DRIVER=str(fakecuda_driver.lib._name))
    proc = subprocess.run(
        [sys.executable, "-m", "gpusleep.cli", "doctor", "--size-gib", "0.1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == doctor.EXIT_OK, proc.stdout + proc.stderr
    assert "SIMULATED GPU" in proc.stdout and "verdict: ok" in proc.stdout
    assert "level-1 sleep" in proc.stderr, "progress goes to stderr"
    bad = subprocess.run(
        [sys.executable, "-m", "gpusleep.cli", "doctor", "--size-gib", "-1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 2 and "GiB" in bad.stderr
