"""Sleep mode under real PyTorch workloads, in global mode and in pool mode (one fresh process each).

A ~470 MB transformer lives under tag("weights") and a ~268 MB KV buffer under tag("kv_cache"); see
_worker.py for what each scenario does and which facts it reports."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

MODES = ["global", "pool"]
MiB = 1 << 20


@pytest.mark.parametrize("mode", MODES)
def test_level1_frees_memory_and_restores_bit_exact(run_worker, mode):
    f = run_worker(mode, "level1")
    assert f["tagged_bytes"] >= f["param_bytes"] + f["kv_bytes"], "tagged tensors did not go through gpusleep"
    assert f["freed_bytes"] >= 0.99 * f["tagged_bytes"], f
    assert f["mapped_bytes_asleep"] == 0
    assert f["sleeping_tags"] == ["kv_cache", "weights"]
    assert f["bytes_offloaded"] >= f["param_bytes"]
    assert f["bytes_restored"] == f["bytes_offloaded"]
    assert f["pointers_equal"]
    assert f["outputs_equal"]
    assert not f["is_sleeping_after_wake"]
    assert f["free_bytes_after_wake"] <= f["free_bytes_before_sleep"] + 64 * MiB  # memory really came back


@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_captured_before_sleep_replays_after_wake(run_worker, mode):
    f = run_worker(mode, "graph")
    assert f["graph_outputs_equal"]
    assert f["eager_after_wake_equal"]


@pytest.mark.parametrize("mode", MODES)
def test_level2_staged_wake_with_weight_reload(run_worker, mode):
    f = run_worker(mode, "level2_reload")
    assert f["bytes_offloaded"] == 0
    assert f["bytes_backed_up_asleep"] == 0
    assert f["freed_bytes"] >= 0.99 * f["tagged_bytes"], f
    assert f["wake_weights_tags"] == ["weights"]
    assert f["sleeping_after_weights_wake"] == ["kv_cache"]
    assert f["weights_zero_filled"], "discarded weights must come back zero-filled"
    assert f["pointers_equal"]
    assert f["outputs_equal"]
    assert not f["is_sleeping_at_end"]


@pytest.mark.parametrize("mode", MODES)
def test_wake_without_memory_raises_and_a_retry_restores(run_worker, mode):
    f = run_worker(mode, "wake_oom")
    assert f["first_wake"] == "OutOfMemoryError", f
    assert f["is_memory_error"]
    assert f["bytes_needed"] > f["bytes_free"]
    assert f["sleeping_after_failed_wake"] == ["kv_cache", "weights"]
    assert f["weights_backed_up_after_failed_wake"] > 0
    assert f["free_after_failed_wake"] >= f["free_with_hog"] - 256 * MiB, "the failed wake kept GPU memory"
    assert f["pointers_equal"]
    assert f["outputs_equal"]
    assert not f["is_sleeping_at_end"]


@pytest.mark.parametrize("mode", MODES)
def test_several_sleep_wake_cycles_with_inference(run_worker, mode):
    f = run_worker(mode, "cycles")
    assert len(f["cycles"]) == 6
    for cycle in f["cycles"]:
        assert cycle["freed_bytes"] >= 0.99 * f["tagged_bytes"], cycle
        assert cycle["pointers_equal"], cycle
        assert cycle["outputs_equal"], cycle


@pytest.mark.parametrize("mode", MODES)
def test_two_gpus(run_worker, mode):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    f = run_worker(mode, "two_gpus")
    for device, freed, size in zip(f["devices"], f["freed_bytes"], f["bytes_per_device"], strict=False):
        assert freed >= 0.99 * size, (device, freed, size)
    assert f["pointers_equal"] == [True, True]
    assert f["outputs_equal"] == [True, True]


@pytest.mark.parametrize("mode", MODES)
def test_allocation_beyond_the_card_raises(run_worker, mode):
    """PyTorch's CUDAPluggableAllocator does not check the pointer the entry point returns: in global
    mode a NULL from gpusleep_torch_malloc becomes a tensor at address 0 unless gpusleep reports the
    failure another way. Pool mode goes through PyTorch's caching allocator, which raises."""
    f = run_worker(mode, "oom")
    assert f["raised"], f"no exception: got a tensor at data_ptr {f.get('data_ptr'):#x}"
    assert f["is_memory_error"] or "memory" in f["message"].lower(), f
    assert f["healthy_after"]


@pytest.mark.parametrize("mode", MODES)
def test_weights_in_granularity_tails_come_back_bit_exact(run_worker, mode):
    f = run_worker(mode, "tails")
    assert f["pointers_equal"]
    assert all(f["bytes_equal"]), f


@pytest.mark.parametrize("mode", MODES)
def test_other_gpus_read_and_write_gpusleep_memory(run_worker, mode):
    f = run_worker(mode, "cross_device")
    if "skipped" in f:
        pytest.skip(f["skipped"])
    assert f["copy_before_sleep"]
    assert f["copy_after_wake"]


def test_using_cuda_1_leaves_cuda_0_without_a_context(run_worker):
    f = run_worker("none", "second_device_untouched")
    if "skipped" in f:
        pytest.skip(f["skipped"])
    assert not f["active_before"]
    assert not f["active_after"], "gpusleep created a context on a GPU it was not asked to use"


def test_out_of_memory_during_graph_capture_is_clear_and_keeps_the_cache(run_worker):
    f = run_worker("global", "capture_oom")
    assert f["raised"], f
    assert "capture" in f["message"].lower() or "memory" in f["message"].lower(), f
    assert f["cached_bytes_after"] == f["cached_bytes"], "cached segments were neither released nor orphaned"
    assert f["healthy_after"]


def test_sleep_waits_for_a_peer_gpu_still_reading_the_weights(run_worker):
    f = run_worker("pool", "peer_still_reading")
    if "skipped" in f:
        pytest.skip(f["skipped"])
    assert f["cuda1_granted"], "cuda:1 was in use when the weights were mapped"
    assert f["copy_enqueue_rc"] == 0
    assert "copy_error" not in f, f.get("copy_error")
    assert f["copy_correct"], "the peer's copy ran to the end before the unmap"
    assert f["bytes_release_pending"] == 0
    assert f["weights_after_wake"]


def test_only_peers_in_use_are_granted_access(run_worker):
    f = run_worker("none", "peer_grants")
    if "skipped" in f:
        pytest.skip(f["skipped"])
    if f["cuda1_active_before"]:
        pytest.skip("cuda:1's context was already active in the worker")
    assert f["access_before_use"] == [0, 0], "an idle peer gets no access (no page-table work on it)"
    if f["can_access_peer"]:
        assert f["refreshed_segments"] == 1
        assert f["access_after_refresh"] == [0, 3]
        assert f["access_after_wake"] == [0, 3]
    assert f["peer_grants_refused"] == 0


def test_a_wake_during_a_capture_gpusleep_never_saw_leaves_it_valid(run_worker):
    f = run_worker("pool", "wake_during_unseen_capture")
    if "skipped" in f:
        pytest.skip(f["skipped"])
    assert f.get("wake_ok"), f.get("wake_error")
    assert f.get("capture_ok"), f.get("capture_error")
    assert f["replay_correct"]
    assert f["weights_after_wake"]


# Shared CUDA graph pools in global mode (Note [Shared graph pools]): a fresh process, real torch.cuda.graph.
_SHARED_POOLS_SCRIPT = r"""
import gc, json, sys
import torch, gpusleep

alloc = gpusleep.Allocator()
torch.cuda.memory.change_current_allocator(alloc.pluggable())
alloc.set_policy("graphs", "offload")
weight = torch.randn(1024, 1024, device="cuda")
torch.cuda.synchronize()
MiB = 1 << 20
sizes = [256, 192, 128, 64]  # activation MiB per "batch size", largest first


inputs = []  # kept to the end: only graph memory is measured


def capture(pool, mib):
    g = torch.cuda.CUDAGraph()
    x = torch.ones(mib * MiB // 4, device="cuda")
    inputs.append(x)
    with torch.cuda.graph(g, pool=pool):
        y = (x * 2).sum() + weight.sum()  # x * 2: an activation freed inside the capture
    return g, x, y


def mapped():
    torch.cuda.synchronize()
    return sum(t.bytes_mapped for t in alloc.stats().tags.values())


facts = {}
base = mapped()
pool = torch.cuda.graph_pool_handle() if sys.argv[1] == "shared" else None
with alloc.tag("graphs"):
    graphs = [capture(pool, mib) for mib in sizes]
facts["graph_bytes"] = mapped() - base - sum(mib * MiB for mib in sizes)  # minus the inputs x
expected = [float(2 * mib * MiB // 4) + weight.sum().item() for mib in sizes]
for g, x, y in graphs:
    g.replay()
facts["replays_equal"] = all(abs(y.item() - e) <= 1e-3 * abs(e) for (g, x, y), e in zip(graphs, expected))
alloc.sleep(level=1)
alloc.wake_up()
for g, x, y in graphs:
    y.zero_()
    g.replay()
facts["replays_equal_after_wake"] = all(abs(y.item() - e) <= 1e-3 * abs(e) for (g, x, y), e in zip(graphs, expected))
del g, x, y  # the loop's names would keep the last graph and its output alive past graphs.clear()
before = mapped()
del graphs[:-1]
gc.collect()
torch.cuda.empty_cache()
facts["released_while_one_graph_lives"] = before - mapped()
graphs.clear()
gc.collect()
torch.cuda.empty_cache()
facts["released_after_last_graph"] = before - mapped()
print(json.dumps(facts))
"""


@pytest.mark.parametrize("pools", ["shared", "separate"])
def test_captures_into_one_graph_pool_share_its_memory_and_free_it_with_the_last_graph(pools):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "GPUSLEEP_CUDA_DRIVER"}
    out = subprocess.run(
        [sys.executable, "-c", _SHARED_POOLS_SCRIPT, pools], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    f = json.loads(out.stdout.strip().splitlines()[-1])
    assert f["replays_equal"] and f["replays_equal_after_wake"], f
    activations = [256 * MiB, 192 * MiB, 128 * MiB, 64 * MiB]
    if pools == "shared":
        assert f["graph_bytes"] <= max(activations) + 64 * MiB, f
        assert f["released_while_one_graph_lives"] < 64 * MiB, f
    else:
        assert f["graph_bytes"] >= sum(activations), f
        assert f["released_while_one_graph_lives"] >= sum(activations[:-1]), f
        # the last graph's own pool goes only with it
        assert f["released_after_last_graph"] - f["released_while_one_graph_lives"] >= activations[-1], f
    assert f["released_after_last_graph"] >= max(activations), f
