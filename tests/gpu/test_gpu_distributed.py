"""gpusleep.distributed on a single-node multi-GPU box: 2 ranks, one GPU each, NCCL for the model and a
gloo group for the sleep protocol (as docs/distributed.md recommends). Skips with fewer than 2 GPUs.

Each rank holds ~64 MiB of weights (pool mode, tag "weights") and a KV buffer; the test checks that the
collective level-1 sleep frees the memory on both GPUs, that the wake restores the weights bit-exact and
NCCL still works, and that a wake refused on rank 1 (another tenant fills its GPU) leaves both ranks
asleep and the next wake succeeds. This file is also the ranks' program (``__main__``)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu
MiB = 1 << 20
LIMIT_S = 240


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_gpu_count() < 2, reason="needs at least 2 CUDA GPUs")
def test_two_gpus_sleep_and_wake_together_and_roll_back_a_refused_wake(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=LIMIT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    facts = {}
    for r in range(2):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} reported nothing:\n" + "\n".join(o[-4000:] for o in outputs)
        facts[r] = json.loads(path.read_text())
    for _r, f in facts.items():
        assert f["freed_bytes"] >= 64 * MiB, f
        assert f["is_sleeping_after_sleep"] and not f["is_sleeping_after_wake"]
        assert f["weights_equal_after_wake"] and f["all_reduce_after_wake"] == 3.0
        assert f["refused_wake_error"] == "ModelOutOfMemoryError" and f["refused_failed_ranks"] == [1]
        assert f["is_sleeping_after_refused_wake"] is True
        assert f["weights_equal_after_retry"] is True
    assert facts[0]["model_bytes_offloaded"] >= 2 * 64 * MiB


def _rank(rank: int, port: int, out_dir: pathlib.Path) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    import gpusleep
    import gpusleep.distributed as gsd

    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
        device_id=torch.device("cuda", rank),
    )
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    alloc = gpusleep.Allocator()
    alloc.use_mem_pools()
    with alloc.tag("weights"):
        weights = torch.randn(16 * MiB, device="cuda")  # 64 MiB
    with alloc.tag("kv_cache"):
        kv = torch.zeros(8 * MiB, device="cuda")
    expected = weights.cpu()
    one = torch.ones(1, device="cuda")
    dist.all_reduce(one)  # the NCCL communicator exists before the sleep
    torch.cuda.synchronize()
    facts: dict = {}

    free_before = torch.cuda.mem_get_info()[0]
    report = gsd.sleep(alloc, 1, group=control, timeout_seconds=60)
    facts["freed_bytes"] = torch.cuda.mem_get_info()[0] - free_before
    facts["is_sleeping_after_sleep"] = alloc.is_sleeping
    facts["model_bytes_offloaded"] = report.bytes_offloaded
    gsd.wake_up(alloc, group=control, timeout_seconds=60)
    facts["is_sleeping_after_wake"] = alloc.is_sleeping
    facts["weights_equal_after_wake"] = bool(torch.equal(weights.cpu(), expected))
    three = torch.full((1,), 1.0 + rank, device="cuda")
    dist.all_reduce(three)
    facts["all_reduce_after_wake"] = float(three.item())

    gsd.sleep(alloc, 1, group=control, timeout_seconds=60)
    hog = None
    if rank == 1:  # another tenant fills rank 1's GPU (plain torch memory, outside gpusleep's tags)
        hog = torch.empty(torch.cuda.mem_get_info()[0] - 16 * MiB, dtype=torch.uint8, device="cuda")
    try:
        gsd.wake_up(alloc, group=control, timeout_seconds=60)
    except gsd.DistributedSleepError as error:
        facts["refused_wake_error"] = type(error).__name__
        facts["refused_failed_ranks"] = list(error.failed_ranks)
    facts["is_sleeping_after_refused_wake"] = alloc.is_sleeping
    del hog
    torch.cuda.empty_cache()
    gsd.wake_up(alloc, group=control, timeout_seconds=60)
    facts["weights_equal_after_retry"] = bool(torch.equal(weights.cpu(), expected))
    try:
        facts["nccl_suspend_available"] = bool(gsd.nccl_communicators([dist.group.WORLD]))
    except RuntimeError as error:
        facts["nccl_suspend_available"] = False
        facts["nccl_suspend_missing"] = str(error)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(facts))
    del kv
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
