"""Unmodified engine code on a real GPU through ``python -m gpusleep.compat.launch`` (Note [Unmodified
engines] in gpusleep/compat/redirect.py): the engine's own calls, written for torch_memory_saver (SGLang's
``--enable-memory-saver``) or for vLLM's ``CuMemAllocator`` (``--enable-sleep-mode``), run unchanged in a
launched process, free the device memory they pause and bring every byte back. The CPU twin of these checks
is tests/compat/test_unmodified_engines.py; a full engine serving a model is not run here (neither is
installed on the GPU image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu

MiB = 1 << 20
WEIGHTS_BYTES = 256 * MiB

# What SGLang's TorchMemorySaverAdapter does with the real package: a region per tag, pause and resume.
TORCH_MEMORY_SAVER_ENGINE = f"""
    import json, torch, torch_memory_saver
    saver = torch_memory_saver.torch_memory_saver
    with saver.region(tag="weights", enable_cpu_backup=True):
        weights = torch.arange({WEIGHTS_BYTES // 4}, dtype=torch.int32, device="cuda")
    with saver.region(tag="kv_cache"):
        kv = torch.ones({WEIGHTS_BYTES // 4}, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    pointers = (weights.data_ptr(), kv.data_ptr())
    saver.pause()
    free_paused = torch.cuda.mem_get_info()[0]
    saver.resume()
    expected = torch.arange({WEIGHTS_BYTES // 4}, dtype=torch.int32, device="cuda")
    print("RESULT " + json.dumps({{
        "module": torch_memory_saver.__name__,
        "freed_bytes": free_paused - free_awake,
        "weights_intact": bool(torch.equal(weights, expected)),
        "kv_zero": int(kv.count_nonzero()) == 0,
        "pointers_equal": (weights.data_ptr(), kv.data_ptr()) == pointers,
    }}))
"""

# What vLLM's worker does with CuMemAllocator: allocations under use_memory_pool, sleep offloading weights.
VLLM_ENGINE = f"""
    import json, torch
    from vllm.device_allocator.cumem import CuMemAllocator
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool(tag="weights"):
        weights = torch.arange({WEIGHTS_BYTES // 4}, dtype=torch.int32, device="cuda")
    with allocator.use_memory_pool(tag="kv_cache"):
        kv = torch.ones({WEIGHTS_BYTES // 4}, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    free_awake = torch.cuda.mem_get_info()[0]
    allocator.sleep(offload_tags=("weights",))
    free_asleep = torch.cuda.mem_get_info()[0]
    allocator.wake_up()
    expected = torch.arange({WEIGHTS_BYTES // 4}, dtype=torch.int32, device="cuda")
    print("RESULT " + json.dumps({{
        "module": type(allocator).__module__,
        "freed_bytes": free_asleep - free_awake,
        "weights_intact": bool(torch.equal(weights, expected)),
    }}))
"""


def launch(peer: str, code: str, extra_path: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), extra_path) if p)
    command = [sys.executable, "-m", "gpusleep.compat.launch", "--peers", peer, "--", sys.executable, "-c"]
    out = subprocess.run([*command, textwrap.dedent(code)], capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT ") :])


def test_torch_memory_saver_engine_code_sleeps_on_gpusleep_unchanged():
    facts = launch("torch_memory_saver", TORCH_MEMORY_SAVER_ENGINE)
    assert facts["module"] == "gpusleep.compat.torch_memory_saver"
    # Both regions were released: at least the two tensors' bytes came back to the driver.
    assert facts["freed_bytes"] >= 2 * WEIGHTS_BYTES, facts
    assert facts["weights_intact"] and facts["kv_zero"] and facts["pointers_equal"], facts


def test_vllm_engine_code_sleeps_on_gpusleep_unchanged(tmp_path):
    try:
        import vllm.device_allocator  # noqa: F401

        extra_path = None
    except Exception:
        # vLLM is not installed on the GPU image: two empty parent packages stand in, as on the CPU.
        (tmp_path / "vllm" / "device_allocator").mkdir(parents=True)
        (tmp_path / "vllm" / "__init__.py").write_text("")
        (tmp_path / "vllm" / "device_allocator" / "__init__.py").write_text("")
        extra_path = str(tmp_path)
    facts = launch("vllm", VLLM_ENGINE, extra_path)
    assert facts["module"] == "gpusleep.compat.vllm"
    assert facts["freed_bytes"] >= 2 * WEIGHTS_BYTES, facts
    assert facts["weights_intact"], facts
