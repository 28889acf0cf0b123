"""gpusleep.compat.vllm.CuMemAllocator on the CPU: vLLM's own allocator tests, ported, plus vLLM's
contract as its worker uses it.

Ported from vllm-project/vllm ``tests/basic_correctness/test_cumem.py`` in its current form (the version
that reads the allocator's own mapped bytes, ``mapped_usage``, instead of device-wide free memory):
test_python_error, test_basic_cumem, test_discard_tags, test_selective_wake_restores_internal_tags
(both parameters), test_tagged_ordinary_tensor_is_discarded_with_kv_cache,
test_level2_discards_ordinary_tensor_with_weights_tag, test_cumem_with_cudagraph (allocator side), and
the allocator calls of test_reentered_tag. The originals run on a GPU; here each tensor is one
allocation through gpusleep's pool-mode entry point (what PyTorch's MemPool does), its contents are
written and read through the driver double, and ``mapped_usage`` reads ``allocator.stats()``. Each
original assertion is kept; where gpusleep differs on purpose (discarded memory comes back zero-filled,
not with vLLM's poison bytes) the assertion says so. Not ported: the tests that start an ``LLM`` engine
or use vLLM's worker internals (``CuMemBackend``, ``WorkspaceManager``, ``capture_pool``); the GPU
versions of the ported ones are in _gpu_scenarios.py.
"""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest

import gpusleep
from gpusleep.compat.vllm import CuMemAllocator

MiB = 1 << 20
SHAPE_BYTES = 1024 * 1024 * 4  # torch.empty((1024, 1024)) of float32


def floats(value: float, size_bytes: int) -> bytes:
    return struct.pack("<f", value) * (size_bytes // 4)


def identity_matrix_bytes(n: int) -> bytes:
    rows = bytearray(n * n * 4)
    for i in range(n):
        rows[(i * n + i) * 4 : (i * n + i) * 4 + 4] = struct.pack("<f", 1.0)
    return bytes(rows)


@pytest.fixture
def cumem(alloc, torch_cuda, monkeypatch):
    """The process-wide CuMemAllocator (get_instance()), on a fresh gpusleep allocator over the double."""
    monkeypatch.setattr(CuMemAllocator, "instance", CuMemAllocator(allocator=alloc))
    return CuMemAllocator.get_instance()


def mapped_usage(allocator: CuMemAllocator) -> int:
    """vLLM's test helper: the bytes the allocator has mapped on the device now."""
    return sum(t.bytes_mapped for t in allocator.allocator.stats().tags.values())


def mem_get_info():
    import torch

    return torch.cuda.mem_get_info()


# ---------------------------------------------------------------------------------- ported tests
def test_python_error(cumem, fake, pool_tensor, torch_cuda):
    """test_python_error: a wake-up without enough GPU memory raises RuntimeError. The device is made
    128 MiB so that 70% of it stays cheap on the CPU."""
    torch_cuda.capacity_bytes = 128 * MiB
    fake.set_capacity(0, torch_cuda.capacity_bytes)
    allocator = CuMemAllocator.get_instance()
    total_bytes = mem_get_info()[1]
    alloc_bytes = int(total_bytes * 0.7)
    with allocator.use_memory_pool():
        x = pool_tensor(alloc_bytes)  # 70% of the total memory
    allocator.sleep(offload_tags=())  # release the memory

    fake.set_foreign_load(0, alloc_bytes)  # y: more memory than is left
    try:
        with pytest.raises(RuntimeError):
            allocator.wake_up()
        # gpusleep goes further than vLLM: the failed wake changed nothing, and a retry succeeds.
        assert cumem.allocator.is_sleeping and mapped_usage(allocator) == 0
    finally:
        fake.set_foreign_load(0, 0)
    allocator.wake_up()
    assert x.read() == bytes(alloc_bytes)


def test_basic_cumem(cumem, fake, pool_tensor):
    """test_basic_cumem: tensors of the default pool survive sleep() and wake_up(), and the allocator's
    mapped bytes go to 0 and come back. (The original's x, from PyTorch's own allocator, is not
    gpusleep memory.)"""
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool():
        y = pool_tensor(SHAPE_BYTES)
        y.fill(0)
        y_ones = floats(1.0, SHAPE_BYTES)
        fake.write(y.address, y_ones)
        z = pool_tensor(SHAPE_BYTES)
        z_twos = floats(2.0, SHAPE_BYTES)
        fake.write(z.address, z_twos)

    mapped_bytes = mapped_usage(allocator)
    assert mapped_bytes >= y.size + z.size
    allocator.sleep()
    assert mapped_usage(allocator) == 0
    allocator.wake_up()
    assert mapped_usage(allocator) == mapped_bytes

    assert y.read() == y_ones
    assert z.read() == z_twos


def test_discard_tags(cumem, fake, pool_tensor):
    """test_discard_tags: discard("kv_cache") frees that tag only; weights stay mapped and usable."""
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool("weights"):
        weights = pool_tensor(SHAPE_BYTES)
        fake.write(weights.address, floats(1.0, SHAPE_BYTES))
    with allocator.use_memory_pool("kv_cache"):
        kv = pool_tensor(512 * 512 * 4)
        fake.write(kv.address, floats(1.0, kv.size))

    mapped_bytes = mapped_usage(allocator)
    allocator.discard("kv_cache")
    mapped_bytes_after_discard = mapped_usage(allocator)
    assert mapped_bytes - mapped_bytes_after_discard >= kv.size
    assert mapped_bytes_after_discard >= weights.size
    assert weights.read() == floats(1.0, SHAPE_BYTES)  # weights are still usable

    allocator.wake_up()
    assert kv.read() == bytes(kv.size)  # remapped; vLLM: undefined, gpusleep: zero-filled

    allocator.sleep(offload_tags="weights")  # a full cycle still works after discard
    allocator.wake_up()
    assert weights.read() == floats(1.0, SHAPE_BYTES)


@pytest.mark.parametrize("tag", ["workspace", None], ids=["workspace", "default"])
def test_selective_wake_restores_internal_tags(cumem, pool_tensor, tag):
    """test_selective_wake_restores_internal_tags: a staged wake defers only weights and kv_cache; any
    other tag wakes with it."""
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool(tag):
        internal = pool_tensor(16 << 20)
    with allocator.use_memory_pool("kv_cache"):
        kv = pool_tensor(32 << 20)

    allocator.sleep(offload_tags=())
    assert mapped_usage(allocator) == 0

    allocator.wake_up(tags=["weights"])
    assert mapped_usage(allocator) == internal.size
    allocator.wake_up(tags=["kv_cache"])
    assert mapped_usage(allocator) == internal.size + kv.size


def test_tagged_ordinary_tensor_is_discarded_with_kv_cache(cumem, fake, pool_tensor):
    """test_tagged_ordinary_tensor_is_discarded_with_kv_cache: the tag goes with the allocation, not the
    tensor's meaning. vLLM wakes the discarded memory poisoned (0xA5); gpusleep zero-fills it."""
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool("weights"):
        weight = pool_tensor(4096)
        weight.fill(0x11)
    with allocator.use_memory_pool("kv_cache"):
        fake_kv = pool_tensor(4096)
        fake_kv.fill(0x22)
        ordinary_tensor = pool_tensor(4096)
        ordinary_tensor.fill(0x33)

    pointers = tuple(t.address for t in (weight, fake_kv, ordinary_tensor))
    allocator.sleep(offload_tags=("weights",))
    allocator.wake_up()

    assert tuple(t.address for t in (weight, fake_kv, ordinary_tensor)) == pointers
    assert weight.read() == bytes([0x11]) * 4096
    assert fake_kv.read() == bytes(4096)
    assert ordinary_tensor.read() == bytes(4096)


def test_level2_discards_ordinary_tensor_with_weights_tag(cumem, fake, pool_tensor):
    """test_level2_discards_ordinary_tensor_with_weights_tag: sleep(offload_tags=()) discards weights too."""
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool("weights"):
        fake_weight = pool_tensor(4096)
        fake_weight.fill(0x44)
        ordinary_tensor = pool_tensor(4096)
        ordinary_tensor.fill(0x55)

    pointers = (fake_weight.address, ordinary_tensor.address)
    allocator.sleep(offload_tags=())
    allocator.wake_up()

    assert (fake_weight.address, ordinary_tensor.address) == pointers
    assert fake_weight.read() == bytes(4096)  # vLLM: the poison byte (0 on ROCm); gpusleep: zero-filled
    assert ordinary_tensor.read() == bytes(4096)


def test_cumem_with_cudagraph(cumem, fake, pool_tensor):
    """test_cumem_with_cudagraph, allocator side: the default tag (weights) is restored, the "discard"
    tag (cache) is not, both at the same addresses so a captured graph stays valid, and the mapped bytes
    go to 0 and come back."""
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool():
        weight = pool_tensor(SHAPE_BYTES)
    with allocator.use_memory_pool(tag="discard"):
        cache = pool_tensor(SHAPE_BYTES)
    eye = identity_matrix_bytes(1024)
    fake.write(weight.address, eye)
    cache.fill(0x77)
    addresses = (weight.address, cache.address)

    mapped_bytes = mapped_usage(allocator)
    assert mapped_bytes >= weight.size + cache.size
    allocator.sleep()
    assert mapped_usage(allocator) == 0
    allocator.wake_up()
    assert mapped_usage(allocator) == mapped_bytes

    assert (weight.address, cache.address) == addresses
    assert weight.read() == eye  # restored
    assert cache.read() == bytes(SHAPE_BYTES)  # discarded; gpusleep defines it: zero-filled


def test_reentered_tag_allocator_calls(cumem, fake, pool_tensor):
    """test_reentered_tag, the allocator calls: a tag entered twice, sleep(offload_tags="t") and wake
    keep the second tensor, and release_pools() ends it. (Whether memory freed inside the first entry
    is back by the next one is PyTorch's pool cache at work: the GPU test checks it.)"""
    allocator = CuMemAllocator.get_instance()
    nbytes = 64 << 20
    with allocator.use_memory_pool("t"):
        pass
    with allocator.use_memory_pool("t"):
        y = pool_tensor(nbytes)
    assert mapped_usage(allocator) == nbytes
    y.fill(1)
    allocator.sleep(offload_tags="t")
    allocator.wake_up()
    assert y.read() == bytes([1]) * nbytes
    allocator.release_pools()


def test_memory_freed_inside_use_memory_pool_is_given_back_when_the_block_exits(cumem, fake, pool_tensor):
    """vLLM's use_memory_pool releases the pool's unused segments when the block exits (online quantization
    builds the model in a higher precision, quantizes it and drops the original inside the block): memory
    freed inside goes back to the driver then, memory still referenced stays and sleeps and wakes with
    its tag."""
    allocator = CuMemAllocator.get_instance()
    used_before = fake.used_bytes(0)
    with allocator.use_memory_pool("weights"):
        original = pool_tensor(32 * MiB)  # the higher-precision copy
        quantized = pool_tensor(8 * MiB)
        quantized.fill(0x5A)
        original.release()  # dropped: PyTorch keeps its segment cached in the tag's pool
        assert mapped_usage(allocator) >= original.size + quantized.size, "held while the block runs"
    assert mapped_usage(allocator) == quantized.size
    assert fake.used_bytes(0) - used_before == quantized.size, "the freed 32 MiB went back to the driver"
    assert mem_get_info()[0] == fake.free_bytes(0)
    allocator.sleep(offload_tags=("weights",))
    assert mapped_usage(allocator) == 0
    allocator.wake_up()
    assert quantized.read() == bytes([0x5A]) * quantized.size


def test_memory_freed_inside_a_nested_block_of_the_same_tag_waits_for_the_outer_block(cumem, fake, pool_tensor):
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool("weights"):
        kept = pool_tensor(4 * MiB)
        with allocator.use_memory_pool("weights"):
            pool_tensor(16 * MiB).release()
        with allocator.use_memory_pool("kv_cache"):  # another tag's block exits: nothing of "weights" goes
            pool_tensor(2 * MiB).release()
        assert mapped_usage(allocator) == kept.size + 16 * MiB, "the outer block still runs in the pool"
    assert mapped_usage(allocator) == kept.size


def test_memory_freed_inside_reuse_memory_pool_is_given_back_too(cumem, fake, pool_tensor):
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool("weights"):
        kept = pool_tensor(4 * MiB)
    with allocator.reuse_memory_pool("weights"):
        pool_tensor(16 * MiB).release()
    assert mapped_usage(allocator) == kept.size


# ------------------------------------------------------------------------- vLLM's calling contract
def test_get_instance_is_one_pool_mode_allocator(cumem):
    assert CuMemAllocator.get_instance() is cumem
    assert CuMemAllocator.default_tag == "default"
    assert cumem.allocator.mode == "pool"
    assert cumem.current_tag == "default"


def test_get_instance_creates_the_allocator_once(fake, torch_cuda, monkeypatch):
    monkeypatch.setattr(CuMemAllocator, "instance", None)
    first = CuMemAllocator.get_instance()
    try:
        assert CuMemAllocator.get_instance() is first
        assert first.allocator.mode == "pool"
    finally:
        first.allocator.close()


def test_constructor_refuses_expandable_segments_like_vllm(alloc, torch_cuda, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    with pytest.raises(RuntimeError, match="expandable_segments"):
        CuMemAllocator(allocator=alloc)


def test_use_memory_pool_routes_each_tag_to_its_pool(cumem, torch_cuda):
    pools = cumem.allocator._torch.pools
    with cumem.use_memory_pool(tag="weights"):
        assert cumem.current_tag == "weights"
        assert gpusleep.Allocator.current_tag() == "weights"
        weights = pools[("weights", 0)].id
        with cumem.use_memory_pool():
            assert cumem.current_tag == "default"
            default = pools[("default", 0)].id
        assert cumem.current_tag == "weights"
    assert cumem.current_tag == "default"
    entered = [e[1] for e in torch_cuda.events if e[0] == "enter"]
    assert entered == [weights, default, weights]
    assert pools == {}, "each block's pool is retired at its end (its unused segments go back)"


def test_sleep_level_1_as_vllm_worker_calls_it(cumem, fake, pool_tensor):
    """vLLM's worker: sleep(offload_tags=("weights",)) for level 1, then a staged wake."""
    used_before = fake.used_bytes(0)
    with cumem.use_memory_pool(tag="weights"):
        weights = pool_tensor(6 * MiB)
    with cumem.use_memory_pool(tag="kv_cache"):
        kv = pool_tensor(10 * MiB)
    weights.fill(0x11)
    kv.fill(0x22)
    mapped = fake.used_bytes(0) - used_before
    assert cumem.get_current_usage() == mapped

    assert cumem.sleep(offload_tags=("weights",)) is None
    assert fake.used_bytes(0) == used_before
    assert cumem.get_current_usage() == mapped, "vLLM counts the bytes of sleeping allocations too"
    assert mapped_usage(cumem) == 0
    tags = cumem.allocator.stats().tags
    assert tags["weights"].bytes_backed_up >= 6 * MiB
    assert tags["kv_cache"].bytes_backed_up == 0

    assert cumem.wake_up(tags=["weights"]) is None
    assert weights.read() == bytes([0x11]) * (6 * MiB)
    assert mapped_usage(cumem) == tags["weights"].bytes_asleep
    assert cumem.get_current_usage() == mapped
    assert cumem.allocator.sleeping_tags == {"kv_cache"}
    cumem.wake_up(tags=["kv_cache"])
    assert kv.read() == bytes(10 * MiB)
    assert cumem.get_current_usage() == mapped


def test_sleep_with_no_offload_tags_discards_everything(cumem, fake, pool_tensor):
    """vLLM's level 2: sleep(offload_tags=tuple())."""
    used_before = fake.used_bytes(0)
    with cumem.use_memory_pool(tag="weights"):
        weights = pool_tensor(4 * MiB)
    with cumem.use_memory_pool():
        default = pool_tensor(3 * MiB)
    weights.fill(0x5A)
    default.fill(0x6B)
    cumem.sleep(offload_tags=tuple())
    assert fake.used_bytes(0) == used_before
    assert cumem.allocator.stats().host.bytes_in_use == 0
    cumem.wake_up()
    assert weights.read() == bytes(4 * MiB)
    assert default.read() == bytes(3 * MiB)


def test_the_default_tag_is_released_not_kept(cumem, fake, pool_tensor):
    """The migration trap of issue 12: gpusleep's own "default" tag stays resident, vLLM's does not."""
    used_before = fake.used_bytes(0)
    with cumem.use_memory_pool():
        pool_tensor(8 * MiB)
    assert fake.used_bytes(0) > used_before
    cumem.sleep(offload_tags="kv_cache")  # a single string is one tag, as in vLLM
    assert fake.used_bytes(0) == used_before
    assert cumem.allocator.stats().tags["default"].bytes_backed_up == 0
    cumem.wake_up()


def test_sleep_twice_and_wake_twice_change_nothing(cumem, fake, pool_tensor):
    with cumem.use_memory_pool():
        t = pool_tensor(2 * MiB)
    t.fill(0x42)
    cumem.sleep()
    used_asleep = fake.used_bytes(0)
    cumem.sleep()
    assert fake.used_bytes(0) == used_asleep
    cumem.wake_up()
    cumem.wake_up()
    assert t.read() == bytes([0x42]) * (2 * MiB)


def test_tags_without_memory_are_ignored(cumem, pool_tensor):
    with cumem.use_memory_pool(tag="kv_cache"):
        pool_tensor(2 * MiB)
    cumem.sleep(offload_tags=("weights",))  # no weights were ever loaded
    cumem.wake_up(tags=["weights"])
    assert "weights" not in cumem.allocator.known_tags
    assert cumem.allocator.sleeping_tags == {"kv_cache"}
    cumem.wake_up(tags=["kv_cache", "no_such_tag"])
    assert not cumem.allocator.is_sleeping


@pytest.mark.parametrize("bad", [3, [None], ("ok", "")])
def test_offload_tags_of_the_wrong_type_are_refused(cumem, bad):
    with pytest.raises(TypeError, match="offload_tags"):
        cumem.sleep(offload_tags=bad)
    assert not cumem.allocator.is_sleeping


def test_use_memory_pool_of_a_sleeping_tag_is_refused(cumem, pool_tensor):
    with cumem.use_memory_pool(tag="kv_cache"):
        pool_tensor(2 * MiB)
    cumem.sleep()
    with pytest.raises(gpusleep.SleepStateError, match="wake_up"):
        with cumem.use_memory_pool(tag="kv_cache"):
            pass
    assert cumem.current_tag == "default"
    cumem.wake_up()


def test_importing_the_compat_modules_needs_no_torch():
    code = "import sys, gpusleep.compat.vllm, gpusleep.compat.torch_memory_saver; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


# ----------------------------------------------- weight updates and kept host copies (issue 19, finding 5)
@pytest.fixture
def kept_weights(cumem, pool_tensor):
    """A "weights" tag that keeps its host copy (set through gpusleep's own API, under vLLM's class), with
    one 4 MiB tensor of 0x11 that has been through one sleep and wake: its kept copy is trusted now."""
    cumem.allocator.set_policy("weights", "offload", keep_host_copy=True)
    with cumem.use_memory_pool(tag="weights"):
        weights = pool_tensor(4 * MiB)
    with cumem.use_memory_pool(tag="kv_cache"):
        pool_tensor(2 * MiB)
    weights.fill(0x11)
    cumem.sleep(offload_tags=("weights",))
    cumem.wake_up()
    return weights


def test_a_full_wake_keeps_trusting_the_kept_copy(cumem, kept_weights):
    """Model switching: wake_up() restores the weights unchanged, so the next sleep only unmaps them."""
    cumem.sleep(offload_tags=("weights",))
    assert cumem.allocator.stats().last_sleep.bytes_reused == 4 * MiB
    cumem.wake_up()
    assert kept_weights.read() == bytes([0x11]) * (4 * MiB)


def test_weights_reloaded_inside_use_memory_pool_are_not_rolled_back(cumem, kept_weights):
    """A reload through another path: new parameters land in blocks of the weights pool that PyTorch
    reuses without calling gpusleep. Entering use_memory_pool("weights") drops the kept copy's trust."""
    with cumem.use_memory_pool(tag="weights"):
        kept_weights.fill(0x22)
    cumem.sleep(offload_tags=("weights",))
    cumem.wake_up()
    assert kept_weights.read() == bytes([0x22]) * (4 * MiB)


def test_a_staged_wake_for_a_weight_update_is_not_rolled_back(cumem, kept_weights):
    """vLLM's RL flow: wake_up(tags=["weights"]), the engine writes new weights in place (an NCCL
    broadcast into the parameters, load_weights), then wake_up(tags=["kv_cache"])."""
    cumem.sleep(offload_tags=("weights",))
    cumem.wake_up(tags=["weights"])
    kept_weights.fill(0x33)
    cumem.wake_up(tags=["kv_cache"])
    cumem.sleep(offload_tags=("weights",))
    cumem.wake_up()
    assert kept_weights.read() == bytes([0x33]) * (4 * MiB)


# ---------------------------------------------------------------- vLLM's newer surface (issue 21)
def test_discard_of_an_offloaded_sleeping_tag_keeps_its_backup(cumem, pool_tensor):
    """As vLLM: discard() does not change the state of a tag that already sleeps."""
    with cumem.use_memory_pool("weights"):
        weights = pool_tensor(2 * MiB)
    weights.fill(0x5C)
    cumem.sleep(offload_tags=("weights",))
    cumem.discard(("weights", "never_used"))
    cumem.wake_up()
    assert weights.read() == bytes([0x5C]) * (2 * MiB)


def test_a_staged_wake_names_only_what_it_defers(cumem, pool_tensor):
    with cumem.use_memory_pool("weights"):
        pool_tensor(2 * MiB)
    with cumem.use_memory_pool("kv_cache"):
        pool_tensor(2 * MiB)
    with cumem.use_memory_pool("workspace"):
        pool_tensor(2 * MiB)
    cumem.sleep(offload_tags=("weights",))
    cumem.wake_up(tags=["kv_cache"])
    assert cumem.allocator.sleeping_tags == {"weights"}, "workspace woke with the first wake"
    cumem.wake_up(tags=["weights"])
    assert not cumem.allocator.is_sleeping


def test_reuse_memory_pool_enters_an_existing_pool_only(cumem, torch_cuda):
    with pytest.raises(ValueError, match="does not exist"):
        with cumem.reuse_memory_pool("weights"):
            pass
    with cumem.use_memory_pool("weights"):
        pass
    with cumem.reuse_memory_pool("weights"):
        assert cumem.current_tag == "weights" and gpusleep.Allocator.current_tag() == "weights"
    assert cumem.current_tag == "default"
    entered = [e for e in torch_cuda.events if e[0] == "enter"]
    assert len(entered) == 2 and all(e[2] == 0 for e in entered), "a pool of the tag on device 0 both times"
    # Each block retires its MemPool at its end (PyTorch then gives the pool's unused segments back), so
    # the second block runs in a new pool of the same tag.
    assert ("weights", 0) not in cumem.allocator._torch.pools


def test_release_pools_drops_the_pools_and_can_be_called_twice(cumem, pool_tensor, torch_cuda):
    import weakref

    with cumem.use_memory_pool("weights"):
        kept = pool_tensor(2 * MiB)
        pool = weakref.ref(cumem.allocator._torch.pools[("weights", 0)])
    kept.fill(0x21)
    assert pool() is None, "the block's MemPool was destroyed at its end: PyTorch returns its unused segments"
    cumem.release_pools()
    assert ("weights", 0) not in cumem.allocator._torch.pools
    with pytest.raises(ValueError):
        with cumem.reuse_memory_pool("weights"):
            pass
    cumem.close()  # vLLM's alias; twice is fine
    assert kept.read() == bytes([0x21]) * (2 * MiB), "live tensors keep their memory"
    with cumem.use_memory_pool("weights"):  # a new pool for the tag
        assert ("weights", 0) in cumem.allocator._torch.pools
    with cumem.reuse_memory_pool("weights"):
        pass
