"""The peers' own GPU tests, each run in a fresh process (``python _gpu_scenarios.py NAME``; exit 0 on
success) against gpusleep's compat modules: only the import line differs from the originals.

vLLM, ``tests/basic_correctness/test_cumem.py`` at commit 04a070dc088c6cd86299a19dab64195ed8e209a8
(which also runs each test in a new process): ``vllm_python_error``, ``vllm_basic_cumem``,
``vllm_cumem_with_cudagraph``.

torch_memory_saver, ``test/examples/`` (run by ``test/test_examples.py`` in a spawned process, once per
hook mode): ``tms_simple`` (simple.py, 1ddc8f8330d79747edfcd787d75b94e932f581c5), ``tms_cpu_backup`` and
``tms_cpu_backup_get_cpu_backup`` (cpu_backup.py, 0974467fe1d478040694bcb1e487bc48f51ed4e9, split where
it calls get_cpu_backup), ``tms_multi_device`` (multi_device.py, a233a41a994424d6dd3379cf895e002150ebc237),
``tms_cuda_graph`` (examples/cuda_graph.py, 687c7cbd0ece0e5fc918d3e9f765f08d3c914b82), plus
``tms_cuda_graph_region``: a graph captured under ``cuda_graph()`` whose memory is paused.
The time.sleep() pauses and prints of the originals are left out; ``get_and_print_gpu_memory`` (from
torch_memory_saver.testing_utils) is read as total minus free memory of the device.
"""

from __future__ import annotations

import sys

import pytest
import torch

GiB_bytes = 1 << 30


def _used_bytes(gpu_id: int = 0) -> int:
    free, total = torch.cuda.mem_get_info(gpu_id)
    return total - free


# ------------------------------------------------------------------------------------------ vLLM
def vllm_python_error() -> None:
    from gpusleep.compat.vllm import CuMemAllocator

    allocator = CuMemAllocator.get_instance()
    total_bytes = torch.cuda.mem_get_info()[1]
    alloc_bytes = int(total_bytes * 0.7)
    tensors = []
    with allocator.use_memory_pool():
        x = torch.empty(alloc_bytes, dtype=torch.uint8, device="cuda")
        tensors.append(x)
    allocator.sleep()
    y = torch.empty(alloc_bytes, dtype=torch.uint8, device="cuda")
    tensors.append(y)
    with pytest.raises(RuntimeError):
        allocator.wake_up()


def vllm_basic_cumem() -> None:
    from gpusleep.compat.vllm import CuMemAllocator

    shape = (1024, 1024)
    x = torch.empty(shape, device="cuda")
    x.zero_()
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool():
        y = torch.empty(shape, device="cuda")
        y.zero_()
        y += 1
        z = torch.empty(shape, device="cuda")
        z.zero_()
        z += 2
    output = x + y + z
    assert torch.allclose(output, torch.ones_like(output) * 3)

    free_bytes = torch.cuda.mem_get_info()[0]
    allocator.sleep()
    free_bytes_after_sleep = torch.cuda.mem_get_info()[0]
    assert free_bytes_after_sleep > free_bytes
    allocator.wake_up()

    output = x + y + z
    assert torch.allclose(output, torch.ones_like(output) * 3)


def vllm_cumem_with_cudagraph() -> None:
    from gpusleep.compat.vllm import CuMemAllocator

    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool():
        weight = torch.eye(1024, device="cuda")
    with allocator.use_memory_pool(tag="discard"):
        cache = torch.empty(1024, 1024, device="cuda")

    def model(x):
        out = x @ weight
        cache[: out.size(0)].copy_(out)
        return out + 1

    x = torch.empty(128, 1024, device="cuda")
    model(x)
    model_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(model_graph):
        y = model(x)

    free_bytes = torch.cuda.mem_get_info()[0]
    allocator.sleep()
    free_bytes_after_sleep = torch.cuda.mem_get_info()[0]
    assert free_bytes_after_sleep > free_bytes
    allocator.wake_up()

    x.random_()
    model_graph.replay()
    assert torch.allclose(x, cache[: x.size(0)])
    assert torch.allclose(y, x + 1)


# ---------------------------------------------------------------------------- torch_memory_saver
def vllm_freed_inside_use_memory_pool() -> None:
    """Not an upstream test: vLLM's use_memory_pool gives memory freed inside the block back when it exits
    (online quantization drops the original weights inside it); what is still referenced stays and sleeps
    and wakes with its tag."""
    from gpusleep.compat.vllm import CuMemAllocator

    allocator = CuMemAllocator.get_instance()
    torch.cuda.synchronize()
    before = _used_bytes()
    with allocator.use_memory_pool("weights"):
        original = torch.ones(256 << 20, dtype=torch.uint8, device="cuda")
        quantized = torch.full((64 << 20,), 7, dtype=torch.uint8, device="cuda")
        del original
        torch.cuda.synchronize()
        assert _used_bytes() - before >= (256 + 64) << 20, "held by the pool while the block runs"
    torch.cuda.synchronize()
    held = _used_bytes() - before
    assert held < (64 + 32) << 20, f"the freed 256 MiB should be back after the block, {held} bytes held"
    allocator.sleep(offload_tags=("weights",))
    allocator.wake_up()
    assert bool((quantized == 7).all())


def tms_simple(hook_mode: str = "torch") -> None:
    from gpusleep.compat.torch_memory_saver import torch_memory_saver

    torch_memory_saver.hook_mode = hook_mode
    normal_tensor = torch.full((1_000_000_0,), 100, dtype=torch.uint8, device="cuda")
    with torch_memory_saver.region():
        pauseable_tensor = torch.full((1_000_000_000_0,), 100, dtype=torch.uint8, device="cuda")
    original_address = pauseable_tensor.data_ptr()

    mem_before_pause = _used_bytes()
    torch_memory_saver.pause()
    mem_after_pause = _used_bytes()
    assert mem_before_pause - mem_after_pause > 0.9 * 1024**3

    torch_memory_saver.resume()
    mem_after_resume = _used_bytes()
    assert mem_after_resume - mem_after_pause > 0.9 * 1024**3
    assert original_address == pauseable_tensor.data_ptr(), "Tensor virtual address should be the same"

    torch.cuda.empty_cache()
    del normal_tensor, pauseable_tensor
    torch.cuda.empty_cache()


def _cpu_backup_tensors(hook_mode: str):
    from gpusleep.compat.torch_memory_saver import torch_memory_saver

    torch_memory_saver.hook_mode = hook_mode
    with torch_memory_saver.region(enable_cpu_backup=True):
        tensor_with_backup = torch.full((20_000_000,), 10, dtype=torch.uint8, device="cuda")
        typed_tensor_with_backup = torch.full((10, 20, 30), 1.5, dtype=torch.float32, device="cuda")
    with torch_memory_saver.region(enable_cpu_backup=False):
        tensor_without_backup = torch.full((20_000_000,), 20, dtype=torch.uint8, device="cuda")
    assert tensor_with_backup[:3].tolist() == [10, 10, 10]
    assert tensor_without_backup[:3].tolist() == [20, 20, 20]
    return torch_memory_saver, tensor_with_backup, typed_tensor_with_backup, tensor_without_backup


def tms_cpu_backup(hook_mode: str = "torch") -> None:
    torch_memory_saver, tensor_with_backup, typed, tensor_without_backup = _cpu_backup_tensors(hook_mode)
    torch_memory_saver.pause()
    tensor_unrelated = torch.full((20_000_000,), 30, dtype=torch.uint8, device="cuda")  # noqa: F841
    torch_memory_saver.resume()
    assert tensor_with_backup[:3].tolist() == [10, 10, 10]
    assert tensor_without_backup[:3].tolist() != [20, 20, 20]
    assert typed.flatten()[:3].tolist() == [1.5, 1.5, 1.5]


def tms_cpu_backup_get_cpu_backup(hook_mode: str = "torch") -> None:
    torch_memory_saver, _, typed, _ = _cpu_backup_tensors(hook_mode)
    torch_memory_saver.pause()
    cpu_tensor = torch_memory_saver.get_cpu_backup(typed)
    assert cpu_tensor.flatten()[:3].tolist() == [1.5, 1.5, 1.5]


def tms_multi_device(hook_mode: str = "torch") -> None:
    from gpusleep.compat.torch_memory_saver import torch_memory_saver

    torch_memory_saver.hook_mode = hook_mode

    def used():
        return _used_bytes(0), _used_bytes(1)

    def check(prev, min_delta):
        curr = used()
        assert all(c - p >= d for c, p, d in zip(curr, prev, min_delta, strict=False)), (curr, prev, min_delta)
        return curr

    prev = used()
    torch.cuda.set_device(1)
    # gpusleep's pool mode routes the current device only (as torch.cuda.use_mem_pool does), so
    # cuda:0's tensor is made with cuda:0 current; the original relies on LD_PRELOAD for it.
    with torch.cuda.device(0), torch_memory_saver.region():
        dev0_a = torch.full((100_000_000,), 10, dtype=torch.uint8, device="cuda:0")  # noqa: F841
    prev = check(prev, (80_000_000, 0))
    with torch_memory_saver.region():
        dev1_a = torch.full((100_000_000,), 10, dtype=torch.uint8, device="cuda")  # noqa: F841
    prev = check(prev, (0, 80_000_000))
    with torch_memory_saver.region():
        dev1_b = torch.full((100_000_000,), 10, dtype=torch.uint8, device="cuda:1")  # noqa: F841
    prev = check(prev, (0, 80_000_000))
    torch_memory_saver.pause()
    torch_memory_saver.resume()
    check(prev, (0, 0))


def tms_cuda_graph() -> None:
    from gpusleep.compat.torch_memory_saver import TorchMemorySaver

    memory_saver = TorchMemorySaver()
    dummy_tensor_size = (5, 100_000_000)

    class KVCache:
        def __init__(self):
            with memory_saver.region():
                self.kv_buffer = torch.full(dummy_tensor_size, 1, dtype=torch.float32, device="cuda")

        def execute(self, arg):
            return (arg + self.kv_buffer.mean(dim=1)).mean()

    cache = KVCache()
    static_input = torch.zeros((5,), dtype=torch.float32, device="cuda")
    static_output = torch.zeros((5,), dtype=torch.float32, device="cuda")

    def fn():
        nonlocal static_output
        static_output = cache.execute(static_input)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()

    static_input[...] = 100
    g.replay()
    assert static_output == 101, f"{static_output=}"
    torch.cuda.empty_cache()
    memory_saver.pause()
    other_big_tensor = torch.zeros((2500_000_000,), dtype=torch.uint8, device="cuda")
    del other_big_tensor
    torch.cuda.empty_cache()
    memory_saver.resume()
    cache.kv_buffer[...] = 2
    static_input[...] = 200
    g.replay()
    assert static_output == 202, f"{static_output=}"


def tms_cuda_graph_region() -> None:
    from gpusleep.compat.torch_memory_saver import torch_memory_saver

    with torch_memory_saver.region(tag="weights", enable_cpu_backup=True):
        weight = torch.full((1024, 1024), 3.0, device="cuda")
    static_input = torch.ones((1024,), device="cuda")
    out = static_input @ weight  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch_memory_saver.cuda_graph(cuda_graph=graph, tag="cuda_graph"):
        out = static_input @ weight
    graph_bytes = torch_memory_saver.allocator.stats().tags["cuda_graph"].bytes_mapped
    assert graph_bytes > 0, "the capture's memory is not in the cuda_graph region"
    used = _used_bytes()
    torch_memory_saver.pause()
    assert used - _used_bytes() >= graph_bytes
    torch_memory_saver.resume()
    static_input.fill_(2.0)
    graph.replay()
    assert torch.allclose(out, torch.full((1024,), 2.0 * 3.0 * 1024, device="cuda"))


SCENARIOS = {name: fn for name, fn in globals().items() if name.startswith(("vllm_", "tms_")) and callable(fn)}

if __name__ == "__main__":
    SCENARIOS[sys.argv[1]]()
    print("scenario passed:", sys.argv[1])
