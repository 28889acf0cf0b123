"""gpusleep.compat.torch_memory_saver on the CPU: torch_memory_saver's own examples, ported, plus the
surface SGLang, verl and slime call.

Ported from fzyzcjy/torch_memory_saver ``test/examples/`` (run by its ``test/test_examples.py``) at
commit 4a43c97 (its current head here): simple.py, cpu_backup.py (run over both backends, the retention
block, run_retain_from_env, the release of a kept copy when its tensor is freed), nested_region.py,
multi_device.py, multi_device_torch_mode.py, rl_example.py and cuda_graph.py (allocator sides), and
training_engine.py's disable() inside a paused region; disk_backup.py runs on the file tier.
Not ported: what reads torch_memory_saver's C library (``_impl._binary_wrapper.cdll``: the backend
from TMS_INIT_CPU_BACKUP_BACKEND, RSS measurements of mmap shadows) and the preload-only
cuda_vmm_granularity.py. Each tensor is one allocation through
gpusleep's pool-mode entry point (what PyTorch's MemPool does), contents go through the driver double,
and GPU memory is read with ``fake.used_bytes`` / ``torch.cuda.mem_get_info`` (which reads the double).
The GPU versions are in test_torch_memory_saver_gpu.py.
"""

from __future__ import annotations

import os
import struct
import warnings

import pytest

import gpusleep
import gpusleep.compat.torch_memory_saver as tms_module
from gpusleep.compat.torch_memory_saver import BACKUP_TAG_SUFFIX, TorchMemorySaver

MiB = 1 << 20


class CudaTensorView:
    """What get_cpu_backup() reads of a CUDA tensor: is_cuda, data_ptr() and nbytes."""

    is_cuda = True

    def __init__(self, address: int, nbytes: int):
        self.address, self.nbytes = address, nbytes

    def data_ptr(self) -> int:
        return self.address


@pytest.fixture
def saver(alloc, torch_cuda):
    """A TorchMemorySaver on a fresh gpusleep allocator over the double (the module's singleton is the
    same class, created unconfigured at import)."""
    return TorchMemorySaver(allocator=alloc)


# ---------------------------------------------------------------------------------- ported tests
@pytest.mark.parametrize("hook_mode", ["preload", "torch"])
def test_simple(saver, fake, pool_tensor, hook_mode):
    """simple.py: a region's memory is released by pause() and comes back at the same address."""
    saver.hook_mode = hook_mode
    size = 32 * MiB  # the original: 10 GB; the double's device has 1 GiB
    with saver.region():
        pauseable = pool_tensor(size)
    pauseable.fill(100)
    original_address = pauseable.address

    mem_before_pause = fake.used_bytes(0)
    saver.pause()
    mem_after_pause = fake.used_bytes(0)
    assert mem_before_pause - mem_after_pause > 0.9 * size

    saver.resume()
    mem_after_resume = fake.used_bytes(0)
    assert mem_after_resume - mem_after_pause > 0.9 * size
    assert pauseable.address == original_address, "Tensor virtual address should be the same"


@pytest.mark.parametrize("backend", ["mmap", "pinned"])
def test_cpu_backup(saver, fake, pool_tensor, backend):
    """cpu_backup.py, its loop over the backends: a region with enable_cpu_backup=True keeps its bytes
    through pause()/resume(), one without does not, with other memory taken while paused; the typed
    tensor's backup is readable while paused and gone after the resume."""
    assert saver.retain_cpu_backup is False
    with saver.region(enable_cpu_backup=True, cpu_backup_backend=backend):
        tensor_with_backup = pool_tensor(2_000_000)
        typed_tensor_with_backup = pool_tensor(10 * 20 * 30 * 4)
    with saver.region(enable_cpu_backup=False):
        tensor_without_backup = pool_tensor(2_000_000)
    tensor_with_backup.fill(10)
    fake.write(typed_tensor_with_backup.address, struct.pack("<f", 1.5) * (10 * 20 * 30))
    tensor_without_backup.fill(20)
    assert tensor_with_backup.read()[:3] == bytes([10, 10, 10])
    assert tensor_without_backup.read()[:3] == bytes([20, 20, 20])

    saver.pause()
    typed_view = CudaTensorView(typed_tensor_with_backup.address, typed_tensor_with_backup.size)
    typed_actual = saver.get_cpu_backup(typed_view)
    assert typed_actual is not None and typed_actual == struct.pack("<f", 1.5) * (10 * 20 * 30)
    fake.set_foreign_load(0, 2_000_000)  # tensor_unrelated: occupy some space
    try:
        saver.resume()
    finally:
        fake.set_foreign_load(0, 0)

    assert tensor_with_backup.read()[:3] == bytes([10, 10, 10])
    assert tensor_without_backup.read()[:3] != bytes([20, 20, 20])
    assert typed_tensor_with_backup.read() == struct.pack("<f", 1.5) * (10 * 20 * 30)
    assert saver.get_cpu_backup(typed_view) is None


def pattern(size: int, offset: int) -> bytes:
    """cpu_backup.py's _make_pattern: (arange(size) + offset) % 251 as bytes."""
    return bytes((i + offset) % 251 for i in range(size))


def test_cpu_backup_retained_across_resume(saver, fake, pool_tensor):
    """cpu_backup.py, the retention block (one device): with retain_cpu_backup a resume keeps the host
    copy and every pause refreshes it; with it off a resume frees it. torch_memory_saver's zero-copy
    pointer checks have no counterpart (get_cpu_backup always copies here); the reads of a retained
    copy while the tensor is on the GPU are in the next test."""
    with saver.region(tag="retained_0", enable_cpu_backup=True):
        selected = pool_tensor(1024)
    with saver.region(tag="other_0", enable_cpu_backup=True):
        other = pool_tensor(1024)
    fake.write(selected.address, pattern(1024, 40))
    fake.write(other.address, pattern(1024, 80))
    view = CudaTensorView(selected.address, 1024)

    saver.pause(tag="retained_0")
    assert saver.get_cpu_backup(view) == pattern(1024, 40)
    assert other.read() == pattern(1024, 80), "tags stay independent"
    saver.retain_cpu_backup = True
    assert saver.retain_cpu_backup is True
    saver.resume(tag="retained_0")
    assert selected.read() == pattern(1024, 40)
    host_in_use = saver.allocator.stats().host.bytes_in_use
    assert host_in_use >= 1024, "the resume kept the host copy"

    saver.retain_cpu_backup = False
    fake.write(selected.address, pattern(1024, 50))
    saver.pause(tag="retained_0")
    assert saver.get_cpu_backup(view) == pattern(1024, 50), "the pause refreshed the retained copy"
    assert saver.allocator.stats().last_sleep.bytes_reused == 0
    saver.retain_cpu_backup = True
    saver.resume(tag="retained_0")
    assert selected.read() == pattern(1024, 50)

    fake.write(selected.address, pattern(1024, 60))
    saver.pause(tag="retained_0")
    assert saver.get_cpu_backup(view) == pattern(1024, 60)
    saver.retain_cpu_backup = False
    saver.resume(tag="retained_0")
    assert selected.read() == pattern(1024, 60)
    assert saver.get_cpu_backup(view) is None
    assert saver.allocator.stats().tags["retained_0" + BACKUP_TAG_SUFFIX].bytes_backed_up == 0, "freed"


def test_cpu_backup_retained_copy_is_readable_after_resume(saver, fake, pool_tensor):
    """cpu_backup.py: after a retaining resume, get_cpu_backup(selected) returns the retained copy."""
    with saver.region(tag="retained_0", enable_cpu_backup=True):
        selected = pool_tensor(1024)
    fake.write(selected.address, pattern(1024, 40))
    saver.retain_cpu_backup = True
    saver.pause(tag="retained_0")
    saver.resume(tag="retained_0")
    assert saver.get_cpu_backup(CudaTensorView(selected.address, 1024)) == pattern(1024, 40)


def test_cpu_backup_retain_from_env(alloc, torch_cuda, monkeypatch):
    """cpu_backup.py run_retain_from_env: TMS_RETAIN_CPU_BACKUP=1 turns retain_cpu_backup on."""
    monkeypatch.setenv("TMS_RETAIN_CPU_BACKUP", "1")
    assert TorchMemorySaver(allocator=alloc).retain_cpu_backup is True
    monkeypatch.setenv("TMS_RETAIN_CPU_BACKUP", "0")
    assert TorchMemorySaver(allocator=alloc).retain_cpu_backup is False


@pytest.mark.parametrize("paused", [False, True], ids=["active", "paused"])
def test_cpu_backup_released_on_allocation_free(saver, fake, pool_tensor, paused):
    """cpu_backup.py _assert_cpu_backup_released_on_allocation_free: freeing a backed-up tensor whose
    copy is kept (retained after a resume, or held while paused) frees that host copy."""
    tag = f"retained_free_{'paused' if paused else 'active'}_0"
    with saver.region(tag=tag, enable_cpu_backup=True):
        tensor = pool_tensor(4096)
    fake.write(tensor.address, pattern(4096, 100 + int(paused)))
    saver.retain_cpu_backup = True
    saver.pause(tag=tag)
    assert saver.get_cpu_backup(CudaTensorView(tensor.address, 4096)) == pattern(4096, 100 + int(paused))
    if not paused:
        saver.resume(tag=tag)
        assert tensor.read() == pattern(4096, 100)
    core = tag + BACKUP_TAG_SUFFIX
    assert saver.allocator.stats().tags[core].bytes_backed_up >= 4096
    tensor.free()
    assert saver.allocator.stats().tags[core].bytes_backed_up == 0
    tensor.free = lambda: None  # freed here, not at teardown
    saver.retain_cpu_backup = False


@pytest.mark.parametrize("call", ["region", "cuda_graph"])
def test_cpu_backup_backend_is_checked_like_torch_memory_saver(saver, call, monkeypatch):
    monkeypatch.setenv("NCCL_GRAPH_REGISTER", "0")

    def enter(**kwargs):
        block = saver.region(**kwargs) if call == "region" else saver.cuda_graph(object(), **kwargs)
        with block:
            return gpusleep.Allocator.current_tag()

    assert enter(enable_cpu_backup=True, cpu_backup_backend="mmap") == "default+mmap" + BACKUP_TAG_SUFFIX
    assert enter(enable_cpu_backup=True, cpu_backup_backend="pinned") == "default" + BACKUP_TAG_SUFFIX
    assert enter(enable_cpu_backup=True) == "default" + BACKUP_TAG_SUFFIX
    with pytest.raises(ValueError, match="requires enable_cpu_backup=True"):
        enter(cpu_backup_backend="mmap")
    with pytest.raises(ValueError, match="cpu_backup_backend"):
        enter(enable_cpu_backup=True, cpu_backup_backend="disk")


@pytest.mark.parametrize("backend,tier", [("mmap", "pageable"), ("pinned", "pinned")])
def test_cpu_backup_backend_picks_the_host_tier(saver, fake, pool_tensor, backend, tier):
    """cpu_backup_backend="mmap" keeps the backup in pageable memory (no pinned memory held), "pinned" in the
    pinned arena (docs/host-tiers.md)."""
    with saver.region(tag="w", enable_cpu_backup=True, cpu_backup_backend=backend):
        tensor = pool_tensor(3 * MiB + 5)
    tensor.fill(7)
    saver.pause("w")
    stats = saver.allocator.stats()
    name = "w" + ("+mmap" if backend == "mmap" else "") + BACKUP_TAG_SUFFIX
    assert stats.tags[name].host_tier == tier
    assert getattr(stats.tags[name], "bytes_" + tier) >= 3 * MiB + 5
    pinned_pages = -(-stats.tags[name].bytes_backed_up // 4096) * 4096  # counted in 4 KiB pages
    assert stats.host.bytes_in_use == (0 if tier == "pageable" else pinned_pages)
    saver.resume("w")
    assert tensor.read() == bytes([7]) * (3 * MiB + 5)


def test_disk_backup_keeps_the_backup_in_a_file_in_the_disk_backup_dir(saver, fake, pool_tensor, tmp_path):
    """disk_backup.py: set_disk_backup_dir() then region(enable_disk_backup=True): the bytes survive a
    pause in gpusleep's file tier, in that directory, with no file left behind."""
    disk = tmp_path / "tms_disk_backup"
    saver.set_disk_backup_dir(str(disk))
    with saver.region(tag="w", enable_disk_backup=True):
        tensor = pool_tensor(5 * MiB + 3)
    with saver.region(tag="w", enable_cpu_backup=False):
        _scratch = pool_tensor(MiB)
    tensor.fill(9)
    saver.pause("w")
    stats = saver.allocator.stats()
    assert stats.host.file_dir == str(disk)
    assert stats.tags["w+disk" + BACKUP_TAG_SUFFIX].bytes_file >= 5 * MiB + 3
    assert stats.host.bytes_in_use == 0, "no pinned memory holds the backup"
    assert list(disk.iterdir()) == [], "the file is unlinked while open"
    saver.resume("w")
    assert tensor.read() == bytes([9]) * (5 * MiB + 3)
    assert saver.allocator.stats().host.bytes_file == 0


def test_disk_backup_without_a_directory_uses_a_private_default(saver, pool_tensor):
    from gpusleep.compat.torch_memory_saver import default_disk_backup_dir

    with saver.region(enable_disk_backup=True):
        pool_tensor(MiB).fill(3)
    assert saver.allocator.stats().host.file_dir == default_disk_backup_dir()
    assert os.stat(default_disk_backup_dir()).st_mode & 0o077 == 0, "private to the user"


def test_disk_and_cpu_backup_are_mutually_exclusive(saver):
    with pytest.raises(ValueError, match="mutually exclusive"):
        with saver.region(enable_cpu_backup=True, enable_disk_backup=True):
            pass
    assert gpusleep.Allocator.current_tag() == gpusleep.DEFAULT_TAG


def test_multi_device_torch_mode(saver, fake, pool_tensor, torch_cuda):
    """multi_device_torch_mode.py: one tag on two devices, each allocated with its device current;
    pause("t") frees both devices and resume("t") maps both again, tensors usable."""
    size = 16 * MiB  # the original: 1 GiB per device, deltas of at least 0.8 GiB
    with torch_cuda.device_guard(0), saver.region(tag="t"):
        a = pool_tensor(size, device=0)
    with torch_cuda.device_guard(1), saver.region(tag="t"):
        b = pool_tensor(size, device=1)
    alloc0, alloc1 = fake.used_bytes(0), fake.used_bytes(1)
    saver.pause("t")
    pause0, pause1 = fake.used_bytes(0), fake.used_bytes(1)
    saver.resume("t")
    a.fill(2)
    b.fill(2)
    resume0, resume1 = fake.used_bytes(0), fake.used_bytes(1)
    assert alloc0 - pause0 > 0.8 * size and alloc1 - pause1 > 0.8 * size
    assert resume0 - pause0 > 0.8 * size and resume1 - pause1 > 0.8 * size
    assert a.read()[:1] == b"\x02" and b.read()[:1] == b"\x02"


def test_rl_example(saver, fake, pool_tensor):
    """rl_example.py, allocator side: kv_cache and model_weights paused one after the other, resumed one
    after the other, addresses unchanged, contents set again and kept; then kv_cache alone."""
    with saver.region(tag="kv_cache"):
        kv_buffer = pool_tensor(5 * 1_000_000 * 4)
    with saver.region(tag="model_weights"):
        weight = pool_tensor(2048 * 2048 * 4)
    kv_buffer.fill(1)
    weight.fill(1)
    addresses = (kv_buffer.address, weight.address)

    saver.pause("kv_cache")
    saver.pause("model_weights")
    saver.resume("model_weights")
    saver.resume("kv_cache")
    assert (kv_buffer.address, weight.address) == addresses
    kv_buffer.fill(2)
    weight.fill(2)
    saver.pause("kv_cache")
    assert weight.read()[:4] == bytes([2] * 4), "model weights stay usable"
    saver.resume("kv_cache")


def test_cpu_backup_get_cpu_backup_while_paused(saver, fake, pool_tensor):
    """cpu_backup.py: get_cpu_backup() of a paused backed-up tensor returns its bytes."""

    with saver.region(enable_cpu_backup=True):
        typed = pool_tensor(10 * 20 * 30 * 4)
    with saver.region(enable_cpu_backup=False):
        plain = pool_tensor(MiB)
    fake.write(typed.address, struct.pack("<f", 1.5) * (10 * 20 * 30))
    assert saver.get_cpu_backup(CudaTensorView(typed.address, typed.size)) is None, "on the GPU: None"
    saver.pause()
    try:
        backup = saver.get_cpu_backup(CudaTensorView(typed.address, typed.size))
        assert backup[:12] == struct.pack("<f", 1.5) * 3
        assert saver.get_cpu_backup(CudaTensorView(plain.address, MiB)) is None, "paused without a backup"
    finally:
        saver.resume()


def test_nested_region(saver, fake, pool_tensor):
    """nested_region.py (its torch-mode part; the preload-only TMS_INIT_ENABLE default region becomes an
    explicit outer region): an inner region(enable_cpu_backup=False) is not backed up, the outer
    backed-up region is, and allocations after the inner block go back to the outer region."""
    size = 1_000_000 * 4  # the original: 10_000_000 float32
    with saver.region(tag="default", enable_cpu_backup=True):
        model_weight = pool_tensor(size)
        with saver.region(tag="grad_buffer", enable_cpu_backup=False):
            assert gpusleep.Allocator.current_tag() == "grad_buffer"
            grad_buffer = pool_tensor(size)
        assert gpusleep.Allocator.current_tag() == "default" + BACKUP_TAG_SUFFIX
        extra_tensor = pool_tensor(size)
    model_weight.fill(42)
    grad_buffer.fill(99)
    extra_tensor.fill(7)

    mem_before_pause = fake.used_bytes(0)
    saver.pause()
    assert fake.used_bytes(0) < mem_before_pause - size * 0.5
    saver.resume()
    assert model_weight.read() == bytes([42]) * size
    assert grad_buffer.read() == bytes(size)  # not preserved; gpusleep defines it: zero-filled

    saver.pause()
    saver.resume()
    assert extra_tensor.read() == bytes([7]) * size


def test_multi_device(saver, fake, pool_tensor, torch_cuda):
    """multi_device.py: regions on two devices each take memory on their own device, and pause/resume of
    everything gives it all back. (Pool mode routes the *current* device, so each allocation is made
    with its device current.)"""
    size = 10_000_000  # the original: 100_000_000, with deltas of at least 80% of it
    before = (fake.used_bytes(0), fake.used_bytes(1))
    with torch_cuda.device_guard(0), saver.region():
        dev0_a = pool_tensor(size, device=0)
    assert fake.used_bytes(0) - before[0] >= 8_000_000 and fake.used_bytes(1) == before[1]
    with torch_cuda.device_guard(1), saver.region():
        dev1_a = pool_tensor(size, device=1)
        dev1_b = pool_tensor(size, device=1)
    assert fake.used_bytes(1) - before[1] >= 16_000_000
    for t in (dev0_a, dev1_a, dev1_b):
        t.fill(10)
    used = (fake.used_bytes(0), fake.used_bytes(1))

    saver.pause()
    assert (fake.used_bytes(0), fake.used_bytes(1)) == before
    saver.resume()
    assert (fake.used_bytes(0), fake.used_bytes(1)) == used


def test_cuda_graph(saver, fake, pool_tensor, torch_cuda, monkeypatch):
    """examples/cuda_graph.py, allocator side: memory allocated while capturing under cuda_graph() is in
    the region's gpusleep pool, released by pause() and mapped again at the same address by resume()."""
    monkeypatch.setenv("NCCL_GRAPH_REGISTER", "0")  # the warning about it is tested below
    graph = object()
    with saver.cuda_graph(cuda_graph=graph, tag="cuda_graph"):
        captured = pool_tensor(8 * MiB)
    region_pool = saver.allocator._torch.pools[("cuda_graph", 0)]
    assert torch_cuda.graphs == [{"graph": graph, "pool": region_pool.id, "stream": None, "mode": "global"}]
    used = fake.used_bytes(0)
    saver.pause()
    assert fake.used_bytes(0) <= used - 8 * MiB
    saver.resume()
    assert fake.used_bytes(0) == used
    captured.fill(2)
    assert captured.read()[:4] == bytes([2] * 4)


def test_cuda_graph_keeps_an_explicit_pool(saver, torch_cuda, monkeypatch):
    monkeypatch.setenv("NCCL_GRAPH_REGISTER", "0")
    graph, pool = object(), (7, 7)
    with saver.cuda_graph(
        graph, pool=pool, stream="s", capture_error_mode="thread_local", tag="cuda_graph", enable_cpu_backup=True
    ):
        assert gpusleep.Allocator.current_tag() == "cuda_graph" + BACKUP_TAG_SUFFIX
    assert torch_cuda.graphs == [{"graph": graph, "pool": pool, "stream": "s", "mode": "thread_local"}]


# ----------------------------------------------------------------------- the surface SGLang uses
def test_pause_and_resume_one_tag_leave_the_others(saver, fake, pool_tensor):
    """SGLang: pause("kv_cache") then pause("weights"), resume("weights") then resume("kv_cache")."""
    with saver.region(tag="weights", enable_cpu_backup=True):
        weights = pool_tensor(6 * MiB)
    with saver.region(tag="kv_cache"):
        kv = pool_tensor(10 * MiB)
    with saver.region(tag="cuda_graph"):
        graph_mem = pool_tensor(2 * MiB)
    weights.fill(1)
    kv.fill(2)
    graph_mem.fill(3)
    base = fake.used_bytes(0)

    saver.pause("kv_cache")
    assert saver.allocator.sleeping_tags == {"kv_cache"}
    assert base - fake.used_bytes(0) >= 10 * MiB
    assert weights.read()[:1] == b"\x01" and graph_mem.read()[:1] == b"\x03"  # still mapped, untouched
    saver.pause("weights")
    assert saver.allocator.sleeping_tags == {"kv_cache", "weights" + BACKUP_TAG_SUFFIX}
    saver.pause("weights")  # already paused: nothing happens
    saver.pause("no_such_tag")

    saver.resume("weights")
    assert weights.read() == bytes([1]) * (6 * MiB)
    assert saver.allocator.sleeping_tags == {"kv_cache"}
    saver.resume("kv_cache")
    assert kv.read() == bytes(10 * MiB)
    assert fake.used_bytes(0) == base
    saver.resume()  # nothing paused: nothing happens


def test_backup_is_chosen_per_region_within_one_tag(saver, pool_tensor):
    with saver.region(tag="weights", enable_cpu_backup=True):
        kept = pool_tensor(2 * MiB)
    with saver.region(tag="weights", enable_cpu_backup=False):
        scratch = pool_tensor(2 * MiB)
    kept.fill(0xAB)
    scratch.fill(0xCD)
    saver.pause("weights")
    assert saver.allocator.sleeping_tags == {"weights", "weights" + BACKUP_TAG_SUFFIX}
    saver.resume("weights")
    assert kept.read() == bytes([0xAB]) * (2 * MiB)
    assert scratch.read() == bytes(2 * MiB)


def test_disable_suspends_every_region_of_the_thread(saver, torch_cuda):
    """disable() routes to a throw-away MemPool of PyTorch's own allocator, dropped at the end of the
    block (PyTorch's MemPool destructor then releases its unused memory), as torch_memory_saver does."""
    import weakref

    with saver.region(tag="weights"), saver.region(tag="kv_cache"):
        active_before = list(torch_cuda.active_pools())
        with saver.disable():
            (throwaway,) = torch_cuda.active_pools()
            assert throwaway.allocator is None, "PyTorch's own allocator, not gpusleep's"
            assert throwaway not in saver.allocator._torch.pools.values()
            assert gpusleep.Allocator.current_tag() == gpusleep.DEFAULT_TAG
            throwaway = weakref.ref(throwaway)
        assert throwaway() is None, "the throw-away pool was dropped when the block ended"
        assert torch_cuda.active_pools() == active_before
        assert gpusleep.Allocator.current_tag() == "kv_cache"
    assert torch_cuda.active_pools() == []


def test_disable_inside_a_paused_region(saver, fake, pool_tensor, torch_cuda):
    """training_engine.py: pause(), then disable() in the paused region to run other work, then resume()."""
    with saver.region(tag="weights", enable_cpu_backup=True):
        weights = pool_tensor(4 * MiB)
        weights.fill(42)
        saver.pause()
        used_after_pause = fake.used_bytes(0)
        with saver.disable():
            assert gpusleep.Allocator.current_tag() == gpusleep.DEFAULT_TAG
            assert fake.used_bytes(0) == used_after_pause
        assert gpusleep.Allocator.current_tag() == "weights" + BACKUP_TAG_SUFFIX, "the region is back"
        saver.resume()
    assert weights.read() == bytes([42]) * (4 * MiB)


def test_memory_margin_bytes_refuses_a_resume_that_would_eat_it(saver, fake, pool_tensor):
    with saver.region(tag="kv_cache"):
        pool_tensor(64 * MiB)
    saver.pause()
    saver.memory_margin_bytes = fake.free_bytes(0)  # what is needed on top of this cannot be had
    with pytest.raises(gpusleep.OutOfMemoryError, match="memory_margin_bytes") as info:
        saver.resume()
    assert isinstance(info.value, RuntimeError)
    assert saver.allocator.sleeping_tags == {"kv_cache"}
    saver.memory_margin_bytes = 0
    saver.resume()
    assert not saver.allocator.is_sleeping


def test_resume_without_memory_stays_paused_and_can_be_retried(saver, fake, pool_tensor):
    with saver.region(tag="weights", enable_cpu_backup=True):
        weights = pool_tensor(32 * MiB)
    weights.fill(0x5E)
    saver.pause()
    fake.set_foreign_load(0, fake.free_bytes(0))
    try:
        with pytest.raises(gpusleep.OutOfMemoryError):
            saver.resume()
        assert saver.allocator.is_sleeping
    finally:
        fake.set_foreign_load(0, 0)
    saver.resume()
    assert weights.read() == bytes([0x5E]) * (32 * MiB)


def test_get_cpu_backup_of_an_active_tensor_is_none(saver, pool_tensor):
    with saver.region(enable_cpu_backup=True):
        tensor = pool_tensor(2 * MiB)
    assert saver.get_cpu_backup(CudaTensorView(tensor.address, 2 * MiB)) is None


@pytest.mark.parametrize("value", [-1, 1.5, True, "1"])
def test_memory_margin_bytes_must_be_a_byte_count(saver, value):
    with pytest.raises(ValueError, match="memory_margin_bytes"):
        saver.memory_margin_bytes = value


def test_reserved_suffix_and_bad_hook_mode_are_refused(saver):
    with pytest.raises(ValueError, match="reserves"):
        with saver.region(tag="x" + BACKUP_TAG_SUFFIX):
            pass
    with pytest.raises(ValueError, match="hook_mode"):
        saver.hook_mode = "ld_preload"


def test_module_surface_without_initializing():
    """`from torch_memory_saver import torch_memory_saver` and the module-level calls exist, and importing
    creates no allocator (torch_memory_saver initializes lazily too)."""
    assert isinstance(tms_module.torch_memory_saver, TorchMemorySaver)
    assert tms_module.torch_memory_saver._allocator is None
    assert tms_module.torch_memory_saver.enabled is True
    with tms_module.configure_subprocess():
        pass


# ----------------------------------------------- weight updates and kept host copies (issue 19, finding 5)
WEIGHTS = "weights" + BACKUP_TAG_SUFFIX


@pytest.fixture
def kept_weights(saver, pool_tensor):
    """A backed-up "weights" region whose gpusleep tag keeps its host copy (set through gpusleep's API),
    with one 4 MiB tensor of 0x11 that has been through one pause and resume: its copy is trusted now."""
    with saver.region(tag="weights", enable_cpu_backup=True):
        weights = pool_tensor(4 * MiB)
    saver.allocator.set_policy(WEIGHTS, "offload", keep_host_copy=True)
    weights.fill(0x11)
    saver.pause()
    saver.resume()
    return weights


def test_resume_of_everything_keeps_trusting_the_kept_copy(saver, kept_weights):
    saver.pause()
    assert saver.allocator.stats().last_sleep.bytes_reused == 4 * MiB
    saver.resume()
    assert kept_weights.read() == bytes([0x11]) * (4 * MiB)


def test_weights_loaded_into_an_existing_region_are_not_rolled_back(saver, kept_weights):
    with saver.region(tag="weights", enable_cpu_backup=True):
        kept_weights.fill(0x22)  # new tensors in blocks the region's MemPool reuses
    saver.pause()
    saver.resume()
    assert kept_weights.read() == bytes([0x22]) * (4 * MiB)


def test_resume_of_one_tag_for_a_weight_update_is_not_rolled_back(saver, kept_weights):
    """SGLang / verl: resume("weights"), write the new weights in place
    (update_weights_from_tensor / _distributed), resume("kv_cache")."""
    saver.pause("weights")
    saver.resume("weights")
    kept_weights.fill(0x33)
    saver.pause()
    saver.resume()
    assert kept_weights.read() == bytes([0x33]) * (4 * MiB)


# ------------------------------------------- NCCL graph registration of memory that can sleep (finding 11)
@pytest.mark.parametrize("value", [None, "1"], ids=["unset", "1"])
def test_cuda_graph_warns_once_while_nccl_registers_graph_buffers(saver, pool_tensor, monkeypatch, value):
    from gpusleep import torch_glue

    monkeypatch.setattr(torch_glue, "_nccl_graph_register_warned", False, raising=False)
    if value is None:
        monkeypatch.delenv("NCCL_GRAPH_REGISTER", raising=False)
    else:
        monkeypatch.setenv("NCCL_GRAPH_REGISTER", value)
    with pytest.warns(UserWarning, match="NCCL_GRAPH_REGISTER=0") as record:
        with saver.cuda_graph(cuda_graph=object(), tag="cuda_graph"):
            pool_tensor(2 * MiB)
    assert [w.category.__name__ for w in record if "NCCL" in str(w.message)] == ["NcclGraphRegisterWarning"]
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        with saver.cuda_graph(cuda_graph=object(), tag="cuda_graph"):
            pass
    assert [w for w in again if "NCCL" in str(w.message)] == [], "once per process"


def test_cuda_graph_does_not_warn_with_nccl_graph_register_0(saver, monkeypatch):
    from gpusleep import torch_glue

    monkeypatch.setattr(torch_glue, "_nccl_graph_register_warned", False, raising=False)
    monkeypatch.setenv("NCCL_GRAPH_REGISTER", "0")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with saver.cuda_graph(cuda_graph=object(), tag="cuda_graph"):
            pass
    assert [w for w in record if "NCCL" in str(w.message)] == []
