"""One GPU scenario in a fresh process: ``python _worker.py MODE SCENARIO``.

MODE is ``global`` (gpusleep is PyTorch's allocator for the whole process, installed before any CUDA
allocation) or ``pool`` (tagged tensors go to gpusleep-backed MemPools, the rest stays native). Global
mode can be installed once per process and must come first, hence one process per scenario; a sticky
CUDA fault in one scenario cannot spoil the others either.

The worker measures and prints facts as one JSON line prefixed with ``GPUSLEEP_RESULT``; the assertions
live in test_gpu_torch_modes.py. Exit code 0 when the scenario ran to the end, 1 on an exception (the
traceback is in the JSON and on stderr)."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from gpu_workers import emit_result  # noqa: E402

import gpusleep  # noqa: E402
from gpusleep.demo.model import KVCache, TinyTransformer, TinyTransformerConfig  # noqa: E402

MiB = 1 << 20
SEQ = 128  # tokens per forward pass
# gpusleep's demo transformer at a size that makes the GPU figures mean something: about 430 MB of float32
# weights and a KV cache of 8 layers x 2 x 16 heads x 4096 positions x 64 x 4 B = 268 MB.
MODEL = TinyTransformerConfig(vocab_size=8192, d_model=1024, n_layers=8, n_heads=16, d_ff=4096, max_seq_len=4096)


def example_tokens(seed: int) -> torch.Tensor:
    """Token ids of one sequence on the CPU, reproducible from ``seed``."""
    return torch.randint(0, MODEL.vocab_size, (SEQ,), generator=torch.Generator().manual_seed(seed))


@dataclass
class Served:
    """A model with its KV buffer on one device, as a server holds it."""

    alloc: gpusleep.Allocator
    device: int
    model: TinyTransformer
    kv: KVCache
    cpu_state: dict[str, torch.Tensor]
    tokens: torch.Tensor

    def forward(self, tokens: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad(), torch.cuda.device(self.device):
            out = self.model(self.tokens if tokens is None else tokens, self.kv, 0)
        torch.cuda.synchronize(self.device)
        return out.cpu()

    def pointers(self) -> list[int]:
        return [t.data_ptr() for t in self.model.state_dict().values()] + [self.kv.buffer.data_ptr()]

    def reload_weights(self) -> None:
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(self.cpu_state[name])
        torch.cuda.synchronize(self.device)

    def weights_all_zero(self) -> bool:
        return all(int(t.count_nonzero()) == 0 for t in self.model.state_dict().values())

    @property
    def param_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.model.state_dict().values())

    @property
    def kv_bytes(self) -> int:
        return self.kv.num_bytes


def install(mode: str) -> gpusleep.Allocator:
    alloc = gpusleep.Allocator()
    if mode == "global":
        torch.cuda.memory.change_current_allocator(alloc.pluggable())
    elif mode == "pool":
        alloc.use_mem_pools()
    else:
        raise ValueError(f"mode must be global or pool, got {mode!r}")
    return alloc


def serve(alloc: gpusleep.Allocator, device: int = 0) -> Served:
    model = TinyTransformer(MODEL).eval()
    cpu_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.cuda.device(device):
        with alloc.tag("weights"):
            model = model.to(f"cuda:{device}")
        with alloc.tag("kv_cache"):
            kv = KVCache(MODEL, torch.device(f"cuda:{device}"))
        tokens = example_tokens(seed=1).to(f"cuda:{device}")
    return Served(alloc, device, model, kv, cpu_state, tokens)


def free_bytes(device: int = 0) -> int:
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]


def tagged_bytes(alloc: gpusleep.Allocator, *tags: str) -> int:
    stats = alloc.stats()
    return sum(stats.tags[t].bytes_mapped for t in tags if t in stats.tags)


# --------------------------------------------------------------------------------------- scenarios
def scenario_level1(mode: str) -> dict:
    alloc = install(mode)
    s = serve(alloc)
    out0, ptrs0 = s.forward(), s.pointers()
    tagged = tagged_bytes(alloc, "weights", "kv_cache")
    free_awake = free_bytes()
    report = alloc.sleep(level=1)
    free_asleep = free_bytes()
    mapped_asleep = tagged_bytes(alloc, "weights", "kv_cache")
    sleeping = sorted(alloc.sleeping_tags)
    wake = alloc.wake_up()
    out1 = s.forward()
    return {
        "param_bytes": s.param_bytes,
        "kv_bytes": s.kv_bytes,
        "tagged_bytes": tagged,
        "freed_bytes": free_asleep - free_awake,
        "mapped_bytes_asleep": mapped_asleep,
        "sleeping_tags": sleeping,
        "bytes_offloaded": report.bytes_offloaded,
        "bytes_restored": wake.bytes_restored,
        "free_bytes_after_wake": free_bytes(),
        "free_bytes_before_sleep": free_awake,
        "pointers_equal": s.pointers() == ptrs0,
        "outputs_equal": bool(torch.equal(out0, out1)),
        "is_sleeping_after_wake": alloc.is_sleeping,
    }


def scenario_graph(mode: str) -> dict:
    alloc = install(mode)
    s = serve(alloc)
    static_tokens = s.tokens.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            s.model(static_tokens, s.kv, 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = s.model(static_tokens, s.kv, 0)
    graph.replay()
    torch.cuda.synchronize()
    out0 = static_out.cpu()
    eager = s.forward()
    alloc.sleep(level=1)
    alloc.wake_up()
    static_out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    out1 = static_out.cpu()
    return {
        "graph_outputs_equal": bool(torch.equal(out0, out1)),
        "graph_matches_eager": bool(torch.equal(out0, eager)),
        "eager_after_wake_equal": bool(torch.equal(eager, s.forward())),
    }


def scenario_level2_reload(mode: str) -> dict:
    alloc = install(mode)
    s = serve(alloc)
    out0, ptrs0 = s.forward(), s.pointers()
    free_awake = free_bytes()
    tagged = tagged_bytes(alloc, "weights", "kv_cache")
    report = alloc.sleep(level=2)
    freed = free_bytes() - free_awake
    backed_up = alloc.stats().bytes_backed_up
    wake_weights = alloc.wake_up(tags=["weights"])
    still_sleeping = sorted(alloc.sleeping_tags)
    zero_filled = s.weights_all_zero()
    s.reload_weights()
    alloc.wake_up(tags=["kv_cache"])
    out1 = s.forward()
    return {
        "tagged_bytes": tagged,
        "freed_bytes": freed,
        "bytes_offloaded": report.bytes_offloaded,
        "bytes_backed_up_asleep": backed_up,
        "wake_weights_tags": list(wake_weights.tags),
        "sleeping_after_weights_wake": still_sleeping,
        "weights_zero_filled": zero_filled,
        "pointers_equal": s.pointers() == ptrs0,
        "outputs_equal": bool(torch.equal(out0, out1)),
        "is_sleeping_at_end": alloc.is_sleeping,
    }


def scenario_wake_oom(mode: str) -> dict:
    alloc = install(mode)
    s = serve(alloc)
    out0, ptrs0 = s.forward(), s.pointers()
    tagged = tagged_bytes(alloc, "weights", "kv_cache")
    alloc.sleep(level=1)
    # Take the freed memory: leave only half of what the wake needs. In pool mode the tensor comes from
    # PyTorch's native allocator; in global mode it is an untagged ("default", kept awake) gpusleep block.
    hog_bytes = (free_bytes() - tagged // 2) // (2 * MiB) * (2 * MiB)
    hog = torch.empty(hog_bytes, dtype=torch.uint8, device="cuda")
    free_with_hog = free_bytes()
    facts: dict = {"tagged_bytes": tagged, "hog_bytes": hog_bytes, "free_with_hog": free_with_hog}
    try:
        alloc.wake_up()
        facts["first_wake"] = "succeeded"
    except gpusleep.OutOfMemoryError as exc:
        facts.update(
            first_wake="OutOfMemoryError",
            is_memory_error=isinstance(exc, MemoryError),
            bytes_needed=exc.bytes_needed,
            bytes_free=exc.bytes_free,
            message=str(exc),
        )
    except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
        facts.update(first_wake=type(exc).__name__, message=str(exc))
    facts["free_after_failed_wake"] = free_bytes()
    facts["sleeping_after_failed_wake"] = sorted(alloc.sleeping_tags)
    facts["weights_backed_up_after_failed_wake"] = alloc.stats().tags["weights"].bytes_backed_up
    del hog
    if mode == "pool":
        torch.cuda.empty_cache()
    else:
        facts["empty_cache_bytes"] = alloc.empty_cache()
    alloc.wake_up()
    out1 = s.forward()
    facts.update(
        pointers_equal=s.pointers() == ptrs0,
        outputs_equal=bool(torch.equal(out0, out1)),
        is_sleeping_at_end=alloc.is_sleeping,
    )
    return facts


def scenario_cycles(mode: str) -> dict:
    alloc = install(mode)
    s = serve(alloc)
    ptrs0 = s.pointers()
    inputs = [example_tokens(seed=10 + i).cuda() for i in range(3)]
    references = [s.forward(t) for t in inputs]
    levels = [1, 2, 1, 1, 2, 1]
    cycles = []
    for i, level in enumerate(levels):
        free_awake = free_bytes()
        alloc.sleep(level=level)
        freed = free_bytes() - free_awake
        if level == 2:
            alloc.wake_up(tags=["weights"])
            s.reload_weights()
        alloc.wake_up()
        out = s.forward(inputs[i % len(inputs)])
        cycles.append(
            {
                "level": level,
                "freed_bytes": freed,
                "pointers_equal": s.pointers() == ptrs0,
                "outputs_equal": bool(torch.equal(out, references[i % len(inputs)])),
            }
        )
    return {"tagged_bytes": tagged_bytes(alloc, "weights", "kv_cache"), "cycles": cycles}


def scenario_two_gpus(mode: str) -> dict:
    if torch.cuda.device_count() < 2:
        return {"skipped": "fewer than 2 GPUs"}
    alloc = install(mode)
    served = [serve(alloc, device) for device in (0, 1)]
    outs0 = [s.forward() for s in served]
    ptrs0 = [s.pointers() for s in served]
    free_awake = [free_bytes(d) for d in (0, 1)]
    alloc.sleep(level=1)
    freed = [free_bytes(d) - free_awake[d] for d in (0, 1)]
    alloc.wake_up()
    return {
        "devices": [s.device for s in served],
        "bytes_per_device": [s.param_bytes + s.kv_bytes for s in served],
        "freed_bytes": freed,
        "pointers_equal": [s.pointers() == p for s, p in zip(served, ptrs0, strict=False)],
        "outputs_equal": [bool(torch.equal(s.forward(), o)) for s, o in zip(served, outs0, strict=False)],
    }


def scenario_oom(mode: str) -> dict:
    """Ask for twice the card: PyTorch must raise (not hand back a tensor at address 0)."""
    alloc = install(mode)
    total = torch.cuda.mem_get_info()[1]
    facts: dict = {"requested_bytes": 2 * total}
    try:
        with alloc.tag("weights"):
            tensor = torch.empty(2 * total, dtype=torch.uint8, device="cuda")
        facts.update(raised=False, data_ptr=tensor.data_ptr())
        del tensor
    except Exception as exc:  # noqa: BLE001 - the type is what the test checks
        facts.update(
            raised=True,
            exception=type(exc).__name__,
            message=str(exc)[:500],
            is_memory_error=isinstance(exc, (MemoryError, torch.OutOfMemoryError)),
        )
    small = torch.arange(1024, device="cuda", dtype=torch.float32)
    facts["healthy_after"] = float(small.sum().item()) == 1023 * 1024 / 2
    return facts


def scenario_tails(mode: str) -> dict:
    """Weights whose sizes are not granularity multiples, so later ones land in the tail of a segment
    (a 151936 x 3584 bf16 embedding, then small odd tensors): every byte must come back after level 1."""
    alloc = install(mode)
    generator = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(151936, 3584), (5 * MiB + MiB // 4 + 3,), (10 * MiB + MiB // 2,), (MiB + MiB // 4 + 5,), (777,)]
    with alloc.tag("weights"):
        tensors = [
            torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, device="cuda", generator=generator).view(
                torch.bfloat16
            )
            for shape in shapes
        ]
    copies = [t.cpu() for t in tensors]
    ptrs = [t.data_ptr() for t in tensors]
    alloc.sleep(level=1)
    alloc.wake_up()
    return {
        "sizes": [t.numel() * t.element_size() for t in tensors],
        "pointers_equal": [t.data_ptr() for t in tensors] == ptrs,
        "bytes_equal": [
            bool(torch.equal(t.cpu().view(torch.int16), c.view(torch.int16)))
            for t, c in zip(tensors, copies, strict=False)
        ],
    }


def scenario_cross_device(mode: str) -> dict:
    """gpusleep memory on one GPU read and written by the other (peer access), before and after a wake."""
    if torch.cuda.device_count() < 2:
        return {"skipped": "fewer than 2 GPUs"}
    alloc = install(mode)
    facts: dict = {"can_access_peer": torch.cuda.can_device_access_peer(1, 0)}
    with alloc.tag("weights"):
        on0 = torch.arange(3 * MiB + 7, dtype=torch.int32, device="cuda:0")
    with alloc.tag("kv_cache"):
        on1 = torch.zeros(3 * MiB + 7, dtype=torch.int32, device="cuda:1")
    on1.copy_(on0)
    torch.cuda.synchronize(1)
    facts["copy_before_sleep"] = bool(torch.equal(on1.cpu(), on0.cpu()))
    alloc.sleep(level=1)
    alloc.wake_up()
    on1.copy_(on0)  # remapped: access must have been granted again
    on0.copy_(on1 * 2)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    facts["copy_after_wake"] = bool(torch.equal(on0.cpu(), torch.arange(3 * MiB + 7, dtype=torch.int32) * 2))
    return facts


def scenario_second_device_untouched(mode: str) -> dict:
    """Using only cuda:1 must not create a context (and spend memory) on cuda:0."""
    if torch.cuda.device_count() < 2:
        return {"skipped": "fewer than 2 GPUs"}
    import cuda_driver

    alloc = gpusleep.Allocator()
    active_before = cuda_driver.primary_context_active(0)
    address = alloc.allocate(64 * MiB, tag="weights", device=1)
    alloc.reserve_host_memory()
    alloc.sleep(level=1)
    alloc.wake_up()
    alloc.free(address)
    alloc.close()
    return {"active_before": active_before, "active_after": cuda_driver.primary_context_active(0)}


def scenario_peer_still_reading(mode: str) -> dict:
    """Review 2026-12-06 C.10 (finding 2): a copy queued on cuda:1 (behind a long kernel) reads gpusleep memory
    on cuda:0 when sleep() is called, and gpusleep never allocated on cuda:1 (pool mode: cuda:1's tensors come
    from PyTorch's own allocator). Sleep must wait for cuda:1 before it unmaps: otherwise the copy reads
    unmapped memory (a sticky illegal address) or freed pages."""
    if torch.cuda.device_count() < 2:
        return {"skipped": "fewer than 2 GPUs"}
    if not torch.cuda.can_device_access_peer(1, 0):
        return {"skipped": "cuda:1 cannot access cuda:0"}
    import cuda_driver

    alloc = install(mode)
    n = 256 * MiB
    with alloc.tag("weights"):
        weights = torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda:0")
    expected = weights.cpu()
    dst = torch.zeros(n, dtype=torch.uint8, device="cuda:1")  # cuda:1 is in use (PyTorch holds its context)
    torch.cuda.synchronize(0)
    torch.cuda.synchronize(1)
    driver = cuda_driver.Driver()
    facts: dict = {"cuda1_granted": driver.get_access(weights.data_ptr(), 1)[1] == 3}
    stream = torch.cuda.Stream(device=1)
    with torch.cuda.device(1), torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000_000)  # about half a second of GPU time before the copy runs
        facts["copy_enqueue_rc"] = driver.dtod_async(dst.data_ptr(), weights.data_ptr(), n, stream.cuda_stream)
    start = time.perf_counter()
    report = alloc.sleep(level=1)
    facts["sleep_seconds"] = time.perf_counter() - start
    facts["bytes_release_pending"] = report.bytes_release_pending
    try:
        stream.synchronize()
        facts["copy_correct"] = bool(torch.equal(dst.cpu(), expected))
    except Exception as exc:  # noqa: BLE001 - a sticky error is the defect
        facts["copy_error"] = f"{type(exc).__name__}: {exc}"[:600]
        return facts
    alloc.wake_up()
    facts["weights_after_wake"] = bool(torch.equal(weights.cpu(), expected))
    return facts


def scenario_peer_grants(mode: str) -> dict:
    """Review C.2 (finding 10): a map grants cuda:1 access only once cuda:1 is in use; refresh_peer_access()
    and a wake grant it afterwards. Low-level allocations, so that no tensor makes cuda:1 active early."""
    if torch.cuda.device_count() < 2:
        return {"skipped": "fewer than 2 GPUs"}
    import cuda_driver

    driver = cuda_driver.Driver()
    facts: dict = {
        "cuda1_active_before": driver.primary_context_active(1),
        "can_access_peer": torch.cuda.can_device_access_peer(1, 0),
    }
    alloc = gpusleep.Allocator()
    address = alloc.allocate(64 * MiB, tag="weights", device=0)
    facts["access_before_use"] = driver.get_access(address, 1)
    torch.zeros(1, device="cuda:1")  # cuda:1 comes into use
    facts["access_after_use"] = driver.get_access(address, 1)
    facts["refreshed_segments"] = alloc.refresh_peer_access()
    facts["access_after_refresh"] = driver.get_access(address, 1)
    alloc.sleep(level=1)
    alloc.wake_up()
    facts["access_after_wake"] = driver.get_access(address, 1)
    facts["peer_grants_refused"] = alloc.stats().counters.get("peer_grants_refused", 0)
    alloc.free(address)
    alloc.close()
    return facts


def scenario_wake_during_unseen_capture(mode: str) -> dict:
    """Review C.1 (finding 3): a wake and pinning run while another thread captures a CUDA graph that gpusleep
    never saw (PyTorch's own graph pool, pool mode); the capture must stay valid and replay correctly."""
    if mode != "pool":
        return {"skipped": "pool mode only (global mode sees its captures and refuses them)"}
    alloc = install(mode)
    with alloc.tag("weights"):
        weights = torch.arange(64 * MiB // 4, dtype=torch.int32, device="cuda")
    expected = weights.cpu()
    alloc.sleep(level=1)
    static_in = torch.ones(1 << 20, device="cuda")
    graph = torch.cuda.CUDAGraph()
    captured, proceed, facts = threading.Event(), threading.Event(), {}

    def capture() -> None:
        try:
            with torch.cuda.graph(graph):
                out = static_in * 3
                captured.set()
                proceed.wait(30)
                out += 1
            facts["capture_ok"] = True
            facts["out"] = out
        except Exception as exc:  # noqa: BLE001 - the failure is the fact
            captured.set()
            facts["capture_error"] = f"{type(exc).__name__}: {exc}"[:600]

    thread = threading.Thread(target=capture)
    thread.start()
    captured.wait(30)
    try:
        alloc.wake_up()
        facts["wake_ok"] = True
        facts["pinned_more"] = alloc.reserve_host_memory(8 * MiB).bytes_newly_pinned
    except Exception as exc:  # noqa: BLE001
        facts["wake_error"] = f"{type(exc).__name__}: {exc}"[:600]
    finally:
        proceed.set()
        thread.join(60)
    if facts.get("capture_ok"):
        graph.replay()
        torch.cuda.synchronize()
        facts["replay_correct"] = bool(torch.all(facts.pop("out") == 4).item())
    facts["weights_after_wake"] = bool(torch.equal(weights.cpu(), expected))
    return facts


def scenario_capture_oom(mode: str) -> dict:
    """Global mode: an allocation that cannot be satisfied during a CUDA graph capture fails with a clear
    error, does not invalidate the capture by giving cached memory back, and the process stays healthy."""
    if mode != "global":
        return {"skipped": "global mode only"}
    alloc = install(mode)
    cached = torch.empty(64 * MiB, dtype=torch.uint8, device="cuda")
    del cached  # stays in gpusleep's cache
    cached_bytes = alloc.stats().bytes_cached
    free, _ = torch.cuda.mem_get_info()
    hog = alloc.allocate(free - 32 * MiB, tag="hog")  # leaves too little for the capture's allocation
    static_in = torch.ones(1024, device="cuda")
    graph = torch.cuda.CUDAGraph()
    facts: dict = {"cached_bytes": cached_bytes}
    try:
        with torch.cuda.graph(graph):
            out = static_in * 2
            big = torch.empty(256 * MiB, dtype=torch.uint8, device="cuda")
            out = out + big[:1024].float()
        facts["raised"] = False
    except Exception as exc:  # noqa: BLE001 - what is raised is the fact
        facts.update(raised=True, exception=type(exc).__name__, message=str(exc)[:600])
    facts["cached_bytes_after"] = alloc.stats().bytes_cached
    alloc.free(hog)
    small = torch.arange(1024, device="cuda", dtype=torch.float32)
    facts["healthy_after"] = float(small.sum().item()) == 1023 * 1024 / 2
    return facts


SCENARIOS: dict[str, Callable[[str], dict]] = {
    name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")
}


def main(argv: list[str]) -> int:
    mode, scenario = argv[1], argv[2]
    try:
        facts = SCENARIOS[scenario](mode)
        status = 0
    except Exception:  # noqa: BLE001 - the whole traceback goes to the test
        facts = {"error": traceback.format_exc()}
        traceback.print_exc()
        status = 1
    emit_result({"mode": mode, "scenario": scenario, **facts})
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
