"""Tests of the host-memory CUDA driver double itself (tests/fakecuda).

Each test calls the exported cu* entry points through ctypes and proves that one
strictness rule of docs/driver-rules.md fires.  For rules the
docs leave open (tag S) the tests assert "!= CUDA_SUCCESS" rather than a code.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import threading

import pytest
from fakecuda import harness
from fakecuda.harness import ERROR, CUmemAccessDesc, CUmemAllocationProp

MiB = 1 << 20
OK = 0
E = ERROR
INVALID_VALUE = E["CUDA_ERROR_INVALID_VALUE"]
NON_BLOCKING = 1
PROT_NONE, PROT_READ, PROT_RW = 0, 1, 3
GLOBAL, THREAD_LOCAL, RELAXED = 0, 1, 2
CAPTURE_NONE, CAPTURE_ACTIVE, CAPTURE_INVALIDATED = 0, 1, 2
CU_STREAM_LEGACY = 1


class Drv:
    """Thin convenience layer over the raw entry points (asserting success)."""

    def __init__(self, fake: harness.FakeCuda):
        self.fake = fake
        self.lib = fake.lib
        self.gran = fake.granularity_bytes

    def __getattr__(self, name):
        return getattr(self.lib, name)

    # -- contexts
    def ctx(self, dev=0):
        c = ctypes.c_void_p()
        assert self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(c), dev) == OK
        self.lib.cuDevicePrimaryCtxRelease_v2(dev)  # the fixture holds the long-lived reference
        return c

    def use(self, dev=0):
        assert self.lib.cuCtxSetCurrent(self.ctx(dev)) == OK

    # -- VMM
    @staticmethod
    def prop(dev=0):
        p = CUmemAllocationProp()
        p.type = 1  # PINNED
        p.location.type = 1  # DEVICE
        p.location.id = dev
        return p

    def create_rc(self, size, dev=0):
        h = ctypes.c_ulonglong()
        rc = self.lib.cuMemCreate(ctypes.byref(h), size, ctypes.byref(self.prop(dev)), 0)
        return rc, h.value

    def create(self, size=None, dev=0):
        rc, h = self.create_rc(size or self.gran, dev)
        assert rc == OK, rc
        return h

    def reserve(self, size, alignment=0):
        p = ctypes.c_ulonglong()
        assert self.lib.cuMemAddressReserve(ctypes.byref(p), size, alignment, 0, 0) == OK
        return p.value

    def access_rc(self, ptr, size, flags=PROT_RW, dev=0):
        d = CUmemAccessDesc()
        d.location.type = 1
        d.location.id = dev
        d.flags = flags
        return self.lib.cuMemSetAccess(ptr, size, ctypes.byref(d), 1)

    def mapped(self, nchunks=1, dev=0, access=True):
        """Reserve nchunks*gran, map one handle per chunk, grant RW. Returns (va, handles)."""
        size = nchunks * self.gran
        va = self.reserve(size)
        hs = []
        for i in range(nchunks):
            h = self.create(dev=dev)
            assert self.lib.cuMemMap(va + i * self.gran, self.gran, 0, h, 0) == OK
            hs.append(h)
        if access:
            assert self.access_rc(va, size, PROT_RW, dev) == OK
        return va, hs

    def teardown(self, va, hs):
        assert self.lib.cuMemUnmap(va, len(hs) * self.gran) == OK
        for h in hs:
            assert self.lib.cuMemRelease(h) == OK
        assert self.lib.cuMemAddressFree(va, len(hs) * self.gran) == OK

    # -- streams, events, host memory
    def stream(self, flags=NON_BLOCKING):
        s = ctypes.c_void_p()
        assert self.lib.cuStreamCreate(ctypes.byref(s), flags) == OK
        return s

    def event(self, flags=0):
        e = ctypes.c_void_p()
        assert self.lib.cuEventCreate(ctypes.byref(e), flags) == OK
        return e

    def pinned(self, n):
        p = ctypes.c_void_p()
        assert self.lib.cuMemHostAlloc(ctypes.byref(p), n, 0) == OK
        return p.value

    def capture_mode(self, mode):
        m = ctypes.c_int(mode)
        assert self.lib.cuThreadExchangeStreamCaptureMode(ctypes.byref(m)) == OK
        return m.value

    def capturing(self, s):
        st = ctypes.c_int(-1)
        rc = self.lib.cuStreamIsCapturing(s, ctypes.byref(st))
        return rc, st.value


@pytest.fixture(params=[2 * MiB, 4 * MiB], ids=["gran2MiB", "gran4MiB"])
def drv(request, fakecuda_driver):
    fake = fakecuda_driver
    fake.configure(devices=2, capacity_bytes=1 << 30, granularity_bytes=request.param, seed=1234)
    d = Drv(fake)
    assert d.cuInit(0) == OK
    ctxs = []
    for dev in (0, 1):
        c = ctypes.c_void_p()
        assert d.cuDevicePrimaryCtxRetain(ctypes.byref(c), dev) == OK
        ctxs.append(c)
    assert d.cuCtxSetCurrent(ctxs[0]) == OK
    d.capture_mode(GLOBAL)
    yield d
    d.capture_mode(GLOBAL)
    fake.clear_faults()
    try:
        fake.configure(devices=2, capacity_bytes=1 << 30, granularity_bytes=request.param, seed=0)
    except AssertionError:
        pass  # tests that leak on purpose
    for dev in (0, 1):
        assert d.cuDevicePrimaryCtxRelease_v2(dev) == OK
    d.cuCtxSetCurrent(None)


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh interpreter with FAKECUDA (the built library path) set."""
    lib = harness.build()
    prog = "import ctypes, sys\nlib = ctypes.CDLL(sys.argv[1])\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog, str(lib)], capture_output=True, text=True, timeout=60)


# ============================================================================ ABI, init, contexts


def test_exports_exactly_the_versioned_names(fakecuda_driver):
    lib = fakecuda_driver.lib
    for name in harness.ENTRY_POINTS:
        assert hasattr(lib, name), name
    for unversioned in (
        "cuMemGetInfo",
        "cuMemcpyHtoDAsync",
        "cuStreamDestroy",
        "cuEventDestroy",
        "cuDevicePrimaryCtxRelease",
        "cuEventElapsedTime",
        "cuStreamBeginCapture",
        "cuStreamGetCaptureInfo",
        "cuMemHostRegister",
        "cuMemcpyHtoD_v2_ptds",
        "cuMemcpyHtoDAsync_v2_ptsz",
        "cuStreamGetCaptureInfo_v2",
    ):
        assert not hasattr(lib, unversioned), unversioned
    out = subprocess.run(["nm", "-D", "--defined-only", str(fakecuda_driver.path)], capture_output=True, text=True)
    if out.returncode == 0:
        assert not re.search(r"_pt(sz|ds)\b", out.stdout)


def test_every_call_needs_cuinit_first():
    r = run_isolated("""
        f, t = ctypes.c_size_t(), ctypes.c_size_t()
        n = ctypes.c_int()
        print(lib.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)), lib.cuDeviceGetCount(ctypes.byref(n)))
        v = ctypes.c_int(); print(lib.cuDriverGetVersion(ctypes.byref(v)), v.value)
        print(lib.cuInit(0), lib.cuDeviceGetCount(ctypes.byref(n)), n.value)
    """)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("\n")
    assert lines[0] == "3 3"  # CUDA_ERROR_NOT_INITIALIZED
    assert lines[1] == "0 13000"
    assert lines[2] == "0 0 2"


def test_current_context_is_per_thread_and_required(drv):
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK
    results = {}

    def other():
        cur = ctypes.c_void_p(123)
        results["cur"] = (drv.cuCtxGetCurrent(ctypes.byref(cur)), cur.value)
        results["info"] = drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t))
        results["create"] = drv.create_rc(drv.gran)[0]
        p = ctypes.c_ulonglong()
        results["reserve"] = drv.cuMemAddressReserve(ctypes.byref(p), drv.gran, 0, 0, 0)
        s = ctypes.c_void_p()
        results["stream"] = drv.cuStreamCreate(ctypes.byref(s), 0)
        h = ctypes.c_void_p()
        results["hostalloc"] = drv.cuMemHostAlloc(ctypes.byref(h), 4096, 0)
        results["ctxsync"] = drv.cuCtxSynchronize()
        # Retaining does not make the context current.
        c = ctypes.c_void_p()
        drv.cuDevicePrimaryCtxRetain(ctypes.byref(c), 1)
        results["after_retain"] = drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t))
        drv.cuDevicePrimaryCtxRelease_v2(1)

    th = threading.Thread(target=other)
    th.start()
    th.join()
    ic = E["CUDA_ERROR_INVALID_CONTEXT"]
    assert results["cur"] == (OK, None)
    for key in ("info", "create", "reserve", "stream", "hostalloc", "ctxsync", "after_retain"):
        assert results[key] == ic, key
    # Releasing a context that was not retained.
    drv.fake.configure(devices=3, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    assert drv.cuDevicePrimaryCtxRelease_v2(2) == ic
    # A released (refcount 0) context is not usable even if still current.
    c = ctypes.c_void_p()
    assert drv.cuDevicePrimaryCtxRetain(ctypes.byref(c), 2) == OK
    assert drv.cuCtxSetCurrent(c) == OK
    assert drv.cuDevicePrimaryCtxRelease_v2(2) == OK
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == ic
    drv.use(0)


def test_context_handles_survive_configure(drv):
    c0 = drv.ctx(0).value
    drv.fake.configure(devices=2, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    assert drv.ctx(0).value == c0
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK


def test_device_queries(drv):
    n = ctypes.c_int()
    assert drv.cuDeviceGetCount(ctypes.byref(n)) == OK and n.value == 2
    d = ctypes.c_int()
    assert drv.cuDeviceGet(ctypes.byref(d), 2) == E["CUDA_ERROR_INVALID_DEVICE"]
    v = ctypes.c_int()
    for attr, want in ((102, 1), (40, 2), (75, 9), (76, 0)):
        assert drv.cuDeviceGetAttribute(ctypes.byref(v), attr, 1) == OK and v.value == want
    assert drv.cuDeviceGetAttribute(ctypes.byref(v), 33, 1) == OK
    bus1 = v.value
    assert drv.cuDeviceGetAttribute(ctypes.byref(v), 33, 0) == OK and v.value != bus1
    name = ctypes.create_string_buffer(64)
    assert drv.cuDeviceGetName(name, 64, 0) == OK and name.value
    cur = ctypes.c_int(-1)
    drv.use(1)
    assert drv.cuCtxGetDevice(ctypes.byref(cur)) == OK and cur.value == 1
    drv.use(0)


# ============================================================================ granularity, create, capacity


def test_granularity_minimum_and_recommended(drv):
    g = ctypes.c_size_t()
    p = drv.prop()
    assert drv.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(p), 0) == OK
    assert g.value == drv.gran
    assert drv.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(p), 1) == OK
    assert g.value == drv.gran
    assert drv.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(p), 7) == INVALID_VALUE
    bad = drv.prop(dev=5)
    assert drv.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(bad), 0) == E["CUDA_ERROR_INVALID_DEVICE"]
    drv.fake.set_recommended_granularity(4 * drv.gran)
    assert drv.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(p), 1) == OK
    assert g.value == 4 * drv.gran
    # Correctness uses MINIMUM: a MIN-sized create is fine even when REC is larger.
    h = drv.create(drv.gran)
    assert drv.cuMemRelease(h) == OK


def test_create_size_must_be_a_multiple_of_the_minimum_granularity(drv):
    for size in (0, drv.gran // 2, drv.gran + 4096, 4096):
        assert drv.create_rc(size)[0] == INVALID_VALUE, size
    h = ctypes.c_ulonglong()
    assert drv.cuMemCreate(ctypes.byref(h), drv.gran, ctypes.byref(drv.prop()), 1) == INVALID_VALUE  # flags
    p = drv.prop()
    p.type = 2  # MANAGED
    assert drv.cuMemCreate(ctypes.byref(h), drv.gran, ctypes.byref(p), 0) == INVALID_VALUE
    p = drv.prop()
    p.location.id = 7
    assert drv.cuMemCreate(ctypes.byref(h), drv.gran, ctypes.byref(p), 0) == E["CUDA_ERROR_INVALID_DEVICE"]
    assert drv.fake.used_bytes(0) == 0


def test_4mib_granularity_rejects_2mib_chunks(fakecuda_driver, drv):
    if drv.gran != 4 * MiB:
        pytest.skip("only meaningful with the 4 MiB variant")
    assert drv.create_rc(2 * MiB)[0] == INVALID_VALUE
    va = drv.reserve(8 * MiB)
    h = drv.create(4 * MiB)
    assert drv.cuMemMap(va + 2 * MiB, 4 * MiB, 0, h, 0) == INVALID_VALUE  # 2 MiB aligned only
    assert drv.cuMemMap(va, 4 * MiB, 0, h, 0) == OK
    assert drv.cuMemUnmap(va, 4 * MiB) == OK and drv.cuMemRelease(h) == OK
    assert drv.cuMemAddressFree(va, 8 * MiB) == OK


def test_granularity_env_default():
    lib = harness.build()
    prog = (
        "import ctypes,sys; lib=ctypes.CDLL(sys.argv[1]); lib.fakecuda_granularity.restype=ctypes.c_size_t;"
        "print(lib.fakecuda_granularity())"
    )
    env = dict(os.environ, FAKECUDA_GRANULARITY_BYTES=str(8 * MiB))
    out = subprocess.run([sys.executable, "-c", prog, str(lib)], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == str(8 * MiB), out.stderr


def test_fresh_physical_memory_is_poisoned_not_zero(drv):
    va, hs = drv.mapped(1)
    data = drv.fake.read(va, drv.gran)
    assert data == b"\xa5" * drv.gran
    drv.teardown(va, hs)
    p = drv.pinned(8192)
    assert ctypes.string_at(p, 16) == b"\xa5" * 16  # pinned host memory is not zeroed either
    assert drv.cuMemFreeHost(p) == OK


def test_capacity_foreign_load_overhead_and_oom(drv):
    fake = drv.fake
    cap = 4 * drv.gran
    fake.set_context_overhead(0, 0)  # the context charge has its own test below
    fake.set_capacity(0, cap)
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK
    assert (f.value, t.value) == (cap, cap)
    hs = [drv.create() for _ in range(4)]
    assert fake.used_bytes(0) == cap and fake.free_bytes(0) == 0
    assert drv.create_rc(drv.gran)[0] == E["CUDA_ERROR_OUT_OF_MEMORY"]
    h1 = drv.create(dev=1)  # device 1 has its own capacity
    assert fake.used_bytes(1) == drv.gran and drv.cuMemRelease(h1) == OK
    for h in hs:
        assert drv.cuMemRelease(h) == OK
    assert fake.used_bytes(0) == 0
    fake.set_foreign_load(0, 2 * drv.gran)
    fake.set_context_overhead(0, drv.gran)
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK
    assert f.value == drv.gran and fake.free_bytes(0) == drv.gran
    h = drv.create()
    assert drv.create_rc(drv.gran)[0] == E["CUDA_ERROR_OUT_OF_MEMORY"]
    assert drv.cuMemRelease(h) == OK


# ============================================================================ reserve / free


def test_reserve_rules(drv):
    p = ctypes.c_ulonglong()
    for size, align, flags in ((drv.gran + 1, 0, 0), (0, 0, 0), (drv.gran, 3 * 4096, 0), (drv.gran, 0, 1)):
        assert drv.cuMemAddressReserve(ctypes.byref(p), size, align, 0, flags) == INVALID_VALUE
    va = drv.reserve(3 * drv.gran)
    assert va % drv.gran == 0
    # An explicit small alignment is honoured exactly, not more (S).
    small = drv.reserve(drv.gran, alignment=64 * 1024)
    assert small % (64 * 1024) == 0 and small % drv.gran != 0
    # Free needs exactly ptr and size of one reserve call.
    assert drv.cuMemAddressFree(va, drv.gran) == INVALID_VALUE
    assert drv.cuMemAddressFree(va + drv.gran, 2 * drv.gran) == INVALID_VALUE
    assert drv.cuMemAddressFree(va, 3 * drv.gran) == OK
    assert drv.cuMemAddressFree(va, 3 * drv.gran) == INVALID_VALUE
    assert drv.cuMemAddressFree(small, drv.gran) == OK


def test_address_hint_ignored_by_default_and_honoured_by_knob(drv):
    p = ctypes.c_ulonglong()
    hint = 0x7E0000000000
    assert drv.cuMemAddressReserve(ctypes.byref(p), drv.gran, 0, hint, 0) == OK
    assert p.value != hint
    assert drv.cuMemAddressFree(p.value, drv.gran) == OK
    drv.fake.set_honor_address_hints(True)
    try:
        assert drv.cuMemAddressReserve(ctypes.byref(p), drv.gran, 0, hint, 0) == OK
        assert p.value == hint
        assert drv.cuMemAddressFree(p.value, drv.gran) == OK
    finally:
        drv.fake.set_honor_address_hints(False)


def test_address_free_with_live_mapping_is_rejected(drv):
    va, hs = drv.mapped(1)
    assert drv.cuMemAddressFree(va, drv.gran) != OK  # S
    drv.teardown(va, hs)


# ============================================================================ map / unmap / access


def test_map_rules(drv):
    G = drv.gran
    va = drv.reserve(4 * G)
    other = drv.reserve(2 * G)
    h = drv.create()
    h2 = drv.create(2 * G)
    assert drv.cuMemMap(va, G, G, h, 0) == INVALID_VALUE  # offset must be 0
    assert drv.cuMemMap(va, G, 0, h, 1) == INVALID_VALUE  # flags must be 0
    assert drv.cuMemMap(va + G // 2, G, 0, h, 0) == INVALID_VALUE  # misaligned ptr
    assert drv.cuMemMap(va, G, 0, h2, 0) != OK  # S: size must equal the handle size
    assert drv.cuMemMap(va, 2 * G, 0, h, 0) == INVALID_VALUE  # larger than the handle
    assert drv.cuMemMap(va + 4 * G, G, 0, h, 0) == INVALID_VALUE or va + 4 * G == other  # outside
    assert drv.cuMemMap(0x1000000, G, 0, h, 0) == INVALID_VALUE  # not reserved at all
    assert drv.cuMemMap(va, G, 0, 0xDEAD, 0) == INVALID_VALUE  # bad handle
    assert drv.cuMemMap(va + G, G, 0, h, 0) == OK
    assert drv.cuMemMap(va, 2 * G, 0, h2, 0) == INVALID_VALUE  # over an existing mapping
    assert drv.cuMemMap(va + G, G, 0, h, 0) == INVALID_VALUE  # exactly over it
    assert drv.cuMemMap(va + 2 * G, 2 * G, 0, h2, 0) == OK
    assert drv.cuMemUnmap(va + G, 3 * G) == OK
    for x in (h, h2):
        assert drv.cuMemRelease(x) == OK
    assert drv.cuMemAddressFree(va, 4 * G) == OK
    assert drv.cuMemAddressFree(other, 2 * G) == OK


def test_map_straddling_two_adjacent_reservations_is_rejected(drv):
    G = drv.gran
    p = ctypes.c_ulonglong()
    drv.fake.set_honor_address_hints(True)
    try:
        a = drv.reserve(G)
        assert drv.cuMemAddressReserve(ctypes.byref(p), G, 0, a + G, 0) == OK
        b = p.value
    finally:
        drv.fake.set_honor_address_hints(False)
    if b != a + G:
        drv.cuMemAddressFree(a, G)
        drv.cuMemAddressFree(b, G)
        pytest.skip("could not get adjacent reservations")
    h2 = drv.create(2 * G)
    assert drv.cuMemMap(a, 2 * G, 0, h2, 0) != OK  # S: inside one reservation
    # Unmap / SetAccess across reservations are rejected too.
    h, hb = drv.create(), drv.create()
    assert drv.cuMemMap(a, G, 0, h, 0) == OK and drv.cuMemMap(b, G, 0, hb, 0) == OK
    assert drv.access_rc(a, 2 * G) != OK
    assert drv.cuMemUnmap(a, 2 * G) != OK
    assert drv.cuMemUnmap(a, G) == OK and drv.cuMemUnmap(b, G) == OK
    for x in (h, hb, h2):
        assert drv.cuMemRelease(x) == OK
    assert drv.cuMemAddressFree(a, G) == OK and drv.cuMemAddressFree(b, G) == OK


def test_unmap_whole_mappings_only(drv):
    G = drv.gran
    va, hs = drv.mapped(3)
    assert drv.cuMemUnmap(va, G // 2) == INVALID_VALUE  # part of a mapping
    assert drv.cuMemUnmap(va + G // 2, G) == INVALID_VALUE
    assert drv.cuMemUnmap(va, G + G // 2) == INVALID_VALUE  # ends inside the second mapping
    assert drv.cuMemUnmap(va + G, G) == OK  # the middle one
    assert drv.cuMemUnmap(va, 3 * G) == INVALID_VALUE  # a hole now
    assert drv.cuMemUnmap(va + G, G) == INVALID_VALUE  # already unmapped
    assert drv.cuMemMap(va + G, G, 0, hs[1], 0) == OK
    assert drv.cuMemUnmap(va, 3 * G) == OK  # several adjacent whole mappings at once
    for h in hs:
        assert drv.cuMemRelease(h) == OK
    assert drv.cuMemAddressFree(va, 3 * G) == OK


def test_set_access_rules(drv):
    G = drv.gran
    va, hs = drv.mapped(2, access=False)
    assert drv.access_rc(va, G // 2) == INVALID_VALUE  # sub-range of a mapping (S)
    assert drv.access_rc(va + G, 2 * G) == INVALID_VALUE  # runs past the mappings
    assert drv.access_rc(va, 2 * G, flags=2) == INVALID_VALUE  # not a valid PROT value
    assert drv.access_rc(va, 2 * G, dev=9) == E["CUDA_ERROR_INVALID_DEVICE"]
    d = CUmemAccessDesc()
    d.location.type = 2  # HOST
    d.flags = PROT_RW
    assert drv.cuMemSetAccess(va, 2 * G, ctypes.byref(d), 1) == INVALID_VALUE
    assert drv.access_rc(va, 2 * G) == OK  # spans two mappings of one reservation
    drv.fake.write(va + G - 4, b"12345678")
    assert drv.fake.read(va + G - 4, 8) == b"12345678"
    # Read-only access: reads work, writes are rejected.
    assert drv.access_rc(va, 2 * G, PROT_READ) == OK
    with pytest.raises(harness.CudaCallError):
        drv.fake.write(va, b"x")
    assert drv.fake.read(va, 1) == b"\xa5"
    drv.teardown(va, hs)


def test_a_mapping_grants_no_access_and_unmap_resets_access(drv):
    G = drv.gran
    va, hs = drv.mapped(1, access=False)
    buf = ctypes.create_string_buffer(16)
    assert drv.cuMemcpyDtoH_v2(buf, va, 16) == INVALID_VALUE  # mapped, no access yet
    assert drv.access_rc(va, G) == OK
    drv.fake.write(va, b"kept across remap")
    assert drv.cuMemUnmap(va, G) == OK
    assert drv.cuMemcpyDtoH_v2(buf, va, 16) == INVALID_VALUE  # unmapped
    assert drv.cuMemMap(va, G, 0, hs[0], 0) == OK
    assert drv.cuMemcpyDtoH_v2(buf, va, 16) == INVALID_VALUE  # remapped: access was reset
    assert drv.access_rc(va, G) == OK
    assert drv.fake.read(va, 17) == b"kept across remap"  # same handle keeps its bytes
    drv.teardown(va, hs)


def test_aliasing_one_handle_at_two_addresses(drv):
    G = drv.gran
    a = drv.reserve(G)
    b = drv.reserve(G)
    h = drv.create()
    assert drv.cuMemMap(a, G, 0, h, 0) == OK and drv.cuMemMap(b, G, 0, h, 0) == OK
    assert drv.access_rc(a, G) == OK and drv.access_rc(b, G) == OK
    drv.fake.write(a + 100, b"alias")
    assert drv.fake.read(b + 100, 5) == b"alias"
    assert drv.cuMemRelease(h) == OK
    assert drv.fake.used_bytes(0) == G  # still mapped twice
    assert drv.cuMemUnmap(a, G) == OK
    assert drv.fake.used_bytes(0) == G
    assert drv.cuMemUnmap(b, G) == OK
    assert drv.fake.used_bytes(0) == 0
    assert drv.cuMemAddressFree(a, G) == OK and drv.cuMemAddressFree(b, G) == OK


def test_device_addresses_are_not_host_readable():
    r = run_isolated("""
        import ctypes
        class Loc(ctypes.Structure): _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]
        class Flags(ctypes.Structure): _fields_ = [("a", ctypes.c_ubyte), ("b", ctypes.c_ubyte), ("c", ctypes.c_ushort), ("r", ctypes.c_ubyte * 4)]
        class Prop(ctypes.Structure): _fields_ = [("type", ctypes.c_int), ("ht", ctypes.c_int), ("loc", Loc), ("w", ctypes.c_void_p), ("f", Flags)]
        class Desc(ctypes.Structure): _fields_ = [("loc", Loc), ("flags", ctypes.c_int)]
        G = 2 << 20
        ctx = ctypes.c_void_p(); lib.cuInit(0); lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0); lib.cuCtxSetCurrent(ctx)
        va = ctypes.c_ulonglong(); assert lib.cuMemAddressReserve(ctypes.byref(va), ctypes.c_size_t(G), ctypes.c_size_t(0), ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)) == 0
        p = Prop(); p.type = 1; p.loc.type = 1; p.loc.id = 0
        h = ctypes.c_ulonglong(); assert lib.cuMemCreate(ctypes.byref(h), ctypes.c_size_t(G), ctypes.byref(p), ctypes.c_ulonglong(0)) == 0
        assert lib.cuMemMap(va, ctypes.c_size_t(G), ctypes.c_size_t(0), h, ctypes.c_ulonglong(0)) == 0
        d = Desc(); d.loc.type = 1; d.loc.id = 0; d.flags = 3
        assert lib.cuMemSetAccess(va, ctypes.c_size_t(G), ctypes.byref(d), ctypes.c_size_t(1)) == 0
        print("mapped", flush=True)
        print(ctypes.string_at(va.value, 1), flush=True)
    """)  # noqa: E501 - the driver calls of the child, one per line
    assert "mapped" in r.stdout
    assert r.returncode < 0 and r.returncode in (-11, -7), (r.returncode, r.stdout, r.stderr)  # SIGSEGV/SIGBUS


# ============================================================================ release refcount


def test_release_is_refcounted_by_mappings(drv):
    G = drv.gran
    va, hs = drv.mapped(1)
    drv.fake.write(va, b"alive")
    assert drv.cuMemRelease(hs[0]) == OK  # legal while mapped (the cuda-samples pattern)
    assert drv.fake.used_bytes(0) == G
    assert drv.fake.read(va, 5) == b"alive"
    assert drv.cuMemMap(va, G, 0, hs[0], 0) != OK  # the handle itself is gone
    assert drv.cuMemUnmap(va, G) == OK
    assert drv.fake.used_bytes(0) == 0
    assert drv.cuMemAddressFree(va, G) == OK
    assert drv.fake.violations() == []


def test_double_release_is_invalid_and_recorded(drv):
    h = drv.create()
    assert drv.cuMemRelease(h) == OK
    assert drv.cuMemRelease(h) == INVALID_VALUE
    assert drv.cuMemRelease(0xBAD) == INVALID_VALUE
    v = drv.fake.violations()
    assert len(v) == 2 and "already released" in v[0]
    drv.fake.clear_violations()


# ============================================================================ copies: deferral, ordering, races


def test_async_ops_are_deferred_until_a_sync_point(drv):
    va, hs = drv.mapped(1)
    s = drv.stream()
    src = drv.pinned(4096)
    dst = drv.pinned(4096)
    ctypes.memmove(src, b"first", 5)
    assert drv.cuMemcpyHtoDAsync_v2(va, src, 5, s) == OK
    ctypes.memmove(src, b"later", 5)  # reusing the source before a sync is a bug: the double shows it
    assert drv.cuMemcpyDtoHAsync_v2(dst, va, 5, s) == OK
    assert drv.cuMemsetD8Async(va + 100, 7, 10, s) == OK
    assert drv.fake.pending_ops() == 3
    assert ctypes.string_at(dst, 5) == b"\xa5" * 5  # nothing ran yet
    assert drv.cuStreamSynchronize(s) == OK
    assert drv.fake.pending_ops() == 0
    assert ctypes.string_at(dst, 5) == b"later"
    assert drv.fake.read(va + 100, 10) == b"\x07" * 10
    assert drv.cuStreamDestroy_v2(s) == OK
    assert drv.cuMemFreeHost(src) == OK and drv.cuMemFreeHost(dst) == OK
    drv.teardown(va, hs)


def test_stream_query_polls_make_progress_but_report_not_ready_first(drv):
    va, hs = drv.mapped(1)
    s = drv.stream()
    for i in range(3):
        assert drv.cuMemsetD8Async(va + i, i, 1, s) == OK
    seen = []
    for _ in range(10):
        rc = drv.cuStreamQuery(s)
        seen.append(rc)
        if rc == OK:
            break
    assert seen[0] == E["CUDA_ERROR_NOT_READY"] and seen[-1] == OK
    assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, hs)


def test_stalled_stream_never_completes_until_released(drv):
    """Work that never finishes (a collective waiting for a dead peer): queries say NOT_READY however often
    they poll, a synchronize blocks (g_mu released, so other threads' calls go on) until the release, and one
    that would wait past the hang limit is a violation: on a GPU it would block for ever."""
    va, hs = drv.mapped(1)
    s, other = drv.stream(), drv.stream()
    ev = ctypes.c_void_p()
    assert drv.cuEventCreate(ctypes.byref(ev), 2) == OK
    drv.fake.stall_stream(s)
    assert drv.cuMemsetD8Async(va, 7, 16, s) == OK
    assert drv.cuEventRecord(ev, s) == OK
    for _ in range(20):
        assert drv.cuStreamQuery(s) == E["CUDA_ERROR_NOT_READY"]
        assert drv.cuEventQuery(ev) == E["CUDA_ERROR_NOT_READY"]
    assert drv.fake.progress() == 0 and drv.fake.pending_ops() == 2
    # Another stream of the same context is not held back.
    assert drv.cuMemsetD8Async(va + 1024, 1, 16, other) == OK
    assert drv.cuStreamSynchronize(other) == OK
    # A synchronize past the hang limit: a violation and a failure, nothing ran.
    drv.fake.set_hang_limit_ms(50)
    try:
        assert drv.cuCtxSynchronize() != OK
        assert drv.cuEventSynchronize(ev) != OK
        v = drv.fake.violations()
        assert len(v) == 2 and all("never finishes" in x for x in v)
        drv.fake.clear_violations()
        # A synchronize blocked on another thread returns once the stream is released.
        drv.fake.set_hang_limit_ms(10000)
        result = []
        ctx = drv.ctx(0)

        def waiter():
            drv.lib.cuCtxSetCurrent(ctx)
            result.append(drv.lib.cuStreamSynchronize(s))

        t = threading.Thread(target=waiter)
        t.start()
        t.join(0.2)
        assert t.is_alive() and not result
        assert drv.cuStreamQuery(other) == OK  # the driver is not locked meanwhile
        drv.fake.stall_stream(s, False)
        t.join(5)
        assert result == [OK] and drv.fake.pending_ops() == 0
        assert drv.fake.read(va, 16) == b"\x07" * 16
    finally:
        drv.fake.set_hang_limit_ms(10000)
        drv.fake.stall_stream(s, False)
    assert drv.fake.violations() == []
    assert drv.cuEventDestroy_v2(ev) == OK
    for x in (s, other):
        assert drv.cuStreamDestroy_v2(x) == OK
    drv.teardown(va, hs)


def test_stall_on_call_stalls_the_stream_of_the_nth_op_until_released(drv):
    """stall_on_call: the nth op a function enqueues (from when it was armed) stalls its stream, as stall_stream
    does (for streams a test cannot name, like a copy engine's); earlier ops and other streams go on, and
    release_stalls() releases every stalled stream."""
    va, hs = drv.mapped(1)
    s, other = drv.stream(), drv.stream()
    drv.fake.stall_on_call("cuMemsetD8Async", nth=2)
    assert drv.cuMemsetD8Async(va, 1, 16, other) == OK  # the first: not stalled
    assert drv.cuStreamSynchronize(other) == OK
    assert drv.cuMemsetD8Async(va + 64, 2, 16, s) == OK  # the second: its stream stalls
    assert drv.cuMemsetD8Async(va + 128, 3, 16, other) == OK  # armed once: the third is not
    for _ in range(20):
        assert drv.cuStreamQuery(s) == E["CUDA_ERROR_NOT_READY"]
    assert drv.cuStreamSynchronize(other) == OK
    assert drv.fake.progress() == 0, "stalled work never runs"
    with pytest.raises(ValueError):
        drv.fake.stall_on_call("cuNoSuchCall")
    assert drv.fake.release_stalls() == 1
    assert drv.cuStreamSynchronize(s) == OK
    assert drv.fake.read(va + 64, 16) == b"\x02" * 16
    # Armed and released before it fired: disarmed.
    drv.fake.stall_on_call("cuMemsetD8Async")
    assert drv.fake.release_stalls() == 0
    assert drv.cuMemsetD8Async(va, 4, 16, s) == OK and drv.cuStreamSynchronize(s) == OK
    assert drv.fake.violations() == []
    for x in (s, other):
        assert drv.cuStreamDestroy_v2(x) == OK
    drv.teardown(va, hs)


def test_stream_sync_runs_only_what_it_must(drv):
    va, hs = drv.mapped(1)
    a, b = drv.stream(), drv.stream()
    assert drv.cuMemsetD8Async(va, 1, 16, a) == OK
    assert drv.cuMemsetD8Async(va + 1024, 2, 16, b) == OK
    assert drv.cuStreamSynchronize(a) == OK
    assert drv.fake.pending_ops() == 1  # b's work was not needed
    # Unmapping while b's memset is still queued is a recorded violation.
    assert drv.cuMemUnmap(va, drv.gran) == E["CUDA_ERROR_ILLEGAL_STATE"]
    v = drv.fake.violations()
    assert len(v) == 1 and "cuMemUnmap" in v[0] and "cuMemsetD8Async" in v[0]
    drv.fake.clear_violations()
    assert drv.cuCtxSynchronize() == OK
    assert drv.fake.pending_ops() == 0
    for s in (a, b):
        assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, hs)


def _race_outcome(drv, seed):
    drv.fake.configure(devices=2, capacity_bytes=1 << 30, granularity_bytes=drv.gran, seed=seed)
    va, hs = drv.mapped(1)
    a, b = drv.stream(), drv.stream()
    assert drv.cuMemsetD8Async(va, 1, 64, a) == OK
    assert drv.cuMemsetD8Async(va, 2, 64, b) == OK  # unordered with a: a race
    races = [v for v in drv.fake.violations() if v.startswith("race")]
    assert drv.cuCtxSynchronize() == OK
    out = drv.fake.read(va, 1)
    for s in (a, b):
        drv.cuStreamDestroy_v2(s)
    drv.teardown(va, hs)
    drv.fake.clear_violations()
    return out, len(races)


def test_unordered_streams_run_in_seeded_random_order_and_races_are_reported(drv):
    outcomes = {}
    for seed in range(16):
        out, races = _race_outcome(drv, seed)
        assert races == 1
        outcomes.setdefault(out, []).append(seed)
    assert set(outcomes) == {b"\x01", b"\x02"}  # both orders happen
    assert _race_outcome(drv, 3)[0] == _race_outcome(drv, 3)[0]  # and replay exactly


def test_event_wait_orders_streams(drv):
    for seed in range(8):
        drv.fake.configure(devices=2, capacity_bytes=1 << 30, granularity_bytes=drv.gran, seed=seed)
        va, hs = drv.mapped(1)
        a, b = drv.stream(), drv.stream()
        ev = drv.event()
        src, dst = drv.pinned(64), drv.pinned(64)
        ctypes.memmove(src, b"A" * 64, 64)
        assert drv.cuMemcpyHtoDAsync_v2(va, src, 64, a) == OK
        assert drv.cuEventRecord(ev, a) == OK
        assert drv.cuStreamWaitEvent(b, ev, 0) == OK
        assert drv.cuMemcpyDtoHAsync_v2(dst, va, 64, b) == OK
        assert drv.fake.violations() == []  # ordered: no race
        assert drv.cuStreamSynchronize(b) == OK  # drives a's work through the event edge
        assert ctypes.string_at(dst, 64) == b"A" * 64
        assert drv.fake.pending_ops() == 0
        assert drv.cuEventQuery(ev) == OK
        for s in (a, b):
            assert drv.cuStreamDestroy_v2(s) == OK
        assert drv.cuEventDestroy_v2(ev) == OK
        assert drv.cuMemFreeHost(src) == OK and drv.cuMemFreeHost(dst) == OK
        drv.teardown(va, hs)


def test_event_captures_work_at_record_time(drv):
    va, hs = drv.mapped(1)
    a = drv.stream()
    ev = drv.event()
    assert drv.cuEventQuery(ev) == OK  # never recorded: empty work
    assert drv.cuMemsetD8Async(va, 1, 8, a) == OK
    assert drv.cuEventRecord(ev, a) == OK
    assert drv.cuMemsetD8Async(va + 8, 2, 8, a) == OK  # after the record
    assert drv.cuEventSynchronize(ev) == OK
    assert drv.fake.pending_ops() == 1  # the later memset is not part of the event
    assert drv.cuStreamSynchronize(a) == OK
    assert drv.cuStreamDestroy_v2(a) == OK
    assert drv.cuEventDestroy_v2(ev) == OK
    drv.teardown(va, hs)


def test_event_elapsed_time(drv):
    a = drv.stream()
    e1, e2, nt = drv.event(), drv.event(), drv.event(2)  # 2 = DISABLE_TIMING
    ms = ctypes.c_float()
    assert drv.cuEventElapsedTime_v2(ctypes.byref(ms), e1, e2) == E["CUDA_ERROR_INVALID_HANDLE"]
    assert drv.cuEventRecord(e1, a) == OK and drv.cuEventRecord(e2, a) == OK and drv.cuEventRecord(nt, a) == OK
    assert drv.cuEventElapsedTime_v2(ctypes.byref(ms), e1, e2) == E["CUDA_ERROR_NOT_READY"]
    assert drv.cuStreamSynchronize(a) == OK
    assert drv.cuEventElapsedTime_v2(ctypes.byref(ms), e1, e2) == OK and ms.value >= 0
    assert drv.cuEventElapsedTime_v2(ctypes.byref(ms), e1, nt) == E["CUDA_ERROR_INVALID_HANDLE"]
    for e in (e1, e2, nt):
        assert drv.cuEventDestroy_v2(e) == OK
    assert drv.cuStreamDestroy_v2(a) == OK


def test_event_and_stream_must_share_a_context(drv):
    a = drv.stream()
    drv.use(1)
    e1 = drv.event()
    drv.use(0)
    assert drv.cuEventRecord(e1, a) == E["CUDA_ERROR_INVALID_HANDLE"]
    assert drv.cuStreamWaitEvent(a, e1, 0) == OK  # waiting on another context's event is fine
    assert drv.cuEventDestroy_v2(e1) == OK and drv.cuStreamDestroy_v2(a) == OK


def test_legacy_stream_synchronizes_with_blocking_streams_only(drv):
    va, hs = drv.mapped(1)
    blocking = drv.stream(0)
    nonblocking = drv.stream(NON_BLOCKING)
    assert drv.cuMemsetD8Async(va, 1, 8, blocking) == OK
    assert drv.cuMemsetD8Async(va + 64, 2, 8, nonblocking) == OK
    assert drv.cuMemsetD8Async(va + 8, 3, 8, None) == OK  # legacy stream: waits for `blocking`
    assert drv.cuStreamSynchronize(CU_STREAM_LEGACY) == OK
    assert drv.fake.pending_ops() == 1  # the non-blocking stream's memset only
    # A blocking stream's new work waits for earlier legacy work.
    assert drv.cuMemsetD8Async(va + 16, 4, 8, None) == OK
    assert drv.cuMemsetD8Async(va + 16, 5, 8, blocking) == OK  # ordered after: no race
    assert drv.cuStreamSynchronize(blocking) == OK
    assert drv.fake.read(va + 16, 1) == b"\x05"
    assert drv.fake.violations() == []
    assert drv.cuStreamSynchronize(nonblocking) == OK
    for s in (blocking, nonblocking):
        assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, hs)


def test_sync_copies_and_memset_semantics(drv):
    va, hs = drv.mapped(1)
    nb = drv.stream(NON_BLOCKING)
    src = ctypes.create_string_buffer(b"pageable", 8)
    assert drv.cuMemcpyHtoD_v2(va, src, 8) == OK
    ctypes.memmove(src, b"XXXXXXXX", 8)  # pageable source is staged: reuse is fine
    assert drv.cuMemsetD8_v2(va + 8, 9, 4) == OK
    assert drv.fake.pending_ops() == 2  # both still in flight on the legacy stream
    out = ctypes.create_string_buffer(12)
    assert drv.cuMemcpyDtoH_v2(out, va, 12) == OK  # waits for earlier legacy work
    assert out.raw == b"pageable" + b"\x09" * 4
    assert drv.fake.pending_ops() == 0
    assert drv.fake.pageable_sync_copy_count() == 2
    assert drv.fake.pageable_copy_count() == 0
    assert drv.cuStreamDestroy_v2(nb) == OK
    drv.teardown(va, hs)


def test_copies_may_span_adjacent_mappings_and_dtod(drv):
    G = drv.gran
    va, hs = drv.mapped(3)
    payload = bytes(range(256)) * 64
    drv.fake.write(va + G - 8000, payload)
    assert drv.fake.read(va + G - 8000, len(payload)) == payload
    s = drv.stream()
    assert drv.cuMemcpyDtoDAsync_v2(va + 2 * G + 5, va + G - 8000, len(payload), s) == OK
    assert drv.cuStreamSynchronize(s) == OK
    assert drv.fake.read(va + 2 * G + 5, len(payload)) == payload
    assert drv.cuMemcpyDtoDAsync_v2(va + 3 * G - 10, va, 20, s) == INVALID_VALUE  # runs off the end
    assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, hs)


def test_copy_validation_at_enqueue(drv):
    G = drv.gran
    va, hs = drv.mapped(1)
    reserved_only = drv.reserve(G)
    s = drv.stream()
    p = drv.pinned(4096)
    assert drv.cuMemcpyHtoDAsync_v2(reserved_only, p, 16, s) == INVALID_VALUE
    assert drv.cuMemcpyHtoDAsync_v2(va, None, 16, s) == INVALID_VALUE
    assert drv.cuMemcpyHtoDAsync_v2(va, va, 16, s) == INVALID_VALUE  # a device address as host memory
    assert drv.cuMemcpyHtoDAsync_v2(va, p, 16, ctypes.c_void_p(0xFAC5000000000FF0)) == E["CUDA_ERROR_INVALID_HANDLE"]
    drv.use(1)
    assert drv.cuMemcpyHtoDAsync_v2(va, p, 16, s) != OK  # S: stream of another context / no access for dev 1
    drv.use(0)
    assert drv.fake.pending_ops() == 0
    assert drv.cuStreamDestroy_v2(s) == OK
    assert drv.cuMemcpyHtoDAsync_v2(va, p, 16, s) == E["CUDA_ERROR_INVALID_HANDLE"]  # destroyed
    assert drv.cuMemFreeHost(p) == OK
    assert drv.cuMemAddressFree(reserved_only, G) == OK
    drv.teardown(va, hs)


def test_unmap_release_free_with_queued_work_are_violations(drv):
    G = drv.gran
    va, hs = drv.mapped(1)
    s = drv.stream()
    host = drv.pinned(4096)
    assert drv.cuMemcpyDtoHAsync_v2(host, va, 4096, s) == OK
    assert drv.cuMemUnmap(va, G) == E["CUDA_ERROR_ILLEGAL_STATE"]
    assert drv.cuMemFreeHost(host) == E["CUDA_ERROR_ILLEGAL_STATE"]
    v = drv.fake.violations()
    assert len(v) == 2 and "cuMemUnmap" in v[0] and "cuMemFreeHost" in v[1]
    drv.fake.clear_violations()
    reg = ctypes.create_string_buffer(8192)
    assert drv.cuMemHostRegister_v2(reg, 8192, 0) == OK
    assert drv.cuMemcpyHtoDAsync_v2(va, reg, 100, s) == OK
    assert drv.cuMemHostUnregister(reg) == E["CUDA_ERROR_ILLEGAL_STATE"]
    assert len(drv.fake.violations()) == 1
    drv.fake.clear_violations()
    assert drv.cuStreamSynchronize(s) == OK
    assert drv.cuMemHostUnregister(reg) == OK
    assert drv.cuMemFreeHost(host) == OK
    assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, hs)
    assert drv.fake.violations() == []


def test_destroyed_stream_keeps_its_queued_work(drv):
    va, hs = drv.mapped(1)
    s = drv.stream()
    assert drv.cuMemsetD8Async(va, 3, 4, s) == OK
    assert drv.cuStreamDestroy_v2(s) == OK
    assert drv.fake.live_objects().startswith("handles=1 ") and "streams=0" in drv.fake.live_objects()
    assert drv.fake.pending_ops() == 1
    assert drv.cuCtxSynchronize() == OK
    assert drv.fake.read(va, 4) == b"\x03" * 4
    drv.teardown(va, hs)


def test_deferred_op_on_vanished_memory_makes_the_context_sticky(drv):
    G = drv.gran
    va, hs = drv.mapped(1)
    s = drv.stream()
    assert drv.cuMemsetD8Async(va, 1, 16, s) == OK
    assert drv.access_rc(va, G, PROT_NONE) == OK  # allowed, but the queued memset will fault
    illegal = E["CUDA_ERROR_ILLEGAL_ADDRESS"]
    assert drv.cuStreamSynchronize(s) == illegal
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == illegal
    assert drv.create_rc(G)[0] == illegal
    assert drv.cuMemUnmap(va, G) == illegal
    assert drv.fake.sticky_error(0) == illegal
    drv.use(1)
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK  # other device unaffected
    drv.use(0)
    assert any("ILLEGAL_ADDRESS" in v for v in drv.fake.violations())
    drv.fake.clear_violations()
    with pytest.raises(AssertionError, match="handles=1 reservations=1 mappings=1"):
        drv.fake.configure(devices=2, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    assert drv.fake.sticky_error(0) == OK  # configure clears it
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK


# ============================================================================ pinned vs pageable


def test_pinned_pageable_and_mixed_host_ranges(drv):
    va, hs = drv.mapped(1)
    s = drv.stream()
    pinned = drv.pinned(8192)
    pageable = ctypes.create_string_buffer(8192)
    fake = drv.fake
    assert drv.cuMemcpyHtoDAsync_v2(va, pinned, 4096, s) == OK
    assert fake.pageable_copy_count() == 0
    assert drv.cuMemcpyDtoHAsync_v2(pageable, va, 4096, s) == OK
    assert fake.pageable_copy_count() == 1
    reg = ctypes.create_string_buffer(3 * 4096)
    base = ctypes.addressof(reg)
    assert drv.cuMemHostRegister_v2(base + 4096, 4096, 0) == OK
    assert drv.cuMemcpyDtoHAsync_v2(base + 4096, va, 4096, s) == OK  # registered: pinned
    assert fake.pageable_copy_count() == 1
    assert drv.cuMemcpyDtoHAsync_v2(base, va, 8192, s) == INVALID_VALUE  # half pageable, half pinned
    assert drv.cuMemcpyDtoHAsync_v2(pinned + 4096, va, 8192, s) == INVALID_VALUE  # runs off the pinned block
    assert drv.cuMemHostRegister_v2(base + 2048, 4096, 0) == E["CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"]
    assert drv.cuMemHostRegister_v2(va, 4096, 0) == INVALID_VALUE  # device memory
    assert drv.cuStreamSynchronize(s) == OK
    assert drv.cuMemHostUnregister(base + 4097) == E["CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"]
    assert drv.cuMemHostUnregister(pinned) == E["CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"]
    assert drv.cuMemFreeHost(base + 4096) == INVALID_VALUE  # registered, not allocated
    assert drv.cuMemFreeHost(pinned + 16) == INVALID_VALUE
    assert drv.cuMemHostUnregister(base + 4096) == OK
    assert drv.cuMemFreeHost(pinned) == OK
    assert drv.cuMemFreeHost(pinned) == INVALID_VALUE
    p = ctypes.c_void_p()
    assert drv.cuMemHostAlloc(ctypes.byref(p), 4096, 0x8) == INVALID_VALUE
    assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, hs)


def test_a_copy_across_two_adjacent_registrations_is_refused(drv):
    """§8b: a host range inside one registration is pinned; one that runs from a registration into the next,
    even where the two are adjacent parts of one mapping, is refused (R: SGLang PR 36798, `invalid argument`
    from a copy that spans two registered chunks), so gpusleep splits its copies at piece boundaries."""
    va, hs = drv.mapped(1)
    s = drv.stream()
    fake = drv.fake
    reg = ctypes.create_string_buffer(4 * 4096)
    base = (ctypes.addressof(reg) + 4095) // 4096 * 4096
    assert drv.cuMemHostRegister_v2(base, 4096, 0) == OK
    assert drv.cuMemHostRegister_v2(base + 4096, 4096, 0) == OK
    spanning = fake.lib.fakecuda_spanning_copy_count
    spanning.restype = ctypes.c_uint64
    assert drv.cuMemcpyDtoHAsync_v2(base, va, 4096, s) == OK
    assert drv.cuMemcpyHtoDAsync_v2(va, base + 4096, 4096, s) == OK
    assert fake.pageable_copy_count() == 0, "each registration on its own is pinned"
    assert drv.cuMemcpyDtoHAsync_v2(base + 2048, va, 4096, s) == INVALID_VALUE
    assert drv.cuMemcpyHtoDAsync_v2(va, base, 8192, s) == INVALID_VALUE
    assert spanning() == 2
    assert drv.cuStreamSynchronize(s) == OK
    for p in (base, base + 4096):
        assert drv.cuMemHostUnregister(p) == OK
    assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, hs)


# ============================================================================ fault injection, counters


def test_fault_injection_nth_call(drv):
    fake = drv.fake
    fake.inject_fault("cuMemCreate", nth=2)
    h1 = drv.create()
    assert drv.create_rc(drv.gran)[0] == E["CUDA_ERROR_OUT_OF_MEMORY"]
    h3 = drv.create()
    for h in (h1, h3):
        assert drv.cuMemRelease(h) == OK
    va = drv.reserve(drv.gran)
    h = drv.create()
    fake.inject_fault("cuMemMap", 1, E["CUDA_ERROR_OUT_OF_MEMORY"])
    assert drv.cuMemMap(va, drv.gran, 0, h, 0) == E["CUDA_ERROR_OUT_OF_MEMORY"]
    assert drv.cuMemMap(va, drv.gran, 0, h, 0) == OK
    fake.inject_fault("cuMemSetAccess", 1, E["CUDA_ERROR_INVALID_VALUE"])
    assert drv.access_rc(va, drv.gran) == INVALID_VALUE
    assert drv.access_rc(va, drv.gran) == OK
    s = drv.stream()
    p = drv.pinned(4096)
    fake.inject_fault("cuMemcpyDtoHAsync_v2", 1, E["CUDA_ERROR_UNKNOWN"])
    fake.inject_fault("cuMemcpyHtoDAsync", 1)  # unversioned alias works too
    assert drv.cuMemcpyDtoHAsync_v2(p, va, 16, s) == E["CUDA_ERROR_UNKNOWN"]
    assert drv.cuMemcpyHtoDAsync_v2(va, p, 16, s) == E["CUDA_ERROR_OUT_OF_MEMORY"]
    assert fake.pending_ops() == 0  # an injected copy failure enqueues nothing
    fake.inject_fault("cuMemHostAlloc")
    q = ctypes.c_void_p()
    assert drv.cuMemHostAlloc(ctypes.byref(q), 4096, 0) == E["CUDA_ERROR_OUT_OF_MEMORY"]
    fake.inject_fault("cuMemAddressReserve", 2)
    r = ctypes.c_ulonglong()
    assert drv.cuMemAddressReserve(ctypes.byref(r), drv.gran, 0, 0, 0) == OK
    assert drv.cuMemAddressReserve(ctypes.byref(r), drv.gran, 0, 0, 0) == E["CUDA_ERROR_OUT_OF_MEMORY"]
    fake.inject_fault("cuMemGetInfo_v2", 3, E["CUDA_ERROR_UNKNOWN"])
    fake.clear_faults()
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    for _ in range(4):
        assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK
    with pytest.raises(ValueError):
        fake.inject_fault("cuNoSuchCall")
    assert drv.cuMemFreeHost(p) == OK and drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, [h])


def test_every_entry_point_is_injectable_and_counted(drv):
    fake = drv.fake
    for name in harness.ENTRY_POINTS:
        fake.inject_fault(name, 1000)
        assert fake.call_count(name) >= 0
    fake.clear_faults()
    fake.reset_call_counts()
    assert fake.total_call_count() == 0
    va, hs = drv.mapped(2)
    assert fake.call_count("cuMemCreate") == 2
    assert fake.call_count("cuMemMap") == 2
    assert fake.call_count("cuMemSetAccess") == 1
    assert fake.call_count("cuMemAddressReserve") == 1
    assert fake.call_count("cuMemGetInfo_v2") == 0
    fake.reset_call_counts()
    assert fake.call_count("cuMemCreate") == 0
    drv.teardown(va, hs)
    assert fake.call_count("cuMemRelease") == 2


OUT_OF_MEMORY, UNKNOWN = E["CUDA_ERROR_OUT_OF_MEMORY"], E["CUDA_ERROR_UNKNOWN"]


def _null_args(function):
    """Arguments for any entry point that are harmless because an injected fault fires first."""
    out = []
    for t in function.argtypes:
        pointer_like = t in (ctypes.c_void_p, ctypes.c_char_p) or hasattr(t, "_type_") and not isinstance(t._type_, str)
        out.append(None if pointer_like else 0)
    return out


@pytest.mark.parametrize("error", [OUT_OF_MEMORY, UNKNOWN])
def test_every_entry_point_returns_an_injected_error_per_function_and_as_any_call(drv, error):
    for name in harness.ENTRY_POINTS:
        function = getattr(drv.lib, name)
        drv.fake.inject_fault(name, 1, error)
        assert function(*_null_args(function)) == error, name
        drv.fake.inject_fault_any(1, error)
        assert function(*_null_args(function)) == error, name
    assert set(drv.fake.call_log()) == set(harness.ENTRY_POINTS)


def test_inject_fault_any_fails_the_nth_call_whatever_the_entry_point(drv):
    fake = drv.fake
    va, hs = drv.mapped(1)
    fake.reset_call_counts()
    assert fake.call_log() == []
    fake.inject_fault_any(3, UNKNOWN)
    cur, n = ctypes.c_void_p(), ctypes.c_int()
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert drv.cuCtxGetCurrent(ctypes.byref(cur)) == OK
    fake.write(va, b"harness")  # the harness's own calls neither count towards nor consume the fault
    assert fake.read(va, 7) == b"harness"
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK
    assert drv.cuDeviceGetCount(ctypes.byref(n)) == UNKNOWN  # the third call of the code under test
    assert drv.cuDeviceGetCount(ctypes.byref(n)) == OK  # one shot
    assert fake.call_log() == ["cuCtxGetCurrent", "cuMemGetInfo_v2", "cuDeviceGetCount", "cuDeviceGetCount"]
    assert fake.call_count("cuMemcpyDtoH_v2") == 1, "call_count still counts the harness's calls"
    fake.inject_fault_any(1, OUT_OF_MEMORY)
    fake.clear_faults()  # disarms any-call faults too
    assert drv.cuDeviceGetCount(ctypes.byref(n)) == OK
    with pytest.raises(ValueError):
        fake.inject_fault_any(0, UNKNOWN)
    with pytest.raises(ValueError):
        fake.inject_fault_any(1, 0)
    drv.teardown(va, hs)
    fake.reset_call_counts()
    assert fake.call_log() == []


def test_a_sweep_can_fail_every_position_of_an_operation_in_turn(drv):
    """The reliability campaigns' pattern: run once to count calls, then fail position i for every i."""
    fake = drv.fake

    def operation():
        """Map one chunk with access and tear it down; returns (first failing call's rc, names called)."""
        names = []

        def call(name, *args):
            names.append(name)
            return getattr(drv.lib, name)(*args)

        va, h = ctypes.c_ulonglong(), ctypes.c_ulonglong()
        rc = call("cuMemAddressReserve", ctypes.byref(va), drv.gran, 0, 0, 0)
        if rc:
            return rc, names
        rc = call("cuMemCreate", ctypes.byref(h), drv.gran, ctypes.byref(drv.prop()), 0)
        if rc == OK:
            rc = mapped = call("cuMemMap", va.value, drv.gran, 0, h.value, 0)
            released = call("cuMemRelease", h.value)
            while released != OK:  # a refused release stays owned: retry
                rc, released = rc or released, call("cuMemRelease", h.value)
            if rc == OK:
                desc = CUmemAccessDesc()
                desc.location.type, desc.location.id, desc.flags = 1, 0, PROT_RW
                rc = call("cuMemSetAccess", va.value, drv.gran, ctypes.byref(desc), 1)
            if mapped == OK:
                while call("cuMemUnmap", va.value, drv.gran) != OK:
                    rc = rc or UNKNOWN
        while call("cuMemAddressFree", va.value, drv.gran) != OK:
            rc = rc or UNKNOWN
        return rc, names

    fake.reset_call_counts()
    assert operation() == (OK, fake.call_log())
    positions = len(fake.call_log())
    assert positions == 7
    for nth in range(1, positions + 1):
        fake.reset_call_counts()
        fake.inject_fault_any(nth, UNKNOWN)
        rc, names = operation()
        assert rc == UNKNOWN, f"position {nth} ({names[nth - 1]}) did not fail"
        assert fake.call_log() == names
        assert fake.live_object_count() == 0 and fake.used_bytes(0) == 0, f"position {nth} leaked"


RELEASE_CALLS = [
    "cuMemUnmap",
    "cuMemRelease",
    "cuMemAddressFree",
    "cuMemFreeHost",
    "cuStreamDestroy_v2",
    "cuDevicePrimaryCtxRelease_v2",
]


@pytest.mark.parametrize("error", [OUT_OF_MEMORY, UNKNOWN])
@pytest.mark.parametrize("function", RELEASE_CALLS)
def test_an_injected_failure_of_a_release_call_changes_nothing_and_a_retry_succeeds(drv, function, error):
    fake, G = drv.fake, drv.gran
    if function == "cuMemUnmap":
        va, hs = drv.mapped(1)
        fake.write(va, b"still mapped")
        fake.inject_fault_any(1, error)
        assert drv.cuMemUnmap(va, G) == error
        assert "mappings=1" in fake.live_objects() and fake.read(va, 12) == b"still mapped"
        drv.teardown(va, hs)
    elif function == "cuMemRelease":
        h = drv.create()
        fake.inject_fault_any(1, error)
        assert drv.cuMemRelease(h) == error
        assert fake.used_bytes(0) == G and "handles=1" in fake.live_objects()
        va = drv.reserve(G)
        assert drv.cuMemMap(va, G, 0, h, 0) == OK, "the handle is still live"
        drv.teardown(va, [h])
    elif function == "cuMemAddressFree":
        va = drv.reserve(G)
        fake.inject_fault_any(1, error)
        assert drv.cuMemAddressFree(va, G) == error
        h = drv.create()
        assert drv.cuMemMap(va, G, 0, h, 0) == OK, "the reservation is still live"
        drv.teardown(va, [h])
    elif function == "cuMemFreeHost":
        va, hs = drv.mapped(1)
        p = drv.pinned(4096)
        fake.inject_fault_any(1, error)
        assert drv.cuMemFreeHost(p) == error
        assert "pinned=1" in fake.live_objects()
        s = drv.stream()
        assert drv.cuMemcpyHtoDAsync_v2(va, p, 64, s) == OK and drv.cuStreamSynchronize(s) == OK
        assert fake.pageable_copy_count() == 0, "the buffer is still pinned"
        assert drv.cuMemFreeHost(p) == OK and drv.cuStreamDestroy_v2(s) == OK
        drv.teardown(va, hs)
    elif function == "cuStreamDestroy_v2":
        s = drv.stream()
        fake.inject_fault_any(1, error)
        assert drv.cuStreamDestroy_v2(s) == error
        assert drv.cuStreamSynchronize(s) == OK and "streams=1" in fake.live_objects()
        assert drv.cuStreamDestroy_v2(s) == OK
    else:
        c = ctypes.c_void_p()
        assert drv.cuDevicePrimaryCtxRetain(ctypes.byref(c), 1) == OK
        before = fake.primary_context_retains(1)
        fake.inject_fault_any(1, error)
        assert drv.cuDevicePrimaryCtxRelease_v2(1) == error
        assert fake.primary_context_retains(1) == before
        assert drv.cuDevicePrimaryCtxRelease_v2(1) == OK
        assert fake.primary_context_retains(1) == before - 1
    assert fake.live_object_count() == 0


@pytest.mark.parametrize("error", [OUT_OF_MEMORY, UNKNOWN])
def test_context_calls_can_fail_and_a_failed_set_current_changes_nothing(drv, error):
    cur = ctypes.c_void_p()
    drv.fake.inject_fault("cuCtxGetCurrent", 1, error)
    assert drv.cuCtxGetCurrent(ctypes.byref(cur)) == error
    drv.fake.inject_fault("cuCtxSetCurrent", 1, error)
    assert drv.cuCtxSetCurrent(drv.ctx(1)) == error
    assert drv.cuCtxGetCurrent(ctypes.byref(cur)) == OK and cur.value == drv.ctx(0).value
    drv.fake.inject_fault_any(1, error)
    assert drv.cuCtxSetCurrent(None) == error
    assert drv.cuCtxGetCurrent(ctypes.byref(cur)) == OK and cur.value == drv.ctx(0).value


# ============================================================================ capture


def test_capture_records_work_without_executing_it(drv):
    va, hs = drv.mapped(1)
    s = drv.stream()
    assert drv.cuStreamBeginCapture_v2(None, GLOBAL) == E["CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"]
    assert drv.cuStreamBeginCapture_v2(s, 7) == INVALID_VALUE
    assert drv.cuStreamBeginCapture_v2(s, GLOBAL) == OK
    assert drv.cuStreamBeginCapture_v2(s, GLOBAL) != OK  # already capturing
    assert drv.capturing(s) == (OK, CAPTURE_ACTIVE)
    st, cid = ctypes.c_int(), ctypes.c_uint64()
    graph_out, deps, edges, n = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_size_t(9)
    assert (
        drv.cuStreamGetCaptureInfo_v3(
            s,
            ctypes.byref(st),
            ctypes.byref(cid),
            ctypes.byref(graph_out),
            ctypes.byref(deps),
            ctypes.byref(edges),
            ctypes.byref(n),
        )
        == OK
    )
    assert st.value == CAPTURE_ACTIVE and cid.value > 0
    assert drv.cuMemsetD8Async(va, 0x11, 64, s) == OK
    assert drv.fake.pending_ops() == 0
    # Queries stay allowed during a GLOBAL capture.
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK
    g = ctypes.c_size_t()
    assert drv.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(drv.prop()), 0) == OK
    graph = ctypes.c_void_p()
    assert drv.cuStreamEndCapture(s, ctypes.byref(graph)) == OK and graph.value
    assert drv.capturing(s) == (OK, CAPTURE_NONE)
    assert drv.fake.read(va, 1) == b"\xa5"  # captured memset never ran
    assert "graphs=1" in drv.fake.live_objects()
    assert drv.cuGraphDestroy(graph) == OK
    assert drv.cuGraphDestroy(graph) == INVALID_VALUE
    assert drv.cuStreamEndCapture(s, ctypes.byref(graph)) == E["CUDA_ERROR_ILLEGAL_STATE"]
    assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, hs)


@pytest.mark.parametrize("call", ["create", "reserve", "hostalloc", "streamsync_other", "ctxsync", "eventquery"])
def test_prohibited_call_in_global_capture_invalidates_it(drv, call):
    s = drv.stream()
    other = drv.stream()
    ev = drv.event()
    assert drv.cuStreamBeginCapture_v2(s, GLOBAL) == OK
    if call == "create":
        rc = drv.create_rc(drv.gran)[0]
    elif call == "reserve":
        p = ctypes.c_ulonglong()
        rc = drv.cuMemAddressReserve(ctypes.byref(p), drv.gran, 0, 0, 0)
    elif call == "hostalloc":
        p = ctypes.c_void_p()
        rc = drv.cuMemHostAlloc(ctypes.byref(p), 4096, 0)
    elif call == "streamsync_other":
        rc = drv.cuStreamSynchronize(other)
    elif call == "ctxsync":
        rc = drv.cuCtxSynchronize()
    else:
        rc = drv.cuEventQuery(ev)
    assert rc == E["CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"]
    assert drv.capturing(s) == (OK, CAPTURE_INVALIDATED)
    assert drv.cuEventRecord(ev, s) == E["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"]
    graph = ctypes.c_void_p(1)
    assert drv.cuStreamEndCapture(s, ctypes.byref(graph)) == E["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"]
    assert graph.value is None
    assert drv.capturing(s) == (OK, CAPTURE_NONE)
    assert drv.fake.used_bytes(0) == 0 and "reservations=0" in drv.fake.live_objects()
    for x in (s, other):
        assert drv.cuStreamDestroy_v2(x) == OK
    assert drv.cuEventDestroy_v2(ev) == OK


def test_relaxed_thread_mode_permits_unsafe_calls(drv):
    s = drv.stream()
    assert drv.cuStreamBeginCapture_v2(s, GLOBAL) == OK
    prev = drv.capture_mode(RELAXED)
    assert prev == GLOBAL
    h = drv.create()  # allowed in RELAXED
    assert drv.cuMemRelease(h) == OK
    assert drv.cuStreamSynchronize(s) == E["CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"]  # never: the capturing stream
    drv.capture_mode(prev)
    graph = ctypes.c_void_p()
    assert drv.cuStreamEndCapture(s, ctypes.byref(graph)) == E["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"]
    m = ctypes.c_int(9)
    assert drv.cuThreadExchangeStreamCaptureMode(ctypes.byref(m)) == INVALID_VALUE
    assert drv.cuStreamDestroy_v2(s) == OK


def _in_thread(fn, *args):
    out = {}

    def run():
        drv_ctx_ok = fn(*args)
        out["rc"] = drv_ctx_ok

    th = threading.Thread(target=run)
    th.start()
    th.join()
    return out["rc"]


def _other_thread_create(drv, mode):
    drv.use(0)
    drv.capture_mode(mode)
    rc, h = drv.create_rc(drv.gran)
    if rc == OK:
        drv.cuMemRelease(h)
    drv.cuCtxSetCurrent(None)
    return rc


@pytest.mark.parametrize(
    "capture_mode,other_mode,expect_ok,still_active",
    [
        (GLOBAL, GLOBAL, False, False),  # another thread's GLOBAL capture prohibits and is invalidated
        (GLOBAL, THREAD_LOCAL, True, True),
        (GLOBAL, RELAXED, True, True),
        (THREAD_LOCAL, GLOBAL, True, True),  # a THREAD_LOCAL capture only restricts its own thread
        (RELAXED, GLOBAL, True, True),
    ],
)
def test_capture_modes_across_threads(drv, capture_mode, other_mode, expect_ok, still_active):
    s = drv.stream()
    assert drv.cuStreamBeginCapture_v2(s, capture_mode) == OK
    rc = _in_thread(_other_thread_create, drv, other_mode)
    assert (rc == OK) == expect_ok, rc
    if not expect_ok:
        assert rc == E["CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"]
    assert drv.capturing(s) == (OK, CAPTURE_ACTIVE if still_active else CAPTURE_INVALIDATED)
    # Own-thread rules: THREAD_LOCAL and GLOBAL prohibit here, RELAXED does not.
    own = drv.create_rc(drv.gran)
    if capture_mode == RELAXED:
        assert own[0] == OK
        assert drv.cuMemRelease(own[1]) == OK
    else:
        assert own[0] == E["CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"]
    graph = ctypes.c_void_p()
    rc = drv.cuStreamEndCapture(s, ctypes.byref(graph))
    if capture_mode == RELAXED:
        assert rc == OK
        assert drv.cuGraphDestroy(graph) == OK
    else:
        assert rc == E["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"] and not graph.value
    assert drv.cuStreamDestroy_v2(s) == OK


def test_end_capture_on_another_thread_is_wrong_thread(drv):
    s = drv.stream()
    assert drv.cuStreamBeginCapture_v2(s, THREAD_LOCAL) == OK

    def end():
        graph = ctypes.c_void_p()
        return drv.cuStreamEndCapture(s, ctypes.byref(graph))

    assert _in_thread(end) == E["CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD"]
    graph = ctypes.c_void_p()
    assert drv.cuStreamEndCapture(s, ctypes.byref(graph)) == OK
    assert drv.cuGraphDestroy(graph) == OK
    assert drv.cuStreamDestroy_v2(s) == OK


def test_legacy_stream_while_a_blocking_stream_captures(drv):
    va, hs = drv.mapped(1)
    blocking = drv.stream(0)
    assert drv.cuStreamBeginCapture_v2(blocking, RELAXED) == OK
    implicit = E["CUDA_ERROR_STREAM_CAPTURE_IMPLICIT"]
    assert drv.capturing(None) == (implicit, -1)  # query: error, but no invalidation
    assert drv.capturing(blocking) == (OK, CAPTURE_ACTIVE)
    assert drv.cuMemsetD8Async(va, 1, 4, None) == implicit  # use: invalidates
    assert drv.capturing(blocking) == (OK, CAPTURE_INVALIDATED)
    graph = ctypes.c_void_p()
    assert drv.cuStreamEndCapture(blocking, ctypes.byref(graph)) == E["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"]
    # A non-blocking capturing stream leaves the legacy stream usable.
    nb = drv.stream(NON_BLOCKING)
    assert drv.cuStreamBeginCapture_v2(nb, RELAXED) == OK
    assert drv.cuMemsetD8Async(va, 1, 4, None) == OK
    assert drv.cuStreamEndCapture(nb, ctypes.byref(graph)) == OK
    assert drv.cuGraphDestroy(graph) == OK
    assert drv.cuCtxSynchronize() == OK
    for s in (blocking, nb):
        assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, hs)


def test_capture_fork_join_and_captured_events(drv):
    origin, side = drv.stream(), drv.stream()
    fork, join = drv.event(), drv.event()
    va, hs = drv.mapped(1)
    assert drv.cuStreamBeginCapture_v2(origin, GLOBAL) == OK
    assert drv.cuEventRecord(fork, origin) == OK
    assert drv.cuEventQuery(fork) == E["CUDA_ERROR_CAPTURED_EVENT"]
    assert drv.cuStreamWaitEvent(side, fork, 0) == OK  # side joins the capture
    assert drv.capturing(side) == (OK, CAPTURE_ACTIVE)
    assert drv.cuMemsetD8Async(va, 1, 4, side) == OK
    graph = ctypes.c_void_p()
    # Unjoined side work: ending now fails.
    assert drv.cuStreamEndCapture(side, ctypes.byref(graph)) == E["CUDA_ERROR_STREAM_CAPTURE_UNMATCHED"]
    assert drv.cuStreamEndCapture(origin, ctypes.byref(graph)) != OK and not graph.value
    # Again, joined properly.
    assert drv.cuStreamBeginCapture_v2(origin, GLOBAL) == OK
    assert drv.cuEventRecord(fork, origin) == OK
    assert drv.cuStreamWaitEvent(side, fork, 0) == OK
    assert drv.cuMemsetD8Async(va, 1, 4, side) == OK
    assert drv.cuEventRecord(join, side) == OK
    assert drv.cuStreamWaitEvent(origin, join, 0) == OK
    assert drv.cuStreamEndCapture(origin, ctypes.byref(graph)) == OK and graph.value
    assert drv.capturing(side) == (OK, CAPTURE_NONE)
    assert drv.cuGraphDestroy(graph) == OK
    # Waiting inside a capture on an event recorded outside it: isolation error.
    plain = drv.event()
    assert drv.cuEventRecord(plain, side) == OK
    assert drv.cuStreamBeginCapture_v2(origin, GLOBAL) == OK
    assert drv.cuStreamWaitEvent(origin, plain, 0) == E["CUDA_ERROR_STREAM_CAPTURE_ISOLATION"]
    assert drv.cuStreamEndCapture(origin, ctypes.byref(graph)) == E["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"]
    assert drv.fake.read(va, 1) == b"\xa5"
    for e in (fork, join, plain):
        assert drv.cuEventDestroy_v2(e) == OK
    for s in (origin, side):
        assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(va, hs)


# ============================================================================ errors, leaks, threads


def test_error_names_match_cuda_h(drv):
    text = (harness.find_cuda_include() / "cuda.h").read_text()
    body = re.search(r"typedef enum cudaError_enum \{(.*?)\}\s*CUresult;", text, re.S).group(1)
    enum = {int(v): n for n, v in re.findall(r"(CUDA_\w+)\s*=\s*(\d+)", body)}
    assert len(enum) > 90
    s = ctypes.c_char_p()
    for code, name in enum.items():
        assert drv.cuGetErrorName(code, ctypes.byref(s)) == OK
        assert s.value.decode() == name
        assert drv.cuGetErrorString(code, ctypes.byref(s)) == OK and s.value
    for name, code in ERROR.items():
        assert enum[code] == name
    s = ctypes.c_char_p(b"x")
    assert drv.cuGetErrorName(12345, ctypes.byref(s)) == INVALID_VALUE and s.value is None
    s = ctypes.c_char_p(b"x")
    assert drv.cuGetErrorString(12345, ctypes.byref(s)) == INVALID_VALUE and s.value is None
    assert drv.fake.error_name(2) == "CUDA_ERROR_OUT_OF_MEMORY"


def test_configure_reports_leaks_and_still_resets(drv):
    s = drv.stream()
    drv.event()
    drv.pinned(4096)
    with pytest.raises(AssertionError, match="pinned=1 streams=1 events=1"):
        drv.fake.configure(devices=2, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    assert drv.fake.live_objects() == "handles=0 reservations=0 mappings=0 pinned=0 streams=0 events=0 graphs=0"
    assert drv.cuStreamSynchronize(s) == E["CUDA_ERROR_INVALID_HANDLE"]
    with pytest.raises(ValueError):
        drv.fake.configure(devices=2, granularity_bytes=3 * MiB)


def test_last_primary_context_release_with_live_objects_is_a_violation(drv):
    drv.fake.configure(devices=3, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    c = ctypes.c_void_p()
    assert drv.cuDevicePrimaryCtxRetain(ctypes.byref(c), 2) == OK
    assert drv.cuCtxSetCurrent(c) == OK
    s = drv.stream()
    assert drv.cuDevicePrimaryCtxRelease_v2(2) == OK
    assert any("reset" in v for v in drv.fake.violations())
    assert drv.cuStreamDestroy_v2(s) == E["CUDA_ERROR_INVALID_HANDLE"]  # died with the context
    drv.fake.clear_violations()
    drv.use(0)


def test_harness_write_read_roundtrip(drv):
    G = drv.gran
    va, hs = drv.mapped(2)
    data = os.urandom(3 * 4096 + 17)
    drv.fake.write(va + G - 5000, data, device=0)
    assert drv.fake.read(va + G - 5000, len(data)) == data
    cur = ctypes.c_void_p()
    assert drv.cuCtxGetCurrent(ctypes.byref(cur)) == OK and cur.value == drv.ctx(0).value  # restored
    drv.teardown(va, hs)
    with pytest.raises(harness.CudaCallError, match="CUDA_ERROR_INVALID_VALUE"):
        drv.fake.read(va, 4)


def test_many_threads_allocate_while_another_copies(drv):
    G = drv.gran
    errors = []
    va, hs = drv.mapped(2)
    stop = threading.Event()

    def allocator(i):
        try:
            drv.use(i % 2)
            for _ in range(20):
                v, h = drv.mapped(1, dev=i % 2)
                drv.fake.write(v, bytes([i]) * 64, device=i % 2)
                assert drv.fake.read(v, 64, device=i % 2) == bytes([i]) * 64
                drv.teardown(v, h)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))
        finally:
            drv.cuCtxSetCurrent(None)

    def copier():
        try:
            drv.use(0)
            s = drv.stream()
            buf = drv.pinned(G)
            while not stop.is_set():
                assert drv.cuMemcpyDtoHAsync_v2(buf, va, G, s) == OK
                assert drv.cuMemcpyHtoDAsync_v2(va + G, buf, G, s) == OK
                assert drv.cuStreamSynchronize(s) == OK
            assert drv.cuStreamDestroy_v2(s) == OK
            assert drv.cuMemFreeHost(buf) == OK
        except Exception as e:  # pragma: no cover
            errors.append(repr(e))
        finally:
            drv.cuCtxSetCurrent(None)

    c = threading.Thread(target=copier)
    c.start()
    ts = [threading.Thread(target=allocator, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    stop.set()
    c.join()
    assert errors == []
    assert drv.fake.violations() == []
    drv.teardown(va, hs)
    assert drv.fake.used_bytes(0) == 0 and drv.fake.used_bytes(1) == 0


def test_build_is_cached(fakecuda_driver):
    p = pathlib.Path(harness.build())
    mtime = p.stat().st_mtime_ns
    assert pathlib.Path(harness.build()).stat().st_mtime_ns == mtime


# ============================================================================ primary contexts cost device memory


def _retain(drv, dev):
    c = ctypes.c_void_p()
    rc = drv.cuDevicePrimaryCtxRetain(ctypes.byref(c), dev)
    return rc, c


def test_an_active_primary_context_costs_device_memory_until_its_last_release(drv):
    fake, cap = drv.fake, 1 << 30
    fake.configure(devices=3, capacity_bytes=cap, granularity_bytes=drv.gran)
    overhead = 32 * MiB  # the default charge
    assert not fake.context_active(2) and fake.free_bytes(2) == cap
    assert _retain(drv, 2)[0] == OK
    assert fake.context_active(2) and fake.free_bytes(2) == cap - overhead
    assert fake.primary_context_retains(2) == 1 and fake.primary_context_retain_calls(2) == 1
    rc, c = _retain(drv, 2)  # a second reference costs nothing more
    assert rc == OK and fake.free_bytes(2) == cap - overhead
    assert drv.cuCtxSetCurrent(c) == OK
    f, t = ctypes.c_size_t(), ctypes.c_size_t()
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK
    assert (f.value, t.value) == (cap - overhead, cap), "cuMemGetInfo shows the context"
    fake.set_context_overhead(2, 300 * MiB)  # the knob: what a real H100 context takes
    assert drv.cuMemGetInfo_v2(ctypes.byref(f), ctypes.byref(t)) == OK and f.value == cap - 300 * MiB
    drv.use(0)
    assert drv.cuDevicePrimaryCtxRelease_v2(2) == OK and fake.free_bytes(2) == cap - 300 * MiB
    assert drv.cuDevicePrimaryCtxRelease_v2(2) == OK
    assert not fake.context_active(2) and fake.free_bytes(2) == cap, "the last release frees it"
    assert fake.primary_context_retains(2) == 0 and fake.primary_context_retain_calls(2) == 2
    assert fake.free_bytes(0) == cap - overhead, "the fixture holds device 0's context"
    fake.reset_call_counts()
    assert fake.primary_context_retain_calls(2) == 0


def test_creating_a_context_without_room_for_it_is_out_of_memory(drv):
    fake = drv.fake
    fake.configure(devices=3, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    fake.set_foreign_load(2, (1 << 30) - 32 * MiB + 1)
    assert _retain(drv, 2)[0] == OUT_OF_MEMORY
    assert not fake.context_active(2) and fake.primary_context_retain_calls(2) == 0
    fake.set_foreign_load(2, (1 << 30) - 32 * MiB)
    assert _retain(drv, 2)[0] == OK and fake.free_bytes(2) == 0
    assert drv.cuDevicePrimaryCtxRelease_v2(2) == OK


def test_harness_helpers_leave_no_context_active_and_their_retains_are_told_apart(drv):
    fake = drv.fake
    fake.configure(devices=3, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    with fake.context(2):
        assert fake.context_active(2), "the harness's retain is a real one"
        assert fake.primary_context_retains(2) == 0 and fake.primary_context_retain_calls(2) == 0
    assert not fake.context_active(2) and fake.free_bytes(2) == 1 << 30
    rc, c = _retain(drv, 2)  # the code under test uses device 2
    assert rc == OK and drv.cuCtxSetCurrent(c) == OK
    va, hs = drv.mapped(1, dev=2)
    drv.use(0)
    fake.write(va, b"on device 2", device=2)
    assert fake.read(va, 11, device=2) == b"on device 2"
    assert fake.primary_context_retains(2) == 1 and fake.primary_context_retain_calls(2) == 1
    assert drv.cuCtxSetCurrent(c) == OK
    drv.teardown(va, hs)
    drv.use(0)
    assert drv.cuDevicePrimaryCtxRelease_v2(2) == OK
    assert not fake.context_active(2)


# ============================================================================ peer access


def _can_access(drv, dev, peer):
    v = ctypes.c_int(-1)
    rc = drv.cuDeviceCanAccessPeer(ctypes.byref(v), dev, peer)
    return rc, v.value


def test_can_access_peer_follows_the_peer_matrix(drv):
    assert _can_access(drv, 0, 1) == (OK, 1) and _can_access(drv, 1, 0) == (OK, 1)  # NVLink box
    assert _can_access(drv, 0, 0) == (OK, 0), "a device is not its own peer"
    drv.fake.set_peer_access(1, 0, False)
    assert _can_access(drv, 1, 0) == (OK, 0) and _can_access(drv, 0, 1) == (OK, 1), "directed"
    assert _can_access(drv, 0, 2)[0] == E["CUDA_ERROR_INVALID_DEVICE"]
    assert drv.cuDeviceCanAccessPeer(None, 0, 1) == INVALID_VALUE
    with pytest.raises(ValueError):
        drv.fake.set_peer_access(0, 5, True)
    drv.fake.configure(devices=2, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    assert _can_access(drv, 1, 0) == (OK, 1), "configure restores every pair"


def _primary_state(drv, dev):
    flags, active = ctypes.c_uint(7), ctypes.c_int(-1)
    rc = drv.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))
    return rc, active.value


def test_primary_context_state_says_who_holds_a_context_and_creates_none(drv):
    fake = drv.fake
    fake.configure(devices=3, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    free_before = fake.free_bytes(2)
    assert _primary_state(drv, 2) == (OK, 0), "nobody retained device 2"
    assert not fake.context_active(2) and fake.free_bytes(2) == free_before, "the query created nothing"
    assert _primary_state(drv, 0) == (OK, 1)
    c = ctypes.c_void_p()
    assert drv.cuDevicePrimaryCtxRetain(ctypes.byref(c), 2) == OK
    assert _primary_state(drv, 2) == (OK, 1), "retained by someone else (PyTorch, say)"
    assert drv.cuDevicePrimaryCtxRelease_v2(2) == OK
    assert _primary_state(drv, 2) == (OK, 0), "the last release resets it"
    assert _primary_state(drv, 3)[0] == E["CUDA_ERROR_INVALID_DEVICE"]
    assert drv.cuDevicePrimaryCtxGetState(0, None, None) == INVALID_VALUE
    with fake.capture_on_thread(0) as cap:
        assert _primary_state(drv, 1) == (OK, 1), "a query: allowed during another thread's capture"
        assert cap.status() == "active"


def test_get_access_reports_each_devices_grant_on_a_mapping(drv):
    G, fake = drv.gran, drv.fake
    va, hs = drv.mapped(2, dev=0, access=False)
    loc = harness.CUmemLocation(1, 1)
    flags = ctypes.c_ulonglong(99)
    assert drv.cuMemGetAccess(ctypes.byref(flags), ctypes.byref(loc), va + G) == OK and flags.value == PROT_NONE
    assert drv.access_rc(va, 2 * G, PROT_READ, dev=1) == OK
    assert fake.access(va + G + 5, device=1) == "read" and fake.access(va, device=0) == "none"
    assert drv.access_rc(va, 2 * G, PROT_RW, dev=0) == OK
    assert fake.access(va, device=0) == "readwrite"
    spare = drv.reserve(G)
    assert drv.cuMemGetAccess(ctypes.byref(flags), ctypes.byref(loc), spare) != OK, "reserved, not mapped (S)"
    loc.id = 5
    assert drv.cuMemGetAccess(ctypes.byref(flags), ctypes.byref(loc), va) == E["CUDA_ERROR_INVALID_DEVICE"]
    assert drv.cuMemAddressFree(spare, G) == OK
    drv.teardown(va, hs)
    with pytest.raises(harness.CudaCallError):
        fake.access(va, device=0)


def test_a_retained_allocation_stays_allocated_until_every_reference_is_released(drv):
    G, fake = drv.gran, drv.fake
    va, hs = drv.mapped(1, dev=0)
    used = fake.used_bytes(0)
    retained = harness.CUhandle()
    assert drv.cuMemRetainAllocationHandle(ctypes.byref(retained), ctypes.c_void_p(va + 4096)) == OK
    assert retained.value == hs[0], "any address inside the mapping names its allocation"
    drv.teardown(va, hs)  # the owner unmaps and releases
    assert fake.used_bytes(0) == used, "the retained reference keeps the memory allocated"
    assert drv.cuMemRelease(retained) == OK
    assert fake.used_bytes(0) == used - G
    assert drv.cuMemRelease(retained) == INVALID_VALUE, "every reference is gone"
    fake.clear_violations()
    spare = drv.reserve(G)
    assert drv.cuMemRetainAllocationHandle(ctypes.byref(retained), ctypes.c_void_p(spare)) != OK, "not mapped"
    assert drv.cuMemAddressFree(spare, G) == OK


def test_set_access_for_a_device_that_cannot_reach_the_owner_is_rejected(drv):
    G = drv.gran
    va, hs = drv.mapped(1, dev=0, access=False)
    drv.fake.set_peer_access(1, 0, False)
    assert drv.access_rc(va, G, PROT_READ, dev=1) != OK  # S
    both = (CUmemAccessDesc * 2)()
    for d, dev in zip(both, (0, 1), strict=False):
        d.location.type, d.location.id, d.flags = 1, dev, PROT_RW
    assert drv.cuMemSetAccess(va, G, both, 2) != OK
    assert drv.cuMemsetD8_v2(va, 1, 16) == INVALID_VALUE, "a rejected call grants nobody access"
    assert drv.access_rc(va, G, PROT_NONE, dev=1) == OK, "PROT_NONE needs no peer access"
    assert drv.access_rc(va, G, PROT_RW, dev=0) == OK, "the owner needs no peer access"
    drv.fake.set_peer_access(1, 0, True)
    assert drv.cuMemSetAccess(va, G, both, 2) == OK
    drv.teardown(va, hs)


def test_a_copy_on_another_devices_stream_needs_that_devices_access(drv):
    G, fake = drv.gran, drv.fake
    a, ha = drv.mapped(1, dev=0)  # device 0's memory, access for device 0 only
    drv.use(1)
    b, hb = drv.mapped(1, dev=1)
    drv.use(0)
    fake.write(a, b"from device 0", device=0)
    s1 = ctypes.c_void_p()
    drv.use(1)
    assert drv.cuStreamCreate(ctypes.byref(s1), NON_BLOCKING) == OK
    assert drv.cuMemcpyDtoDAsync_v2(b, a, 13, s1) == INVALID_VALUE, "device 1 has no access to a"
    host = drv.pinned(64)
    assert drv.cuMemcpyDtoHAsync_v2(host, a, 13, s1) == INVALID_VALUE
    with pytest.raises(harness.CudaCallError, match="INVALID_VALUE"):
        fake.copy_device_to_device(b, a, 13, device=1)
    drv.use(0)
    assert drv.access_rc(a, G, PROT_READ, dev=1) == OK  # the owner's grant to its peer
    drv.use(1)
    assert drv.cuMemcpyDtoDAsync_v2(b, a, 13, s1) == OK and drv.cuStreamSynchronize(s1) == OK
    assert fake.read(b, 13, device=1) == b"from device 0"
    with pytest.raises(harness.CudaCallError, match="INVALID_VALUE"):
        fake.copy_device_to_device(a, b, 13, device=1)  # READ is not READWRITE
    with pytest.raises(harness.CudaCallError, match="INVALID_VALUE"):
        fake.copy_device_to_device(a, b, 13, device=0)  # device 0 has no access to b
    fake.write(b, b"back to device 0", device=1)
    drv.use(1)
    assert drv.access_rc(b, G, PROT_READ, dev=0) == OK
    fake.copy_device_to_device(a, b, 16, device=0)
    assert fake.read(a, 16) == b"back to device 0"
    assert drv.cuStreamDestroy_v2(s1) == OK and drv.cuMemFreeHost(host) == OK
    drv.teardown(b, hb)
    drv.use(0)
    drv.teardown(a, ha)


def test_memcpy_peer_async_checks_contexts_owners_and_access(drv):
    G, fake = drv.gran, drv.fake
    a, ha = drv.mapped(1, dev=0)
    b, hb = drv.mapped(1, dev=1, access=False)
    c0, c1 = drv.ctx(0), drv.ctx(1)
    fake.write(a, b"peer copy")
    s = drv.stream()  # a stream of device 0
    assert drv.cuMemcpyPeerAsync(b, c1, a, c0, 9, s) != OK, "nobody may write b yet"
    assert drv.access_rc(b, G, PROT_RW, dev=1) == OK
    assert drv.cuMemcpyPeerAsync(b, c1, a, c0, 9, s) != OK, "the stream's device 0 has no access to b"
    assert drv.access_rc(b, G, PROT_RW, dev=0) == OK
    assert drv.cuMemcpyPeerAsync(b, c0, a, c0, 9, s) != OK, "b belongs to device 1, not to the context named"
    assert drv.cuMemcpyPeerAsync(b, None, a, c0, 9, s) == E["CUDA_ERROR_INVALID_CONTEXT"]
    assert drv.cuMemcpyPeerAsync(b, c1, a, c0, 9, s) == OK and drv.cuStreamSynchronize(s) == OK
    assert fake.read(b, 9, device=1) == b"peer copy"
    assert drv.cuStreamDestroy_v2(s) == OK
    drv.teardown(b, hb)
    drv.teardown(a, ha)


# ============================================================================ capture from another thread


@pytest.mark.parametrize(
    "call",
    [
        "unmap",
        "release",
        "address_free",
        "map",
        "set_access",
        "ctx_sync",
        "stream_sync",
        "event_sync",
        "free_host",
        "retain_new_context",
    ],
)
def test_another_threads_global_capture_prohibits_and_is_invalidated(drv, call):
    fake, G = drv.fake, drv.gran
    fake.configure(devices=3, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    va, hs = drv.mapped(1)
    spare_va = drv.reserve(G)
    spare = drv.create()
    s, ev, p = drv.stream(), drv.event(), drv.pinned(4096)
    assert drv.cuEventRecord(ev, s) == OK
    calls = {
        "unmap": lambda: drv.cuMemUnmap(va, G),
        "release": lambda: drv.cuMemRelease(spare),
        "address_free": lambda: drv.cuMemAddressFree(spare_va, G),
        "map": lambda: drv.cuMemMap(spare_va, G, 0, spare, 0),
        "set_access": lambda: drv.access_rc(va, G),
        "ctx_sync": lambda: drv.cuCtxSynchronize(),
        "stream_sync": lambda: drv.cuStreamSynchronize(s),
        "event_sync": lambda: drv.cuEventSynchronize(ev),
        "free_host": lambda: drv.cuMemFreeHost(p),
        "retain_new_context": lambda: _retain(drv, 2)[0],
    }
    with fake.capture_on_thread(device=0, mode="global") as capture:
        assert capture.status() == "active"
        before = fake.live_objects()
        assert calls[call]() == E["CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"]
        assert fake.live_objects() == before and not fake.context_active(2), "the call changed nothing"
        assert capture.status() == "invalidated"
        assert capture.end() == E["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"]
    assert calls[call]() == OK, "allowed once the capture has ended"
    if call == "retain_new_context":
        assert drv.cuDevicePrimaryCtxRelease_v2(2) == OK
    if call != "free_host":
        assert drv.cuMemFreeHost(p) == OK
    assert drv.cuStreamDestroy_v2(s) == OK and drv.cuEventDestroy_v2(ev) == OK
    if call != "unmap":
        assert drv.cuMemUnmap(va, G) == OK
    if call == "map":
        assert drv.cuMemUnmap(spare_va, G) == OK
    if call != "release":
        assert drv.cuMemRelease(spare) == OK
    if call != "address_free":
        assert drv.cuMemAddressFree(spare_va, G) == OK
    assert drv.cuMemRelease(hs[0]) == OK and drv.cuMemAddressFree(va, G) == OK


@pytest.mark.parametrize("mode", ["thread_local", "relaxed"])
def test_another_threads_non_global_capture_does_not_prohibit(drv, mode):
    G = drv.gran
    va, hs = drv.mapped(1)
    with drv.fake.capture_on_thread(device=0, mode=mode) as capture:
        assert drv.cuMemUnmap(va, G) == OK and drv.cuMemRelease(hs[0]) == OK
        assert capture.status() == "active"
        if mode == "relaxed":
            # Synchronizing the capturing stream's context is invalid in every mode.
            assert drv.cuCtxSynchronize() == E["CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"]
            assert capture.end() == E["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"]
        else:
            assert capture.end() == OK
    assert drv.cuMemAddressFree(va, G) == OK


def test_syncing_another_threads_capturing_stream_is_invalid_even_in_relaxed_mode(drv):
    with drv.fake.capture_on_thread(device=0, mode="global") as capture:
        drv.capture_mode(RELAXED)
        h = drv.create()  # RELAXED: unsafe calls are allowed...
        assert drv.cuMemRelease(h) == OK and capture.status() == "active"
        stream = ctypes.c_void_p(capture.stream)
        assert drv.cuStreamSynchronize(stream) == E["CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"]  # ...this never
        drv.capture_mode(GLOBAL)
        assert capture.status() == "invalidated"
    assert capture.end_result == E["CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"]


def test_thread_capture_helper_records_work_and_reports_errors(drv):
    va, hs = drv.mapped(1)
    with drv.fake.capture_on_thread(device=0, mode="thread_local") as capture:
        assert capture.stream
        stream = ctypes.c_void_p(capture.stream)
        assert drv.cuMemsetD8Async(va, 0x42, 8, stream) == OK  # recorded into the capture, not run
        assert drv.fake.pending_ops() == 0
        assert capture.end() == OK
        assert capture.status() == "none"
    assert drv.fake.read(va, 1) == b"\xa5"
    assert drv.fake.call_log() and "cuStreamBeginCapture_v2" not in drv.fake.call_log()
    with pytest.raises(ValueError, match="capture mode"):
        drv.fake.capture_on_thread(mode="loose")
    with pytest.raises(harness.CudaCallError, match="INVALID_DEVICE"):
        with drv.fake.capture_on_thread(device=7):
            pass
    drv.teardown(va, hs)


# ============================================================================ GPUDirect RDMA and NUMA attributes

RDMA_WITH_VMM, HOST_NUMA_ID = 110, 134  # CU_DEVICE_ATTRIBUTE_* in cuda.h


def _attribute(drv, attr, dev):
    v = ctypes.c_int(-99)
    rc = drv.cuDeviceGetAttribute(ctypes.byref(v), attr, dev)
    return rc, v.value


def test_rdma_and_host_numa_attributes_with_their_knobs(drv):
    fake = drv.fake
    assert _attribute(drv, RDMA_WITH_VMM, 0) == (OK, 1) and _attribute(drv, RDMA_WITH_VMM, 1) == (OK, 1)
    fake.set_rdma_vmm_supported(1, False)
    assert _attribute(drv, RDMA_WITH_VMM, 1) == (OK, 0)
    assert _attribute(drv, HOST_NUMA_ID, 0) == (OK, 0) and _attribute(drv, HOST_NUMA_ID, 1) == (OK, 1)
    fake.set_host_numa_id(1, -1)  # no NUMA on this host
    assert _attribute(drv, HOST_NUMA_ID, 1) == (OK, -1)
    fake.set_host_numa_id(1, None)  # a driver older than the attribute
    assert _attribute(drv, HOST_NUMA_ID, 1)[0] == INVALID_VALUE
    with pytest.raises(ValueError):
        fake.set_host_numa_id(0, -5)
    fake.configure(devices=4, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    assert [_attribute(drv, HOST_NUMA_ID, d)[1] for d in range(4)] == [0, 0, 1, 1]


HOST_REGISTER_SUPPORTED = 99  # CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED


def test_host_register_follows_the_host_register_supported_attribute(drv):
    fake = drv.fake
    assert [_attribute(drv, HOST_REGISTER_SUPPORTED, d) for d in (0, 1)] == [(OK, 1), (OK, 1)]
    fake.set_host_register_supported(0, False)
    assert _attribute(drv, HOST_REGISTER_SUPPORTED, 0) == (OK, 0)
    buf = ctypes.create_string_buffer(8192)
    rc = drv.cuMemHostRegister_v2(buf, 8192, 0)
    assert rc != OK and rc == E["CUDA_ERROR_NOT_SUPPORTED"]
    assert drv.cuMemHostUnregister(buf) == E["CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"], "nothing was registered"
    drv.use(1)  # the rule follows the current context's device: device 1 still supports registration
    assert drv.cuMemHostRegister_v2(buf, 8192, 0) == OK
    assert drv.cuMemHostUnregister(buf) == OK
    drv.use(0)
    fake.set_host_register_supported(0, True)
    assert drv.cuMemHostRegister_v2(buf, 8192, 0) == OK
    assert drv.cuMemHostUnregister(buf) == OK
    with pytest.raises(ValueError):
        fake.set_host_register_supported(5, False)
    fake.set_host_register_supported(0, False)
    fake.configure(devices=2, capacity_bytes=1 << 30, granularity_bytes=drv.gran)
    assert _attribute(drv, HOST_REGISTER_SUPPORTED, 0) == (OK, 1), "configure() resets the knob"


def _create_rdma(drv, dev, flag):
    prop = drv.prop(dev)
    prop.allocFlags.gpuDirectRDMACapable = flag
    h = ctypes.c_ulonglong()
    rc = drv.cuMemCreate(ctypes.byref(h), drv.gran, ctypes.byref(prop), 0)
    return rc, h.value


def test_rdma_capable_memory_only_where_the_device_supports_it(drv):
    fake, G = drv.fake, drv.gran
    rc, h = _create_rdma(drv, 0, 1)
    assert rc == OK and fake.rdma_capable(h)
    va = drv.reserve(G)
    assert drv.cuMemMap(va, G, 0, h, 0) == OK
    assert fake.rdma_capable(va + 100), "looked up by device address too"
    plain = drv.create()
    assert not fake.rdma_capable(plain)
    fake.set_rdma_vmm_supported(1, False)
    assert _create_rdma(drv, 1, 1)[0] != OK  # S: the flag on a device without support
    assert fake.used_bytes(1) == 0
    assert _create_rdma(drv, 0, 2)[0] == INVALID_VALUE
    g = ctypes.c_size_t()
    prop = drv.prop(1)
    prop.allocFlags.gpuDirectRDMACapable = 1
    assert drv.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(prop), 0) != OK
    with pytest.raises(ValueError):
        fake.rdma_capable(0xDEAD000)
    assert drv.cuMemRelease(plain) == OK
    drv.teardown(va, [h])


# ---------------------------------------------------------------------------- modules and kernels (README, "Kernels")

HASH_PTX = re.search(
    r'R"PTX\((.*)\)PTX"', (pathlib.Path(__file__).resolve().parents[2] / "csrc" / "chunk_hash_ptx.h").read_text(), re.S
).group(1)


def load_module(drv, text: str):
    module = ctypes.c_void_p()
    rc = drv.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(text.encode()))
    return rc, module


def hash_function(drv):
    rc, module = load_module(drv, HASH_PTX)
    assert rc == OK
    function = ctypes.c_void_p()
    assert drv.cuModuleGetFunction(ctypes.byref(function), module, b"gpusleep_hash_pieces") == OK
    return module, function


def launch_hash(drv, function, data, num_bytes, sums, stream, grid=None, block=256, span_words=8192, bpp=64):
    values = [ctypes.c_uint64(v) for v in (data, num_bytes, span_words, bpp, sums)]
    params = (ctypes.c_void_p * 5)(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in values])
    grid = grid if grid is not None else max(1, -(-num_bytes // (8 * span_words)))
    return drv.cuLaunchKernel(function, grid, 1, 1, block, 1, 1, 0, stream, params, None)


def test_a_module_needs_a_context_and_ptx_a_cuda_12_0_driver_can_jit(drv):
    assert load_module(drv, HASH_PTX)[0] == OK
    assert load_module(drv, "not ptx at all")[0] == E["CUDA_ERROR_INVALID_IMAGE"]
    newer = HASH_PTX.replace(".version 7.0", ".version 8.1")
    assert load_module(drv, newer)[0] == E["CUDA_ERROR_UNSUPPORTED_PTX_VERSION"]
    assert load_module(drv, HASH_PTX.replace(".target sm_70", ".target sm_100"))[0] != OK
    assert drv.cuCtxSetCurrent(None) == OK
    assert load_module(drv, HASH_PTX)[0] == E["CUDA_ERROR_INVALID_CONTEXT"]
    drv.use(0)


def load_module_ex(drv, text: str, log_bytes: int = 256):
    """cuModuleLoadDataEx with an error-log buffer, as a real caller asks for the JIT's reasons."""
    module = ctypes.c_void_p()
    log = ctypes.create_string_buffer(log_bytes)
    CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES = 5, 6  # cuda.h's CUjit_option values
    options = (ctypes.c_int * 2)(CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES)
    values = (ctypes.c_void_p * 2)(ctypes.cast(log, ctypes.c_void_p), ctypes.c_void_p(log_bytes))
    rc = drv.cuModuleLoadDataEx(ctypes.byref(module), ctypes.c_char_p(text.encode()), 2, options, values)
    return rc, module, log.value.decode(), values[1] or 0


def test_load_data_ex_says_why_the_jit_refused_in_the_error_log(drv):
    rc, module, log, written = load_module_ex(drv, HASH_PTX)
    assert rc == OK and log == "" and written == 0
    assert drv.cuModuleUnload(module) == OK
    rc, _, log, written = load_module_ex(drv, HASH_PTX.replace(".version 7.0", ".version 8.1"))
    assert rc == E["CUDA_ERROR_UNSUPPORTED_PTX_VERSION"]
    assert "8.1" in log and "8.0" in log and written == len(log) + 1, "the length written, NUL included"
    rc, _, log, _ = load_module_ex(drv, HASH_PTX, log_bytes=16)
    assert rc == OK
    rc, _, log, written = load_module_ex(drv, "not ptx at all", log_bytes=16)
    assert rc == E["CUDA_ERROR_INVALID_IMAGE"] and len(log) == 15 and written == 16, "cut to the buffer"
    drv.fake.set_jit_limits(max_ptx=(6, 5), device_sm=60)  # an old driver on an old device
    rc, _, log, _ = load_module_ex(drv, HASH_PTX)
    assert rc == E["CUDA_ERROR_UNSUPPORTED_PTX_VERSION"] and "7.0" in log
    drv.fake.set_jit_limits(max_ptx=(8, 0), device_sm=60)
    rc, _, log, _ = load_module_ex(drv, HASH_PTX)
    assert rc == E["CUDA_ERROR_INVALID_PTX"] and "sm_70" in log and "sm_60" in log
    drv.fake.set_jit_limits()
    rc, module, _, _ = load_module_ex(drv, HASH_PTX)
    assert rc == OK and drv.cuModuleUnload(module) == OK


def test_a_function_is_found_by_its_entry_name_only(drv):
    _, module = load_module(drv, HASH_PTX)
    function = ctypes.c_void_p()
    assert drv.cuModuleGetFunction(ctypes.byref(function), module, b"gpusleep_hash") == E["CUDA_ERROR_NOT_FOUND"]
    assert drv.cuModuleUnload(module) == OK
    assert (
        drv.cuModuleGetFunction(ctypes.byref(function), module, b"gpusleep_hash_pieces")
        == E["CUDA_ERROR_INVALID_HANDLE"]
    )


def test_the_hash_kernel_runs_at_a_sync_point_and_equals_the_host_twin(drv):
    from gpusleep import _C

    _, function = hash_function(drv)
    va, hs = drv.mapped(2)
    size = drv.gran + 12345  # odd: a partial last word
    data = os.urandom(size)
    drv.fake.write(va, data)
    sums_va, sums_hs = drv.mapped(1)
    drv.fake.write(sums_va, bytes(4096))
    stream = drv.stream()
    before = drv.fake.kernels_run()
    assert launch_hash(drv, function, va, size, sums_va, stream, bpp=8) == OK  # 8 blocks (512 KiB) per sum
    assert drv.fake.kernels_run() == before, "asynchronous: nothing ran yet"
    assert drv.cuStreamSynchronize(stream) == OK
    pieces = -(-size // (512 << 10))
    got = [int.from_bytes(drv.fake.read(sums_va + 8 * i, 8), "little") for i in range(pieces)]
    assert got == _C.chunk_hash_pieces(data, 512 << 10)
    drv.teardown(va, hs)
    drv.teardown(sums_va, sums_hs)


def test_a_kernel_that_reads_unmapped_memory_faults_at_the_sync_point(drv):
    _, function = hash_function(drv)
    va, hs = drv.mapped(1, access=False)  # mapped, but this device has no access
    sums_va, sums_hs = drv.mapped(1)
    stream = drv.stream()
    assert launch_hash(drv, function, va, drv.gran, sums_va, stream) == OK, "launches succeed; the GPU faults"
    assert drv.cuStreamSynchronize(stream) == E["CUDA_ERROR_ILLEGAL_ADDRESS"]
    assert drv.fake.sticky_error(0) == E["CUDA_ERROR_ILLEGAL_ADDRESS"]
    drv.fake.clear_violations()


def test_launch_shapes_the_driver_refuses(drv):
    _, function = hash_function(drv)
    sums_va, sums_hs = drv.mapped(1)
    stream = drv.stream()
    assert launch_hash(drv, function, sums_va, 64, sums_va + 4096, stream, block=2048) == INVALID_VALUE
    assert launch_hash(drv, function, sums_va, 64, sums_va + 4096, stream, grid=0) == INVALID_VALUE
    assert drv.cuLaunchKernel(function, 1, 1, 1, 32, 1, 1, 0, stream, None, None) == INVALID_VALUE
    assert drv.cuStreamSynchronize(stream) == OK
    drv.teardown(sums_va, sums_hs)


def test_a_function_of_another_context_is_refused(drv):
    _, function = hash_function(drv)
    va, hs = drv.mapped(1)
    drv.use(1)
    stream = drv.stream()
    assert launch_hash(drv, function, va, 64, va + 4096, stream) == E["CUDA_ERROR_INVALID_HANDLE"]
    drv.use(0)
    drv.teardown(va, hs)


def test_loading_a_module_during_another_threads_global_capture_invalidates_it_unless_relaxed(drv):
    with drv.fake.capture_on_thread(device=0, mode="global") as capture:
        drv.capture_mode(RELAXED)
        assert load_module(drv, HASH_PTX)[0] == OK
        assert capture.status() == "active"
        drv.capture_mode(GLOBAL)
        assert load_module(drv, HASH_PTX)[0] == E["CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"]
        assert capture.status() == "invalidated"


def test_a_kernel_launched_into_a_capture_is_recorded_not_run(drv):
    _, function = hash_function(drv)
    va, hs = drv.mapped(1)
    stream = drv.stream()
    assert drv.cuStreamBeginCapture_v2(stream, GLOBAL) == OK
    before = drv.fake.kernels_run()
    assert launch_hash(drv, function, va, 64, va + 4096, stream) == OK
    graph = ctypes.c_void_p()
    assert drv.cuStreamEndCapture(stream, ctypes.byref(graph)) == OK
    assert drv.cuGraphDestroy(graph) == OK
    assert drv.fake.kernels_run() == before
    drv.teardown(va, hs)


@pytest.mark.parametrize("kind", ["flip_byte", "wrong_offset", "lost_tail"])
def test_an_armed_corruption_changes_exactly_the_nth_copy_and_reports_no_error(drv, kind):
    va, hs = drv.mapped(1)
    host = drv.pinned(4096)
    data = os.urandom(4096)
    ctypes.memmove(host, data, 4096)
    stream = drv.stream()
    drv.fake.corrupt_copy("cuMemcpyHtoDAsync", nth=2, kind=kind)
    for _ in range(2):
        assert drv.cuMemcpyHtoDAsync_v2(va, ctypes.c_void_p(host), 4096, stream) == OK
        assert drv.cuStreamSynchronize(stream) == OK
        if _ == 0:
            assert drv.fake.read(va, 4096) == data, "the first copy is exact"
            drv.fake.write(va, bytes(4096))
    got = drv.fake.read(va, 4096)
    assert got != data
    if kind == "wrong_offset":
        assert got[8:] == data[:-8]
    if kind == "lost_tail":
        assert got[:3072] == data[:3072] and got[3072:] == bytes(1024)
    with pytest.raises(ValueError):
        drv.fake.corrupt_copy("cuMemUnmap", nth=1)
    drv.teardown(va, hs)


def test_the_hash_twin_runs_only_for_the_signature_it_implements(drv):
    # A PTX whose gpusleep_hash_pieces takes other parameters than the twin would run wrongly on a GPU.
    four = HASH_PTX.replace(",\n\t.param .u64 gpusleep_hash_pieces_param_4", "")
    assert four != HASH_PTX
    rc, module = load_module(drv, four)
    assert rc == OK
    function = ctypes.c_void_p()
    assert drv.cuModuleGetFunction(ctypes.byref(function), module, b"gpusleep_hash_pieces") == OK
    assert drv.cuFuncLoad(function) == OK
    va, hs = drv.mapped(1)
    stream = drv.stream()
    drv.fake.clear_violations()
    assert launch_hash(drv, function, va, 64, va + 4096, stream) == OK
    assert any("five .u64" in v for v in drv.fake.violations())
    drv.fake.clear_violations()
    assert drv.cuStreamSynchronize(stream) == OK
    drv.teardown(va, hs)
