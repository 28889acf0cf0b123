"""The PyTorch glue on a CPU machine: what it refuses and why, the pool-mode tag bookkeeping (with torch's
CUDA pieces replaced by recorders), and the global-mode caching arena behind ``gpusleep_torch_malloc`` /
``gpusleep_torch_free``, driven through ``_C.torch_malloc`` / ``_C.torch_free`` and the driver double.

Fixtures ``fake`` (a configured driver double) and ``alloc`` (a fresh Allocator over it, checked for leaks
and rule violations at teardown) come from tests/conftest.py."""

from __future__ import annotations

import ctypes
import random
import subprocess
import sys
import threading
import warnings

import pytest
from torch_cuda_double import TorchCudaDouble, install_torch_cuda_double

import gpusleep
from gpusleep import _C, torch_glue
from gpusleep.torch_glue import TorchIntegrationError, expandable_segments_variable

MiB = 1 << 20
STREAM_A = 0  # the legacy default stream
STREAM_B = 2  # CU_STREAM_PER_THREAD: another valid stream handle
CUDA_MIN_ALIGNMENT = 256  # what cudaMalloc guarantees and PyTorch kernels assume


def driver_calls(name: str) -> int:
    return _C.driver_counters().get(name, (0, 0))[0]


def mapping_calls() -> dict[str, int]:
    return {n: driver_calls(n) for n in ("cuMemCreate", "cuMemMap", "cuMemSetAccess")}


# --------------------------------------------------------------------------- import and config checks
def test_import_gpusleep_does_not_import_torch():
    code = "import sys, gpusleep, gpusleep.torch_glue; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, None),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, "PYTORCH_CUDA_ALLOC_CONF"),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments : true"}, "PYTORCH_CUDA_ALLOC_CONF"),
        ({"PYTORCH_ALLOC_CONF": "garbage_collection_threshold:0.6,expandable_segments:True"}, "PYTORCH_ALLOC_CONF"),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, None),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, None),
        ({"PYTORCH_ALLOC_CONF": "expandable_segments"}, None),
    ],
)
def test_expandable_segments_variable(environ, expected):
    assert expandable_segments_variable(environ) == expected


@pytest.mark.parametrize(
    "version, expected",
    [("2.8.0+cu128", (2, 8)), ("2.13.0+cpu", (2, 13)), ("2.10.0a0+git1234", (2, 10)), ("3.0", (3, 0))],
)
def test_torch_version_parsing(version, expected):
    assert torch_glue._torch_version(version) == expected


def test_library_exports_the_pluggable_entry_points():
    lib = ctypes.CDLL(_C.library_path())
    for symbol in (torch_glue.MALLOC_SYMBOL, torch_glue.FREE_SYMBOL):
        assert ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value, symbol


# ------------------------------------------------------------------- refusals on this CPU-only torch
def test_pluggable_without_cuda_says_a_cuda_device_is_needed(alloc):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TorchIntegrationError, match="needs a CUDA device"):
        alloc.pluggable()
    with pytest.raises(TorchIntegrationError, match="needs a CUDA device"):
        alloc.use_mem_pools()
    assert alloc.mode == "none"
    assert alloc._torch is None


# ------------------------------------------------------------------ a torch with CUDA, simulated
@pytest.fixture
def torch_with_cuda(monkeypatch, fake):
    """torch whose CUDA queries answer as on a fresh GPU process, with recorders for the CUDA objects."""
    return install_torch_cuda_double(monkeypatch, fake)


def test_global_mode_builds_one_pluggable_allocator(alloc, torch_with_cuda):
    pluggable = alloc.pluggable()
    assert isinstance(pluggable, torch_with_cuda.CUDAPluggableAllocator)
    assert (pluggable.path, pluggable.malloc_name, pluggable.free_name) == (
        _C.library_path(),
        "gpusleep_torch_malloc",
        "gpusleep_torch_free",
    )
    assert alloc.mode == "global"
    assert alloc.pluggable() is pluggable
    assert len(torch_with_cuda.pluggables) == 1
    with alloc.tag("weights"):
        assert alloc.current_tag() == "weights"
    assert alloc.current_tag() == gpusleep.DEFAULT_TAG
    assert torch_with_cuda.events == []  # global mode routes in C++, no torch pools
    with pytest.raises(TorchIntegrationError, match="already in global mode"):
        alloc.use_mem_pools()


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"memory_reserved": lambda device=None: 4 * MiB if device == 1 else 0}, "cuda:1 holds 4194304 bytes"),
        ({"is_initialized": lambda: True}, "install pluggable\\(\\) before any CUDA allocation"),
        ({"get_allocator_backend": lambda: "pluggable"}, "already changed"),
        ({"get_allocator_backend": lambda: "cudaMallocAsync"}, "cudaMallocAsync"),
    ],
)
def test_global_mode_refuses_after_cuda_was_used(alloc, torch_with_cuda, monkeypatch, patch, message):
    import torch

    for name, value in patch.items():
        monkeypatch.setattr(torch.cuda, name, value)
    with pytest.raises(TorchIntegrationError, match=message):
        alloc.pluggable()
    assert alloc.mode == "none"
    assert torch_with_cuda.pluggables == []


@pytest.mark.parametrize("variable", torch_glue.ALLOC_CONF_VARIABLES)
@pytest.mark.parametrize("enable", ["pluggable", "use_mem_pools"])
def test_both_modes_refuse_expandable_segments(alloc, torch_with_cuda, monkeypatch, variable, enable):
    monkeypatch.setenv(variable, "max_split_size_mb:64,expandable_segments:True")
    with pytest.raises(TorchIntegrationError, match=f"{variable} contains expandable_segments:True"):
        getattr(alloc, enable)()
    assert alloc.mode == "none"


def test_pool_mode_refuses_a_torch_without_mem_pools(alloc, torch_with_cuda, monkeypatch):
    import torch

    monkeypatch.delattr(torch.cuda, "use_mem_pool")
    with pytest.raises(TorchIntegrationError, match="lacks torch.cuda.use_mem_pool"):
        alloc.use_mem_pools()
    assert alloc.mode == "none"


def test_pool_mode_refuses_an_old_torch(alloc, torch_with_cuda, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "__version__", "2.7.1+cu126")
    with pytest.raises(TorchIntegrationError, match="PyTorch >= 2.8"):
        alloc.use_mem_pools()


def test_a_second_allocator_cannot_also_become_the_torch_backend(alloc, torch_with_cuda):
    alloc.use_mem_pools()
    other = gpusleep.Allocator()
    try:
        with pytest.raises(TorchIntegrationError, match="(?i)one gpusleep allocator per process"):
            other.pluggable()
        assert other.mode == "none"
    finally:
        other.close()


# -------------------------------------------------------------------------- pool-mode bookkeeping
def pool_events(recorder: TorchCudaDouble, glue) -> list[tuple]:
    """Events with pool identities replaced by their (tag, device) keys."""
    names = {pool.id: key for key, pool in glue.pools.items()}
    return [(e[0], names[e[1]]) if e[0] != "create" else e for e in recorder.events]


def test_pool_mode_one_pool_per_tag_and_device(alloc, torch_with_cuda):
    alloc.use_mem_pools()
    glue = alloc._torch
    assert alloc.mode == "pool"
    alloc.use_mem_pools()  # idempotent
    assert alloc._torch is glue
    for _ in range(2):
        with alloc.tag("weights"):
            assert alloc.current_tag() == "weights"
    with torch_with_cuda.device_guard(1), alloc.tag("weights"):
        pass
    assert sorted(glue.pools) == [("weights", 0), ("weights", 1)]
    assert glue.pools[("weights", 1)].device == 1  # created with its device current
    assert [e for e in pool_events(torch_with_cuda, glue) if e[0] == "create"] == [("create", 0), ("create", 1)]
    assert pool_events(torch_with_cuda, glue)[-2:] == [("enter", ("weights", 1)), ("exit", ("weights", 1))]


def test_pool_mode_nested_tags_suspend_the_outer_pool(alloc, torch_with_cuda):
    alloc.use_mem_pools()
    glue = alloc._torch
    with alloc.tag("weights"):
        with alloc.tag("kv_cache"):
            assert alloc.current_tag() == "kv_cache"
        assert alloc.current_tag() == "weights"
    assert [e for e in pool_events(torch_with_cuda, glue) if e[0] != "create"] == [
        ("enter", ("weights", 0)),
        ("exit", ("weights", 0)),
        ("enter", ("kv_cache", 0)),
        ("exit", ("kv_cache", 0)),
        ("enter", ("weights", 0)),
        ("exit", ("weights", 0)),
    ]
    assert glue._stack() == []


def test_pool_mode_exception_unwinds_every_pool(alloc, torch_with_cuda):
    alloc.use_mem_pools()
    glue = alloc._torch
    with pytest.raises(KeyError):
        with alloc.tag("weights"), alloc.tag("kv_cache"):
            raise KeyError("boom")
    entered = [e for e in torch_with_cuda.events if e[0] == "enter"]
    exited = [e for e in torch_with_cuda.events if e[0] == "exit"]
    assert len(entered) == len(exited) == 3
    assert glue._stack() == []
    assert alloc.current_tag() == gpusleep.DEFAULT_TAG


def test_pool_mode_stacks_are_per_thread(alloc, torch_with_cuda):
    alloc.use_mem_pools()
    glue = alloc._torch
    inside = threading.Event()
    release = threading.Event()
    seen: dict[str, object] = {}

    def worker():
        with alloc.tag("kv_cache"):
            seen["worker_tag"] = alloc.current_tag()
            inside.set()
            release.wait(10)

    with alloc.tag("weights"):
        thread = threading.Thread(target=worker)
        thread.start()
        assert inside.wait(10)
        seen["main_stack"] = [s.key for s in glue._stack()]
        release.set()
        thread.join(10)
        seen["main_tag"] = alloc.current_tag()
    assert seen == {"worker_tag": "kv_cache", "main_stack": [("weights", 0)], "main_tag": "weights"}
    # The worker's tag did not suspend the main thread's pool: the main thread entered exactly once.
    weights_pool = glue.pools[("weights", 0)].id
    assert [e[0] for e in torch_with_cuda.events if len(e) == 3 and e[1] == weights_pool] == ["enter", "exit"]


def test_sleeping_tag_cannot_be_entered_in_pool_mode(alloc, torch_with_cuda):
    alloc.use_mem_pools()
    address = alloc.allocate(MiB, tag="kv_cache")
    alloc.sleep(level=1)
    with pytest.raises(gpusleep.SleepStateError):
        with alloc.tag("kv_cache"):
            pass
    assert not [e for e in torch_with_cuda.events if e[0] == "enter"]
    alloc.wake_up()
    alloc.free(address)


# --------------------------------------------------------- global mode: the caching arena, via the double
@pytest.mark.parametrize("size", [512, 5 * MiB, 64 * MiB], ids=["small", "medium", "large"])
def test_repeated_malloc_free_hits_the_cache(global_mode, size):
    first = _C.torch_malloc(size, 0, STREAM_A)
    assert first
    _C.torch_free(first, size, 0, STREAM_A)
    before = mapping_calls()
    second = _C.torch_malloc(size, 0, STREAM_A)
    assert mapping_calls() == before
    assert second == first
    _C.torch_free(second, size, 0, STREAM_A)


def test_a_block_freed_on_one_stream_is_not_given_to_another(global_mode):
    size = MiB
    a = _C.torch_malloc(size, 0, STREAM_A)
    _C.torch_free(a, size, 0, STREAM_A)
    b = _C.torch_malloc(size, 0, STREAM_B)
    assert b and (b + size <= a or a + size <= b)
    again = _C.torch_malloc(size, 0, STREAM_A)
    assert again == a  # still cached for its own stream
    _C.torch_free(b, size, 0, STREAM_B)
    _C.torch_free(again, size, 0, STREAM_A)


def test_small_blocks_share_one_segment(global_mode, fake):
    used_before = fake.used_bytes(0)
    creates_before = driver_calls("cuMemCreate")
    size = 4096
    ptrs = [_C.torch_malloc(size, 0, STREAM_A) for _ in range(16)]
    segment_bytes = fake.used_bytes(0) - used_before
    assert driver_calls("cuMemCreate") - creates_before == 1
    assert 0 < segment_bytes <= 4 * MiB
    ordered = sorted(ptrs)
    assert all(b - a >= size for a, b in zip(ordered, ordered[1:], strict=False))
    assert ordered[-1] + size - ordered[0] <= segment_bytes
    for p in ptrs:
        _C.torch_free(p, size, 0, STREAM_A)


def test_free_from_another_thread(global_mode):
    size = 3 * MiB
    p = _C.torch_malloc(size, 0, STREAM_A)
    errors: list[BaseException] = []

    def free_it():
        try:
            _C.torch_free(p, size, 0, STREAM_A)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=free_it)
    thread.start()
    thread.join(10)
    assert not errors
    before = mapping_calls()
    assert _C.torch_malloc(size, 0, STREAM_A) == p  # the block went back to the cache
    assert mapping_calls() == before
    _C.torch_free(p, size, 0, STREAM_A)


def test_empty_cache_returns_unused_segments(global_mode, fake):
    used_at_start = fake.used_bytes(0)
    sizes = [700, 2 * MiB + 3, 12 * MiB, 40 * MiB]
    ptrs = [_C.torch_malloc(s, 0, STREAM_A) for s in sizes]
    kept = _C.torch_malloc(MiB, 0, STREAM_B)
    for p, s in zip(ptrs, sizes, strict=False):
        _C.torch_free(p, s, 0, STREAM_A)
    used_cached = fake.used_bytes(0)
    assert global_mode.stats().bytes_cached > 0
    released = global_mode.empty_cache()
    assert released > 0
    assert fake.used_bytes(0) == used_cached - released
    assert fake.used_bytes(0) > used_at_start  # the live block's segment stays
    assert global_mode.empty_cache() == 0
    _C.torch_free(kept, MiB, 0, STREAM_B)
    assert global_mode.empty_cache() > 0
    assert fake.used_bytes(0) == used_at_start


def test_malloc_under_a_sleeping_tag_returns_null(global_mode):
    _C.set_current_tag("kv_cache")
    p = _C.torch_malloc(MiB, 0, STREAM_A)
    assert p
    global_mode.sleep(level=1)
    assert "kv_cache" in global_mode.sleeping_tags
    assert _C.torch_malloc(MiB, 0, STREAM_A) == 0  # no exception: PyTorch gets NULL
    _C.set_current_tag(gpusleep.DEFAULT_TAG)
    q = _C.torch_malloc(MiB, 0, STREAM_A)  # "default" is kept awake
    assert q
    global_mode.wake_up()
    _C.torch_free(p, MiB, 0, STREAM_A)
    _C.torch_free(q, MiB, 0, STREAM_A)


def test_malloc_beyond_capacity_returns_null_and_the_next_one_works(global_mode, fake):
    assert _C.torch_malloc(fake.free_bytes(0) + 64 * MiB, 0, STREAM_A) == 0
    p = _C.torch_malloc(MiB, 0, STREAM_A)
    assert p
    _C.torch_free(p, MiB, 0, STREAM_A)


@pytest.mark.parametrize("size", [0, 1, 511, 513, 4097, MiB + 1, 2 * MiB - 1, 33 * MiB + 7, 256 * MiB + 1])
def test_sizes_are_mapped_and_aligned(global_mode, fake, size):
    p = _C.torch_malloc(size, 0, STREAM_A)
    if size == 0:
        if p:
            _C.torch_free(p, 0, 0, STREAM_A)
        return
    assert p and p % CUDA_MIN_ALIGNMENT == 0
    edge = bytes(random.Random(size).randrange(256) for _ in range(min(size, 64)))
    fake.write(p, edge)
    fake.write(p + size - len(edge), edge)
    assert fake.read(p, len(edge)) == edge
    assert fake.read(p + size - len(edge), len(edge)) == edge
    _C.torch_free(p, size, 0, STREAM_A)


def test_random_trace_keeps_live_blocks_disjoint_and_intact(global_mode, fake):
    """A seeded mix of sizes, two streams, frees in random order: live blocks never overlap and keep
    their bytes while neighbours are split, freed and coalesced."""
    rng = random.Random(1234)
    live: dict[int, tuple[int, int, bytes]] = {}  # ptr -> (size, stream, stamp)
    for step in range(400):
        if live and (rng.random() < 0.45 or len(live) > 40):
            p = rng.choice(list(live))
            size, stream, stamp = live.pop(p)
            assert fake.read(p, len(stamp)) == stamp
            _C.torch_free(p, size, 0, stream)
            continue
        size = rng.choice([rng.randrange(1, 4096), rng.randrange(4096, 2 * MiB), rng.randrange(2 * MiB, 24 * MiB)])
        stream = rng.choice([STREAM_A, STREAM_B])
        p = _C.torch_malloc(size, 0, stream)
        assert p, f"step {step}: malloc({size}) failed"
        for q, (qsize, _, _) in live.items():
            assert p + size <= q or q + qsize <= p, f"step {step}: {p:#x}+{size} overlaps {q:#x}+{qsize}"
        stamp = step.to_bytes(4, "little") * 4
        stamp = stamp[: min(size, len(stamp))]
        fake.write(p, stamp)
        live[p] = (size, stream, stamp)
    for p, (size, stream, stamp) in live.items():
        assert fake.read(p, len(stamp)) == stamp
        _C.torch_free(p, size, 0, stream)


# ----------------------------------------------------------------------- pool mode through the double
def test_pool_mode_maps_one_segment_per_call_and_releases_it_on_free(alloc, fake):
    alloc._core.set_mode("pool")
    used_before = fake.used_bytes(0)
    previous = _C.set_current_tag("weights")
    try:
        size = 5 * MiB + 1
        p = _C.torch_malloc(size, 0, STREAM_A)
        assert p
        mapped = fake.used_bytes(0) - used_before
        assert size <= mapped <= size + 4 * MiB  # rounded up to the granularity only
        assert alloc.stats().tags["weights"].bytes_mapped == mapped
        _C.torch_free(p, size, 0, STREAM_A)
        assert fake.used_bytes(0) == used_before
    finally:
        _C.set_current_tag(previous)


def test_set_mode_is_exclusive(alloc):
    alloc._core.set_mode("global")
    assert alloc.mode == "global"
    with pytest.raises(RuntimeError):
        alloc._core.set_mode("pool")
    other = gpusleep.Allocator()
    try:
        with pytest.raises(RuntimeError):
            other._core.set_mode("global")
    finally:
        other.close()


def test_global_mode_routes_torch_empty_cache_to_gpusleep(alloc, torch_with_cuda, fake):
    import torch

    alloc.pluggable()
    ptr = _C.torch_malloc(64 * MiB, 0, 0)
    assert ptr
    _C.torch_free(ptr, 64 * MiB, 0, 0)
    assert fake.used_bytes(0) >= 64 * MiB
    torch.cuda.empty_cache()
    assert fake.used_bytes(0) == 0
    assert torch.cuda.memory.empty_cache is torch.cuda.empty_cache
    alloc.close()
    torch.cuda.empty_cache()  # a closed allocator is skipped, not an error


# ------------------------------------------- NCCL graph registration of memory that can sleep (finding 11)
@pytest.fixture
def nccl_graph_register(monkeypatch):
    """``set(value)``: NCCL_GRAPH_REGISTER as given (None: unset); the once-per-process warning re-armed."""
    monkeypatch.setattr(torch_glue, "_nccl_graph_register_warned", False, raising=False)

    def set_value(value):
        if value is None:
            monkeypatch.delenv("NCCL_GRAPH_REGISTER", raising=False)
        else:
            monkeypatch.setenv("NCCL_GRAPH_REGISTER", value)

    return set_value


def nccl_warnings(record) -> list:
    return [w for w in record if "NCCL_GRAPH_REGISTER" in str(w.message)]


@pytest.mark.parametrize("value", [None, "1"], ids=["unset", "1"])
def test_a_sleepable_graph_pool_warns_once_while_nccl_registers_graph_buffers(
    alloc, torch_with_cuda, nccl_graph_register, value
):
    nccl_graph_register(value)
    alloc.use_mem_pools()
    with pytest.warns(UserWarning, match="NCCL_GRAPH_REGISTER=0") as record:
        alloc.mem_pool("graphs")
    (warning,) = nccl_warnings(record)
    assert warning.category.__name__ == "NcclGraphRegisterWarning"
    assert "'graphs'" in str(warning.message) and "docs/torch.md" in str(warning.message)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        alloc.mem_pool("graphs")
        alloc.mem_pool("cuda_graph")
    assert nccl_warnings(again) == [], "once per process"


def test_no_nccl_warning_when_graph_registration_is_off_or_the_pool_stays_resident(
    alloc, torch_with_cuda, nccl_graph_register
):
    alloc.use_mem_pools()
    alloc.set_policy("graphs", "keep")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        alloc.mem_pool("graphs")  # "keep": never released by a sleep that does not name it
        nccl_graph_register("0")
        alloc.mem_pool("cuda_graph")
    assert nccl_warnings(record) == []


class _GraphContext:
    """Stands in for torch's ``torch.cuda.graph`` class (the torch double's is a function)."""

    def __init__(self, cuda_graph, pool=None, stream=None, capture_error_mode="global"):
        self.cuda_graph = cuda_graph

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


def test_global_mode_warns_when_a_graph_is_captured_under_a_sleepable_tag(
    alloc, torch_with_cuda, monkeypatch, nccl_graph_register
):
    import torch

    monkeypatch.setattr(torch.cuda, "graph", _GraphContext)
    alloc.pluggable()
    assert issubclass(torch.cuda.graph, _GraphContext) and torch.cuda.graph.__name__ == "_GraphContext"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.cuda.graph(object()):  # the untagged "default" tag stays resident: no warning
            pass
    assert nccl_warnings(record) == []
    with pytest.warns(UserWarning, match="NCCL_GRAPH_REGISTER") as record:
        with alloc.tag("graphs"), torch.cuda.graph(object()) as entered:
            assert isinstance(entered, _GraphContext)
    assert "'graphs'" in str(nccl_warnings(record)[0].message)


def test_global_mode_graph_capture_does_not_warn_with_nccl_graph_register_0(
    alloc, torch_with_cuda, monkeypatch, nccl_graph_register
):
    import torch

    nccl_graph_register("0")
    monkeypatch.setattr(torch.cuda, "graph", _GraphContext)
    alloc.pluggable()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with alloc.tag("graphs"), torch.cuda.graph(object()):
            pass
    assert nccl_warnings(record) == []


# ------------------------------------------------- shared CUDA graph pools in global mode (issue 24, part 5)
@pytest.fixture
def graph_capture(alloc, torch_with_cuda, monkeypatch, fake):
    """Global mode with torch.cuda.graph as torch writes it (the double's GraphContext over the driver double's
    streams and captures), device 0's context current; yields the double."""
    import torch

    monkeypatch.setenv("NCCL_GRAPH_REGISTER", "0")
    monkeypatch.setattr(torch.cuda, "graph", torch_with_cuda.GraphContext)
    alloc.pluggable()
    with fake.context(0):
        yield torch_with_cuda
        torch_with_cuda.destroy_streams()


def capture_step(size: int, output_bytes: int = MiB, pool=None, stamp: int | None = None, fake=None):
    """Capture one 'batch size' the way a server does: an activation of ``size`` bytes freed inside the capture and
    an output kept alive for replays. Returns (graph, output address, activation address)."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        stream = torch.cuda.current_stream().cuda_stream
        activation = _C.torch_malloc(size, 0, stream)
        output = _C.torch_malloc(output_bytes, 0, stream)
        assert activation and output, _C.last_torch_error()
        _C.torch_free(activation, size, 0, stream)
    if stamp is not None:  # what a replay writes
        fake.write(activation, bytes([stamp]) * 4096)
        fake.write(output, bytes([stamp + 1]) * 4096)
    return graph, output, activation


BATCH_ACTIVATIONS = [64 * MiB, 48 * MiB, 32 * MiB, 16 * MiB]


@pytest.mark.parametrize("shared", [True, False], ids=["one_pool", "a_pool_each"])
def test_captures_into_one_pool_use_about_the_largest_not_the_sum(alloc, graph_capture, fake, shared):
    import torch

    used_before = fake.used_bytes(0)
    pool = torch.cuda.graph_pool_handle() if shared else None
    graphs = [capture_step(size, pool=pool) for size in BATCH_ACTIVATIONS]
    used = fake.used_bytes(0) - used_before
    if shared:
        assert used <= max(BATCH_ACTIVATIONS) + 8 * MiB, f"{used} bytes for {len(graphs)} graphs of one pool"
        assert alloc._core.graph_pool_graphs(pool) == len(graphs)
    else:
        assert used >= sum(BATCH_ACTIVATIONS), "captures into different pools do not share"
    outputs = [output for _, output, _ in graphs]
    assert len(set(outputs)) == len(outputs), "every graph's live output has its own block"
    alloc.empty_cache()
    assert fake.used_bytes(0) - used_before == used, "graph memory is kept while its graphs live"
    for _, output, _ in graphs:
        _C.torch_free(output, MiB, 0, 0)
    del graphs
    alloc.empty_cache()
    assert fake.used_bytes(0) == used_before, "every pool went with its graphs"


def test_a_later_capture_naming_a_graphs_pool_reuses_what_that_capture_freed(alloc, graph_capture):
    first, _, activation = capture_step(8 * MiB)  # no pool named: a pool of its own, first.pool()
    second, _, reused = capture_step(8 * MiB, pool=first.pool())
    assert reused == activation, "the block freed inside the first capture serves the second"
    third, _, private = capture_step(8 * MiB)
    assert private != activation, "a capture into another pool does not get it"
    assert alloc._core.graph_pool_graphs(first.pool()) == 2


def test_a_pool_is_released_only_after_its_last_graph_goes(alloc, graph_capture, fake):
    import gc

    import torch

    used_before = fake.used_bytes(0)
    pool = torch.cuda.graph_pool_handle()
    first, first_output, _ = capture_step(32 * MiB, pool=pool)
    second, second_output, _ = capture_step(16 * MiB, pool=pool)
    _C.torch_free(first_output, MiB, 0, 0)
    _C.torch_free(second_output, MiB, 0, 0)
    held = fake.used_bytes(0) - used_before
    assert held >= 32 * MiB
    del first
    gc.collect()
    assert alloc._core.graph_pool_graphs(pool) == 1
    assert alloc.empty_cache() == 0 and fake.used_bytes(0) - used_before == held, "the second graph may replay"
    second.reset()
    assert alloc._core.graph_pool_graphs(pool) == 0
    assert alloc.empty_cache() >= 32 * MiB
    assert fake.used_bytes(0) == used_before
    del second  # reset released its share already: nothing is released twice
    gc.collect()


def test_a_block_of_a_live_pool_is_never_handed_to_a_non_capture_allocation(alloc, graph_capture, fake):
    import torch

    pool = torch.cuda.graph_pool_handle()
    graph, output, activation = capture_step(4 * MiB, pool=pool)
    _C.torch_free(output, MiB, 0, 0)  # both blocks of the pool are free now
    stream = torch.cuda.graph.default_capture_stream.cuda_stream  # the capture's own stream
    taken = [_C.torch_malloc(size, 0, stream) for size in (4 * MiB, MiB, 4 * MiB, MiB)]
    assert activation not in taken and output not in taken
    for p, size in zip(taken, (4 * MiB, MiB, 4 * MiB, MiB), strict=True):
        _C.torch_free(p, size, 0, stream)
    graph.reset()  # retired: its blocks are released, never handed out
    after = _C.torch_malloc(4 * MiB, 0, stream)
    assert after != activation
    _C.torch_free(after, 4 * MiB, 0, stream)


def test_graph_memory_of_a_shared_pool_sleeps_and_wakes_at_the_same_addresses(alloc, graph_capture, fake):
    import torch

    alloc.set_policy("graphs", "offload")
    pool = torch.cuda.graph_pool_handle()
    with alloc.tag("graphs"):
        captured = [
            capture_step(size, pool=pool, stamp=2 * i + 1, fake=fake) for i, size in enumerate([8 * MiB, 4 * MiB])
        ]
    used = fake.used_bytes(0)
    alloc.sleep(level=1)
    assert fake.used_bytes(0) < used
    alloc.wake_up()
    assert fake.used_bytes(0) == used
    _, last_output, last_activation = captured[-1]
    assert fake.read(last_activation, 4096) == bytes([3]) * 4096, "memory a graph replays into came back"
    for i, (_, output, _) in enumerate(captured):
        assert fake.read(output, 4096) == bytes([2 * i + 2]) * 4096
    assert alloc._core.graph_pool_graphs(pool) == 2


def capturing(fake, stream: int) -> bool:
    """Whether the double's `stream` is capturing now (cuStreamIsCapturing)."""
    status = ctypes.c_int(-1)
    with fake._as_harness():
        assert fake.lib.cuStreamIsCapturing(ctypes.c_void_p(stream), ctypes.byref(status)) == 0
    return status.value != 0


def arena_pools(alloc) -> int:
    return dict(alloc._core.stats().counters)["arena_pools"]


def test_a_capture_ended_without_the_glue_leaves_no_binding_for_the_next_capture_on_its_stream(
    alloc, graph_capture, fake
):
    # Defect: the binding of a capture ended by cuStreamEndCapture (or torch._C._CUDAGraph.capture_end) stayed, and
    # the next, unrelated capture on the same stream was sent into the live pool P by its stream alone; retiring P
    # then let empty_cache unmap memory that capture's graph replays into.
    import torch

    lib = fake.lib
    pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    stream = graph_capture.Stream()
    s = stream.cuda_stream
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        pools_block = _C.torch_malloc(8 * MiB, 0, s)
        assert pools_block, _C.last_torch_error()
        _C.torch_free(pools_block, 8 * MiB, 0, s)  # a free block of P now
    raw_graph = ctypes.c_void_p()
    with fake._as_harness():
        assert lib.cuStreamEndCapture(ctypes.c_void_p(s), ctypes.byref(raw_graph)) == 0  # the glue never hears of it
        lib.cuGraphDestroy(raw_graph)
        assert lib.cuStreamBeginCapture_v2(ctypes.c_void_p(s), 0) == 0  # an unrelated capture, on the same stream
    replayed = _C.torch_malloc(8 * MiB, 0, s)
    assert replayed, _C.last_torch_error()
    _C.torch_free(replayed, 8 * MiB, 0, s)  # still the raw graph's: its replays write it
    with fake._as_harness():
        assert lib.cuStreamEndCapture(ctypes.c_void_p(s), ctypes.byref(raw_graph)) == 0
        lib.cuGraphDestroy(raw_graph)
    assert replayed != pools_block, "the unrelated capture was given a block of pool P"
    graph.reset()  # P's last graph: P retires
    alloc.empty_cache()
    fake.write(replayed, b"\x5a" * 4096)  # raises if empty_cache unmapped it
    assert fake.read(replayed, 4096) == b"\x5a" * 4096


def test_a_mem_pool_passed_as_pool_captures_and_shares(alloc, graph_capture, fake):
    # Defect: the wrapper read pool[0] after the capture had begun; a MemPool (torch >= 2.14 accepts one) is not
    # indexable, so the capture raised with its stream left capturing.
    import torch

    mem_pool = torch.cuda.MemPool()
    first, _, activation = capture_step(8 * MiB, pool=mem_pool)
    second, _, reused = capture_step(8 * MiB, pool=mem_pool)
    assert reused == activation, "the second capture into the MemPool reuses what the first freed"
    assert alloc._core.graph_pool_graphs(mem_pool.id) == 2
    first.reset()
    second.reset()
    assert alloc._core.graph_pool_graphs(mem_pool.id) == 0


def test_a_failure_after_capture_begin_leaves_no_capture_open(alloc, graph_capture, fake, monkeypatch):
    import torch

    stream = graph_capture.Stream()
    graph = torch.cuda.CUDAGraph()

    def broken_current_stream(device=None):
        raise RuntimeError("current_stream broke")

    with torch.cuda.stream(stream):
        monkeypatch.setattr(torch.cuda, "current_stream", broken_current_stream)
        with pytest.raises(RuntimeError, match="current_stream broke"):
            graph.capture_begin(pool=torch.cuda.graph_pool_handle())
        monkeypatch.undo()
    assert not capturing(fake, stream.cuda_stream), "the failed capture_begin left its stream capturing"
    # The stream works again: a plain allocation on it is an ordinary block.
    ptr = _C.torch_malloc(MiB, 0, stream.cuda_stream)
    assert ptr, _C.last_torch_error()
    _C.torch_free(ptr, MiB, 0, stream.cuda_stream)


def test_a_graph_dropped_during_a_blocked_sleep_does_not_wait_and_its_pool_retires_after(alloc, graph_capture, fake):
    # Defect: the graph's finalizer (release_graph_pool) waited for the allocator's lock, so a graph collected on the
    # HTTP or metrics thread during a sleep blocked that thread for the whole transition (Note [Frees never wait]).
    import gc

    import torch

    fake.set_hang_limit_ms(3000)  # old code: the release waits until the stuck sleep gives up
    alloc.set_policy("weights", "offload")
    previous = _C.set_current_tag("weights")
    try:
        weights = _C.torch_malloc(8 * MiB, 0, 0)
    finally:
        _C.set_current_tag(previous)
    assert weights, _C.last_torch_error()
    pool = torch.cuda.graph_pool_handle()
    graph, output, _ = capture_step(16 * MiB, pool=pool)
    _C.torch_free(output, MiB, 0, 0)
    holder = [graph]
    del graph
    errors, sleeping_done, dropped = [], threading.Event(), threading.Event()
    try:
        with fake.stuck_work(0):

            def sleeper():
                try:
                    alloc.sleep(level=1)
                except Exception as error:  # noqa: BLE001
                    errors.append(error)
                sleeping_done.set()

            def dropper():
                holder.clear()  # the graph's last reference: its finalizer releases its share of the pool
                gc.collect()
                dropped.set()

            calls_before = fake.call_count("cuCtxSynchronize")
            t_sleep = threading.Thread(target=sleeper)
            t_sleep.start()
            for _ in range(2000):  # until the sleep waits for the stuck device, the allocator's lock held
                if fake.call_count("cuCtxSynchronize") > calls_before or sleeping_done.wait(0.005):
                    break
            t_drop = threading.Thread(target=dropper)
            t_drop.start()
            assert dropped.wait(2.5), "dropping a graph waited for the sleep"
            assert not sleeping_done.is_set(), "the sleep was not blocked while the graph was dropped"
        t_sleep.join(10)
        t_drop.join(1)
    finally:
        fake.set_hang_limit_ms(10000)
    assert not errors, errors
    assert alloc._core.graph_pool_graphs(pool) == 0, "the queued release was done after the sleep"
    alloc.wake_up()
    used = fake.used_bytes(0)
    assert alloc.empty_cache() >= 16 * MiB, "the retired pool's memory is ordinary cache"
    assert fake.used_bytes(0) < used
    _C.torch_free(weights, 8 * MiB, 0, 0)


def test_a_retired_pool_is_forgotten_once_it_holds_no_block(alloc, graph_capture, fake):
    # Defect: retired pools stayed in the arena's map for the life of the process, one entry per graph pool ever made.
    import torch

    alloc.empty_cache()
    before = arena_pools(alloc)
    for _ in range(3):
        graph, output, _ = capture_step(8 * MiB, pool=torch.cuda.graph_pool_handle())
        assert arena_pools(alloc) > before
        graph.reset()
        assert arena_pools(alloc) > before, "a live output keeps its retired pool"
        _C.torch_free(output, MiB, 0, 0)
        alloc.empty_cache()
        assert arena_pools(alloc) == before, "the empty retired pools were not forgotten"
    graph, output, _ = capture_step(8 * MiB, pool=torch.cuda.graph_pool_handle())
    _C.torch_free(output, MiB, 0, 0)
    alloc.empty_cache()  # blocks of a live pool stay
    graph.reset()
    alloc.empty_cache()
    assert arena_pools(alloc) == before
