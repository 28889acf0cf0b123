"""Collective sleep and wake over torch.distributed: every rank or none (gpusleep.distributed).

Each test starts 2 or 3 processes on loopback, joined by a gloo process group; each loads the driver double
(its own devices, its own allocator) exactly as the conftest fixtures do, writes known bytes to its
"weights", runs one scenario and writes what it saw to a JSON file. Faults are injected on one rank only.
The parent kills every child still running after a bounded time, and every collective of the code under
test has a timeout, so no test can hang. This file is also the children's program (``__main__``).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("torch.distributed")

HERE = pathlib.Path(__file__).resolve().parents[1]  # tests/: the shared test modules
MiB = 1 << 20
WEIGHT_BYTES = 3 * MiB
KV_BYTES = 2 * MiB
COLLECTIVE_TIMEOUT_S = 4.0  # per exchange, in the children
CHILD_LIMIT_S = 60.0  # the parent kills the children after this


# ------------------------------------------------------------------------------------------------ parent
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(scenario: str, world: int, tmp_path: pathlib.Path, driver_path) -> dict[int, dict]:
    """Run ``scenario`` on ``world`` ranks; returns each rank's JSON record (ranks that wrote none are absent)."""
    port = _free_port()
    python_path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(HERE)) if p)
    env = dict(os.environ, GPUSLEEP_CUDA_DRIVER=str(driver_path), PYTHONPATH=python_path)
    logs = [open(tmp_path / f"rank{r}.log", "w") for r in range(world)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, scenario, str(r), str(world), str(port), str(tmp_path)],
            env=env,
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + CHILD_LIMIT_S
    try:
        for p in procs:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    hung = [r for r, p in enumerate(procs) if p.returncode == -9]
    output = "\n".join(
        f"--- rank {r} (exit {procs[r].returncode})\n" + (tmp_path / f"rank{r}.log").read_text()[-3000:]
        for r in range(world)
    )
    assert not hung, f"ranks {hung} still ran after {CHILD_LIMIT_S} s and were killed:\n{output}"
    records = {}
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        if path.exists():
            records[r] = json.loads(path.read_text())
    return records, output


@pytest.fixture
def ranks(tmp_path, fakecuda_driver):
    def run(scenario: str, world: int = 2):
        return run_ranks(scenario, world, tmp_path, fakecuda_driver.path)

    return run


@pytest.fixture(scope="module")
def consistent_runs(tmp_path_factory, fakecuda_driver):
    """The scenarios after which the group stays usable, run one after another in the same 2 processes
    (starting processes is what costs time): each rank's records by scenario name."""
    records, output = run_ranks("consistent", 2, tmp_path_factory.mktemp("consistent"), fakecuda_driver.path)
    assert sorted(records) == [0, 1], output

    def scenario(name: str):
        return {rank: rec[name] for rank, rec in records.items()}, output

    return scenario


@pytest.fixture(scope="module")
def nccl_world(tmp_path_factory, fakecuda_driver):
    """Two ranks whose default group looks like an NCCL-only world (tests/nccl_double.py): each rank's record."""
    records, output = run_ranks("nccl_world", 2, tmp_path_factory.mktemp("nccl_world"), fakecuda_driver.path)
    assert sorted(records) == [0, 1], output
    return records, output


def test_every_rank_sleeps_and_wakes_with_its_bytes_and_one_report_for_the_model(consistent_runs):
    records, output = consistent_runs("roundtrip")
    for _rank, rec in records.items():
        assert rec["asleep_after_sleep"] is True
        assert rec["used_after_sleep"] == 0, "every sleepable byte was released on every rank"
        assert rec["model_bytes_offloaded"] == 2 * WEIGHT_BYTES, "the report sums both ranks' offloads"
        assert rec["report_ranks"] == [0, 1]
        assert rec["asleep_after_wake"] is False
        assert rec["weights_intact"] is True
        assert rec["model_bytes_restored"] == 2 * WEIGHT_BYTES
        assert rec["slowest_rank"] in (0, 1) and f"slowest rank {rec['slowest_rank']}" in rec["summary"]


def test_a_pin_failure_on_one_rank_keeps_every_rank_awake_with_the_same_error(consistent_runs):
    records, output = consistent_runs("pin_failure")
    for _rank, rec in records.items():
        assert rec["error_type"] == "ModelHostOutOfMemoryError"
        assert rec["is_host_oom"] is True, "the HTTP control plane answers 507 for it"
        assert rec["failed_ranks"] == [1]
        assert "rank 1 (prepare): HostOutOfMemoryError" in rec["message"]
        assert rec["asleep"] is False and rec["weights_intact"] is True
        assert rec["retry_asleep"] is True, "once the host can pin, the same call succeeds"
    assert records[0]["message"] == records[1]["message"], "every rank raises the same error"


def test_ranks_on_one_node_that_together_need_more_host_memory_than_it_has_all_refuse_before_pinning(consistent_runs):
    records, output = consistent_runs("node_overcommit")
    for _rank, rec in records.items():
        assert rec.get("error_type") == "ModelHostOutOfMemoryError", output
        assert rec["is_host_oom"] is True, "the HTTP control plane answers 507 for it"
        assert rec["failed_ranks"] == [0, 1], "both ranks of the node refuse, though each alone would fit"
        assert "together need" in rec["message"]
        assert rec["bytes_needed"] == 2 * WEIGHT_BYTES, "the node's sum"
        assert rec["pin_calls"] == 0 and rec["bytes_pinned"] == 0, "nothing was pinned on any rank"
        assert rec["asleep"] is False and rec["weights_intact"] is True
        assert rec["asleep_with_room_for_both"] is True, "with room for the node's sum the same call succeeds"
    assert records[0]["message"] == records[1]["message"], "every rank raises the same error"


def test_a_wake_that_cannot_fit_on_one_rank_is_refused_before_any_rank_maps_memory(consistent_runs):
    records, output = consistent_runs("wake_oom")
    for _rank, rec in records.items():
        assert rec["error_type"] == "ModelOutOfMemoryError"
        assert rec["is_gpu_oom"] is True, "the HTTP control plane answers 409 for it"
        assert rec["failed_ranks"] == [1]
        assert rec["bytes_needed"] > rec["bytes_free"] >= 0
        assert "rank 1 (prepare): OutOfMemoryError" in rec["message"], "refused by the dry run (plan_wake)"
        assert rec["rolled_back_ranks"] == [], "no rank mapped anything, so nothing was rolled back"
        assert rec["inconsistent_ranks"] == []
        assert rec["asleep"] is True and rec["used_while_asleep"] == 0
        assert rec["retry_asleep"] is False and rec["weights_intact"] is True, "the retry restores every byte"
    assert records[0]["message"] == records[1]["message"]


def test_a_sleep_that_fails_on_one_rank_with_communicators_rolls_back_everywhere_without_a_hang(consistent_runs):
    records, output = consistent_runs("communicators")
    for _rank, rec in records.items():
        assert rec["error_type"] == "DistributedSleepError" and rec["failed_ranks"] == [1], output
        assert "rank 1 (commit)" in rec["message"]
        assert rec["rolled_back_ranks"] == [0] and rec["inconsistent_ranks"] == []
        assert rec["asleep"] is False and rec["weights_intact"] is True
        assert rec["calls"] == [[], []], "no rank touched a communicator: the allocators did not all sleep"
        assert rec["retry_asleep"] is True and rec["retry_suspended"] == [True, True]
        assert rec["woken_suspended"] == [False, False] and rec["woken_intact"] is True
        assert rec["final_calls"] == [["suspend", "resume"], ["suspend", "resume"]]
    assert records[0]["message"] == records[1]["message"]


def test_a_communicator_that_fails_to_suspend_is_reported_inconsistent_on_every_rank_not_resumed_alone(ranks):
    records, output = ranks("suspend_refused")
    assert sorted(records) == [0, 1], output
    for _rank, rec in records.items():
        assert rec["error_type"] == "CommunicatorsInconsistentError", output
        assert rec["is_distributed_sleep_error"] is True
        assert 1 in rec["failed_ranks"] and "ncclCommSuspend failed" in rec["message"]
        assert "rank 0 (suspend): TimeoutError" in rec["message"], "rank 0 waited at the barrier until its deadline"
        assert "abort" in rec["message"]
        assert rec["inconsistent_ranks"] == [0, 1], "the communicators' state is unknown on every rank"
        assert rec["calls"] == [["suspend"], ["suspend"]], "nothing was resumed, on any rank"
        assert rec["asleep"] is True, "every rank's allocator slept: that part is consistent and stays"
    assert records[0]["message"] == records[1]["message"], "every rank raises the same error"


def test_a_rank_that_dies_inside_the_suspend_leaves_the_others_unresponsive_not_frozen(ranks):
    records, output = ranks("dies_inside_suspend")
    assert sorted(records) == [0], f"rank 1 died on purpose; rank 0 must report:\n{output}"
    rec = records[0]
    assert rec["error_type"] == "RanksUnresponsiveError", output
    assert "suspend" in rec["message"] and "abort" in rec["message"]
    assert rec["inconsistent_ranks"] == [0]
    assert rec["calls"] == [["suspend"]], "rank 0 did not resume on its own"


def test_the_communicator_double_is_a_collective_like_nccl(consistent_runs):
    """The stand-in for ncclCommSuspend/ncclCommResume must be as strict as NCCL (tests/nccl_double.py)."""
    records, output = consistent_runs("nccl_double")
    assert records[0]["returned_before_rank_1_called"] is False, "a suspend waits for every rank"
    for rec in records.values():
        assert rec["suspended"] is True
        assert rec["suspend_twice_refused"] is True and rec["resume_awake_refused"] is True
        assert rec["resumed"] is True


def test_a_staged_wake_refused_on_one_rank_puts_back_only_the_stage_it_woke(consistent_runs):
    records, output = consistent_runs("staged_wake")
    for _rank, rec in records.items():
        assert rec["weights_awake_after_stage_1"] is True
        assert rec["error_type"] == "ModelOutOfMemoryError" and rec["failed_ranks"] == [1], output
        assert rec["rolled_back_ranks"] == [0]
        shared = [tag for tag in rec["sleeping_tags"] if tag != "lora"]  # "lora": rank 0's own tag (mismatched)
        assert shared == ["kv_cache"], "every rank as before the call: weights awake, KV cache asleep"
        assert rec["weights_intact_while_kv_asleep"] is True
        assert rec["used_while_asleep"] == fake_weight_bytes_mapped(), "only the weights are mapped"
        assert rec["weights_intact"] is True and rec["asleep_at_end"] is False


def fake_weight_bytes_mapped() -> int:
    """GPU bytes the weights map on the double: WEIGHT_BYTES rounded up to the 2 MiB granularity."""
    granularity = 2 * MiB
    return -(-WEIGHT_BYTES // granularity) * granularity


def test_a_rank_that_dies_during_the_wake_leaves_the_others_asleep_and_intact(ranks):
    records, output = ranks("dies_during_wake", world=3)
    assert sorted(records) == [0, 1], f"rank 2 died on purpose; 0 and 1 must report:\n{output}"
    for _rank, rec in records.items():
        assert rec["error_type"] == "RanksUnresponsiveError", output
        assert rec["asleep"] is True, "the ranks that woke put themselves back to sleep"
        assert rec["used_while_asleep"] == 0
        assert rec["weights_intact_after_local_wake"] is True


def test_a_rank_that_hangs_before_the_sleep_times_out_and_nobody_sleeps(ranks):
    records, output = ranks("hangs_before_sleep")
    assert sorted(records) == [0, 1], output
    assert records[0]["error_type"] == "RanksUnresponsiveError"
    assert records[0]["seconds"] < 3 * COLLECTIVE_TIMEOUT_S, "the waiting rank gives up after its timeout"
    assert records[1]["error_type"] in ("RanksUnresponsiveError", "DistributedSleepError")
    for rec in records.values():
        assert rec["asleep"] is False and rec["weights_intact"] is True


def test_ranks_asked_different_things_refuse_and_change_nothing(consistent_runs):
    records, output = consistent_runs("mismatched")
    for rec in records.values():
        assert rec["error_type"] == "DistributedSleepError"
        assert "asked different things" in rec["message"]
        assert rec["asleep"] is False
        assert rec["wake_vs_sleep_error_type"] == "DistributedSleepError", "one rank waking, the other sleeping"
        assert rec["asleep_after_wake_vs_sleep"] is False
        assert rec["unknown_tag_error"] == "InvalidModelRequestError" and rec["unknown_tag_is_value_error"] is True
        assert rec["unknown_tag_failed_ranks"] == [1], "only rank 1 does not know the tag"
        assert rec["asleep_after_unknown_tag"] is True
        # The refusal says where every rank really stands, and asks for a corrected call, not for memory.
        assert "nothing changed: rank(s) [0] asleep (" in rec["unknown_tag_message"], rec["unknown_tag_message"]
        assert "rank(s) [1] asleep (kv_cache, weights)" in rec["unknown_tag_message"], rec["unknown_tag_message"]
        assert "every rank is awake as before" in rec["unknown_tag_awake_message"], rec
        assert (
            "Correct the call" in rec["unknown_tag_awake_message"]
            and "free GPU" not in rec["unknown_tag_awake_message"]
        )
    assert records[0]["unknown_tag_message"] == records[1]["unknown_tag_message"], "the same error on every rank"


def test_an_nccl_group_is_refused_for_control_traffic_before_anything_changes(nccl_world):
    records, output = nccl_world
    for _rank, rec in records.items():
        assert rec["world_backend"] == "nccl" and rec["double_refuses_cpu_traffic"] is True, "the double is strict"
        assert rec["explicit_error_type"] == "ValueError", output
        assert "gloo" in rec["explicit_message"] and "NCCL" in rec["explicit_message"]
        assert rec["pin_calls_by_refusal"] == 0 and rec["groups_made_by_refusal"] == 0
        assert rec["asleep_after_refusal"] is False
        assert rec["http_side_error_type"] == "ValueError", "ModelSleepController and follow() refuse it too"


def test_group_none_on_an_nccl_world_runs_on_a_gloo_group_of_its_own_made_once_per_world(nccl_world):
    records, output = nccl_world
    for _rank, rec in records.items():
        assert rec.get("asleep_after_sleep") is True, output
        assert rec["groups_made"] == ["gloo"], "one gloo group for two sleeps and two wakes"
        assert rec["weights_intact"] is True
        assert rec["groups_made_in_new_world"] == ["gloo", "gloo"] and rec["new_world_group_is_new"] is True
        assert rec["asleep_in_new_world"] is True and rec["weights_intact_in_new_world"] is True


def test_http_on_rank_0_drives_the_model_and_the_gate_covers_every_rank(ranks):
    records, output = ranks("http")
    assert sorted(records) == [0, 1], output
    r0, r1 = records[0], records[1]
    assert r0["sleep_status"] == 200 and r0["is_sleeping_after_sleep"] is True
    assert r0["protected_status_while_asleep"] == 503
    assert r0["wake_status_with_rank1_short"] == 409, "rank 1 cannot wake: the whole model stays asleep"
    assert r0["is_sleeping_after_failed_wake"] is True
    assert r0["wake_status"] == 200 and r0["is_sleeping_after_wake"] is False
    assert r0["protected_status_awake"] == 200
    assert r0["weights_intact"] is True
    assert r1["followed_until_stop"] is True
    assert r1["asleep_at_end"] is False and r1["weights_intact"] is True
    assert r1["slept_while_following"] is True


# ------------------------------------------------------------------------------------------------ children
def _child(scenario: str, rank: int, world: int, port: int, out_dir: pathlib.Path) -> None:
    import threading
    from datetime import timedelta

    from fakecuda import harness
    from helpers import pattern
    from nccl_double import BarrierCommunicator, pretend_world_is_nccl

    fake = harness.FakeCuda(os.environ["GPUSLEEP_CUDA_DRIVER"])
    fake.configure(devices=1, capacity_bytes=256 * MiB, granularity_bytes=2 * MiB, seed=rank)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=2 * COLLECTIVE_TIMEOUT_S),
    )
    import gpusleep
    import gpusleep.distributed as gsd

    alloc = gpusleep.Allocator()
    weights = alloc.allocate(WEIGHT_BYTES, tag="weights")
    data = pattern(WEIGHT_BYTES, 100 + rank)
    fake.write(weights, data)
    alloc.allocate(KV_BYTES, tag="kv_cache")

    def intact() -> bool:
        return fake.read(weights, WEIGHT_BYTES) == data

    def record_error(rec: dict, error: BaseException) -> None:
        rec.update(
            error_type=type(error).__name__,
            message=str(error),
            failed_ranks=list(getattr(error, "failed_ranks", ())),
            rolled_back_ranks=list(getattr(error, "rolled_back_ranks", ())),
            inconsistent_ranks=list(getattr(error, "inconsistent_ranks", ())),
            is_gpu_oom=isinstance(error, gpusleep.OutOfMemoryError),
            is_host_oom=isinstance(error, gpusleep.HostOutOfMemoryError),
            bytes_needed=getattr(error, "bytes_needed", 0),
            bytes_free=getattr(error, "bytes_free", None),
        )

    t = COLLECTIVE_TIMEOUT_S

    def run(scenario: str, rec: dict) -> None:
        if scenario == "roundtrip":
            report = gsd.sleep(alloc, 1, timeout_seconds=t)
            rec.update(
                asleep_after_sleep=alloc.is_sleeping,
                used_after_sleep=fake.used_bytes(0),
                model_bytes_offloaded=report.bytes_offloaded,
                report_ranks=list(report.ranks),
                slowest_rank=report.slowest_rank,
                summary=report.summary(),
            )
            wake = gsd.wake_up(alloc, timeout_seconds=t)
            rec.update(
                asleep_after_wake=alloc.is_sleeping, weights_intact=intact(), model_bytes_restored=wake.bytes_restored
            )
        elif scenario == "pin_failure":
            alloc.release_host_memory()  # what an earlier sleep pinned is kept; this sleep has to pin again
            if rank == 1:
                for pin_call in ("cuMemHostAlloc", "cuMemHostRegister_v2"):  # plain or NUMA-placed pinning
                    fake.inject_fault(pin_call, nth=1, error=2)
            try:
                gsd.sleep(alloc, 1, timeout_seconds=t)
            except gsd.DistributedSleepError as error:
                record_error(rec, error)
            rec.update(asleep=alloc.is_sleeping, weights_intact=intact())
            fake.clear_faults()
            gsd.sleep(alloc, 1, timeout_seconds=t)
            rec.update(retry_asleep=alloc.is_sleeping)
            gsd.wake_up(alloc, timeout_seconds=t)
        elif scenario == "node_overcommit":  # both ranks on this machine; the host allows one backup, not two
            alloc.release_host_memory()  # nothing pinned: each rank's level-1 sleep must pin WEIGHT_BYTES
            meminfo, no_cgroup = out_dir / f"meminfo{rank}", out_dir / f"no-cgroup{rank}"
            no_cgroup.mkdir(exist_ok=True)
            os.environ.update(GPUSLEEP_PROC_MEMINFO=str(meminfo), GPUSLEEP_CGROUP_ROOT=str(no_cgroup))
            try:
                meminfo.write_text(f"MemAvailable: {(WEIGHT_BYTES * 3 // 2) // 1024} kB\n")  # 1.5 backups
                pins = lambda: fake.call_count("cuMemHostAlloc") + fake.call_count("cuMemHostRegister_v2")  # noqa: E731
                pins_before = pins()
                try:
                    gsd.sleep(alloc, 1, timeout_seconds=t)
                except gsd.DistributedSleepError as error:
                    record_error(rec, error)
                rec.update(
                    pin_calls=pins() - pins_before,
                    bytes_pinned=alloc.stats().host.bytes_pinned,
                    asleep=alloc.is_sleeping,
                    weights_intact=not alloc.is_sleeping and intact(),
                )
                if alloc.is_sleeping:
                    gsd.wake_up(alloc, timeout_seconds=t)
                meminfo.write_text(f"MemAvailable: {(WEIGHT_BYTES * 4) // 1024} kB\n")
                gsd.sleep(alloc, 1, timeout_seconds=t)
                rec.update(asleep_with_room_for_both=alloc.is_sleeping)
                gsd.wake_up(alloc, timeout_seconds=t)
            finally:
                del os.environ["GPUSLEEP_PROC_MEMINFO"], os.environ["GPUSLEEP_CGROUP_ROOT"]
        elif scenario == "wake_oom":
            gsd.sleep(alloc, 1, timeout_seconds=t)
            if rank == 1:  # another tenant takes rank 1's GPU
                fake.set_foreign_load(0, fake.free_bytes(0) - MiB)
            try:
                gsd.wake_up(alloc, timeout_seconds=t)
            except gsd.DistributedSleepError as error:
                record_error(rec, error)
            rec.update(asleep=alloc.is_sleeping, used_while_asleep=fake.used_bytes(0))
            fake.set_foreign_load(0, 0)
            gsd.wake_up(alloc, timeout_seconds=t)
            rec.update(retry_asleep=alloc.is_sleeping, weights_intact=intact())
        elif scenario == "dies_during_wake":
            gsd.sleep(alloc, 1, timeout_seconds=t)

            class CrashesAfterWaking:
                """Rank 2's allocator, seen by the protocol: the process dies right after it has woken."""

                def __getattr__(self, name):
                    return getattr(alloc, name)

                def wake_up(self, tags=None):
                    alloc.wake_up(tags)
                    os._exit(3)

            try:
                gsd.wake_up(CrashesAfterWaking() if rank == 2 else alloc, timeout_seconds=t)
            except gsd.DistributedSleepError as error:
                record_error(rec, error)
            rec.update(asleep=alloc.is_sleeping, used_while_asleep=fake.used_bytes(0))
            alloc.wake_up()
            rec.update(weights_intact_after_local_wake=intact())
        elif scenario == "hangs_before_sleep":
            if rank == 1:
                time.sleep(t + 2)  # stuck in a long request: joins after rank 0 gave up
            started = time.monotonic()
            try:
                gsd.sleep(alloc, 1, timeout_seconds=t)
            except gsd.DistributedSleepError as error:
                record_error(rec, error)
            rec.update(seconds=time.monotonic() - started, asleep=alloc.is_sleeping, weights_intact=intact())
        elif scenario == "mismatched":
            try:
                gsd.sleep(alloc, 1 + rank, timeout_seconds=t)
            except gsd.DistributedSleepError as error:
                record_error(rec, error)
            rec.update(asleep=alloc.is_sleeping)
            try:
                if rank == 0:
                    gsd.wake_up(alloc, timeout_seconds=t)
                else:
                    gsd.sleep(alloc, 1, timeout_seconds=t)
            except gsd.DistributedSleepError as error:
                rec.update(wake_vs_sleep_error_type=type(error).__name__)
            rec.update(asleep_after_wake_vs_sleep=alloc.is_sleeping)
            if rank == 0:
                alloc.set_policy("lora", "offload")  # a tag only rank 0 knows
            gsd.sleep(alloc, 1, timeout_seconds=t)
            try:
                gsd.wake_up(alloc, ["weights", "lora"], timeout_seconds=t)
            except gsd.DistributedSleepError as error:
                rec.update(
                    unknown_tag_error=type(error).__name__,
                    unknown_tag_is_value_error=isinstance(error, ValueError),
                    unknown_tag_failed_ranks=list(error.failed_ranks),
                    unknown_tag_message=str(error),
                )
            rec.update(asleep_after_unknown_tag=alloc.is_sleeping)
            gsd.wake_up(alloc, timeout_seconds=t)
            try:  # the same unknown tag on the awake model: the error must not say it is asleep
                gsd.wake_up(alloc, ["lora"], timeout_seconds=t)
            except gsd.DistributedSleepError as error:
                rec.update(unknown_tag_awake_message=str(error))
        elif scenario == "communicators":  # rank 1's allocator cannot sleep: nobody may enter a suspend
            store = dist.distributed_c10d._get_default_store()
            comms = [BarrierCommunicator(f"{scenario}/{i}", store, rank, world) for i in range(2)]
            if rank == 1:
                fake.inject_fault("cuMemcpyDtoHAsync_v2", nth=2, error=999)  # 1: the chunk hash sums
            try:
                gsd.sleep(alloc, 1, timeout_seconds=t, communicators=comms)
            except gsd.DistributedSleepError as error:
                record_error(rec, error)
            fake.clear_faults()
            rec.update(asleep=alloc.is_sleeping, weights_intact=intact(), calls=[list(c.calls) for c in comms])
            gsd.sleep(alloc, 1, timeout_seconds=t, communicators=comms)
            rec.update(retry_asleep=alloc.is_sleeping, retry_suspended=[c.suspended for c in comms])
            gsd.wake_up(alloc, timeout_seconds=t, communicators=comms)
            rec.update(
                woken_suspended=[c.suspended for c in comms],
                woken_intact=intact(),
                final_calls=[list(c.calls) for c in comms],
            )
        elif scenario in ("suspend_refused", "dies_inside_suspend"):
            store = dist.distributed_c10d._get_default_store()

            def refuse(kind: str) -> None:  # a local check fails: this rank never joins the barrier
                raise RuntimeError(f"ncclCommSuspend failed: ncclInternalError (rank {rank})")

            def die(kind: str) -> None:
                os._exit(3)

            fault = {"suspend_refused": refuse, "dies_inside_suspend": die}[scenario]
            names = ("a", "b") if scenario == "suspend_refused" else ("a",)
            comms = [
                BarrierCommunicator(
                    f"{scenario}/{n}",
                    store,
                    rank,
                    world,
                    before_barrier=fault if rank == 1 and n == names[-1] else None,
                )
                for n in names
            ]
            try:
                gsd.sleep(alloc, 1, timeout_seconds=t, communicators=comms, communicator_timeout_seconds=1.0)
            except gsd.DistributedSleepError as error:
                record_error(rec, error)
                rec["is_distributed_sleep_error"] = True
            rec.update(asleep=alloc.is_sleeping, calls=[list(c.calls) for c in comms])
        elif scenario == "staged_wake":
            gsd.sleep(alloc, 1, timeout_seconds=t)
            gsd.wake_up(alloc, ["weights"], timeout_seconds=t)  # stage 1 everywhere
            rec.update(weights_awake_after_stage_1=not {"weights"} & alloc.sleeping_tags)
            if rank == 1:  # the dry run passes, then another tenant wins the race: rank 1's cuMemCreate fails
                fake.inject_fault("cuMemCreate", nth=1, error=2)
            try:
                gsd.wake_up(alloc, ["kv_cache"], timeout_seconds=t)
            except gsd.DistributedSleepError as error:
                record_error(rec, error)
            rec.update(
                sleeping_tags=sorted(alloc.sleeping_tags),
                used_while_asleep=fake.used_bytes(0),
                weights_intact_while_kv_asleep=intact(),
            )
            fake.clear_faults()
            gsd.wake_up(alloc, timeout_seconds=t)
            rec.update(weights_intact=intact(), asleep_at_end=alloc.is_sleeping)
        elif scenario == "nccl_double":
            store = dist.distributed_c10d._get_default_store()
            comm = BarrierCommunicator("strict", store, rank, world)
            if rank == 0:
                thread = threading.Thread(target=comm.suspend)
                thread.start()
                while comm.arrived(0) < 1:  # rank 0 waits at the barrier; rank 1 has not called yet
                    time.sleep(0.005)
                rec["returned_before_rank_1_called"] = not thread.is_alive()
                store.set("strict/checked", "1")
                thread.join()
            else:
                store.wait(["strict/checked"])
                comm.suspend()
            rec["suspended"] = comm.suspended
            try:
                comm.suspend()
            except RuntimeError:
                rec["suspend_twice_refused"] = True
            comm.resume()
            rec["resumed"] = not comm.suspended
            try:
                comm.resume()
            except RuntimeError:
                rec["resume_awake_refused"] = True
        elif scenario == "consistent":  # the scenarios that leave the group usable, in one pair of processes
            for name in (
                "nccl_double",
                "roundtrip",
                "pin_failure",
                "node_overcommit",
                "mismatched",
                "wake_oom",
                "communicators",
                "staged_wake",
            ):
                rec[name] = {}
                run(name, rec[name])
        elif scenario == "nccl_world":
            import torch

            nccl = pretend_world_is_nccl(dist)
            rec["world_backend"] = dist.get_backend()
            try:
                dist.all_gather([torch.zeros(1) for _ in range(world)], torch.zeros(1))
            except RuntimeError:
                rec["double_refuses_cpu_traffic"] = True
            pins = lambda: fake.call_count("cuMemHostAlloc") + fake.call_count("cuMemHostRegister_v2")  # noqa: E731
            alloc.release_host_memory()
            pins_before = pins()
            try:
                gsd.sleep(alloc, 1, group=dist.group.WORLD, timeout_seconds=t)
            except Exception as error:  # noqa: BLE001 - the type is what the test checks
                rec.update(explicit_error_type=type(error).__name__, explicit_message=str(error))
            rec.update(
                pin_calls_by_refusal=pins() - pins_before,
                groups_made_by_refusal=len(nccl.new_groups),
                asleep_after_refusal=alloc.is_sleeping,
            )
            try:
                if rank == 0:
                    gsd.ModelSleepController(alloc, group=dist.group.WORLD, timeout_seconds=t)
                else:
                    gsd.follow(alloc, group=dist.group.WORLD, timeout_seconds=t)
            except Exception as error:  # noqa: BLE001
                rec["http_side_error_type"] = type(error).__name__
            if rec.get("explicit_error_type") != "ValueError" or rec.get("http_side_error_type") != "ValueError":
                return  # the old code may have left the ranks out of step: the record says why
            for _ in range(2):
                gsd.sleep(alloc, 1, timeout_seconds=t)
                rec["asleep_after_sleep"] = alloc.is_sleeping
                gsd.wake_up(alloc, timeout_seconds=t)
            rec.update(groups_made=[backend for backend, _ in nccl.new_groups], weights_intact=intact())
            dist.destroy_process_group()  # a new world gets a control group of its own
            dist.init_process_group(
                "gloo",
                init_method=f"file://{out_dir}/world2",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=2 * COLLECTIVE_TIMEOUT_S),
            )
            gsd.sleep(alloc, 1, timeout_seconds=t)
            rec["asleep_in_new_world"] = alloc.is_sleeping
            gsd.wake_up(alloc, timeout_seconds=t)
            rec.update(
                groups_made_in_new_world=[backend for backend, _ in nccl.new_groups],
                new_world_group_is_new=nccl.new_groups[-1][1] is not nccl.new_groups[0][1],
                weights_intact_in_new_world=intact(),
            )
        elif scenario == "http":
            _http_child(rank, alloc, fake, gsd, rec, intact)
        else:
            raise SystemExit(f"unknown scenario {scenario!r}")

    rec: dict = {}
    run(scenario, rec)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(rec))
    dist.destroy_process_group()


def _http_child(rank, alloc, fake, gsd, rec, intact) -> None:
    t = COLLECTIVE_TIMEOUT_S
    if rank != 0:
        original_sleep = alloc.sleep
        slept = []

        class Watched:
            def __getattr__(self, name):
                return getattr(alloc, name)

            def sleep(self, level=1, offload_tags=None):
                slept.append(level)
                return original_sleep(level=level, offload_tags=offload_tags)

            def wake_up(self, tags=None):
                if not rec.get("refused_once"):  # the first wake finds the GPU taken by another tenant
                    rec["refused_once"] = True
                    fake.set_foreign_load(0, fake.free_bytes(0) - MiB)
                    try:
                        return alloc.wake_up(tags)
                    finally:
                        fake.set_foreign_load(0, 0)
                return alloc.wake_up(tags)

        gsd.follow(Watched(), timeout_seconds=t, heartbeat_seconds=1.0)
        rec.update(
            followed_until_stop=True,
            asleep_at_end=alloc.is_sleeping,
            weights_intact=intact(),
            slept_while_following=bool(slept),
        )
        return

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    import gpusleep.server

    app = FastAPI()

    @app.post("/v1/completions")
    def completions():
        return {"ok": True}

    controller = gsd.ModelSleepController(alloc, timeout_seconds=t, heartbeat_seconds=1.0)
    gpusleep.server.install(app, controller)
    with TestClient(app) as client:
        rec["sleep_status"] = client.post("/sleep?level=1").status_code
        rec["is_sleeping_after_sleep"] = client.get("/is_sleeping").json()["is_sleeping"]
        rec["protected_status_while_asleep"] = client.post("/v1/completions", json={}).status_code
        time.sleep(2.5)  # idle: heartbeats keep the followers from timing out
        rec["wake_status_with_rank1_short"] = client.post("/wake_up").status_code
        rec["is_sleeping_after_failed_wake"] = client.get("/is_sleeping").json()["is_sleeping"]
        rec["wake_status"] = client.post("/wake_up").status_code
        rec["is_sleeping_after_wake"] = client.get("/is_sleeping").json()["is_sleeping"]
        rec["protected_status_awake"] = client.post("/v1/completions", json={}).status_code
    controller.close()
    rec["weights_intact"] = intact()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), pathlib.Path(sys.argv[5]))
