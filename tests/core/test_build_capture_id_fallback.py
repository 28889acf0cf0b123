"""Graph-capture ids on drivers that lack cuStreamGetCaptureInfo_v3 (one build must serve CUDA 12.x and 13.x).

Through variants of the driver double that look like older drivers: one that exports only
cuStreamGetCaptureInfo_v2 (drivers 11.3 to 12.2), one with no capture-id query at all. On both, two consecutive
captures on one stream must never be handed each other's blocks (a block freed inside a capture still belongs to
that capture's graph). Each variant runs in its own process: the core opens its driver once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from fakecuda import harness

# Runs in a child process with GPUSLEEP_CUDA_DRIVER pointing at the variant; prints a JSON report.
_CHILD = textwrap.dedent(
    """
    import ctypes, json, sys
    sys.path.insert(0, sys.argv[2])
    from fakecuda import harness
    import gpusleep
    from gpusleep import _C

    fake = harness.FakeCuda(sys.argv[1])
    fake.configure(devices=1, capacity_bytes=1 << 30)
    NON_BLOCKING, GLOBAL = 1, 0
    SIZES = [512, 3 << 20]

    alloc = gpusleep.Allocator()
    alloc._core.set_mode("global")
    _C.set_current_tag("default")
    lib = fake.lib
    report = {"captures": [], "reused_within_capture": [], "valid": []}
    with fake.context(0):
        stream = ctypes.c_void_p()
        assert lib.cuStreamCreate(ctypes.byref(stream), NON_BLOCKING) == 0
        for capture in range(2):
            assert lib.cuStreamBeginCapture_v2(stream, GLOBAL) == 0
            blocks = []
            for size in SIZES:
                first = _C.torch_malloc(size, 0, stream.value)
                assert first, _C.last_torch_error()
                _C.torch_free(first, size, 0, stream.value)
                again = _C.torch_malloc(size, 0, stream.value)  # may reuse `first`: same capture
                assert again, _C.last_torch_error()
                _C.torch_free(again, size, 0, stream.value)
                blocks += [[first, size], [again, size]]
                report["reused_within_capture"].append(again == first)
            graph = ctypes.c_void_p()
            report["valid"].append(lib.cuStreamEndCapture(stream, ctypes.byref(graph)) == 0)
            if graph.value:
                lib.cuGraphDestroy(graph)
            report["captures"].append(blocks)
        lib.cuStreamDestroy_v2(stream)
    alloc.close()
    report["violations"] = fake.violations()
    print(json.dumps(report))
    """
)


def _run_captures(variant: str) -> dict:
    lib = harness.build(variant=variant)
    env = dict(os.environ, GPUSLEEP_CUDA_DRIVER=str(lib))
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(lib), tests_dir], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, f"the capture scenario failed on the {variant} double:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _overlap(a: list[int], b: list[int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


@pytest.mark.parametrize("variant", ["capture_info_v2", "no_capture_info"])
def test_consecutive_captures_on_one_stream_get_disjoint_blocks(variant):
    report = _run_captures(variant)
    assert report["valid"] == [True, True], "an allocation invalidated the capture"
    assert not report["violations"], report["violations"]
    first, second = report["captures"]
    shared = [(a, b) for a in first for b in second if _overlap(a, b)]
    assert not shared, f"the second capture was handed blocks of the first one (address, bytes): {shared}"


def test_cuStreamGetCaptureInfo_v2_keeps_one_id_per_capture():
    """With _v2 the driver's id is used: a block freed inside a capture is reused within that capture."""
    report = _run_captures("capture_info_v2")
    assert all(report["reused_within_capture"]), report


def test_the_variants_lack_exactly_the_symbols_they_stand_for():
    import ctypes

    v2 = ctypes.CDLL(str(harness.build(variant="capture_info_v2")))
    none = ctypes.CDLL(str(harness.build(variant="no_capture_info")))
    assert hasattr(v2, "cuStreamGetCaptureInfo_v2") and not hasattr(v2, "cuStreamGetCaptureInfo_v3")
    assert not hasattr(none, "cuStreamGetCaptureInfo_v2") and not hasattr(none, "cuStreamGetCaptureInfo_v3")
    assert hasattr(none, "cuStreamIsCapturing")
